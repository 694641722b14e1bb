//! The only place with `unsafe`: socket calls and custom io_uring operations.
#![allow(unsafe_code)]

pub mod net;
pub mod reactor;
pub mod uring;

/// Reads and removes an environment variable (one meant for this process
/// only, such as an inherited fd's number), so no child inherits it.
pub fn take_env(name: &str) -> Option<std::ffi::OsString> {
    let value = std::env::var_os(name)?;
    // SAFETY: called at start-up, before this process starts any thread, so
    // nothing reads the environment concurrently.
    unsafe { std::env::remove_var(name) };
    Some(value)
}
