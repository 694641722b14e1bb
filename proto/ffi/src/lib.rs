//! libportmux: the C ABI over the client crate, for services in any language.
//!
//! Everything that touches a raw pointer or exports a symbol is in [`sys`];
//! the rest (error codes and messages, connection info) is safe code.
#![deny(unsafe_code)]
// The C names are the API: portmux_listener, portmux_conn_info.
#![allow(non_camel_case_types)]

mod error;
mod info;
#[allow(unsafe_code)]
mod sys;

pub use error::*;
pub use info::*;
pub use sys::*;
