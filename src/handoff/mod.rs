//! Handing client fds to service sessions (SCM_RIGHTS), keeping portmux's copy
//! of each until the service acks it, and giving back the unacked ones when a
//! session dies so they are re-routed or parked, never dropped.

use crate::ids::{ConnId, ListenerId, SessionId};
use portmux_sys::{net, scm, uring};
use portmux_wire::{ConnMeta, Message};
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Everything portmux knows about a connection on its way to a service, but
/// its socket: what the control plane's core keeps and decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnDesc {
    pub id: ConnId,
    /// The listener it came through.
    pub listener: ListenerId,
    pub meta: ConnMeta,
    pub arrived: Instant,
    /// The session that rejected it last, and when; the next delivery avoids it.
    pub rejected_by: Option<(SessionId, Instant)>,
    /// A service gave it back between requests: if it cannot be routed, it is
    /// closed (its client retries on a new connection) rather than answered.
    pub returned: bool,
    /// portmux terminated its TLS: the socket is a plaintext socketpair end,
    /// and the service learns these facts.
    pub tls: Option<Box<portmux_wire::TlsInfo>>,
}

/// A client connection on its way to a service.
#[derive(Debug)]
pub struct Conn {
    /// Shared so that a sender and the unacked map can both hold it; the socket
    /// closes (in this process) when the last copy goes.
    pub fd: Arc<OwnedFd>,
    pub desc: ConnDesc,
}

impl Conn {
    pub fn id(&self) -> ConnId {
        self.desc.id
    }
}

/// Why a hand-over did not happen; the connection comes back with it.
#[derive(Debug)]
pub enum Refusal {
    /// The service closed its end (the session is now marked failed), or the
    /// session had already failed.
    Dead(Conn),
    /// The session's socket stayed full for the whole patience, it has too many
    /// unacked, or the kernel refused for lack of resources.
    Busy(Conn),
    /// The control plane closed the session to new connections (it ended, or
    /// an upgrade is moving it): deliver it elsewhere, or through the control plane.
    Closed(Conn),
    /// Its connection message would exceed the protocol's size limit (a huge
    /// ALPN list, say): no session can take it; answer it. The session is fine.
    Unsendable(Conn),
}

impl Refusal {
    pub fn into_conn(self) -> Conn {
        match self {
            Refusal::Dead(c) | Refusal::Busy(c) | Refusal::Closed(c) | Refusal::Unsendable(c) => c,
        }
    }
}

/// A service's control session, shared by the control plane (which reads it)
/// and the workers (which send connections on it).
#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    pub name: String,
    pub pid: i32,
    pub uid: u32,
    /// Shared with the reader's reactor registration (an `Arc` keeps its fd stable).
    sock: Arc<OwnedFd>,
    failed: AtomicBool,
    unacked: Mutex<Unacked>,
    /// Wakes hand-overs waiting for room in the socket when the session closes.
    stop: Notify,
    /// Wakes whoever waits for the last hand-over in progress to end.
    sends_over: Notify,
    max_unacked: usize,
}

#[derive(Debug, Default)]
struct Unacked {
    /// Set by the control plane; afterwards nothing new is accepted.
    closed: bool,
    /// Sent (or being sent) and not acked; `false`: its send is still in progress.
    conns: HashMap<ConnId, (Conn, bool)>,
    /// Hand-overs in progress (each holds one not-yet-sent entry).
    sending: usize,
    /// Of those, the ones waiting for room in the socket.
    waiting: usize,
}

impl Session {
    pub fn new(id: SessionId, name: String, pid: i32, uid: u32, sock: OwnedFd, max_unacked: usize) -> Session {
        Session {
            id,
            name,
            pid,
            uid,
            sock: Arc::new(sock),
            failed: AtomicBool::new(false),
            unacked: Mutex::new(Unacked::default()),
            stop: Notify::new(),
            sends_over: Notify::new(),
            max_unacked,
        }
    }

    fn unacked(&self) -> MutexGuard<'_, Unacked> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.unacked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether new connections may be sent to it.
    pub fn is_usable(&self) -> bool {
        !self.failed.load(Ordering::Relaxed)
    }

    /// Stops sending to this session and shuts down portmux's sending side: the
    /// service reads what is already queued, then end-of-file, and closes (the
    /// client library reconnects). Its acks still arrive until then.
    pub fn fail(&self) {
        if !self.failed.swap(true, Ordering::Relaxed) {
            let _ = net::shutdown_write(self.sock.as_fd());
        }
    }

    /// Number of connections sent and not yet acked.
    pub fn unacked_len(&self) -> usize {
        self.unacked().conns.len()
    }

    /// Number of hand-overs waiting for room in the session's socket.
    pub fn waiting_for_room(&self) -> usize {
        self.unacked().waiting
    }

    /// Lends the listening socket `listener` (of `route`, at `listen`) to the
    /// service; waits up to `patience` while its socket is full.
    pub async fn lend(
        &self,
        route: &str,
        listen: std::net::SocketAddr,
        listener: BorrowedFd<'_>,
        patience: Duration,
    ) -> std::io::Result<()> {
        let msg = Message::Lend { route: route.to_string(), listen };
        let bytes = portmux_wire::encode(&msg).map_err(std::io::Error::other)?;
        let deadline = Instant::now() + patience;
        loop {
            if !self.is_usable() {
                return Err(std::io::ErrorKind::NotConnected.into());
            }
            match scm::send_with_fds(self.sock.as_fd(), &bytes, &[listener], scm::Wait::DontWait) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    /// Sends `conn` to the service; waits up to `patience` while its socket is
    /// full. Until the service acks, the connection stays in the unacked map.
    pub async fn hand_over(&self, mut conn: Conn, patience: Duration) -> Result<(), Refusal> {
        if !self.is_usable() {
            return Err(Refusal::Dead(conn));
        }
        // The metadata moves into the message for encoding and back out, uncopied.
        let id = conn.desc.id.0;
        let (encoded, meta, tls) = match conn.desc.tls.take() {
            None => {
                let msg = Message::Connection { id, meta: conn.desc.meta };
                let encoded = portmux_wire::encode(&msg);
                let Message::Connection { meta, .. } = msg else { unreachable!("built just above") };
                (encoded, meta, None)
            }
            Some(tls) => {
                let msg = Message::TlsConnection { id, meta: conn.desc.meta, tls: *tls };
                let encoded = portmux_wire::encode(&msg);
                let Message::TlsConnection { meta, tls, .. } = msg else { unreachable!("built just above") };
                (encoded, meta, Some(Box::new(tls)))
            }
        };
        conn.desc.meta = meta;
        conn.desc.tls = tls;
        let bytes = match encoded {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(conn = %conn.id(), peer = %conn.desc.meta.peer, "cannot describe a connection to a service: {e}");
                return Err(Refusal::Unsendable(conn));
            }
        };
        let (id, fd) = (conn.id(), conn.fd.clone());
        {
            let mut u = self.unacked();
            if u.closed {
                return Err(Refusal::Closed(conn));
            }
            if u.conns.len() >= self.max_unacked {
                return Err(Refusal::Busy(conn));
            }
            u.conns.insert(id, (conn, false));
            u.sending += 1;
        }
        // Undoes the count (and drops the unsent entry) if this future is
        // dropped before it ends (a health check's task aborted, say).
        let mut pending = PendingSend { session: self, id, over: false };
        let deadline = tokio::time::Instant::now() + patience;
        let outcome = loop {
            match scm::send_with_fds(self.sock.as_fd(), &bytes, &[fd.as_fd()], scm::Wait::DontWait) {
                Ok(()) => break Sent::Yes,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Registered before the check, so a close after it still wakes this wait.
                    let stopped = self.stop.notified();
                    let mut stopped = std::pin::pin!(stopped);
                    stopped.as_mut().enable();
                    if self.unacked().closed {
                        break Sent::Closed;
                    }
                    let sock = self.sock.as_fd();
                    let give_up = async {
                        tokio::select! {
                            () = tokio::time::sleep_until(deadline) => {}
                            () = stopped => {}
                        }
                    };
                    self.unacked().waiting += 1;
                    let waiting = Waiting(self);
                    let waited = uring::race(sock, uring::poll(sock, libc::POLLOUT as u32), give_up).await;
                    drop(waiting);
                    match waited {
                        uring::Raced::Done(Ok(_)) => {}
                        // Another task of this worker cancelled its own wait on this socket.
                        uring::Raced::Done(Err(e)) if e.raw_os_error() == Some(libc::ECANCELED) => {}
                        uring::Raced::Done(Err(_)) => break Sent::Dead,
                        uring::Raced::Stopped(_) if self.unacked().closed => break Sent::Closed,
                        uring::Raced::Stopped(_) => break Sent::Busy,
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(session = %self.id, service = %self.name, "handoff failed: {e}");
                    // The service closed its end; other errors (ETOOMANYREFS,
                    // ENOBUFS) are pressure, not a dead session.
                    let closed = matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN));
                    break if closed { Sent::Dead } else { Sent::Busy };
                }
            }
        };
        if let Sent::Dead = outcome {
            self.fail();
        }
        pending.over = true;
        let mut u = self.unacked();
        u.sending -= 1;
        if u.sending == 0 {
            self.sends_over.notify_waiters();
        }
        if let Sent::Yes = outcome {
            if let Some((_, sent)) = u.conns.get_mut(&id) {
                *sent = true;
            }
            tracing::debug!(conn = %id, session = %self.id, pid = std::process::id(), "handed over");
            return Ok(());
        }
        // Not there: the control plane took it meanwhile (the session ended): it is theirs now.
        let Some((conn, _)) = u.conns.remove(&id) else { return Ok(()) };
        Err(match outcome {
            Sent::Dead => Refusal::Dead(conn),
            Sent::Closed => Refusal::Closed(conn),
            Sent::Busy | Sent::Yes => Refusal::Busy(conn),
        })
    }

    /// The service acknowledged `ids`: portmux's copies can go. Returns the
    /// ids it did not know. The copies close after the lock is released: a
    /// close under it would make the workers handing over on this session
    /// wait for it (measured: the one contended futex under handoff load).
    pub fn ack(&self, ids: &[ConnId]) -> Vec<ConnId> {
        let mut gone = Vec::with_capacity(ids.len());
        let mut unknown = Vec::new();
        {
            let mut u = self.unacked();
            for id in ids {
                match u.conns.remove(id) {
                    Some((conn, _)) => gone.push(conn),
                    None => unknown.push(*id),
                }
            }
        }
        drop(gone);
        unknown
    }

    /// The service rejected `id`: take it back to deliver elsewhere.
    pub fn take(&self, id: ConnId) -> Option<Conn> {
        self.unacked().conns.remove(&id).map(|(c, _)| c)
    }

    /// The service closed its end: the kernel discarded whatever it had not
    /// read, fds included, so every unacked connection is returned for re-routing.
    /// Only call this after end-of-file from the service, never while it may
    /// still read (that would give one client to two owners).
    pub fn close(&self) -> Vec<Conn> {
        self.failed.store(true, Ordering::Relaxed);
        let mut u = self.unacked();
        u.closed = true;
        self.stop.notify_waiters();
        let mut conns: Vec<Conn> = u.conns.drain().map(|(_, (c, _))| c).collect();
        conns.sort_by_key(Conn::id);
        conns
    }

    /// An upgrade is taking the session to another process: nothing new is
    /// sent here any more, and hand-overs waiting for room give up now (their
    /// callers deliver those connections through the control plane).
    pub fn freeze(&self) {
        self.unacked().closed = true;
        self.stop.notify_waiters();
    }

    /// Waits until no hand-over is in progress on this session.
    pub async fn sends_done(&self) {
        loop {
            let over = self.sends_over.notified();
            let mut over = std::pin::pin!(over);
            over.as_mut().enable();
            if self.unacked().sending == 0 {
                return;
            }
            over.await;
        }
    }

    /// After [`Session::freeze`]: the connections sent and not acked, which
    /// move with the session (in id order). A send still in progress keeps
    /// its connection; it gives it back to its caller or completes.
    pub fn take_unacked(&self) -> Vec<Conn> {
        let mut u = self.unacked();
        let sent: Vec<ConnId> = u.conns.iter().filter(|(_, (_, sent))| *sent).map(|(id, _)| *id).collect();
        let mut conns: Vec<Conn> = sent.into_iter().filter_map(|id| u.conns.remove(&id)).map(|(c, _)| c).collect();
        conns.sort_by_key(Conn::id);
        conns
    }

    /// The upgrade failed: the session is this process's again, with its
    /// unacked. If it ended meanwhile (its service closed it), they come back
    /// instead, to be routed again.
    pub fn thaw(&self, conns: Vec<Conn>) -> Vec<Conn> {
        if !self.is_usable() {
            return conns;
        }
        let mut u = self.unacked();
        u.closed = false;
        u.conns.extend(conns.into_iter().map(|c| (c.id(), (c, true))));
        Vec::new()
    }

    /// Takes over a connection the previous process had sent and not seen acked.
    pub fn adopt(&self, conn: Conn) {
        self.unacked().conns.insert(conn.id(), (conn, true));
    }

    /// The session's socket (to hand it on in an upgrade).
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// The session's socket, shared (to register it with the reactor).
    pub fn shared_socket(&self) -> Arc<OwnedFd> {
        self.sock.clone()
    }

    /// The service did not close its end in time after portmux ended the
    /// session: it may still read the queued connections, so portmux only drops
    /// its own copies. Returns how many were unacked.
    pub fn abandon(&self) -> usize {
        self.failed.store(true, Ordering::Relaxed);
        let _ = net::shutdown_both(self.sock.as_fd());
        let gone = {
            let mut u = self.unacked();
            u.closed = true;
            self.stop.notify_waiters();
            std::mem::take(&mut u.conns)
        };
        gone.len() // Their copies close here, with the lock released.
    }
}

/// A hand-over in progress, counted in `sending`; see [`Session::hand_over`].
struct PendingSend<'a> {
    session: &'a Session,
    id: ConnId,
    /// It ended normally: the hand-over did its own accounting.
    over: bool,
}

impl Drop for PendingSend<'_> {
    fn drop(&mut self) {
        if self.over {
            return;
        }
        let mut u = self.session.unacked();
        u.sending -= 1;
        if u.conns.get(&self.id).is_some_and(|(_, sent)| !*sent) {
            u.conns.remove(&self.id);
        }
        if u.sending == 0 {
            self.session.sends_over.notify_waiters();
        }
    }
}

/// A hand-over waiting for room in the session's socket, counted in `waiting`.
struct Waiting<'a>(&'a Session);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.unacked().waiting -= 1;
    }
}

/// How one send attempt ended.
#[derive(Debug, Clone, Copy)]
enum Sent {
    Yes,
    Dead,
    Busy,
    Closed,
}

impl AsFd for Session {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
