//! Looks at a new connection's first bytes without consuming them, under an
//! absolute deadline and a byte cap, and says what they are.

pub mod http;
pub mod tls;

use crate::sys::{net, uring};
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

/// Peeks at `fd` until the head is complete, malformed, over `max` bytes, the
/// client hangs up, or `deadline` passes. Never consumes a byte.
pub async fn peek(fd: BorrowedFd<'_>, want: Want, deadline: Instant, max: usize) -> Peek {
    let mut buf = vec![0u8; INITIAL_BUFFER.min(max)];
    let mut low = LowWater { fd, raised: false };
    let mut seen = 0;
    let mut hung_up = false;
    let done = |outcome, bytes| Peek { outcome, bytes };
    loop {
        match net::peek(fd, &mut buf) {
            Ok(0) => return done(Peeked::HungUp, seen),
            Ok(n) => seen = n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return done(Peeked::Failed(e), seen),
        }
        if seen > 0 {
            let is_tls = buf[0] == 0x16;
            let parsed = match (is_tls, want.tls, want.http) {
                (true, true, _) => tls::parse(&buf[..seen]).map(Peeked::Tls),
                (false, _, true) => http::parse(&buf[..seen]).map(Peeked::Http),
                (tls, _, _) => Ok(Peeked::Other { tls }),
            };
            match parsed {
                Ok(outcome) => return done(outcome, seen),
                Err(ParseError::Invalid(reason)) => return done(Peeked::Invalid { tls: is_tls, reason }, seen),
                Err(ParseError::Incomplete) if seen == buf.len() => {
                    if buf.len() >= max {
                        return done(Peeked::TooLarge { tls: is_tls }, seen);
                    }
                    buf.resize((buf.len() * 2).min(max), 0);
                    continue; // More may already be queued.
                }
                Err(ParseError::Incomplete) => {}
            }
            if hung_up {
                return done(Peeked::HungUp, seen);
            }
            // A readability poll fires at once while any byte is unread: make it
            // wait for bytes beyond those already seen.
            if let Err(e) = low.wait_for_more_than(seen) {
                return done(Peeked::Failed(e), seen);
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
            uring::Raced::Done(Err(e)) => return done(Peeked::Failed(e), seen),
            uring::Raced::Stopped(_) => return done(Peeked::TimedOut, seen),
        }
    }
}
