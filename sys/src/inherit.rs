//! File descriptors a process inherits by number: an upgrade's handover socket
//! (named by an environment variable) and systemd's `LISTEN_FDS`. Each number
//! is taken once, at start-up, and the variable naming it is removed, so no
//! child inherits it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: i32 = 3;

/// Reads and removes an environment variable meant for this process only.
///
/// Call it at start-up, before this process starts a thread: the environment
/// is not synchronised.
pub fn take_env(name: &str) -> Option<OsString> {
    let value = std::env::var_os(name)?;
    // SAFETY: documented above: called at start-up, before any other thread
    // exists, so nothing reads the environment concurrently.
    unsafe { std::env::remove_var(name) };
    Some(value)
}

/// Takes ownership of the fd numbered `raw`, passed by the parent process.
/// Refuses numbers below 3 and numbers that are not open; makes the fd
/// close-on-exec.
///
/// # Safety
/// `raw` must be an fd that this process was given to own (inherited from
/// its parent for this purpose) and that nothing else in the process owns or
/// will take ownership of: the returned `OwnedFd` closes it when dropped.
pub unsafe fn adopt(raw: i32) -> io::Result<OwnedFd> {
    if raw < 3 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {raw} is not an inherited fd")));
    }
    // SAFETY: a borrow only for the check below; ownership is taken after it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    rustix::io::fcntl_getfd(borrowed).map_err(|e| io::Error::new(e.kind(), format!("fd {raw} is not open")))?;
    // SAFETY: the fd is open, and the caller guarantees it is ours to own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)?;
    Ok(fd)
}

/// The socket whose number the environment variable `name` gives (an
/// upgrade's handover socket), taking the variable out of the environment.
/// `Ok(None)` when the variable is not set. Call it once, at start-up.
pub fn socket_from_env(name: &str) -> io::Result<Option<OwnedFd>> {
    let Some(value) = take_env(name) else { return Ok(None) };
    let raw: i32 = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is not a number")))?;
    // SAFETY: the parent process named this fd in a variable meant for this
    // process alone, which `take_env` has just removed: the number is taken
    // once, and nothing else in this process knows it.
    let fd = unsafe { adopt(raw) }?;
    rustix::net::sockopt::socket_type(&fd)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("fd {raw} is not a socket")))?;
    Ok(Some(fd))
}

/// An fd passed by systemd, with its `LISTEN_FDNAMES` name ("" if none).
#[derive(Debug)]
pub struct Passed {
    pub fd: OwnedFd,
    pub name: String,
}

impl AsFd for Passed {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The fds systemd passed to this process (`LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`, as `sd_listen_fds_with_names` reads them), taking the
/// variables out of the environment. Empty when they are not set or name
/// another process. Call it once, at start-up.
pub fn listen_fds() -> io::Result<Vec<Passed>> {
    let pid = take_env("LISTEN_PID");
    let count = take_env("LISTEN_FDS");
    let names = take_env("LISTEN_FDNAMES");
    let (Some(pid), Some(count)) = (pid, count) else { return Ok(Vec::new()) };
    if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let count: i32 = count
        .to_str()
        .and_then(|c| c.parse().ok())
        .filter(|c| (0..=65536).contains(c))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "LISTEN_FDS is not a number"))?;
    let names: Vec<String> =
        names.map(|n| n.to_string_lossy().split(':').map(String::from).collect()).unwrap_or_default();
    let mut passed = Vec::new();
    for i in 0..count {
        // SAFETY: systemd passed fds LISTEN_FDS_START.. to this process
        // (LISTEN_PID names it) for it to own; the variables are removed, so
        // each number is taken once.
        let fd =
            unsafe { adopt(LISTEN_FDS_START + i) }.map_err(|e| io::Error::new(e.kind(), format!("LISTEN_FDS: {e}")))?;
        passed.push(Passed { fd, name: names.get(i as usize).cloned().unwrap_or_default() });
    }
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adopting_refuses_the_standard_streams_and_closed_numbers() {
        // SAFETY: both calls are refused before anything is adopted.
        let low = unsafe { adopt(1) }.unwrap_err();
        assert_eq!(low.kind(), io::ErrorKind::InvalidInput);
        // SAFETY: as above: an fd number far above anything open here.
        let closed = unsafe { adopt(1 << 20) }.unwrap_err();
        assert!(closed.to_string().contains("is not open"), "{closed}");
    }
}
