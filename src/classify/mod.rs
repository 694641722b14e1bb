//! Looks at a new connection's first bytes without consuming them, under an
//! absolute deadline and a byte cap, and says what they are.

pub mod http;
pub mod tls;

use portmux_sys::{net, uring};
use std::io;
use std::os::fd::BorrowedFd;
use tokio::time::Instant;

/// Result of a pure parser that was given too few bytes, or bad ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// A longer prefix of the same stream could still parse.
    Incomplete,
    /// No continuation can make this valid; the text says why.
    Invalid(&'static str),
}

/// What the port routes, hence what is worth parsing.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    pub tls: bool,
    pub http: bool,
}

/// What the first bytes turned out to be.
#[derive(Debug)]
pub enum Peeked {
    Tls(tls::ClientHello),
    Http(http::RequestHead),
    /// Bytes the port has no parser for (`tls`: they start like a TLS record).
    Other {
        tls: bool,
    },
    /// Malformed for the protocol they start like.
    Invalid {
        tls: bool,
        reason: &'static str,
    },
    /// Still incomplete at the byte cap.
    TooLarge {
        tls: bool,
    },
    /// The deadline passed first.
    TimedOut,
    /// The client closed its side before a complete head arrived.
    HungUp,
    /// The socket failed.
    Failed(io::Error),
}

/// A classification and how many bytes it looked at (all still unread).
#[derive(Debug)]
pub struct Peek {
    pub outcome: Peeked,
    pub bytes: usize,
}

/// Most heads fit; the buffer doubles up to the cap only when they do not.
const INITIAL_BUFFER: usize = 2048;

/// Restores `SO_RCVLOWAT` to 1 before the fd moves on (to a service or a relay).
struct LowWater<'a> {
    fd: BorrowedFd<'a>,
    raised: bool,
}

impl LowWater<'_> {
    fn wait_for_more_than(&mut self, seen: usize) -> io::Result<()> {
        net::set_rcvlowat(self.fd, seen + 1)?;
        self.raised = true;
        Ok(())
    }
}

impl Drop for LowWater<'_> {
    fn drop(&mut self) {
        if self.raised {
            let _ = net::set_rcvlowat(self.fd, 1);
        }
    }
}

/// How a peek ended.
#[derive(Debug)]
pub enum PeekEnd<T> {
    /// The parser accepted the bytes.
    Parsed(T),
    /// The parser refused them.
    Invalid(&'static str),
    /// Still incomplete at the byte cap.
    TooLarge,
    /// The deadline passed first.
    TimedOut,
    /// The client closed its side before the parser was satisfied.
    HungUp,
    /// The socket failed.
    Failed(io::Error),
}

/// Peeks at `fd` until `parse` is satisfied or refuses, the bytes exceed `max`,
/// the client hangs up, or `deadline` passes. Never consumes a byte. Returns
/// how it ended, the bytes seen, and the first byte (if any arrived).
pub async fn peek_with<T>(
    fd: BorrowedFd<'_>,
    deadline: Instant,
    max: usize,
    mut parse: impl FnMut(&[u8]) -> Result<T, ParseError>,
) -> (PeekEnd<T>, usize, Option<u8>) {
    let mut buf = vec![0u8; INITIAL_BUFFER.min(max)];
    let mut low = LowWater { fd, raised: false };
    let mut seen = 0;
    let mut hung_up = false;
    let first = |buf: &[u8], seen: usize| (seen > 0).then(|| buf[0]);
    loop {
        match net::peek(fd, &mut buf) {
            Ok(0) => return (PeekEnd::HungUp, seen, first(&buf, seen)),
            Ok(n) => seen = n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (PeekEnd::Failed(e), seen, first(&buf, seen)),
        }
        if seen > 0 {
            match parse(&buf[..seen]) {
                Ok(t) => return (PeekEnd::Parsed(t), seen, first(&buf, seen)),
                Err(ParseError::Invalid(reason)) => return (PeekEnd::Invalid(reason), seen, first(&buf, seen)),
                Err(ParseError::Incomplete) if seen == buf.len() => {
                    if buf.len() >= max {
                        return (PeekEnd::TooLarge, seen, first(&buf, seen));
                    }
                    buf.resize((buf.len() * 2).min(max), 0);
                    continue; // More may already be queued.
                }
                Err(ParseError::Incomplete) => {}
            }
            if hung_up {
                return (PeekEnd::HungUp, seen, first(&buf, seen));
            }
            // A readability poll fires at once while any byte is unread: make it
            // wait for bytes beyond those already seen.
            if let Err(e) = low.wait_for_more_than(seen) {
                return (PeekEnd::Failed(e), seen, first(&buf, seen));
            }
        }
        let mask = (libc::POLLIN | libc::POLLRDHUP) as u32;
        match uring::race(fd, uring::poll(fd, mask), tokio::time::sleep_until(deadline)).await {
            uring::Raced::Done(Ok(events)) => {
                if events & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as u32 != 0 {
                    hung_up = true; // One more look at what arrived before the FIN.
                }
            }
            uring::Raced::Done(Err(e)) if e.raw_os_error() == Some(libc::ECANCELED) => {}
            uring::Raced::Done(Err(e)) => return (PeekEnd::Failed(e), seen, first(&buf, seen)),
            uring::Raced::Stopped(_) => return (PeekEnd::TimedOut, seen, first(&buf, seen)),
        }
    }
}

/// Peeks at `fd` until the head is complete, malformed, over `max` bytes, the
/// client hangs up, or `deadline` passes. Never consumes a byte.
pub async fn peek(fd: BorrowedFd<'_>, want: Want, deadline: Instant, max: usize) -> Peek {
    // A handshake record, or an SSLv2-style hello (high bit set: no HTTP
    // method starts so) on a port with TLS routes.
    let tls_like = |b: u8| b == 0x16 || (b & 0x80 != 0 && want.tls);
    let parse = |b: &[u8]| match (tls_like(b[0]), want.tls, want.http) {
        (true, true, _) => tls::parse(b).map(Peeked::Tls),
        (false, _, true) => http::parse(b).map(Peeked::Http),
        (tls, _, _) => Ok(Peeked::Other { tls }),
    };
    let (end, bytes, first) = peek_with(fd, deadline, max, parse).await;
    let tls = first.is_some_and(tls_like);
    let outcome = match end {
        PeekEnd::Parsed(p) => p,
        PeekEnd::Invalid(reason) => Peeked::Invalid { tls, reason },
        PeekEnd::TooLarge => Peeked::TooLarge { tls },
        PeekEnd::TimedOut => Peeked::TimedOut,
        PeekEnd::HungUp => Peeked::HungUp,
        PeekEnd::Failed(e) => Peeked::Failed(e),
    };
    Peek { outcome, bytes }
}
