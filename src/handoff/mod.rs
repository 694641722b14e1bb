//! Handing client fds to service sessions (SCM_RIGHTS), keeping portmux's copy
//! of each until the service acks it, and giving back the unacked ones when a
//! session dies so they are re-routed or parked, never dropped.

use crate::route::{ListenerId, Route, Target};
use crate::runtime::Shared;
use portmux_sys::{net, scm, uring};
use portmux_wire::{ConnMeta, Message};
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Identifies a control session for the life of the process.
pub type SessionId = u64;

/// A client connection on its way to a service.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    /// Shared so that a sender and the unacked map can both hold it; the socket
    /// closes (in this process) when the last copy goes.
    pub fd: Arc<OwnedFd>,
    pub listener: ListenerId,
    pub meta: ConnMeta,
    pub arrived: Instant,
    /// The session that rejected it last, and when; the next delivery avoids it.
    pub rejected_by: Option<(SessionId, Instant)>,
}

/// Why a hand-over did not happen; the connection comes back with it.
#[derive(Debug)]
pub enum Refusal {
    /// The session is closed, or the service closed its end (it is now marked failed).
    Dead(Conn),
    /// The session's socket stayed full for the whole patience, it has too many
    /// unacked, or the kernel refused for lack of resources.
    Busy(Conn),
}

impl Refusal {
    pub fn into_conn(self) -> Conn {
        match self {
            Refusal::Dead(c) | Refusal::Busy(c) => c,
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
    max_unacked: usize,
}

#[derive(Debug, Default)]
struct Unacked {
    /// Set once by the control plane; afterwards nothing new is accepted.
    closed: bool,
    conns: HashMap<u64, Conn>,
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

    /// Sends `conn` to the service; waits up to `patience` while its socket is full.
    /// Until the service acks, the connection stays in the unacked map.
    pub async fn hand_over(&self, mut conn: Conn, patience: Duration) -> Result<(), Refusal> {
        if !self.is_usable() {
            return Err(Refusal::Dead(conn));
        }
        // The metadata moves into the message for encoding and back out, uncopied.
        let msg = Message::Connection { id: conn.id, meta: conn.meta };
        let encoded = portmux_wire::encode(&msg);
        let Message::Connection { meta, .. } = msg else { unreachable!("built just above") };
        conn.meta = meta;
        let bytes = match encoded {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(conn = conn.id, "cannot encode a connection message: {e}");
                return Err(Refusal::Dead(conn));
            }
        };
        let (id, fd) = (conn.id, conn.fd.clone());
        {
            let mut u = self.unacked();
            if u.closed {
                return Err(Refusal::Dead(conn));
            }
            if u.conns.len() >= self.max_unacked {
                return Err(Refusal::Busy(conn));
            }
            u.conns.insert(id, conn);
        }
        let deadline = tokio::time::Instant::now() + patience;
        let dead = loop {
            match scm::send_with_fds(self.sock.as_fd(), &bytes, &[fd.as_fd()], scm::Wait::DontWait) {
                Ok(()) => {
                    tracing::debug!(conn = id, session = self.id, pid = std::process::id(), "handed over");
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let sock = self.sock.as_fd();
                    let waited =
                        uring::race(sock, uring::poll(sock, libc::POLLOUT as u32), tokio::time::sleep_until(deadline))
                            .await;
                    match waited {
                        uring::Raced::Done(Ok(_)) => {}
                        // Another task of this worker cancelled its own wait on this socket.
                        uring::Raced::Done(Err(e)) if e.raw_os_error() == Some(libc::ECANCELED) => {}
                        uring::Raced::Done(Err(_)) => break true,
                        uring::Raced::Stopped(_) => break false,
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(session = self.id, service = %self.name, "handoff failed: {e}");
                    // The service closed its end; other errors (ETOOMANYREFS,
                    // ENOBUFS) are pressure, not a dead session.
                    let closed = matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN));
                    break closed;
                }
            }
        };
        if dead {
            self.fail();
        }
        // Take it back, unless the control plane already did (the session ended).
        match self.unacked().conns.remove(&id) {
            Some(conn) if dead => Err(Refusal::Dead(conn)),
            Some(conn) => Err(Refusal::Busy(conn)),
            None => Ok(()),
        }
    }

    /// The service acknowledged `id`: portmux's copy can go. False if unknown.
    pub fn ack(&self, id: u64) -> bool {
        self.unacked().conns.remove(&id).is_some()
    }

    /// The service rejected `id`: take it back to deliver elsewhere.
    pub fn take(&self, id: u64) -> Option<Conn> {
        self.unacked().conns.remove(&id)
    }

    /// The service closed its end: the kernel discarded whatever it had not
    /// read, fds included, so every unacked connection is returned for re-routing.
    /// Only call this after end-of-file from the service, never while it may
    /// still read (that would give one client to two owners).
    pub fn close(&self) -> Vec<Conn> {
        self.failed.store(true, Ordering::Relaxed);
        let mut u = self.unacked();
        u.closed = true;
        u.conns.drain().map(|(_, c)| c).collect()
    }

    /// An upgrade takes the session to a new process: nothing new is sent here
    /// any more, and the unacked connections move with it (returned).
    pub fn freeze(&self) -> Vec<Conn> {
        let mut u = self.unacked();
        u.closed = true;
        let mut conns: Vec<Conn> = u.conns.drain().map(|(_, c)| c).collect();
        conns.sort_by_key(|c| c.id);
        conns
    }

    /// The upgrade failed: the session is this process's again, with its unacked.
    pub fn thaw(&self, conns: Vec<Conn>) {
        let mut u = self.unacked();
        u.closed = false;
        u.conns.extend(conns.into_iter().map(|c| (c.id, c)));
    }

    /// Takes over a connection the previous process had sent and not seen acked.
    pub fn adopt(&self, conn: Conn) {
        self.unacked().conns.insert(conn.id, conn);
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
        let mut u = self.unacked();
        u.closed = true;
        let n = u.conns.len();
        u.conns.clear();
        n
    }
}

impl AsFd for Session {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Worker side: deliver `conn` on `route` to a live session (round robin,
/// trying each once), or give it to the control plane to queue.
pub async fn deliver(mut conn: Conn, route: &Route, shared: &Shared) {
    if let Target::Pool(pool) = &route.target {
        for session in pool.order() {
            match session.hand_over(conn, shared.settings.handoff_patience).await {
                Ok(()) => return,
                Err(refusal) => conn = refusal.into_conn(),
            }
        }
    }
    // If the control plane is gone (shutting down), the connection closes here.
    let _ = shared.to_control.send(crate::runtime::ToControl::Conn(conn));
}
