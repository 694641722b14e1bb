//! The one place where portmux checks HTTP/1 request framing itself, on
//! every request of a connection: what hyper leaves to the application
//! (Content-Length with Transfer-Encoding, several Content-Lengths, a
//! coding other than `chunked`, bare CR or LF, an absolute-form target that
//! disagrees with Host; see `classify::http`) and the chunked framing of
//! bodies (sizes, extensions, the CRLF after each chunk, trailers).
//!
//! [`Guarded`] sits between the client's socket and hyper. It gives hyper a
//! request head only once the head is complete and valid, and nothing of a
//! request in which it found a fault while hyper has seen none of it: hyper
//! (and the target) never receive the refused request. On a fault it gives
//! hyper an end of file, so that hyper finishes the requests before it, and
//! keeps the reason for the engine to answer. It also ends a connection at a
//! boundary between requests when an upgrade asks (hyper then gives the
//! socket back), and stops checking after a `101 Switching Protocols`.

use crate::classify::{self, ParseError, http::Framing};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest chunk-size line (with extensions) or trailer line.
const MAX_LINE: usize = 4096;
/// How much is read from the socket at a time: little while heads come
/// (most fit), more once a read fills it (a chunked upload).
const READ_SIZE: usize = 4 * 1024;
const READ_SIZE_BULK: usize = 32 * 1024;

/// Why a request was refused before hyper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Malformed or ambiguous: 400.
    Bad(&'static str),
    /// The head is longer than the limit: 431.
    TooLarge,
}

/// What the engine and the guard share about one connection.
#[derive(Debug, Default)]
pub struct Control {
    fault: Cell<Option<Fault>>,
    pause: Cell<bool>,
    /// For a request that asked to upgrade: `Some(true)` once the answer was 101.
    upgraded: Cell<Option<bool>>,
    /// The guard ended the connection at a boundary between requests, with nothing buffered.
    at_boundary: Cell<bool>,
    /// hyper has the connection for one request (the engine's direct path lent it).
    lend: Cell<bool>,
    /// The request refused had been partly given to hyper (a fault in its chunked body).
    partial: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    /// Whoever waits for [`Control::paused`].
    pause_waker: RefCell<Option<Waker>>,
}

impl Control {
    /// The fault that ended the connection, if one did.
    pub fn fault(&self) -> Option<Fault> {
        self.fault.get()
    }

    /// Whether hyper had part of the refused request (its head and some of
    /// its body): hyper then answers it itself (its target's exchange
    /// failed), and the connection must only be closed.
    pub fn fault_after_head(&self) -> bool {
        self.partial.get()
    }

    /// Asks the guard to end the connection at the next boundary between
    /// requests (hyper then returns the socket, to move to a new process).
    pub fn pause(&self) {
        self.pause.set(true);
        self.wake();
        if let Some(w) = self.pause_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Lends the connection to hyper for its next request only (`true`): the
    /// guard ends it at the boundary after, as for a pause.
    pub fn lend(&self, once: bool) {
        self.lend.set(once);
        self.at_boundary.set(false);
    }

    /// Whether [`Control::pause`] was called.
    pub fn pause_asked(&self) -> bool {
        self.pause.get()
    }

    /// Resolves once [`Control::pause`] was called.
    pub fn paused(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.pause.get() {
                return Poll::Ready(());
            }
            *self.pause_waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    /// Whether the connection ended between requests, on a pause, with nothing buffered.
    pub fn paused_between_requests(&self) -> bool {
        self.at_boundary.get()
    }

    /// The answer to a request that asked to upgrade: whether it switched protocols.
    pub fn decide_upgrade(&self, upgraded: bool) {
        self.upgraded.set(Some(upgraded));
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a whole request head starting at `req_start`.
    Head,
    /// This many body bytes are still to come.
    Length(u64),
    /// The chunk-size line of the next chunk.
    ChunkSize,
    /// This many bytes of chunk data are still to come.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer lines after the last chunk (so many bytes of them so far).
    Trailers(usize),
    /// After a request that asked to upgrade: nothing more is checked until the answer.
    Hold,
    /// After a 101: the connection is no longer HTTP.
    Opaque,
    /// A fault was found: nothing more is given.
    Refused,
}

/// A client socket whose requests are checked before hyper reads them.
#[derive(Debug)]
pub struct Guarded<T> {
    inner: T,
    /// Bytes read; `buf[..filled]` is data (the rest is spare room, zeroed once).
    buf: Vec<u8>,
    filled: usize,
    /// Given to hyper up to here.
    start: usize,
    /// Checked and free to give up to here.
    ready: usize,
    /// Checked up to here.
    scan: usize,
    /// Where the request being checked began.
    req_start: usize,
    /// Whether the request being checked asked to upgrade.
    upgrade: bool,
    /// Where the search for the end of the head goes on (from `req_start`),
    /// and whether a non-empty line came before it.
    head_line: usize,
    head_text: bool,
    /// A head was given to hyper: a pause may end the connection at a boundary
    /// (before the first request, the request that made it is served).
    started: bool,
    /// hyper was given bytes of the request being checked.
    given: bool,
    state: State,
    max_head: usize,
    eof: bool,
    ctl: Rc<Control>,
}

impl<T> Guarded<T> {
    /// Guards `inner`, whose first bytes (already read elsewhere, e.g. through
    /// TLS) are `prefix`; heads are at most `max_head` bytes.
    pub fn new(inner: T, prefix: Vec<u8>, max_head: usize, ctl: Rc<Control>) -> Guarded<T> {
        let filled = prefix.len();
        let mut g = Guarded {
            inner,
            buf: prefix,
            filled,
            start: 0,
            ready: 0,
            scan: 0,
            req_start: 0,
            upgrade: false,
            head_line: 0,
            head_text: false,
            started: false,
            given: false,
            state: State::Head,
            max_head,
            eof: false,
            ctl,
        };
        g.check();
        g
    }

    /// The socket, and what was read from it but not yet given to hyper.
    pub fn into_inner(self) -> (T, Vec<u8>) {
        let rest = self.buf[self.start..self.filled].to_vec();
        (self.inner, rest)
    }

    /// Checks what was read since the last call and moves `ready`.
    fn check(&mut self) {
        loop {
            match self.step() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(fault) => {
                    // A request of which hyper has seen nothing is withheld whole.
                    self.ctl.partial.set(self.given || self.ready > self.req_start);
                    self.ready = self.ready.max(self.req_start);
                    self.state = State::Refused;
                    self.ctl.fault.set(Some(fault));
                    return;
                }
            }
        }
        self.ready = match self.state {
            State::Head => self.ready.max(self.req_start),
            State::Opaque => self.filled,
            State::Refused => self.ready,
            _ => self.scan,
        };
    }

    /// One step of checking; `Ok(false)`: more bytes are needed (or nothing is checked now).
    fn step(&mut self) -> Result<bool, Fault> {
        let avail = self.filled - self.scan;
        match self.state {
            State::Head => {
                let from = self.req_start;
                let region = &self.buf[from..self.filled];
                // Leading empty lines before a request line are allowed (RFC 9112 §2.2).
                let Some(end) = head_end(region, &mut self.head_line, &mut self.head_text) else {
                    if region.len() >= self.max_head {
                        return Err(Fault::TooLarge);
                    }
                    self.scan = self.filled;
                    return Ok(false);
                };
                if end > self.max_head {
                    return Err(Fault::TooLarge);
                }
                let head = match classify::http::parse(&region[..end]) {
                    Ok(head) => head,
                    Err(ParseError::Invalid(why)) => return Err(Fault::Bad(why)),
                    Err(ParseError::Incomplete) => {
                        // Only empty lines so far, or a head httparse reads longer.
                        if region.len() >= self.max_head {
                            return Err(Fault::TooLarge);
                        }
                        self.scan = self.filled;
                        return Ok(false);
                    }
                };
                self.scan = from + head.len;
                self.upgrade = head.upgrade;
                (self.head_line, self.head_text, self.started) = (0, false, true);
                if head.upgrade {
                    // The engine answers once hyper has the head, never before this.
                    self.ctl.upgraded.set(None);
                }
                self.state = match head.body {
                    Framing::None | Framing::Length(0) => return Ok(self.message_end()),
                    Framing::Length(n) => State::Length(n),
                    Framing::Chunked => State::ChunkSize,
                };
                Ok(true)
            }
            State::Length(n) => {
                let take = (avail as u64).min(n);
                self.scan += take as usize;
                if take == n {
                    return Ok(self.message_end());
                }
                self.state = State::Length(n - take);
                Ok(false)
            }
            State::ChunkData(n) => {
                let take = (avail as u64).min(n);
                self.scan += take as usize;
                if take == n {
                    self.state = State::ChunkEnd;
                    return Ok(true);
                }
                self.state = State::ChunkData(n - take);
                Ok(false)
            }
            State::ChunkEnd => {
                if avail < 2 {
                    return Ok(false);
                }
                if &self.buf[self.scan..self.scan + 2] != b"\r\n" {
                    return Err(Fault::Bad("a chunk's data is not followed by CRLF"));
                }
                self.scan += 2;
                self.state = State::ChunkSize;
                Ok(true)
            }
            State::ChunkSize => {
                let Some(line) = self.line()? else { return Ok(false) };
                let size = chunk_size(line)?;
                self.scan += line.len();
                self.state = if size == 0 { State::Trailers(0) } else { State::ChunkData(size) };
                Ok(true)
            }
            State::Trailers(total) => {
                let Some(line) = self.line()? else { return Ok(false) };
                let len = line.len();
                if len == 2 {
                    self.scan += 2;
                    return Ok(self.message_end());
                }
                trailer_field(line)?;
                if total + len > self.max_head {
                    return Err(Fault::TooLarge);
                }
                self.scan += len;
                self.state = State::Trailers(total + len);
                Ok(true)
            }
            State::Hold => match self.ctl.upgraded.take() {
                None => Ok(false),
                Some(true) => {
                    self.state = State::Opaque;
                    Ok(false)
                }
                Some(false) => {
                    self.state = State::Head;
                    Ok(true)
                }
            },
            State::Opaque | State::Refused => Ok(false),
        }
    }

    /// The request checked ended at `scan`; `true` if checking goes on.
    fn message_end(&mut self) -> bool {
        self.req_start = self.scan;
        self.given = false;
        if std::mem::take(&mut self.upgrade) {
            self.state = State::Hold;
            return false;
        }
        self.state = State::Head;
        true
    }

    /// The CRLF-terminated line at `scan`, once it is all there.
    fn line(&self) -> Result<Option<&[u8]>, Fault> {
        let region = &self.buf[self.scan..self.filled];
        match region.iter().position(|&b| b == b'\n') {
            Some(i) if i + 1 > MAX_LINE => Err(Fault::Bad("a chunk-size or trailer line is too long")),
            Some(i) => {
                let line = &region[..=i];
                if i == 0 || line[i - 1] != b'\r' || line[..i - 1].contains(&b'\r') {
                    return Err(Fault::Bad("a line of the chunked body does not end in CRLF"));
                }
                Ok(Some(line))
            }
            None if region.len() >= MAX_LINE => Err(Fault::Bad("a chunk-size or trailer line is too long")),
            None => Ok(None),
        }
    }

    /// Moves data already given to hyper out of the buffer.
    fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        self.buf.copy_within(self.start..self.filled, 0);
        let n = self.start;
        self.filled -= n;
        self.ready -= n;
        self.scan -= n;
        self.req_start = self.req_start.saturating_sub(n);
        self.start = 0;
    }

    fn hand_out(&mut self, out: &mut ReadBuf<'_>) {
        let n = (self.ready - self.start).min(out.remaining());
        out.put_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        self.given |= self.start > self.req_start;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > this.start {
                this.hand_out(out);
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Refused || this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Hold {
                this.check();
                if this.state == State::Hold {
                    *this.ctl.waker.borrow_mut() = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                continue;
            }
            let empty = this.start == this.filled;
            if empty && this.state == State::Head && this.started && (this.ctl.pause.get() || this.ctl.lend.get()) {
                this.ctl.at_boundary.set(true);
                return Poll::Ready(Ok(()));
            }
            // Bodies of known length and upgraded streams go straight to hyper.
            let direct = match this.state {
                State::Opaque => true,
                State::Length(n) => out.remaining() as u64 <= n,
                _ => false,
            };
            if empty && direct {
                let before = out.filled().len();
                let polled = Pin::new(&mut this.inner).poll_read(cx, out);
                if polled.is_pending() {
                    *this.ctl.waker.borrow_mut() = Some(cx.waker().clone());
                }
                std::task::ready!(polled)?;
                let n = out.filled().len() - before;
                if let State::Length(left) = this.state {
                    let n = n as u64;
                    if n >= left {
                        // The body ended: the next head starts here (or an upgrade is held).
                        this.message_end();
                    } else {
                        this.state = State::Length(left - n);
                    }
                }
                if n == 0 {
                    this.eof = true;
                }
                return Poll::Ready(Ok(()));
            }
            if this.start == this.filled || this.start > READ_SIZE_BULK {
                this.compact();
            }
            let want = if this.buf.len() > READ_SIZE { READ_SIZE_BULK } else { READ_SIZE };
            if this.buf.len() < this.filled + want {
                this.buf.resize(this.filled + want, 0);
            }
            let mut room = ReadBuf::new(&mut this.buf[this.filled..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut room);
            if polled.is_pending() {
                *this.ctl.waker.borrow_mut() = Some(cx.waker().clone());
            }
            std::task::ready!(polled)?;
            let n = room.filled().len();
            if n == 0 {
                this.eof = true;
                continue;
            }
            this.filled += n;
            this.check();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where a head that starts at `region[0]` ends (after its empty line): at
/// the first empty line that follows a non-empty one. A bare LF ends a line
/// here too, so that such a head is parsed (and refused) rather than waited on.
/// The search goes on from `line_start` (the first line not yet looked at),
/// so a head that trickles in is scanned once, not once per read.
pub(crate) fn head_end(region: &[u8], line_start: &mut usize, seen_text: &mut bool) -> Option<usize> {
    while let Some(off) = region[*line_start..].iter().position(|&b| b == b'\n') {
        let nl = *line_start + off;
        let line = &region[*line_start..nl];
        let empty = line.is_empty() || line == b"\r";
        if empty && *seen_text {
            return Some(nl + 1);
        }
        *seen_text |= !empty;
        *line_start = nl + 1;
    }
    None
}

/// The size of a chunk from its size line (CRLF included): hex digits, then
/// optional extensions (`;name[=value]`, with optional whitespace before each `;`).
fn chunk_size(line: &[u8]) -> Result<u64, Fault> {
    let line = &line[..line.len() - 2];
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Fault::Bad("a chunk size is not a hexadecimal number"));
    }
    if digits > 15 {
        return Err(Fault::Bad("a chunk size is too large"));
    }
    let size = std::str::from_utf8(&line[..digits])
        .ok()
        .and_then(|d| u64::from_str_radix(d, 16).ok())
        .ok_or(Fault::Bad("a chunk size is not a hexadecimal number"))?;
    let rest = &line[digits..];
    let ext = rest.iter().position(|&b| b != b' ' && b != b'\t').map_or(&rest[rest.len()..], |i| &rest[i..]);
    if !ext.is_empty() {
        let ok = ext[0] == b';' && ext.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b));
        if !ok {
            return Err(Fault::Bad("a chunk size is followed by something other than an extension"));
        }
    }
    Ok(size)
}

/// A trailer line (CRLF included) is a header field: `name: value`.
fn trailer_field(line: &[u8]) -> Result<(), Fault> {
    let line = &line[..line.len() - 2];
    let bad = Fault::Bad("a trailer of the chunked body is not a valid header field");
    let colon = line.iter().position(|&b| b == b':').ok_or(bad)?;
    let name_ok = colon > 0 && line[..colon].iter().all(|&b| is_tchar(b));
    let value_ok = line[colon + 1..].iter().all(|&b| b == b'\t' || b >= b' ' && b != 0x7f);
    if name_ok && value_ok { Ok(()) } else { Err(bad) }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns what hyper would see and the fault.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Option<Fault>) {
        let ctl = Rc::new(Control::default());
        let mut g = Guarded::new(tokio::io::empty(), Vec::new(), 1024, ctl.clone());
        let mut seen = Vec::new();
        for piece in input.chunks(step.max(1)) {
            if g.buf.len() < g.filled + piece.len() {
                g.buf.resize(g.filled + piece.len(), 0);
            }
            g.buf[g.filled..g.filled + piece.len()].copy_from_slice(piece);
            g.filled += piece.len();
            g.check();
            seen.extend_from_slice(&g.buf[g.start..g.ready]);
            g.start = g.ready;
            g.compact();
        }
        (seen, ctl.fault())
    }

    const GOOD: &[u8] = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
GET /b HTTP/1.1\r\nHost: a\r\n\r\n\
POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n\
\r\nGET /d HTTP/1.1\r\nHost: a\r\n\r\n";

    #[test]
    fn valid_pipelines_pass_whole_in_any_pieces() {
        for step in [1, 2, 7, 64, GOOD.len()] {
            let (seen, fault) = run(GOOD, step);
            assert_eq!(fault, None, "step {step}");
            assert_eq!(seen, GOOD, "step {step}");
        }
    }

    #[test]
    fn a_faulty_request_is_withheld_whole_and_those_before_pass() {
        let first = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n".as_slice();
        let cases: &[(&[u8], &str)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "smuggling"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n", "hexadecimal"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", "CRLF"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n", "CRLF"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3 x\r\nabc\r\n", "extension"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n", "trailer"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n", "too large"),
            (b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n", "CRLF"),
        ];
        for (bad, why) in cases {
            let input = [first, bad].concat();
            let (seen, fault) = run(&input, input.len());
            assert_eq!(seen, first, "{why}");
            match fault {
                Some(Fault::Bad(reason)) => assert!(reason.contains(why), "{reason} vs {why}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        let (seen, fault) = run(&[first, &[b'x'; 2000]].concat(), 100);
        assert_eq!((seen.as_slice(), fault), (first, Some(Fault::TooLarge)));
    }

    #[test]
    fn an_upgrade_holds_what_follows_until_the_answer() {
        let ctl = Rc::new(Control::default());
        let req = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let input = [req.as_slice(), b"\x81\x05hello"].concat();
        let mut g = Guarded::new(tokio::io::empty(), input.clone(), 1024, ctl.clone());
        assert_eq!(g.ready, req.len(), "the upgrade request passes; the frames wait");
        g.start = g.ready;
        ctl.decide_upgrade(true);
        g.check();
        assert_eq!(g.ready, input.len(), "after 101 the rest is not HTTP");

        let ctl = Rc::new(Control::default());
        let input = [req.as_slice(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"].concat();
        let mut g = Guarded::new(tokio::io::empty(), input.clone(), 1024, ctl.clone());
        assert_eq!(g.ready, req.len());
        ctl.decide_upgrade(false);
        g.check();
        assert_eq!(g.ready, input.len(), "refused upgrade: checked as HTTP again");
    }
}
