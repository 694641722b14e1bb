//! Relaying bytes both ways between a client and a backend, with half-close,
//! an idle timeout, and bounded memory per connection.
//!
//! Each direction starts by copying through a pooled 16 KiB buffer (cheapest
//! for small exchanges) and switches to `splice(2)` through a pooled pipe as
//! soon as one read fills the buffer (a bulk flow: zero-copy from then on).
//! Readiness comes from io_uring PollAdd; the splice and recv/send calls are
//! plain non-blocking system calls (io_uring's own splice on sockets is punted
//! to worker threads and collapses throughput).

use crate::sys::{net, uring};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;
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

/// Why a relay ended early.
#[derive(Debug)]
pub enum Failure {
    /// Reading from or writing to `side` failed.
    Io { side: Side, op: &'static str, error: io::Error },
    /// Neither side sent or took a byte for the idle timeout.
    Idle(Duration),
    /// The other direction failed first.
    Stopped,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Io { side, op, error } => write!(f, "{side} failed while portmux was {op}: {error}"),
            Failure::Idle(d) => write!(f, "idle for {} (neither side sent or read)", humantime::format_duration(*d)),
            Failure::Stopped => f.write_str("stopped"),
        }
    }
}

/// How a relay went: bytes each way, and the failure if any.
#[derive(Debug)]
pub struct Outcome {
    pub to_backend: u64,
    pub to_client: u64,
    pub failure: Option<Failure>,
}

/// The state both directions share.
struct Shared {
    idle: Duration,
    last: Cell<Instant>,
    stopped: Cell<bool>,
    stop: Notify,
}

impl Shared {
    fn touch(&self) {
        self.last.set(Instant::now());
    }

    fn stop(&self) {
        self.stopped.set(true);
        self.stop.notify_waiters();
    }

    /// Waits for `mask` on `fd`, giving up when both directions have been idle
    /// for the timeout or the other direction failed.
    async fn wait(&self, fd: BorrowedFd<'_>, side: Side, mask: i16) -> Result<(), Failure> {
        loop {
            if self.stopped.get() {
                return Err(Failure::Stopped);
            }
            let deadline = self.last.get() + self.idle;
            if Instant::now() >= deadline {
                return Err(Failure::Idle(self.idle));
            }
            let stop = async {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = self.stop.notified() => {}
                }
            };
            // POLLIN also fires at end-of-file; no POLLRDHUP, which would keep
            // firing a POLLOUT wait once the peer has half-closed.
            match uring::race(fd, uring::poll(fd, mask as u32), stop).await {
                uring::Raced::Done(Ok(_)) => return Ok(()),
                // The other direction cancelled its own wait on this fd; wait again.
                uring::Raced::Done(Err(e)) if e.raw_os_error() == Some(libc::ECANCELED) => {}
                uring::Raced::Done(Err(error)) => return Err(Failure::Io { side, op: "polling", error }),
                // Deadline or stop: the loop re-checks both (activity may have moved the deadline).
                uring::Raced::Stopped(_) => {}
            }
        }
    }
}

/// Relays until both directions have ended (each end's EOF is passed on as a
/// half-close) or one fails. Both fds must be non-blocking sockets.
pub async fn relay(client: BorrowedFd<'_>, backend: BorrowedFd<'_>, idle: Duration) -> Outcome {
    let shared = Shared { idle, last: Cell::new(Instant::now()), stopped: Cell::new(false), stop: Notify::new() };
    let up = pump(&shared, client, Side::Client, backend, Side::Backend);
    let down = pump(&shared, backend, Side::Backend, client, Side::Client);
    let (up, down) = tokio::join!(up, down);
    let mut failure = None;
    let mut bytes = |r: Result<u64, (u64, Failure)>| match r {
        Ok(n) => n,
        Err((n, f)) => {
            if failure.is_none() || matches!(failure, Some(Failure::Stopped)) {
                failure = Some(f);
            }
            n
        }
    };
    let (to_backend, to_client) = (bytes(up), bytes(down));
    Outcome { to_backend, to_client, failure }
}

/// One direction: from `src` to `dst` until `src`'s EOF, then shut down `dst`'s write side.
async fn pump(
    shared: &Shared,
    src: BorrowedFd<'_>,
    src_side: Side,
    dst: BorrowedFd<'_>,
    dst_side: Side,
) -> Result<u64, (u64, Failure)> {
    let mut total = 0u64;
    let mut pipe: Option<Pipe> = None;
    let result = pump_inner(shared, src, src_side, dst, dst_side, &mut total, &mut pipe).await;
    if let Some(p) = pipe {
        // A pipe that still holds bytes cannot be reused.
        if result.is_ok() {
            give_pipe(p);
        }
    }
    match result {
        Ok(()) => {
            let _ = net::shutdown_write(dst);
            Ok(total)
        }
        Err(f) => {
            shared.stop();
            Err((total, f))
        }
    }
}

fn io_failure(side: Side, op: &'static str) -> impl FnOnce(io::Error) -> Failure {
    move |error| Failure::Io { side, op, error }
}

async fn pump_inner(
    shared: &Shared,
    src: BorrowedFd<'_>,
    src_side: Side,
    dst: BorrowedFd<'_>,
    dst_side: Side,
    total: &mut u64,
    pipe: &mut Option<Pipe>,
) -> Result<(), Failure> {
    loop {
        if let Some(p) = pipe.as_ref() {
            // Bulk: socket → pipe → socket, never through user space.
            let n = match net::splice(src, p.w.as_fd(), p.capacity) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    shared.wait(src, src_side, libc::POLLIN).await?;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_failure(src_side, "reading")(e)),
            };
            let mut left = n;
            while left > 0 {
                match net::splice(p.r.as_fd(), dst, left) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        shared.wait(dst, dst_side, libc::POLLOUT).await?
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_failure(dst_side, "writing")(e)),
                }
            }
            *total += n as u64;
            shared.touch();
            continue;
        }
        let mut buf = take_buffer();
        let n = match net::recv(src, &mut buf) {
            Ok(0) => {
                give_buffer(buf);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) => {
                give_buffer(buf);
                match e.kind() {
                    io::ErrorKind::WouldBlock => shared.wait(src, src_side, libc::POLLIN).await?,
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(io_failure(src_side, "reading")(e)),
                }
                continue;
            }
        };
        let mut sent = 0;
        while sent < n {
            match net::send(dst, &buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(f) = shared.wait(dst, dst_side, libc::POLLOUT).await {
                        give_buffer(buf);
                        return Err(f);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    give_buffer(buf);
                    return Err(io_failure(dst_side, "writing")(e));
                }
            }
        }
        let bulk = n == buf.len();
        give_buffer(buf);
        *total += n as u64;
        shared.touch();
        if bulk {
            *pipe = take_pipe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};

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
        let outcome = tokio_uring::start(relay(client_end.as_fd(), backend_end.as_fd(), Duration::from_secs(10)));
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
        let outcome = tokio_uring::start(relay(client_end.as_fd(), backend_end.as_fd(), Duration::from_millis(100)));
        assert!(matches!(outcome.failure, Some(Failure::Idle(_))), "{:?}", outcome.failure);

        let (client_end, mut client) = pair();
        let (backend_end, backend) = pair();
        client.write_all(b"x").unwrap();
        // The backend resets: SO_LINGER 0 makes close() send RST.
        rustix::net::sockopt::set_socket_linger(&backend, Some(Duration::ZERO)).unwrap();
        drop(backend);
        let outcome = tokio_uring::start(relay(client_end.as_fd(), backend_end.as_fd(), Duration::from_secs(5)));
        match outcome.failure {
            Some(Failure::Io { side: Side::Backend, .. }) => {}
            other => panic!("expected a backend failure, got {other:?}"),
        }
    }
}
