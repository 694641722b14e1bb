//! Datagrams with file descriptors attached (SCM_RIGHTS), in both directions:
//! the one implementation the daemon, the client library, libportmux and the
//! tests share. Fds are received close-on-exec (`MSG_CMSG_CLOEXEC`), and a
//! control message the kernel had to cut (`MSG_CTRUNC`: the receiver is out of
//! fds) is reported, never silently lost.

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, SocketAddrUnix,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Most fds one message carries (a paused relay carries two, the kernel
/// relay's maps five).
pub const MAX_FDS: usize = 8;

/// Whether a call may block (on a blocking socket) or returns `WouldBlock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// As the socket's mode says (blocking sockets block).
    Block,
    /// Never blocks (`MSG_DONTWAIT`).
    DontWait,
}

impl Wait {
    fn send_flags(self) -> SendFlags {
        match self {
            Wait::Block => SendFlags::NOSIGNAL,
            Wait::DontWait => SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
        }
    }

    fn recv_flags(self) -> RecvFlags {
        match self {
            Wait::Block => RecvFlags::empty(),
            Wait::DontWait => RecvFlags::DONTWAIT,
        }
    }
}

fn control_for<'a>(
    space: &'a mut [MaybeUninit<u8>],
    fds: &'a [BorrowedFd<'a>],
) -> io::Result<SendAncillaryBuffer<'a, 'a, 'a>> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds in one message; at most {MAX_FDS}", fds.len()),
        ));
    }
    let mut control = SendAncillaryBuffer::new(space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("control buffer too small for the fds"));
    }
    Ok(control)
}

/// Sends one datagram carrying `fds` (none to [`MAX_FDS`]) on a connected
/// `SOCK_SEQPACKET` socket. Never raises SIGPIPE.
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>], wait: Wait) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = control_for(&mut space, fds)?;
    let n = rustix::net::sendmsg(sock, &[IoSlice::new(bytes)], &mut control, wait.send_flags())?;
    if n != bytes.len() {
        // SOCK_SEQPACKET sends whole datagrams or nothing.
        return Err(io::Error::other(format!("short datagram send: {n} of {}", bytes.len())));
    }
    Ok(())
}

/// Sends one datagram without fds.
pub fn send_datagram(sock: BorrowedFd<'_>, bytes: &[u8], wait: Wait) -> io::Result<()> {
    send_with_fds(sock, bytes, &[], wait)
}

/// Sends one datagram carrying `fds` from an unbound `SOCK_DGRAM` socket to
/// `addr` (systemd's `$NOTIFY_SOCKET`, which takes fds for its fd store).
pub fn send_to_with_fds(
    sock: BorrowedFd<'_>,
    addr: &SocketAddrUnix,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = control_for(&mut space, fds)?;
    rustix::net::sendmsg_addr(sock, addr, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// One received datagram.
#[derive(Debug)]
pub struct Datagram {
    /// Bytes in the datagram (may exceed the buffer when `truncated`).
    pub len: usize,
    /// The datagram was larger than the buffer.
    pub truncated: bool,
    /// Fds that came with it, close-on-exec (closed when dropped).
    pub fds: Vec<OwnedFd>,
    /// The kernel discarded some of its fds (`MSG_CTRUNC`): this process is
    /// out of file descriptors, or the sender sent more than [`MAX_FDS`].
    pub fds_truncated: bool,
}

impl Datagram {
    /// End of file: the peer closed its end (an empty datagram without fds).
    pub fn is_eof(&self) -> bool {
        self.len == 0 && self.fds.is_empty() && !self.fds_truncated
    }
}

/// Receives one datagram and the fds that came with it.
pub fn recv_with_fds(sock: impl AsFd, buf: &mut [u8], wait: Wait) -> io::Result<Datagram> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        wait.recv_flags() | RecvFlags::CMSG_CLOEXEC | RecvFlags::TRUNC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = m {
            fds.extend(received);
        }
    }
    Ok(Datagram {
        len: msg.bytes,
        truncated: msg.flags.contains(ReturnFlags::TRUNC),
        fds,
        fds_truncated: msg.flags.contains(ReturnFlags::CTRUNC),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{AddressFamily, SocketFlags, SocketType};

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap()
    }

    #[test]
    fn fds_travel_with_their_datagram_close_on_exec() {
        let (a, b) = pair();
        let (x, _y) = pair();
        send_with_fds(a.as_fd(), b"one", &[x.as_fd(), x.as_fd()], Wait::DontWait).unwrap();
        send_datagram(a.as_fd(), b"two", Wait::DontWait).unwrap();
        let mut buf = [0u8; 16];
        let first = recv_with_fds(&b, &mut buf, Wait::DontWait).unwrap();
        assert_eq!(
            (&buf[..first.len], first.fds.len(), first.truncated, first.fds_truncated),
            (&b"one"[..], 2, false, false)
        );
        let flags = rustix::io::fcntl_getfd(&first.fds[0]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC), "received fds are close-on-exec");
        let second = recv_with_fds(&b, &mut buf, Wait::DontWait).unwrap();
        assert_eq!((&buf[..second.len], second.fds.len()), (&b"two"[..], 0));
        let err = recv_with_fds(&b, &mut buf, Wait::DontWait).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert!(recv_with_fds(&b, &mut buf, Wait::DontWait).unwrap().is_eof());
    }

    #[test]
    fn oversized_datagrams_and_too_many_fds_are_reported() {
        let (a, b) = pair();
        send_datagram(a.as_fd(), &[7u8; 32], Wait::DontWait).unwrap();
        let mut small = [0u8; 8];
        let d = recv_with_fds(&b, &mut small, Wait::DontWait).unwrap();
        assert!(d.truncated && d.len == 32, "{d:?}");
        let fds = [a.as_fd(); MAX_FDS + 1];
        let err = send_with_fds(a.as_fd(), b"x", &fds, Wait::DontWait).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
