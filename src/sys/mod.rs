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

/// Raises the soft limit on open files to the hard limit, as a proxy that
/// holds two fds per relayed connection must (systemd starts services with a
/// soft limit of 1024 and a hard limit of 524288). Returns (before, after).
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let before = limit.current.unwrap_or(u64::MAX);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok((before, limit.current.unwrap_or(u64::MAX)))
}
