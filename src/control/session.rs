//! One service's control session, from Hello to the end: registrations, acks,
//! rejects, drain and bye; a malformed or out-of-order message ends this
//! session alone, with an Error naming the problem.

use super::core::Mode;
use super::driver::{Control, Lifecycle};
use super::error::SessionError;
use crate::config::limits::Limit;
use crate::config::policy::Peer;
use crate::handoff::Session;
use crate::ids::ConnId;
use portmux_sys::{net, reactor, scm};
use portmux_wire::spec::validate_service_name;
use portmux_wire::{MAX_MESSAGE, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How long a session refused by a limit may take to read why.
const REFUSAL_LINGER: Duration = Duration::from_millis(300);
/// A new session must say Hello within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A reply that cannot be written for this long ends the session.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// After portmux ends a session, how long the service has to close its end
/// before portmux drops its own copies of the unacked connections.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts control connections until aborted; waits while the control plane
/// does not serve (an upgrade froze it), so those services reach whichever
/// process serves next.
pub(super) async fn accept_sessions(control: Rc<Control>, fd: OwnedFd) {
    let listener = match reactor::register(fd, Interest::READABLE) {
        Ok(l) => l,
        Err(e) => return tracing::error!("cannot watch the control socket: {e}"),
    };
    let mut lifecycle = control.lifecycle();
    loop {
        match lifecycle.wait_for(|l| *l != Lifecycle::Frozen).await.map(|l| *l) {
            Ok(Lifecycle::Serving) => {}
            _ => return,
        }
        let mut ready = tokio::select! {
            r = listener.readable() => match r {
                Ok(r) => r,
                Err(e) => return tracing::error!("control socket failed: {e}"),
            },
            _ = lifecycle.changed() => continue,
        };
        loop {
            match net::seqpacket_accept(listener.get_ref().as_fd()) {
                Ok(Some((fd, cred))) => {
                    let pid = cred.pid.as_raw_nonzero().get();
                    let peer = Peer::from_socket(fd.as_fd(), pid, cred.uid.as_raw(), cred.gid.as_raw());
                    let admitted = Counts::admit(&control, &peer);
                    tokio_uring::spawn(serve(control.clone(), fd, peer, admitted));
                }
                Ok(None) => {
                    ready.clear_ready();
                    break;
                }
                Err(e) => {
                    tracing::warn!("cannot accept a control connection: {e}");
                    drop(ready);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
    }
}

/// Why a received datagram is not a message portmux takes.
enum RecvError {
    /// The socket failed; treated as the service closing.
    Io,
    /// Malformed, oversized, or carrying fds: sent back as Error.
    Protocol(SessionError),
}

/// Receives one message; `Ok(None)` at end-of-file. Only GiveBack carries an
/// fd (its connection); a message with fds is refused unless it is that.
async fn recv<T: AsRawFd + AsFd>(afd: &AsyncFd<T>, buf: &mut [u8]) -> Result<Option<Message>, RecvError> {
    Ok(recv_with_fd(afd, buf).await?.map(|(msg, _)| msg))
}

/// Receives one message and the fd a GiveBack carries.
async fn recv_with_fd<T: AsRawFd + AsFd>(
    afd: &AsyncFd<T>,
    buf: &mut [u8],
) -> Result<Option<(Message, Option<OwnedFd>)>, RecvError> {
    let mut read = |s: &T| match scm::recv_with_fds(s, buf, scm::Wait::DontWait) {
        // The service closed with messages of ours unread: the kernel reports
        // that once, before the messages it had sent (its last give-backs, its
        // Bye), which are still there to read; the end-of-file follows them.
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => scm::recv_with_fds(s, buf, scm::Wait::DontWait),
        other => other,
    };
    let mut dg = match afd.async_io(Interest::READABLE, |s| read(s)).await {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return Ok(None),
        Err(e) => {
            tracing::debug!("control session read failed: {e}");
            return Err(RecvError::Io);
        }
    };
    if dg.truncated {
        return Err(RecvError::Protocol(SessionError::Oversized { len: dg.len, max: MAX_MESSAGE }));
    }
    if dg.is_eof() {
        return Ok(None);
    }
    let msg: Message = portmux_wire::decode(&buf[..dg.len])
        .map_err(|e| RecvError::Protocol(SessionError::Malformed(e.to_string())))?;
    match msg {
        Message::GiveBack { .. } if dg.fds.len() == 1 && !dg.fds_truncated => {
            let fd = dg.fds.pop();
            Ok(Some((msg, fd)))
        }
        // The kernel dropped the fd: portmux is out of file descriptors. That
        // connection is lost, the session is fine.
        Message::GiveBack { .. } if dg.fds.is_empty() && dg.fds_truncated => Ok(Some((msg, None))),
        Message::GiveBack { .. } => Err(RecvError::Protocol(SessionError::GiveBackFds(dg.fds.len()))),
        _ if !dg.fds.is_empty() || dg.fds_truncated => Err(RecvError::Protocol(SessionError::FdsSent)),
        _ => Ok(Some((msg, None))),
    }
}

/// Sends one message, waiting while the socket is full, for at most SEND_TIMEOUT.
async fn send<T: AsRawFd + AsFd>(afd: &AsyncFd<T>, msg: &Message) -> std::io::Result<()> {
    let bytes = portmux_wire::encode(msg).map_err(std::io::Error::other)?;
    let sending = afd.async_io(Interest::WRITABLE, |s| scm::send_datagram(s.as_fd(), &bytes, scm::Wait::DontWait));
    tokio::time::timeout(SEND_TIMEOUT, sending).await.map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// How a session's message loop ended.
enum End {
    /// An upgrade is moving the session to a new process: leave it untouched.
    Frozen,
    /// The service closed its end.
    Closed,
    /// The service said Bye.
    Bye,
    /// A protocol error, sent back to the service.
    Error(SessionError),
}

/// Control connections open, in all and by uid.
#[derive(Debug, Default)]
pub(super) struct Counts {
    all: std::cell::Cell<usize>,
    by_uid: std::cell::RefCell<std::collections::HashMap<u32, usize>>,
}

/// A control connection counted while it lives.
pub(super) struct Counted {
    control: Rc<Control>,
    uid: u32,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let counts = &self.control.session_counts;
        counts.all.set(counts.all.get() - 1);
        let mut by_uid = counts.by_uid.borrow_mut();
        if let Some(n) = by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                by_uid.remove(&self.uid);
            }
        }
    }
}

impl Counts {
    /// Counts a new control connection of `peer`, or says which limit it is over.
    fn admit(control: &Rc<Control>, peer: &Peer) -> Result<Counted, SessionError> {
        let settings = &control.shared.settings;
        let (limits, counts) = (&settings.limits, &control.session_counts);
        let refuse = |limit: Limit, most: usize, whose: String| {
            settings.limit_hits.hit(limit);
            Err(SessionError::TooMany { whose, most, flag: limit.flag() })
        };
        // Root's and portmux's own services always get in: others cannot lock them out.
        let privileged = settings.policy.privileged(peer);
        if counts.all.get() >= limits.sessions && !privileged {
            return refuse(Limit::Sessions, limits.sessions, "portmux has".into());
        }
        let mine = counts.by_uid.borrow().get(&peer.uid).copied().unwrap_or(0);
        if mine >= limits.sessions_per_uid && !privileged {
            return refuse(Limit::SessionsPerUid, limits.sessions_per_uid, format!("uid {} has", peer.uid));
        }
        counts.all.set(counts.all.get() + 1);
        *counts.by_uid.borrow_mut().entry(peer.uid).or_insert(0) += 1;
        Ok(Counted { control: control.clone(), uid: peer.uid })
    }
}

async fn serve(control: Rc<Control>, fd: OwnedFd, peer: Peer, admitted: Result<Counted, SessionError>) {
    let (pid, uid) = (peer.pid, peer.uid);
    let Ok(afd) = reactor::register(fd, Interest::READABLE | Interest::WRITABLE) else { return };
    let _counted = match admitted {
        Ok(c) => c,
        Err(e) => return refuse_early(&afd, pid, e).await,
    };
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (service, version) = match tokio::time::timeout(HELLO_TIMEOUT, recv(&afd, &mut buf)).await {
        Ok(Ok(Some(Message::Hello { version, service }))) => {
            let problem = if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
                Some(SessionError::Version { version })
            } else {
                validate_service_name(&service).err().map(SessionError::BadName)
            };
            if let Some(reason) = problem {
                return refuse_early(&afd, pid, reason).await;
            }
            (service, version)
        }
        Ok(Ok(Some(Message::Upgrade { binary }))) => {
            return upgrade_requested(&control, &afd, &peer, binary).await;
        }
        Ok(Ok(Some(other))) => return refuse_early(&afd, pid, SessionError::NotHello(other.kind())).await,
        Ok(Ok(None)) | Ok(Err(RecvError::Io)) => return,
        Ok(Err(RecvError::Protocol(reason))) => return refuse_early(&afd, pid, reason).await,
        Err(_) => return refuse_early(&afd, pid, SessionError::NoHello(HELLO_TIMEOUT.as_secs())).await,
    };
    if control.mode() != Mode::Serving {
        // An upgrade is moving the sessions; this service reconnects to the new portmux.
        return;
    }
    let session = control.open_session(service, peer, afd.into_inner());
    tracing::info!(session = %session.id, service = %session.name, pid, uid, "service connected");
    run(control, session, Some(version)).await;
}

/// The first protocol version whose services understand [`Message::Lend`].
const LEND_VERSION: u32 = 3;

/// Claims `routes` for `session` (with the certificate it sent): the answer.
fn registration(
    control: &Rc<Control>,
    session: &Session,
    version: Option<u32>,
    routes: &[String],
    cert: Option<Arc<crate::tls::certs::CertSlot>>,
) -> Message {
    let sid = session.id;
    let lend = |r: &&String| portmux_wire::spec::RouteSpec::parse(r).is_ok_and(|s| s.lend);
    if version.is_none_or(|v| v < LEND_VERSION)
        && let Some(route) = routes.iter().find(lend)
    {
        let reason = match version {
            Some(v) => format!(
                "lend needs a client library that speaks control protocol {LEND_VERSION} (this session speaks {v}): \
                 update libportmux / portmux-client, or claim without lend"
            ),
            None => "lend needs a session that said which control protocol it speaks, and this one began before \
                     portmux's last upgrade: claim it from a new session"
                .to_string(),
        };
        tracing::info!(session = %sid, service = %session.name, %route, "refused: {reason}");
        return Message::Refused { route: route.clone(), reason };
    }
    match control.register(sid, routes, cert) {
        Ok(bound) => {
            for b in &bound {
                tracing::info!(session = %sid, service = %session.name, route = %b.route, listen = %b.listen, "registered");
            }
            Message::Registered { routes: bound }
        }
        Err(e) => {
            let route = e.route().to_string();
            tracing::info!(session = %sid, service = %session.name, %route, "refused: {e}");
            Message::Refused { route, reason: e.to_string() }
        }
    }
}

/// The service received connections `ids`: portmux's copies close.
fn acked(control: &Control, session: &Session, ids: &[u64]) {
    let ids: Vec<ConnId> = ids.iter().map(|&id| ConnId(id)).collect();
    let unknown = session.ack(&ids);
    for id in &unknown {
        tracing::debug!(session = %session.id, conn = %id, "ack for an unknown connection");
    }
    if unknown.len() < ids.len() {
        control.acked.notify_waiters();
    }
}

/// Reads a session's messages until it ends, or until an upgrade freezes the
/// control plane (then only at the receive point, never mid-message).
/// `version`: the protocol the session said Hello in (`None`: it came from
/// the previous process, which does not hand that over).
pub(super) async fn run(control: Rc<Control>, session: Arc<Session>, version: Option<u32>) {
    let sid = session.id;
    let pid = session.pid;
    let _reader = control.reader_started(sid);
    let afd = match reactor::register(session.shared_socket(), Interest::READABLE | Interest::WRITABLE) {
        Ok(afd) => afd,
        Err(e) => {
            // Unreadable: end it as after a protocol error, without waiting for a close.
            tracing::warn!(session = %sid, service = %session.name, "cannot watch the session's socket: {e}; ending it");
            session.fail();
            control.end_session(sid);
            let n = session.abandon();
            if n > 0 {
                tracing::warn!(session = %sid, "dropped portmux's copies of {n} unacked connections");
            }
            return;
        }
    };
    // Zeroed when dropped: a RegisterTls that did not decode held a key.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_MESSAGE]);
    let mut lifecycle = control.lifecycle();
    let end = loop {
        let next = tokio::select! {
            biased;
            // Stopping, readers go on: the services' last acks still come.
            _ = lifecycle.wait_for(|l| *l == Lifecycle::Frozen) => break End::Frozen,
            r = recv_with_fd(&afd, &mut buf) => r,
        };
        match next {
            Ok(None) | Err(RecvError::Io) => break End::Closed,
            Err(RecvError::Protocol(reason)) => break End::Error(reason),
            Ok(Some((Message::GiveBack { route, peer, local }, Some(fd)))) => {
                let holds = control.routes_of(sid);
                if let Err(reason) = control.given_back(sid, &holds, &route, (peer, local), fd) {
                    break End::Error(reason);
                }
            }
            Ok(Some((Message::GiveBack { peer, .. }, None))) => {
                tracing::warn!(session = %sid, client = %peer, "a connection given back was lost: portmux has no file descriptor left for it (raise its open-file limit, LimitNOFILE=)");
            }
            Ok(Some((Message::RegisterTls { routes, chain, key }, _))) => {
                // The datagram held the key: zeroed now that it is decoded.
                zeroize::Zeroize::zeroize(&mut buf[..]);
                let (chain, key) = (zeroize::Zeroizing::new(chain), zeroize::Zeroizing::new(key));
                let reply = match crate::tls::certs::CertSlot::from_service(chain, key) {
                    Ok(slot) => registration(&control, &session, version, &routes, Some(slot)),
                    Err(e) => {
                        let route = routes.iter().find(|r| r.starts_with("https")).cloned().unwrap_or_default();
                        tracing::info!(session = %sid, service = %session.name, %route, "refused: {e}");
                        Message::Refused { route, reason: format!("the certificate sent is unusable: {e}") }
                    }
                };
                if let Err(e) = send(&afd, &reply).await {
                    tracing::info!(session = %sid, service = %session.name, "cannot reply: {e}");
                    break End::Closed;
                }
            }
            Ok(Some((msg, _))) => match msg {
                Message::Register { routes } => {
                    let reply = registration(&control, &session, version, &routes, None);
                    if let Err(e) = send(&afd, &reply).await {
                        tracing::info!(session = %sid, service = %session.name, "cannot reply: {e}");
                        break End::Closed;
                    }
                }
                Message::Ack { id } => acked(&control, &session, &[id]),
                Message::Acks { ids } => acked(&control, &session, &ids),
                Message::Reject { id, reason } => {
                    if let Some(mut conn) = session.take(ConnId(id)) {
                        tracing::info!(session = %sid, service = %session.name, conn = id, "connection rejected: {reason}");
                        conn.desc.rejected_by = Some((sid, Instant::now()));
                        control.arrived(conn);
                    }
                }
                Message::Drain => control.drain(sid),
                Message::Bye => break End::Bye,
                Message::Hello { .. } => break End::Error(SessionError::HelloAgain),
                other => break End::Error(SessionError::NotAccepted(other.kind())),
            },
        }
    };

    if let End::Frozen = end {
        return;
    }
    if let End::Error(reason) = &end {
        tracing::warn!(session = %sid, service = %session.name, pid, "protocol error, ending the session: {reason}");
        // Queued before the write side is shut down, so the service reads it.
        let _ = send_error(&session, &reason.to_string());
    }
    if let End::Bye = end {
        tracing::info!(session = %sid, service = %session.name, "service said bye");
    }
    // No new connections for this session from here on; what it gives back
    // until it closes (after its Bye) is still taken, for the routes it held.
    let held = control.routes_of(sid);
    session.fail();
    control.end_session(sid);
    if !matches!(end, End::Closed) && !wait_for_close(&control, &afd, &session, &held, &mut buf).await {
        let n = session.abandon();
        tracing::warn!(
            session = %sid,
            service = %session.name,
            "the service did not close its session within {}s; dropped portmux's copies of {n} unacked connections",
            CLOSE_TIMEOUT.as_secs()
        );
        return;
    }
    // The service's end is closed: what it never read was discarded by the
    // kernel, so the unacked connections are re-routed or queued.
    let unacked = session.close();
    if !unacked.is_empty() {
        tracing::info!(session = %sid, service = %session.name, "re-routing {} unacked connections", unacked.len());
    }
    for conn in unacked {
        control.arrived(conn);
    }
}

/// Best-effort Error message, without waiting.
fn send_error(session: &Session, reason: &str) -> std::io::Result<()> {
    let bytes = portmux_wire::encode(&Message::Error { reason: reason.to_string() }).map_err(std::io::Error::other)?;
    scm::send_datagram(session.as_fd(), &bytes, scm::Wait::DontWait)
}

/// After portmux ended the session: take the service's remaining acks and
/// give-backs until it closes its end. False if it did not within CLOSE_TIMEOUT.
async fn wait_for_close(
    control: &Rc<Control>,
    afd: &AsyncFd<Arc<OwnedFd>>,
    session: &Session,
    held: &[crate::route::RouteKey],
    buf: &mut [u8],
) -> bool {
    let until_closed = async {
        loop {
            match recv_with_fd(afd, buf).await {
                Ok(None) | Err(RecvError::Io) => return,
                Ok(Some((Message::Ack { id }, _))) => acked(control, session, &[id]),
                Ok(Some((Message::Acks { ids }, _))) => acked(control, session, &ids),
                Ok(Some((Message::GiveBack { route, peer, local }, Some(fd)))) => {
                    if let Err(e) = control.given_back(session.id, held, &route, (peer, local), fd) {
                        tracing::warn!(session = %session.id, "a connection given back after the session's end was refused: {e}");
                    }
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(CLOSE_TIMEOUT, until_closed).await.is_ok()
}

/// `portmux upgrade` asked for a new process: only root or portmux's own user may.
async fn upgrade_requested(control: &Rc<Control>, afd: &AsyncFd<OwnedFd>, peer: &Peer, binary: Option<String>) {
    let (pid, uid) = (peer.pid, peer.uid);
    let ours = control.shared.settings.policy.own_uid();
    let answer = if !control.shared.settings.policy.privileged(peer) {
        tracing::warn!(pid, uid, "refused an upgrade request from another user");
        Message::Error { reason: format!("uid {uid} may not upgrade portmux; run it as root or as uid {ours}") }
    } else {
        tracing::info!(pid, uid, "upgrade requested");
        match control.request_upgrade(binary.map(Into::into)).await {
            Ok(Ok(new_pid)) => Message::Upgraded { pid: new_pid },
            Ok(Err(reason)) => Message::Error { reason },
            Err(_) => Message::Error { reason: "the upgrade was abandoned".into() },
        }
    };
    let _ = send(afd, &answer).await;
}

/// Ends a session that never got past Hello: Error, then close.
async fn refuse_early(afd: &AsyncFd<OwnedFd>, pid: i32, reason: SessionError) {
    tracing::warn!(pid, "control session refused: {reason}");
    let _ = send(afd, &Message::Error { reason: reason.to_string() }).await;
    // Over a session limit the refusal is not counted: it lingers only briefly.
    let linger = if matches!(reason, SessionError::TooMany { .. }) { REFUSAL_LINGER } else { CLOSE_TIMEOUT };
    // Linger until the service has read why and closed: its own opening
    // messages may still be on their way, and closing under them would reset
    // its socket before it reads the Error.
    let mut buf = vec![0u8; MAX_MESSAGE];
    let _ = tokio::time::timeout(linger, async {
        while let Ok(Some(_)) | Err(RecvError::Protocol(_)) = recv(afd, &mut buf).await {}
    })
    .await;
}
