//! Registering fds with tokio's reactor (epoll), for long waits: the control
//! socket, each session's socket, relays' sockets; in the client, its session socket.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Values whose `as_raw_fd()` names the same open file for as long as they live.
///
/// # Safety
/// Implementors must keep the fd open, and never replace it, until dropped.
pub unsafe trait StableFd: AsRawFd {}

// SAFETY: an OwnedFd owns its fd and closes it only when dropped.
unsafe impl StableFd for OwnedFd {}
// SAFETY: an Arc points to the same value, with the same fd, for its whole life.
unsafe impl<T: StableFd> StableFd for Arc<T> {}

/// Registers `inner` with the current runtime's reactor.
pub fn register<T: StableFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: StableFd guarantees the fd stays open and unchanged for the life
    // of `inner`, which the AsyncFd owns.
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(|e| e.into_parts().1)
}
