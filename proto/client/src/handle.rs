//! What a listener shares with the connections it handed out: the session to
//! give them back on, the count of those still open (a graceful shutdown waits
//! for it), and the switch that makes them end between requests once a
//! graceful shutdown began.

use crate::exchange::Exchange;
use portmux_sys::scm::{self, Wait};
use portmux_wire::{ConnMeta, Message, Proto};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a give-back (or Drain, or Bye) waits for room in a full session socket.
const SEND_PATIENCE: Duration = Duration::from_secs(1);

/// While a shutdown waits for its connections, how often it refuses the
/// connections portmux sent after the Drain (they go to the next instance).
const REFUSE_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub(crate) struct Handle {
    /// The current session socket (replaced on reconnect; `None` once shut down).
    sock: Mutex<Option<Arc<OwnedFd>>>,
    /// Connections handed out and still open here.
    open: Mutex<Open>,
    changed: Condvar,
    closing: AtomicBool,
    /// The listener went away during a graceful shutdown while connections
    /// were still open: the last of them to close says Bye.
    bye_later: AtomicBool,
    /// The session was ended on purpose (Bye): no reconnecting.
    ended: AtomicBool,
    /// Readable once a graceful shutdown began: blocking readers poll it
    /// beside their socket (an eventfd).
    wake: OwnedFd,
    #[cfg(feature = "tokio")]
    pub(crate) wake_async: Arc<tokio::sync::Notify>,
    /// The tokio connections' read wakers, woken when a shutdown begins
    /// (registered once per connection: a read stores its waker in its own
    /// slot, without touching anything shared).
    #[cfg(feature = "tokio")]
    readers: Mutex<Readers>,
    #[cfg(feature = "tokio")]
    changed_async: tokio::sync::Notify,
}

/// Where a tokio connection's read waits: its task's waker.
#[cfg(feature = "tokio")]
#[derive(Debug, Default)]
pub(crate) struct ReadWaker(Mutex<Option<std::task::Waker>>);

#[cfg(feature = "tokio")]
impl ReadWaker {
    /// The read is waiting now, in the task of `waker`.
    pub(crate) fn set(&self, waker: &std::task::Waker) {
        let mut slot = lock(&self.0);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    pub(crate) fn wake(&self) {
        let waker = lock(&self.0).take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The registered read waker slots. Dropped connections leave dead entries,
/// swept when the list has doubled since the last sweep.
#[cfg(feature = "tokio")]
#[derive(Debug, Default)]
struct Readers {
    slots: Vec<std::sync::Weak<ReadWaker>>,
    sweep_at: usize,
}

/// Connections handed out and still open: all of them, and those that can
/// go back between requests (plain HTTP/1).
#[derive(Debug, Default)]
struct Open {
    all: usize,
    movable: usize,
}

impl Handle {
    pub(crate) fn new(sock: Arc<OwnedFd>) -> io::Result<Arc<Handle>> {
        use rustix::event::{EventfdFlags, eventfd};
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Arc::new(Handle {
            sock: Mutex::new(Some(sock)),
            open: Mutex::new(Open::default()),
            changed: Condvar::new(),
            closing: AtomicBool::new(false),
            bye_later: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            wake,
            #[cfg(feature = "tokio")]
            wake_async: Arc::new(tokio::sync::Notify::new()),
            #[cfg(feature = "tokio")]
            readers: Mutex::new(Readers::default()),
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

    /// Ends the session on purpose: acceptors that see it end do not reconnect.
    pub(crate) fn mark_ended(&self) {
        self.ended.store(true, Ordering::Release);
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// A graceful shutdown begins: connections between requests end, blocked
    /// readers and acceptors wake.
    pub(crate) fn begin_closing(&self) {
        if !self.closing.swap(true, Ordering::AcqRel) {
            let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
            #[cfg(feature = "tokio")]
            {
                self.wake_async.notify_waiters();
                let readers = std::mem::take(&mut lock(&self.readers).slots);
                for r in readers.iter().filter_map(std::sync::Weak::upgrade) {
                    r.wake();
                }
            }
        }
    }

    /// Registers a tokio connection's read waker slot, to be woken when a
    /// shutdown begins.
    #[cfg(feature = "tokio")]
    pub(crate) fn register_reader(&self, slot: &Arc<ReadWaker>) {
        let mut readers = lock(&self.readers);
        if readers.slots.len() >= readers.sweep_at {
            readers.slots.retain(|r| r.strong_count() > 0);
            readers.sweep_at = (2 * readers.slots.len()).max(64);
        }
        readers.slots.push(Arc::downgrade(slot));
    }

    pub(crate) fn opened(&self, movable: bool) {
        let mut open = lock(&self.open);
        open.all += 1;
        open.movable += usize::from(movable);
    }

    /// A connection that counted as able to go back no longer can (it asked
    /// to close, switched protocols, or carries what is not followed).
    pub(crate) fn stuck(&self) {
        let mut open = lock(&self.open);
        open.movable = open.movable.saturating_sub(1);
        if open.movable == 0 {
            #[cfg(feature = "tokio")]
            self.changed_async.notify_waiters();
        }
    }

    /// A connection handed out is closed or given back (`movable`: it still
    /// counted as able to go back).
    pub(crate) fn closed(self: &Arc<Self>, movable: bool) {
        let mut open = lock(&self.open);
        open.all = open.all.saturating_sub(1);
        if movable {
            open.movable = open.movable.saturating_sub(1);
            if open.movable == 0 {
                #[cfg(feature = "tokio")]
                self.changed_async.notify_waiters();
            }
        }
        if open.all > 0 {
            return;
        }
        self.changed.notify_all();
        #[cfg(feature = "tokio")]
        self.changed_async.notify_waiters();
        let bye = self.bye_later.swap(false, Ordering::AcqRel);
        drop(open);
        if !bye {
            return;
        }
        // The last connection of a listener dropped mid-shutdown: its Bye
        // (which waits for portmux to close the session) stays off an async
        // runtime's worker threads.
        #[cfg(feature = "tokio")]
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let me = self.clone();
            rt.spawn_blocking(move || me.say_bye());
            return;
        }
        self.say_bye();
    }

    /// Refuses (Reject) the connections portmux sent after the listener let
    /// go of its own: they raced with the Drain. Called while a shutdown
    /// waits, when nothing else reads the session.
    pub(crate) fn refuse_arrivals(&self, buf: &mut [u8]) {
        if let Some(sock) = self.socket() {
            crate::proto::reject_waiting(&*sock, buf);
        }
    }

    /// The listener is going away. During a graceful shutdown with
    /// connections still open, Bye waits for the last of them, since their
    /// give-backs need the session (frameworks such as axum drop the listener
    /// first and wait for the connections afterwards): then true, and the
    /// session stays open until then. Otherwise false: the caller says Bye.
    pub(crate) fn bye_when_all_closed(&self) -> bool {
        let open = lock(&self.open);
        let later = open.all > 0 && self.is_closing();
        self.bye_later.store(later, Ordering::Release);
        later
    }

    /// Says Bye on the session, reads it to its end (so that portmux reads
    /// everything this side sent; connections it sent meanwhile are left to
    /// it) and forgets it.
    pub(crate) fn say_bye(&self) {
        let Some(sock) = self.socket() else { return };
        self.mark_ended();
        let _ = self.send(&Message::Bye, None);
        let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
        crate::proto::read_to_end(&*sock, &mut buf, crate::CLOSE_WAIT);
        self.clear_socket();
    }

    pub(crate) fn open(&self) -> usize {
        lock(&self.open).all
    }

    /// Waits until every connection handed out is closed or given back, at
    /// most until `deadline`. Returns how many are still open.
    pub(crate) fn wait_all_closed(&self, deadline: Instant) -> usize {
        let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
        loop {
            let mut open = lock(&self.open);
            let left = deadline.saturating_duration_since(Instant::now());
            if open.all == 0 || left.is_zero() {
                return open.all;
            }
            open = self
                .changed
                .wait_timeout(open, left.min(REFUSE_EVERY))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            drop(open);
            self.refuse_arrivals(&mut buf);
        }
    }

    /// Waits until every connection handed out (`all`), or every one that
    /// could go back between requests (plain HTTP/1), is closed or given back,
    /// at most until `deadline`. Returns how many of them are still open.
    #[cfg(feature = "tokio")]
    pub(crate) async fn wait_closed_async(&self, deadline: Instant, all: bool) -> usize {
        let count = |h: &Handle| {
            let open = lock(&h.open);
            if all { open.all } else { open.movable }
        };
        let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
        loop {
            let changed = self.changed_async.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if count(self) == 0 {
                return 0;
            }
            if Instant::now() >= deadline {
                return count(self);
            }
            let slice = deadline.min(Instant::now() + REFUSE_EVERY);
            let _ = tokio::time::timeout_at(slice.into(), changed).await;
            self.refuse_arrivals(&mut buf);
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

/// Whether a connection can go back to portmux between requests: HTTP/1 in
/// the clear (a TLS session's state is the service's, and other protocols
/// have no "between requests" portmux could know).
/// Plain HTTP/1, and HTTP/1 whose TLS portmux terminates (`https://`: the
/// stream is plaintext, and portmux keeps the TLS session while the next
/// instance takes over); not a TLS session the service holds (`tls://`).
pub(crate) fn movable(meta: &ConnMeta) -> bool {
    meta.proto == Proto::Http && !meta.route.starts_with("tls:")
}

/// A handed-out connection's part in the tracking: counted open until
/// dropped; gives itself back on the way out of a graceful shutdown.
#[derive(Debug)]
pub(crate) struct Tracked {
    pub(crate) handle: Arc<Handle>,
    pub(crate) meta: ConnMeta,
    pub(crate) movable: bool,
    /// Where its requests and responses stand (followed only when movable).
    exchange: Mutex<Exchange>,
    /// Nothing was read or written yet: any connection can go back as it came.
    fresh: AtomicBool,
    /// Counted among the listener's connections that can go back (movable,
    /// and its exchange not over).
    counted: AtomicBool,
    given_back: AtomicBool,
}

impl Tracked {
    pub(crate) fn new(handle: Arc<Handle>, meta: ConnMeta) -> Tracked {
        let movable = movable(&meta);
        handle.opened(movable);
        Tracked {
            movable,
            handle,
            meta,
            exchange: Mutex::new(Exchange::default()),
            fresh: AtomicBool::new(true),
            counted: AtomicBool::new(movable),
            given_back: AtomicBool::new(false),
        }
    }

    /// The service read `bytes` (requests).
    pub(crate) fn read(&self, bytes: &[u8]) {
        self.follow(bytes, Exchange::read);
    }

    /// The service wrote `bytes` (responses).
    pub(crate) fn wrote(&self, bytes: &[u8]) {
        self.follow(bytes, Exchange::wrote);
    }

    /// Feeds `bytes` to the exchange; once it is over, the connection no
    /// longer counts among those that can go back.
    fn follow(&self, bytes: &[u8], feed: fn(&mut Exchange, &[u8])) {
        if bytes.is_empty() {
            return;
        }
        self.fresh.store(false, Ordering::Relaxed);
        if self.movable {
            let mut x = lock(&self.exchange);
            feed(&mut x, bytes);
            if x.is_over() && self.counted.swap(false, Ordering::AcqRel) {
                self.handle.stuck();
            }
        }
    }

    /// Whether it can go back to portmux now: untouched, or (HTTP/1 in the
    /// clear) between requests.
    pub(crate) fn can_go_back(&self) -> bool {
        self.fresh.load(Ordering::Relaxed) || self.between_requests()
    }

    /// HTTP/1 in the clear, at rest: every request read has its final
    /// response written in full, nothing of a next one was read, and neither
    /// side asked to close. The next request, if any, is unread.
    pub(crate) fn between_requests(&self) -> bool {
        self.movable && lock(&self.exchange).at_rest()
    }

    /// Why it cannot go back now (when [`Tracked::can_go_back`] is false).
    pub(crate) fn why_not(&self) -> &'static str {
        if self.movable {
            "this connection is not between requests: a request is not answered in full yet, part of a next one \
             was read, or a side asked to close or switched protocols"
        } else {
            "only HTTP/1 connections (plain, or with TLS terminated by portmux) can be given back once used (a \
             tls:// session is the service's)"
        }
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
        self.handle.closed(self.counted.load(Ordering::Acquire));
    }
}
