//! Listening sockets portmux lends to the sessions of a `?lend` route: the
//! service accepts from them itself, as a server on its own port does, while
//! connections portmux accepted before the loan still come over the session.
//! The socket is non-blocking (portmux made it so), so an acceptor that finds
//! nothing (another instance took it) simply waits again. The copy is closed
//! before the session drains or ends, and when it is lost: portmux then
//! accepts for the route again, and what waits in the kernel is not lost.

use crate::ConnInfo;
use portmux_wire::spec::{RouteSpec, Scheme};
use portmux_wire::{ConnMeta, Proto};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Connections taken from lent sockets in a row before the session is
/// looked at again: the connections portmux queued (and handed over before
/// the loan) and its messages are not starved by a busy port.
pub(crate) const STREAK: u32 = 16;

/// Whether `err`, from [`Loan::try_accept`], says the socket listens no
/// more (portmux shut it down as its route went): the loan is over.
pub(crate) fn revoked(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::InvalidInput
}

/// One lent listening socket, held as `F` (the fd, or the fd registered
/// with tokio's reactor).
#[derive(Debug)]
pub(crate) struct Loan<F = OwnedFd> {
    fd: F,
    route: String,
    proto: Proto,
    /// The address it listens on, if it names one (not a wildcard): each
    /// connection's own local address then.
    local: Option<SocketAddr>,
}

impl Loan {
    pub(crate) fn new(fd: OwnedFd, route: String, listen: SocketAddr) -> Loan {
        let proto = match RouteSpec::parse(&route).map(|s| s.scheme) {
            Ok(Scheme::Http) => Proto::Http,
            Ok(Scheme::Tls | Scheme::Https) => Proto::Tls,
            _ => Proto::Tcp,
        };
        Loan { fd, route, proto, local: Some(listen).filter(|a| !a.ip().is_unspecified()) }
    }

    /// The same loan, its fd held as `wrap` makes it.
    #[cfg(feature = "tokio")]
    pub(crate) fn wrap<G>(self, wrap: impl FnOnce(OwnedFd) -> io::Result<G>) -> io::Result<Loan<G>> {
        Ok(Loan { fd: wrap(self.fd)?, route: self.route, proto: self.proto, local: self.local })
    }
}

impl<F: AsFd> Loan<F> {
    /// The route it was lent for: a second loan for it replaces the first
    /// (portmux lends again after an upgrade).
    pub(crate) fn route(&self) -> &str {
        &self.route
    }

    /// How the fd is held.
    #[cfg(feature = "tokio")]
    pub(crate) fn held(&self) -> &F {
        &self.fd
    }

    /// The connection waiting, if one is: the stream (in the mode asked
    /// for) and what is known of it (no peek: its Host, SNI and path are
    /// the service's to read).
    pub(crate) fn try_accept(&self, nonblocking: bool) -> io::Result<Option<(TcpStream, ConnInfo)>> {
        loop {
            let Some((fd, peer)) = portmux_sys::net::accept_waiting(self.fd.as_fd(), nonblocking)? else {
                return Ok(None);
            };
            let local = match self.local {
                Some(local) => local,
                // Gone already (reset before this): the next one.
                None => match portmux_sys::net::local_addr(fd.as_fd()) {
                    Ok(local) => local,
                    Err(_) => continue,
                },
            };
            let meta = ConnMeta::unpeeked(self.route.clone(), self.proto, peer, local);
            return Ok(Some((TcpStream::from(fd), ConnInfo { id: 0, meta, tls: None })));
        }
    }
}

impl<F: AsFd> AsFd for Loan<F> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
