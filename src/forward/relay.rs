//! Relaying bytes both ways between a client and a backend, with half-close,
//! an idle timeout, and bounded memory per connection.
//!
//! Each direction starts by copying through a pooled 16 KiB buffer (cheapest
//! for small exchanges) and switches to `splice(2)` through a pooled pipe as
//! soon as one read fills the buffer (a bulk flow: zero-copy from then on).
//! The splice and recv/send calls are plain non-blocking system calls
//! (io_uring's own splice on sockets is punted to worker threads and collapses
//! throughput). Readiness comes from the runtime's epoll reactor, where both
//! sockets are registered once (edge-triggered): measured here, a wait costs
//! no system call that way, where an io_uring PollAdd per wait halved the
//! keep-alive request rate.

use crate::sys::net;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Size of a copy buffer; a read that fills it marks a bulk flow.
const BUFFER: usize = 16 * 1024;
/// Size asked for each pipe.
const PIPE: usize = 256 * 1024;
/// Buffers and pipes kept per thread for reuse.
const POOLED: usize = 256;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe for splicing; returned to the pool only when empty.
#[derive(Debug)]
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    capacity: usize,
}

fn take_buffer() -> Box<[u8]> {
    BUFFERS.with(|b| b.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; BUFFER].into_boxed_slice())
}

fn give_buffer(buf: Box<[u8]>) {
    BUFFERS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < POOLED {
            b.push(buf);
        }
    });
}

fn take_pipe() -> Option<Pipe> {
    if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
        return Some(p);
    }
    net::pipe(PIPE).ok().map(|(r, w, capacity)| Pipe { r, w, capacity })
}

fn give_pipe(pipe: Pipe) {
    PIPES.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOLED {
            p.push(pipe);
        }
    });
}

/// Which end of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Backend => "backend",
        })
    }
}

/// How a relay moves bytes: `Auto` copies until a read fills the buffer, then
/// splices; the others force one way (for measurements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Auto,
    Copy,
    Splice,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "copy" => Ok(Mode::Copy),
            "splice" => Ok(Mode::Splice),
            _ => Err(format!("'{s}' is not a relay mode; use auto, copy or splice")),
        }
    }
}

/// Asks a relay to stop at its next safe point (both directions waiting to
/// read, no byte held in a buffer or pipe), so its sockets can move to another
/// process (an upgrade). Shared between the relay and whoever may pause it.
#[derive(Debug, Default)]
pub struct Pause {
    requested: Cell<bool>,
    wake: Notify,
}

impl Pause {
    pub fn request(&self) {
        self.requested.set(true);
        self.wake.notify_waiters();
    }

    pub fn is_requested(&self) -> bool {
        self.requested.get()
    }
}

/// Which directions are already over (their end-of-file passed on), e.g. for
/// a relay resumed after an upgrade.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Closed {
    /// The client's end-of-file reached the backend.
    pub client: bool,
    /// The backend's end-of-file reached the client.
    pub backend: bool,
}

/// Why a relay ended early.
#[derive(Debug)]
pub enum Failure {
    /// Reading from or writing to `side` failed.
    Io { side: Side, op: &'static str, error: io::Error },
    /// Neither side sent or took a byte for the idle timeout.
    Idle(Duration),
    /// The other direction failed first.
    Stopped,
    /// Paused at a safe point on request.
    Paused,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Io { side, op, error } => write!(f, "{side} failed while portmux was {op}: {error}"),
            Failure::Idle(d) => write!(f, "idle for {} (neither side sent or read)", humantime::format_duration(*d)),
            Failure::Stopped => f.write_str("stopped"),
            Failure::Paused => f.write_str("paused"),
        }
    }
}

/// How a relay went: bytes each way, and the failure if any.
#[derive(Debug)]
pub struct Outcome {
    pub to_backend: u64,
    pub to_client: u64,
    pub failure: Option<Failure>,
    /// It stopped at a safe point on request; `closed` says which directions
    /// were already over. The sockets can be handed on and resumed.
    pub paused: bool,
    pub closed: Closed,
}

/// The state both directions share.
struct Shared<'p> {
    idle: Duration,
    last: Cell<Instant>,
    stopped: Cell<bool>,
    stop: Notify,
    pause: &'p Pause,
}

impl Shared<'_> {
    fn touch(&self) {
        self.last.set(Instant::now());
    }

    fn stop(&self) {
        self.stopped.set(true);
        self.stop.notify_waiters();
    }

    /// Runs `op` on `fd` once it is ready for `interest`, retrying while it
    /// would block; gives up if the relay is stopped (the other direction
    /// failed, or the watchdog found both idle), and before a read once a pause
    /// is requested (nothing is held then). A short transfer (`short` says so)
    /// clears the readiness: the next call then waits for a new event instead
    /// of spending a system call on EAGAIN.
    async fn ready<R>(
        &self,
        fd: &AsyncFd<OwnedFd>,
        side: Side,
        writing: bool,
        mut op: impl FnMut(BorrowedFd<'_>) -> io::Result<R>,
        short: impl Fn(&R) -> bool,
    ) -> Result<R, Failure> {
        let failure = |error| Failure::Io { side, op: if writing { "writing" } else { "reading" }, error };
        loop {
            if self.stopped.get() {
                return Err(Failure::Stopped);
            }
            if !writing && self.pause.is_requested() {
                return Err(Failure::Paused);
            }
            let mut guard = tokio::select! {
                g = async { if writing { fd.writable().await } else { fd.readable().await } } => g.map_err(failure)?,
                () = self.stop.notified() => continue,
                () = self.pause.wake.notified() => continue,
            };
            match guard.try_io(|inner| op(inner.get_ref().as_fd())) {
                Ok(Ok(r)) => {
                    if short(&r) {
                        guard.clear_ready();
                    }
                    return Ok(r);
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(failure(e)),
                Err(_would_block) => {}
            }
        }
    }

    /// Ends the relay once neither direction has moved a byte for the idle
    /// timeout: one timer per relay, not one per wait.
    async fn watchdog(&self) -> Failure {
        loop {
            let deadline = self.last.get() + self.idle;
            if Instant::now() >= deadline {
                self.stop();
                return Failure::Idle(self.idle);
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Relays until both directions have ended (each end's EOF is passed on as a
/// half-close), one fails, or `pause` is requested and both reach a safe point.
/// Both must be non-blocking sockets registered for reading and writing;
/// `closed` skips directions already over.
pub async fn relay(
    client: &AsyncFd<OwnedFd>,
    backend: &AsyncFd<OwnedFd>,
    idle: Duration,
    mode: Mode,
    pause: &Pause,
    closed: Closed,
) -> Outcome {
    let shared =
        Shared { idle, last: Cell::new(Instant::now()), stopped: Cell::new(false), stop: Notify::new(), pause };
    let up = async {
        if closed.client { Ok(0) } else { pump(&shared, mode, client, Side::Client, backend, Side::Backend).await }
    };
    let down = async {
        if closed.backend { Ok(0) } else { pump(&shared, mode, backend, Side::Backend, client, Side::Client).await }
    };
    let both = async { tokio::join!(up, down) };
    let mut idle = None;
    let (up, down) = {
        let mut both = std::pin::pin!(both);
        tokio::select! {
            biased;
            r = &mut both => r,
            f = shared.watchdog() => {
                // The directions see the stop and finish their waits.
                idle = Some(f);
                both.await
            }
        }
    };
    let paused = [&up, &down].iter().any(|r| matches!(r, Err((_, Failure::Paused))));
    let closed = Closed { client: up.is_ok(), backend: down.is_ok() };
    let mut failure = idle;
    let mut bytes = |r: Result<u64, (u64, Failure)>| match r {
        Ok(n) => n,
        Err((n, Failure::Paused)) => n,
        Err((n, f)) => {
            if failure.is_none() || matches!(failure, Some(Failure::Stopped)) {
                failure = Some(f);
            }
            n
        }
    };
    let (to_backend, to_client) = (bytes(up), bytes(down));
    Outcome { to_backend, to_client, paused: paused && failure.is_none(), closed, failure }
}

/// One direction: from `src` to `dst` until `src`'s EOF, then shut down `dst`'s write side.
async fn pump(
    shared: &Shared<'_>,
    mode: Mode,
    src: &AsyncFd<OwnedFd>,
    src_side: Side,
    dst: &AsyncFd<OwnedFd>,
    dst_side: Side,
) -> Result<u64, (u64, Failure)> {
    let mut total = 0u64;
    let mut pipe: Option<Pipe> = if mode == Mode::Splice { take_pipe() } else { None };
    let ends = Ends { src, src_side, dst, dst_side };
    let result = pump_inner(shared, mode, &ends, &mut total, &mut pipe).await;
    if let Some(p) = pipe {
        // A pipe that still holds bytes cannot be reused.
        if result.is_ok() {
            give_pipe(p);
        }
    }
    match result {
        Ok(()) => {
            let _ = net::shutdown_write(dst.get_ref().as_fd());
            Ok(total)
        }
        Err(Failure::Paused) => Err((total, Failure::Paused)),
        Err(f) => {
            shared.stop();
            Err((total, f))
        }
    }
}

/// The two sockets of one direction.
struct Ends<'a> {
    src: &'a AsyncFd<OwnedFd>,
    src_side: Side,
    dst: &'a AsyncFd<OwnedFd>,
    dst_side: Side,
}

async fn pump_inner(
    shared: &Shared<'_>,
    mode: Mode,
    e: &Ends<'_>,
    total: &mut u64,
    pipe: &mut Option<Pipe>,
) -> Result<(), Failure> {
    loop {
        if let Some(p) = pipe.as_ref() {
            // Bulk: socket → pipe → socket, never through user space.
            let cap = p.capacity;
            let w = p.w.as_fd();
            let n = shared.ready(e.src, e.src_side, false, |fd| net::splice(fd, w, cap), |&n| n > 0 && n < cap).await?;
            if n == 0 {
                return Ok(());
            }
            let mut left = n;
            while left > 0 {
                let r = p.r.as_fd();
                left -= shared.ready(e.dst, e.dst_side, true, |fd| net::splice(r, fd, left), |&m| m < left).await?;
            }
            *total += n as u64;
            shared.touch();
            continue;
        }
        // The buffer comes from the pool only once bytes are ready: an idle
        // connection holds none.
        let read = |fd: BorrowedFd<'_>| {
            let mut buf = take_buffer();
            match net::recv(fd, &mut buf) {
                Ok(n) => Ok((buf, n)),
                Err(err) => {
                    give_buffer(buf);
                    Err(err)
                }
            }
        };
        let (buf, n) = shared.ready(e.src, e.src_side, false, read, |(b, n)| *n > 0 && *n < b.len()).await?;
        let size = buf.len();
        if n == 0 {
            give_buffer(buf);
            return Ok(());
        }
        let mut sent = 0;
        while sent < n {
            let left = n - sent;
            match shared.ready(e.dst, e.dst_side, true, |fd| net::send(fd, &buf[sent..n]), |&m| m < left).await {
                Ok(m) => sent += m,
                Err(f) => {
                    give_buffer(buf);
                    return Err(f);
                }
            }
        }
        give_buffer(buf);
        *total += n as u64;
        shared.touch();
        if n == size && mode == Mode::Auto {
            *pipe = take_pipe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};

    fn run(client: OwnedFd, backend: OwnedFd, idle: Duration) -> Outcome {
        tokio_uring::start(async move {
            let interest = tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE;
            let c = crate::sys::reactor::register(client, interest).unwrap();
            let b = crate::sys::reactor::register(backend, interest).unwrap();
            relay(&c, &b, idle, Mode::Auto, &Pause::default(), Closed::default()).await
        })
    }

    #[test]
    fn a_paused_relay_holds_nothing_and_resumes_elsewhere_byte_exact() {
        let (client_end, mut client) = pair();
        let (backend_end, mut backend) = pair();
        let (client_end, backend_end) = tokio_uring::start(async move {
            let interest = tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE;
            let c = crate::sys::reactor::register(client_end, interest).unwrap();
            let b = crate::sys::reactor::register(backend_end, interest).unwrap();
            let pause = Pause::default();
            let stop_soon = async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                pause.request();
            };
            let relaying = relay(&c, &b, Duration::from_secs(5), Mode::Auto, &pause, Closed::default());
            let (outcome, ()) = tokio::join!(relaying, stop_soon);
            assert!(outcome.paused && outcome.failure.is_none(), "{outcome:?}");
            (c.into_inner(), b.into_inner())
        });
        // While paused (between relays), bytes wait in the kernel.
        client.write_all(b"sent while paused").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let echo = std::thread::spawn(move || {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).unwrap();
            backend.write_all(&got).unwrap();
        });
        // A new relay (as in the new process) picks up where the old one paused.
        let outcome = run(client_end, backend_end, Duration::from_secs(5));
        assert!(outcome.failure.is_none() && !outcome.paused, "{outcome:?}");
        echo.join().unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"sent while paused");
    }

    /// A connected pair of TCP sockets: (our end, the peer's end).
    fn pair() -> (OwnedFd, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (ours.into(), peer)
    }

    #[test]
    fn relays_both_ways_byte_exact_with_half_close() {
        let (client_end, mut client) = pair();
        let (backend_end, mut backend) = pair();
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let up = payload.clone();
        let writer = std::thread::spawn(move || {
            client.write_all(&up).unwrap();
            client.shutdown(Shutdown::Write).unwrap(); // half-close: still reads the answer
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).unwrap();
            answer
        });
        let echo = std::thread::spawn(move || {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).unwrap();
            backend.write_all(&got).unwrap();
            backend.write_all(b"!").unwrap();
            got.len()
        });
        let outcome = run(client_end, backend_end, Duration::from_secs(10));
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
        assert_eq!(echo.join().unwrap(), payload.len());
        let answer = writer.join().unwrap();
        assert_eq!(answer.len(), payload.len() + 1);
        assert!(answer[..payload.len()] == payload[..], "the relayed bytes are exact");
        assert_eq!((outcome.to_backend, outcome.to_client), (payload.len() as u64, payload.len() as u64 + 1));
    }

    #[test]
    fn idle_relays_end_and_resets_name_the_side() {
        let (client_end, _client) = pair();
        let (backend_end, _backend) = pair();
        let outcome = run(client_end, backend_end, Duration::from_millis(100));
        assert!(matches!(outcome.failure, Some(Failure::Idle(_))), "{:?}", outcome.failure);

        let (client_end, mut client) = pair();
        let (backend_end, backend) = pair();
        client.write_all(b"x").unwrap();
        // The backend resets: SO_LINGER 0 makes close() send RST.
        rustix::net::sockopt::set_socket_linger(&backend, Some(Duration::ZERO)).unwrap();
        drop(backend);
        let outcome = run(client_end, backend_end, Duration::from_secs(5));
        match outcome.failure {
            Some(Failure::Io { side: Side::Backend, .. }) => {}
            other => panic!("expected a backend failure, got {other:?}"),
        }
    }
}
