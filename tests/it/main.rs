//! Integration tests: the real `portmux` binary with real services, real
//! sockets and real TLS, driven the way users drive them.
#![forbid(unsafe_code)]

mod acks;
mod acme;
mod config;
mod direct;
mod engine;
mod ffi;
mod forward;
mod graceful;
mod lend;
mod limits;
mod ops;
mod peek;
mod protocol;
mod relay;
mod restart;
mod security;
mod systemd;
mod tls;
mod upgrade;
mod util;
mod walkthrough;
