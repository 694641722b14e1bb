//! Connections from the engine to its targets, kept per worker thread:
//! HTTP/1.1 keep-alive connections per backend (reused most recent first,
//! closed after `--pool-idle-timeout`, at most `--pool-max-idle` kept per
//! backend), and one multiplexed HTTP/2 connection per backend that asks
//! for it. Nothing here is shared between threads, so nothing is locked.

use super::ReqBody;
use crate::forward::backend::{ActiveGuard, Backend};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How long the pool keeps connections and how many.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

/// What a pooled connection leads to: a backend (by its identity while it lives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key(usize);

impl Key {
    pub fn of(backend: &Arc<Backend>) -> Key {
        Key(Arc::as_ptr(backend) as usize)
    }
}

#[derive(Debug)]
struct Idle {
    sender: http1::SendRequest<ReqBody>,
    since: Instant,
    backend: Weak<Backend>,
}

/// An idle connection of the direct path (`accept/direct.rs`): a socket
/// between exchanges, no hyper state.
#[derive(Debug)]
struct RawIdle {
    stream: Stream,
    since: Instant,
    backend: Weak<Backend>,
}

#[derive(Debug, Default)]
struct Pool {
    h1: HashMap<Key, Vec<Idle>>,
    raw: HashMap<Key, Vec<RawIdle>>,
    h2: HashMap<Key, (http2::SendRequest<ReqBody>, Weak<Backend>)>,
    limits: Option<Limits>,
    sweeping: bool,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// A connection taken from the pool (or made) for one exchange.
#[derive(Debug)]
pub struct Lease {
    key: Key,
    backend: Weak<Backend>,
    sender: Option<http1::SendRequest<ReqBody>>,
    /// Goes back to the pool at the end (not a connection that began with a PROXY header).
    pooled: bool,
    /// Counts the exchange among the backend's active ones (least connections).
    _active: ActiveGuard,
}

impl Lease {
    pub fn new(backend: &Arc<Backend>, sender: http1::SendRequest<ReqBody>, pooled: bool) -> Lease {
        let (key, weak) = (Key::of(backend), Arc::downgrade(backend));
        Lease { key, backend: weak, sender: Some(sender), pooled, _active: backend.connected() }
    }

    /// The backend this connection goes to, while it is one of its route's.
    pub fn backend(&self) -> Option<Arc<Backend>> {
        self.backend.upgrade()
    }

    pub fn sender(&mut self) -> &mut http1::SendRequest<ReqBody> {
        self.sender.as_mut().expect("a lease holds its sender until released")
    }

    /// The exchange ended cleanly: the connection goes back to the pool
    /// (hyper's side of it becomes ready for the next request as soon as
    /// its task runs; [`checkout`] waits for that).
    pub fn release(mut self) {
        let Some(sender) = self.sender.take().filter(|_| self.pooled) else { return };
        checkin(self.key, self.backend.clone(), sender);
    }
}

/// The most recently used idle HTTP/1.1 connection to `backend`, if one is open.
pub async fn checkout(backend: &Arc<Backend>) -> Option<Lease> {
    let key = Key::of(backend);
    // Given back but not ready yet (the backend answered before the request's
    // body was all sent): kept for later, not waited for.
    let mut busy = Vec::new();
    let found = loop {
        let idle = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let timeout = p.limits.map_or(Duration::from_secs(60), |l| l.idle_timeout);
            let list = p.h1.get_mut(&key)?;
            while let Some(idle) = list.pop() {
                let same = idle.backend.upgrade().is_some_and(|b| Arc::ptr_eq(&b, backend));
                if same && !idle.sender.is_closed() && idle.since.elapsed() < timeout {
                    return Some(idle);
                }
            }
            None
        });
        let Some(idle) = idle else { break None };
        if !idle.sender.is_ready() {
            // Given back a moment ago: its task has yet to see the end of the last exchange.
            tokio::task::yield_now().await;
        }
        if idle.sender.is_ready() {
            break Some(Lease::new(backend, idle.sender, true));
        }
        busy.push(idle);
    };
    if !busy.is_empty() {
        POOL.with(|p| p.borrow_mut().h1.entry(key).or_default().extend(busy));
    }
    found
}

fn checkin(key: Key, backend: Weak<Backend>, sender: http1::SendRequest<ReqBody>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let Some(limits) = p.limits else { return };
        let list = p.h1.entry(key).or_default();
        list.push(Idle { sender, since: Instant::now(), backend });
        if list.len() > limits.max_idle {
            list.remove(0); // The least recently used closes.
        }
        p.sweep_later(limits);
    });
}

/// The most recently used idle connection of the direct path to `backend`
/// that is still open (the backend has not closed it nor sent anything).
pub fn take_raw(backend: &Arc<Backend>) -> Option<Stream> {
    let key = Key::of(backend);
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let timeout = p.limits.map_or(Duration::from_secs(60), |l| l.idle_timeout);
        let list = p.raw.get_mut(&key)?;
        while let Some(idle) = list.pop() {
            let same = idle.backend.upgrade().is_some_and(|b| Arc::ptr_eq(&b, backend));
            if same && idle.since.elapsed() < timeout && !idle.stream.went_away() {
                return Some(idle.stream);
            }
        }
        None
    })
}

/// Keeps a connection of the direct path for the next exchange with `backend`.
pub fn put_raw(backend: &Arc<Backend>, stream: Stream) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let Some(limits) = p.limits else { return };
        let list = p.raw.entry(Key::of(backend)).or_default();
        list.push(RawIdle { stream, since: Instant::now(), backend: Arc::downgrade(backend) });
        if list.len() > limits.max_idle {
            list.remove(0);
        }
        p.sweep_later(limits);
    });
}

impl Pool {
    fn sweep_later(&mut self, limits: Limits) {
        if !self.sweeping {
            self.sweeping = true;
            tokio::task::spawn_local(sweep(limits.idle_timeout));
        }
    }
}

/// Closes idle connections past the idle timeout, until none is left.
async fn sweep(timeout: Duration) {
    loop {
        tokio::time::sleep((timeout / 2).max(Duration::from_millis(500))).await;
        let empty = POOL.with(|p| {
            let mut p = p.borrow_mut();
            p.h1.retain(|_, list| {
                list.retain(|i| i.since.elapsed() < timeout && !i.sender.is_closed() && i.backend.strong_count() > 0);
                !list.is_empty()
            });
            p.raw.retain(|_, list| {
                list.retain(|i| i.since.elapsed() < timeout && i.backend.strong_count() > 0 && !i.stream.went_away());
                !list.is_empty()
            });
            p.h2.retain(|_, (s, b)| !s.is_closed() && b.strong_count() > 0);
            let empty = p.h1.is_empty() && p.raw.is_empty();
            if empty {
                p.sweeping = false;
            }
            empty
        });
        if empty {
            return;
        }
    }
}

/// Sets this thread's limits (once per worker; later calls change nothing).
pub fn configure(limits: Limits) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.limits.is_none() {
            p.limits = Some(limits);
        }
    });
}

/// The open HTTP/2 connection to `backend`, if there is one.
pub fn h2(backend: &Arc<Backend>) -> Option<http2::SendRequest<ReqBody>> {
    POOL.with(|p| {
        let p = p.borrow();
        let (s, b) = p.h2.get(&Key::of(backend))?;
        (b.upgrade().is_some_and(|b| Arc::ptr_eq(&b, backend)) && !s.is_closed()).then(|| s.clone())
    })
}

pub fn put_h2(backend: &Arc<Backend>, sender: http2::SendRequest<ReqBody>) {
    POOL.with(|p| p.borrow_mut().h2.insert(Key::of(backend), (sender, Arc::downgrade(backend))));
}

/// A connected stream socket, TCP or Unix, for hyper.
#[derive(Debug)]
pub enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Stream {
    /// Watches a connected socket (made non-blocking here).
    pub fn new(fd: OwnedFd) -> io::Result<Stream> {
        let unix = rustix::net::getsockname(&fd).is_ok_and(|a| a.address_family() == rustix::net::AddressFamily::UNIX);
        portmux_sys::net::set_nonblocking(fd.as_fd(), true)?;
        if unix {
            Ok(Stream::Unix(tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?))
        } else {
            let _ = portmux_sys::net::set_nodelay(fd.as_fd());
            Ok(Stream::Tcp(tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))?))
        }
    }

    /// Whether the peer closed the connection (or sent something nobody
    /// asked for) while it was idle. Costs no system call unless the socket
    /// became readable since it was last read to the end.
    pub fn went_away(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let ready = match self {
            Stream::Tcp(s) => s.poll_read_ready(&mut cx),
            Stream::Unix(s) => s.poll_read_ready(&mut cx),
        };
        match ready {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                let read = match self {
                    Stream::Tcp(s) => s.try_read(&mut byte),
                    Stream::Unix(s) => s.try_read(&mut byte),
                };
                !matches!(read, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Starts HTTP/1.1 on a connected socket; its connection runs on this thread.
pub async fn handshake_h1(fd: OwnedFd, max_head: usize) -> io::Result<http1::SendRequest<ReqBody>> {
    let io = TokioIo::new(Stream::new(fd)?);
    let (sender, conn) =
        http1::Builder::new().max_buf_size(max_head.max(8192) * 2).handshake(io).await.map_err(io::Error::other)?;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::trace!("target connection ended: {e}");
        }
    });
    Ok(sender)
}

/// Starts HTTP/2 on a connected socket (prior knowledge: backends that ask for it).
pub async fn handshake_h2(fd: OwnedFd) -> io::Result<http2::SendRequest<ReqBody>> {
    let io = TokioIo::new(Stream::new(fd)?);
    let (sender, conn) = http2::Builder::new(super::LocalExec)
        .timer(hyper_util::rt::TokioTimer::new())
        .handshake(io)
        .await
        .map_err(io::Error::other)?;
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            tracing::trace!("h2 target connection ended: {e}");
        }
    });
    Ok(sender)
}
