//! The only place with `unsafe`: socket calls and custom io_uring operations.
#![allow(unsafe_code)]

pub mod net;
pub mod reactor;
pub mod uring;
