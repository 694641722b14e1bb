//! The handover socket between the old and the new process: one message per
//! `SOCK_SEQPACKET` datagram, the fds it describes attached.

use portmux_sys::{net, reactor, scm};
use portmux_wire::Handover;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Zeroes the secrets a message carries (ticket keys, a service's private
/// key), once it is sent.
pub fn zero_secrets(msg: &mut Handover) {
    use zeroize::Zeroize;
    match msg {
        Handover::TicketKeys { keys, .. } => keys.iter_mut().for_each(Zeroize::zeroize),
        Handover::ServiceCert { key, .. } => key.zeroize(),
        _ => {}
    }
}

/// The handover socket.
#[derive(Debug)]
pub struct Channel {
    sock: AsyncFd<OwnedFd>,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> io::Result<Channel> {
        net::set_nonblocking(fd.as_fd(), true)?;
        Ok(Channel { sock: reactor::register(fd, Interest::READABLE | Interest::WRITABLE)? })
    }

    /// Sends `msg` with `fds` attached (the kernel gives the other process its
    /// own copies; the caller's stay the caller's).
    pub async fn send(&self, msg: &Handover, fds: &[OwnedFd]) -> io::Result<()> {
        // Zeroed when dropped: ticket keys and services' keys travel this way.
        let bytes = zeroize::Zeroizing::new(portmux_wire::encode(msg).map_err(io::Error::other)?);
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        self.sock
            .async_io(Interest::WRITABLE, |s| scm::send_with_fds(s.as_fd(), &bytes, &borrowed, scm::Wait::DontWait))
            .await
    }

    /// The next message and its fds; `None` when the other process is gone.
    pub async fn recv(&self) -> io::Result<Option<(Handover, Vec<OwnedFd>)>> {
        let mut buf = zeroize::Zeroizing::new(vec![0u8; portmux_wire::MAX_MESSAGE]);
        let dg =
            self.sock.async_io(Interest::READABLE, |s| scm::recv_with_fds(s, &mut buf, scm::Wait::DontWait)).await?;
        if dg.is_eof() {
            return Ok(None);
        }
        if dg.truncated || dg.fds_truncated {
            return Err(io::Error::other("truncated handover message (is this process out of file descriptors?)"));
        }
        let msg = portmux_wire::decode(&buf[..dg.len]).map_err(io::Error::other)?;
        Ok(Some((msg, dg.fds)))
    }
}
