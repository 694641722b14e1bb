//! What a listener shares with the connections it handed out: the session to
//! give them back on, the count of those still open (a graceful shutdown waits
//! for it), and the switch that makes them end between requests once a
//! graceful shutdown began.

use portmux_sys::scm::{self, Wait};
use portmux_wire::{ConnMeta, Message, Proto};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a give-back (or Drain, or Bye) waits for room in a full session socket.
const SEND_PATIENCE: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct Handle {
    /// The current session socket (replaced on reconnect; `None` once shut down).
    sock: Mutex<Option<Arc<OwnedFd>>>,
    /// Connections handed out and still open here.
    open: Mutex<usize>,
    changed: Condvar,
    closing: AtomicBool,
    /// The listener went away during a graceful shutdown while connections
    /// were still open: the last of them to close says Bye.
    bye_later: AtomicBool,
    /// Readable once a graceful shutdown began: blocking readers poll it
    /// beside their socket (an eventfd).
    wake: OwnedFd,
    #[cfg(feature = "tokio")]
    pub(crate) wake_async: Arc<tokio::sync::Notify>,
    #[cfg(feature = "tokio")]
    changed_async: tokio::sync::Notify,
}

impl Handle {
    pub(crate) fn new(sock: Arc<OwnedFd>) -> io::Result<Arc<Handle>> {
        use rustix::event::{EventfdFlags, eventfd};
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Arc::new(Handle {
            sock: Mutex::new(Some(sock)),
            open: Mutex::new(0),
            changed: Condvar::new(),
            closing: AtomicBool::new(false),
            bye_later: AtomicBool::new(false),
            wake,
            #[cfg(feature = "tokio")]
            wake_async: Arc::new(tokio::sync::Notify::new()),
            #[cfg(feature = "tokio")]
            changed_async: tokio::sync::Notify::new(),
        }))
    }

    /// The session socket now in use, if any.
    pub(crate) fn socket(&self) -> Option<Arc<OwnedFd>> {
        lock(&self.sock).clone()
    }

    /// A reconnection replaced the session.
    pub(crate) fn set_socket(&self, sock: Arc<OwnedFd>) {
        *lock(&self.sock) = Some(sock);
    }

    /// The session is over for good (after a graceful shutdown).
    pub(crate) fn clear_socket(&self) {
        lock(&self.sock).take();
    }

    pub(crate) fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// A graceful shutdown begins: connections between requests end, blocked
    /// readers and acceptors wake.
    pub(crate) fn begin_closing(&self) {
        if !self.closing.swap(true, Ordering::AcqRel) {
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
            #[cfg(feature = "tokio")]
            self.wake_async.notify_waiters();
        }
    }

    pub(crate) fn opened(&self) {
        *lock(&self.open) += 1;
    }

    pub(crate) fn closed(&self) {
        let mut open = lock(&self.open);
        *open = open.saturating_sub(1);
        if *open > 0 {
            return;
        }
        self.changed.notify_all();
        #[cfg(feature = "tokio")]
        self.changed_async.notify_waiters();
        let bye = self.bye_later.swap(false, Ordering::AcqRel);
        drop(open);
        if bye {
            self.say_bye();
        }
    }

    /// The listener is going away. During a graceful shutdown with
    /// connections still open, Bye waits for the last of them, since their
    /// give-backs need the session (frameworks such as axum drop the listener
    /// first and wait for the connections afterwards): then true, and the
    /// session stays open until then. Otherwise false: the caller says Bye.
    pub(crate) fn bye_when_all_closed(&self) -> bool {
        let open = lock(&self.open);
        let later = *open > 0 && self.is_closing();
        self.bye_later.store(later, Ordering::Release);
        later
    }

    /// Says Bye on the session, reads it to its end (so that portmux reads
    /// everything this side sent; connections it sent meanwhile are left to
    /// it) and forgets it.
    pub(crate) fn say_bye(&self) {
        let Some(sock) = self.socket() else { return };
        let _ = self.send(&Message::Bye, None);
        let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
        crate::proto::read_to_end(&*sock, &mut buf, crate::CLOSE_WAIT);
        self.clear_socket();
    }

    pub(crate) fn open(&self) -> usize {
        *lock(&self.open)
    }

    /// Waits until every connection handed out is closed or given back, at
    /// most until `deadline`. Returns how many are still open.
    pub(crate) fn wait_all_closed(&self, deadline: Instant) -> usize {
        let mut open = lock(&self.open);
        while *open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            open = self.changed.wait_timeout(open, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        *open
    }

    #[cfg(feature = "tokio")]
    pub(crate) async fn wait_all_closed_async(&self, deadline: Instant) -> usize {
        loop {
            let changed = self.changed_async.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let open = self.open();
            if open == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline.into(), changed).await.is_err() {
                return self.open();
            }
        }
    }

    /// Sends one message (with an fd, for a give-back) on the session,
    /// waiting a little for room if its socket is full.
    pub(crate) fn send(&self, msg: &Message, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let sock = self.socket().ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the session is over"))?;
        let bytes = portmux_wire::encode(msg).map_err(io::Error::other)?;
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let deadline = Instant::now() + SEND_PATIENCE;
        loop {
            match scm::send_with_fds(sock.as_fd(), &bytes, &fds, Wait::DontWait) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    use rustix::event::{PollFd, PollFlags, Timespec, poll};
                    let mut pfd = [PollFd::new(&*sock, PollFlags::OUT)];
                    let _ = poll(&mut pfd, Some(&Timespec { tv_sec: 0, tv_nsec: 10_000_000 }));
                }
                other => return other,
            }
        }
    }

    /// Gives connection `fd` back to portmux (the caller then closes its copy).
    pub(crate) fn give_back(&self, fd: BorrowedFd<'_>, meta: &ConnMeta) -> io::Result<()> {
        let msg = Message::GiveBack { route: meta.route.clone(), peer: meta.peer, local: meta.local };
        self.send(&msg, Some(fd))
    }
}

/// Whether the start of an HTTP/1 head says the connection ends after this
/// exchange: `Connection: close`, or (a request) HTTP/1.0 without keep-alive.
/// Only the first 4 KiB are looked at; a head cut there errs on closing.
fn asks_to_close(head: &[u8], request: bool) -> bool {
    let head = &head[..head.len().min(4096)];
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first = lines.next().unwrap_or_default();
    let mut close = request && first.ends_with(b"HTTP/1.0");
    for line in lines {
        if line.is_empty() {
            return close;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        if !line[..colon].trim_ascii().eq_ignore_ascii_case(b"connection") {
            continue;
        }
        for token in line[colon + 1..].split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if token.eq_ignore_ascii_case(b"close") {
                return true;
            }
            if token.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
    }
    // The head goes on past what was seen: whatever it says later is unknown.
    close || head.len() == 4096
}

/// Whether a connection can go back to portmux between requests: HTTP/1 in
/// the clear (a TLS session's state is the service's, and other protocols
/// have no "between requests" portmux could know).
pub(crate) fn movable(meta: &ConnMeta) -> bool {
    meta.proto == Proto::Http && !meta.route.starts_with("https:") && !meta.route.starts_with("tls:")
}

/// A handed-out connection's part in the tracking: counted open until
/// dropped; gives itself back on the way out of a graceful shutdown.
#[derive(Debug)]
pub(crate) struct Tracked {
    pub(crate) handle: Arc<Handle>,
    pub(crate) meta: ConnMeta,
    pub(crate) movable: bool,
    /// Bytes read since the last write: 0 means "between requests" (nothing
    /// of a next request consumed).
    read_since_write: AtomicU64,
    /// Nothing was read or written yet: any connection can go back as it came.
    fresh: AtomicBool,
    /// The last request or answer said the connection ends after it
    /// (`Connection: close`, HTTP/1.0): it closes normally, it never goes back.
    ends_after: AtomicBool,
    given_back: AtomicBool,
}

impl Tracked {
    pub(crate) fn new(handle: Arc<Handle>, meta: ConnMeta) -> Tracked {
        handle.opened();
        Tracked {
            movable: movable(&meta),
            handle,
            meta,
            read_since_write: AtomicU64::new(0),
            fresh: AtomicBool::new(true),
            ends_after: AtomicBool::new(false),
            given_back: AtomicBool::new(false),
        }
    }

    /// `bytes` were read. The first read of a request starts its head: it says
    /// whether the client wants the connection closed after the answer.
    pub(crate) fn read(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.fresh.store(false, Ordering::Relaxed);
        if self.read_since_write.fetch_add(bytes.len() as u64, Ordering::Relaxed) == 0 && self.movable {
            self.ends_after.store(asks_to_close(bytes, true), Ordering::Relaxed);
        }
    }

    /// `bytes` were written. The first write of an answer starts its head:
    /// an answer may also say the connection ends after it.
    pub(crate) fn wrote(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.fresh.store(false, Ordering::Relaxed);
        if self.read_since_write.swap(0, Ordering::Relaxed) > 0 && self.movable && asks_to_close(bytes, false) {
            self.ends_after.store(true, Ordering::Relaxed);
        }
    }

    /// Whether it can go back to portmux now: untouched, or (HTTP/1 in the
    /// clear) between requests.
    pub(crate) fn can_go_back(&self) -> bool {
        self.fresh.load(Ordering::Relaxed)
            || (self.movable && self.between_requests() && !self.ends_after.load(Ordering::Relaxed))
    }

    /// Nothing read since the last answer: the next request, if any, is unread.
    pub(crate) fn between_requests(&self) -> bool {
        self.read_since_write.load(Ordering::Relaxed) == 0
    }

    /// A graceful shutdown is under way and this connection can move: reads
    /// between requests end (as if the client had closed) so it can go back.
    pub(crate) fn ends_here(&self) -> bool {
        self.handle.is_closing() && self.can_go_back()
    }

    pub(crate) fn is_given_back(&self) -> bool {
        self.given_back.load(Ordering::Relaxed)
    }

    /// Gives the connection back (once); false if it was not possible.
    pub(crate) fn give_back(&self, fd: BorrowedFd<'_>) -> bool {
        if self.given_back.swap(true, Ordering::AcqRel) {
            return true;
        }
        match self.handle.give_back(fd, &self.meta) {
            Ok(()) => true,
            Err(_) => {
                self.given_back.store(false, Ordering::Release);
                false
            }
        }
    }

    /// On the way out: back to portmux if a shutdown made it end here.
    pub(crate) fn finish(&self, fd: BorrowedFd<'_>) {
        if !self.is_given_back() && self.ends_here() {
            self.give_back(fd);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.handle.closed();
    }
}

#[cfg(test)]
mod tests {
    use super::asks_to_close;

    #[test]
    fn heads_that_end_the_connection_are_recognised() {
        assert!(!asks_to_close(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", true));
        assert!(asks_to_close(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", true));
        assert!(asks_to_close(b"GET / HTTP/1.1\r\nconnection:Keep-Alive, CLOSE\r\n\r\n", true));
        assert!(asks_to_close(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", true));
        assert!(!asks_to_close(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true));
        assert!(
            !asks_to_close(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
            "an answer's version says nothing"
        );
        assert!(asks_to_close(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", false));
        assert!(!asks_to_close(b"GET /connection:close HTTP/1.1\r\nHost: x\r\n\r\n", true), "only headers count");
        let long = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 5000]].concat();
        assert!(asks_to_close(&long, true), "a head longer than looked at errs on closing");
    }
}
