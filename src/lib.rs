//! portmux: many services share ports 80/443 on one host, claim routes on
//! demand over a control socket, and receive their client connections' fds;
//! neither portmux nor the services drop a connection when they restart.
//!
//! See `docs/ARCHITECTURE.md` for how the pieces fit.
#![forbid(unsafe_code)]

pub mod accept;
pub mod admin;
pub mod classify;
pub mod config;
pub mod control;
pub mod forward;
pub mod handoff;
pub mod reply;
pub mod route;
pub mod runtime;
pub mod systemd;
pub mod upgrade;
