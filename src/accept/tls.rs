//! Connections of `https://` routes: the handshake (the route the SNI chose
//! gives the certificate), the first request read through TLS and routed by
//! its Host and path (a Host that is not the SNI gets 421), then the relay:
//! to a backend, or to a service over a socketpair carrying the plaintext.

use crate::forward::{self, stream};
use crate::handoff::{Conn, ConnDesc};
use crate::ids::ListenerId;
use crate::reply::{self, Reply};
use crate::route::{PortRoutes, Route, Target};
use crate::shared::{Shared, Terminated};
use crate::telemetry::{Outcome, Side};
use crate::tls;
use portmux_wire::spec::normalize_path;
use portmux_wire::{ConnMeta, Proto};
use std::cell::Cell;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a client answered by portmux itself may take to read the answer.
const ANSWER_LINGER: Duration = Duration::from_secs(2);

/// Terminates TLS for `route` (the one the ClientHello chose), then routes
/// and relays the plaintext.
pub(super) async fn terminate(
    fd: OwnedFd,
    listener: ListenerId,
    mut meta: ConnMeta,
    route: Arc<Route>,
    port: Arc<PortRoutes>,
    (arrived, chacha_first): (Instant, bool),
    shared: &Arc<Shared>,
) {
    let settings = &shared.settings;
    let fate = Fate {
        route: std::cell::RefCell::new(route.clone()),
        shared,
        peer: meta.peer,
        arrived,
        outcome: Cell::new(Some(Outcome::Dropped)),
        status: Cell::new(None),
    };
    let Some(terminator) = route.tls.clone() else {
        tracing::warn!(route = %route.key, client = %meta.peer, "no certificate is loaded for this route; handshake refused");
        shared.metrics.error(Side::Internal);
        return reply::send(fd, Reply::tls_alert(reply::ALERT_INTERNAL_ERROR)).await;
    };
    let deadline = tokio::time::Instant::from_std(arrived + settings.peek_timeout);
    let mut client = match tls::handshake(fd, terminator.for_client(chacha_first), deadline).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(route = %route.key, client = %meta.peer, "TLS not terminated: {e}");
            shared.metrics.error(Side::Client);
            return;
        }
    };
    // The handshake's facts are collected only for a service (they copy the client's chain).
    let sni = client.get_ref().1.server_name().map(str::to_ascii_lowercase);
    if client.get_ref().1.alpn_protocol() == Some(tls::acme::ALPN) {
        // ACME's TLS-ALPN-01 validation: the certificate was all it came for.
        tracing::info!(client = %meta.peer, ?sni, "answered an ACME TLS-ALPN-01 challenge");
        fate.outcome.set(Some(Outcome::Answered));
        return say(client, Reply::Close).await;
    }
    let tls_side = |client: &tls::Stream| super::engine::TlsSide {
        sni: sni.clone(),
        info: tls::info(client.get_ref().1),
        host: route.spec.host.clone(),
        client_ca: route.spec.client_ca.clone(),
    };
    let addrs = (meta.peer, meta.local);
    if client.get_ref().1.alpn_protocol() == Some(b"h2") {
        let side = tls_side(&client);
        fate.counted_elsewhere();
        route.counters.count(Outcome::Engine);
        return Box::pin(super::engine::serve_tls(client, Vec::new(), true, side, listener, addrs, shared)).await;
    }
    let head_by = tokio::time::Instant::now() + settings.peek_timeout;
    let (buf, head) = match read_head(&mut client, settings.peek_max, head_by).await {
        Ok(read) => read,
        Err(Some(answer)) => return fate.say(client, answer).await,
        Err(None) => return,
    };
    if let Some(answer) = misdirected(head.host.as_deref(), sni.as_deref()) {
        return fate.say(client, answer).await;
    }
    // Without SNI the handshake used the default route's certificate: its host only.
    if let (Some(host), None) = (&head.host, &sni)
        && !route.spec.host.matches(Some(host))
    {
        let what = format!("no server name: the default certificate, of {}", route.key);
        return fate.say(client, Reply::misdirected(host, &what)).await;
    }
    let host = head.host.or_else(|| sni.clone());
    let Some(found) = port.routes.terminated(host.as_deref(), &normalize_path(&head.target)).cloned() else {
        return fate.say(client, Reply::not_found(host.as_deref(), Some(&head.target), meta.local.port())).await;
    };
    *fate.route.borrow_mut() = found.clone();
    if found.spec.client_ca != route.spec.client_ca {
        let why = "this path asks for a client certificate from another CA than the one this connection was made with";
        return fate.say(client, Reply::forbidden(why)).await;
    }
    if found.per_request(&port.routes, host.as_deref()) {
        let side = tls_side(&client);
        fate.counted_elsewhere();
        found.counters.count(Outcome::Engine);
        return Box::pin(super::engine::serve_tls(client, buf, false, side, listener, addrs, shared)).await;
    }
    meta.proto = Proto::Http;
    meta.host = host;
    meta.path = Some(head.target);
    meta.route = found.key.to_string();
    meta.peeked = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    let idle = settings.idle_timeout;
    match &found.target {
        Target::Forward(pool) => {
            let (backend, server) = match Box::pin(forward::open(&meta, pool, settings)).await {
                Ok(opened) => opened,
                Err(answer) => return fate.say(client, answer).await,
            };
            let _active = backend.connected();
            let std = std::net::TcpStream::from(server);
            let server = std.set_nonblocking(true).and_then(|()| std.set_nodelay(true)).and_then(|()| {
                let mut s = tokio::net::TcpStream::from_std(std)?;
                Ok(async move { s.write_all(&buf).await.map(|()| s) })
            });
            let server = match server {
                Ok(sending) => sending.await,
                Err(e) => Err(e),
            };
            match server {
                Ok(server) => {
                    fate.counted_elsewhere();
                    let ended = stream::relay(client, server, idle).await;
                    found.counters.count(Outcome::Forwarded);
                    if let stream::Ended::Done(from, to) = &ended {
                        found.counters.relayed(*from, *to);
                    }
                    log_end(&meta, ended)
                }
                Err(e) => {
                    tracing::warn!(route = %meta.route, backend = %backend.spec.name, "backend failed: {e}");
                    fate.say(client, Reply::bad_gateway("the backend closed the connection")).await;
                }
            }
        }
        Target::Pool(_) | Target::Queue => {
            let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(client = %meta.peer, "cannot make a socketpair for the service: {e}");
                    return fate
                        .say(client, Reply::unavailable("portmux is out of file descriptors; retry shortly"))
                        .await;
                }
            };
            let ours = ours.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(ours));
            let mut ours = match ours {
                Ok(s) => s,
                Err(e) => return tracing::warn!(client = %meta.peer, "cannot watch a socketpair: {e}"),
            };
            let log = meta.clone();
            let info = tls::info(client.get_ref().1);
            // Known while relayed, so that the service may give it back.
            let id = crate::shared::socket_id(theirs.as_fd());
            let registered = Registered(shared, id);
            if let Some(id) = id {
                let t = Terminated { listener, peer: meta.peer, local: meta.local, tls: info.clone() };
                shared.terminated.lock().unwrap_or_else(|p| p.into_inner()).insert(id, t);
            }
            let tls = Some(Box::new(info));
            let desc =
                ConnDesc { id: shared.conn_id(), listener, meta, arrived, rejected_by: None, returned: false, tls };
            fate.counted_elsewhere();
            let delivery = Box::pin(super::deliver(Conn { fd: Arc::new(OwnedFd::from(theirs)), desc }, &found, shared));
            // The request read so far goes first, then the relay; alongside
            // the delivery, so that a head larger than the socket's buffer
            // waits for the service to read, and an answer portmux gives on
            // the service's end (a refusal) reaches the client.
            let relaying = async {
                if let Err(e) = ours.write_all(&buf).await {
                    return tracing::debug!(client = %log.peer, "the service end closed before the request: {e}");
                }
                log_end(&log, stream::relay(client, ours, idle).await);
            };
            tokio::join!(delivery, relaying);
            drop(registered);
        }
    }
}

/// The 421 for a request whose Host is not the server name its TLS
/// connection was made for.
pub(super) fn misdirected(host: Option<&str>, sni: Option<&str>) -> Option<Reply> {
    match (host, sni) {
        (Some(host), Some(sni)) if host != sni => {
            tracing::debug!(%host, %sni, "misdirected request");
            Some(Reply::misdirected(host, &format!("server name \"{sni}\"")))
        }
        _ => None,
    }
}

/// Forgets a terminated connection's service end when its relay ends.
struct Registered<'a>(&'a Shared, Option<(u64, u64)>);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.1 {
            self.0.terminated.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }
}

/// The next request of a terminated connection a service gave back (on
/// the socketpair end; TLS is still relayed by the task that terminated it):
/// routed among the `https://` routes as the first one was, and delivered
/// with the same TLS facts.
pub(super) async fn returned(
    fd: OwnedFd,
    listener: ListenerId,
    (peer, local): (std::net::SocketAddr, std::net::SocketAddr),
    tls: Box<portmux_wire::TlsInfo>,
    shared: &Shared,
) {
    let Some(port) = shared.table.load().port(listener).cloned() else {
        return reply::send(fd, Reply::Close).await;
    };
    let deadline = tokio::time::Instant::now() + shared.settings.peek_timeout;
    let (head, peeked) = match peek_head(fd.as_fd(), shared.settings.peek_max, deadline).await {
        Ok(read) => read,
        Err(answer) => return reply::send(fd, answer).await,
    };
    if let Some(answer) = misdirected(head.host.as_deref(), tls.sni.as_deref()) {
        return reply::send(fd, answer).await;
    }
    let host = head.host.or_else(|| tls.sni.clone());
    let Some(found) = port.routes.terminated(host.as_deref(), &normalize_path(&head.target)).cloned() else {
        // Gone meanwhile: the client retries on a new connection.
        return reply::send(fd, Reply::Close).await;
    };
    let meta = ConnMeta {
        route: found.key.to_string(),
        proto: Proto::Http,
        peer,
        local,
        sni: tls.sni.clone(),
        alpn: tls.alpn.iter().cloned().collect(),
        host,
        path: Some(head.target),
        peeked: peeked as u32,
    };
    match &found.target {
        Target::Forward(pool) => {
            let started = Instant::now();
            let served = forward::serve(fd, meta, pool.clone(), &shared.settings).await;
            let outcome = if served.backend.is_some() { Outcome::Forwarded } else { Outcome::Dropped };
            let bytes = (served.from_client, served.to_client);
            match served.paused {
                // The plaintext side moves; the TLS relay stays here until it ends.
                Some(paused) => drop(shared.to_control.send(crate::shared::ToControl::Relay(paused))),
                None => super::record(shared, Some(&found), peer, "backend", outcome, served.status, bytes, started),
            }
        }
        Target::Pool(_) | Target::Queue => {
            let desc = ConnDesc {
                id: shared.conn_id(),
                listener,
                meta,
                arrived: Instant::now(),
                rejected_by: None,
                returned: true,
                tls: Some(tls),
            };
            Box::pin(super::deliver(Conn { fd: Arc::new(fd), desc }, &found, shared)).await;
        }
    }
}

fn log_end(meta: &ConnMeta, ended: stream::Ended) {
    match ended {
        stream::Ended::Done(..) => {}
        stream::Ended::Idle => tracing::debug!(route = %meta.route, client = %meta.peer, "closed: idle"),
        stream::Ended::Failed(e) => tracing::debug!(route = %meta.route, client = %meta.peer, "relay ended: {e}"),
    }
}

/// Reads through TLS until a whole request head is there: the bytes read,
/// and the head; or the answer (`None`: close without one).
async fn read_head(
    client: &mut tls::Stream,
    max: usize,
    deadline: tokio::time::Instant,
) -> Result<(Vec<u8>, crate::classify::http::RequestHead), Option<Reply>> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        // Into the spare capacity: nothing is zeroed first.
        match tokio::time::timeout_at(deadline, client.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(None),
            Ok(Ok(_)) => {}
        }
        match crate::classify::http::parse(&buf[..buf.len().min(max)]) {
            Ok(head) => return Ok((buf, head)),
            Err(crate::classify::ParseError::Incomplete) if buf.len() < max => {}
            Err(crate::classify::ParseError::Incomplete) => return Err(Some(Reply::too_large())),
            Err(crate::classify::ParseError::Invalid(reason)) => return Err(Some(Reply::bad_request(reason))),
        }
    }
}

/// Peeks at a socketpair end until a whole request head is there (the
/// terminating task writes it as the client's bytes arrive). A Unix socket's
/// readiness ignores SO_RCVLOWAT, so the wait between looks grows from 1 ms
/// to 50 ms instead: a client that dribbles its head costs no busy loop.
async fn peek_head(
    fd: std::os::fd::BorrowedFd<'_>,
    max: usize,
    deadline: tokio::time::Instant,
) -> Result<(crate::classify::http::RequestHead, usize), Reply> {
    let mut buf = vec![0u8; max];
    let mut pause = Duration::from_millis(1);
    loop {
        match portmux_sys::net::peek(fd, &mut buf) {
            Ok(0) => return Err(Reply::Close),
            Ok(n) => match crate::classify::http::parse(&buf[..n]) {
                Ok(head) => return Ok((head, n)),
                Err(crate::classify::ParseError::Invalid(reason)) => return Err(Reply::bad_request(reason)),
                Err(crate::classify::ParseError::Incomplete) if n >= max => return Err(Reply::too_large()),
                Err(crate::classify::ParseError::Incomplete) => {}
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Reply::Close),
        }
        if tokio::time::Instant::now() + pause > deadline {
            return Err(Reply::Close);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// What became of a terminated connection, recorded when `terminate` ends:
/// dropped, unless an answer or another path (which records it) said otherwise.
struct Fate<'a> {
    /// The route the ClientHello chose, then the one the request did.
    route: std::cell::RefCell<Arc<Route>>,
    shared: &'a Shared,
    peer: std::net::SocketAddr,
    arrived: Instant,
    outcome: Cell<Option<Outcome>>,
    status: Cell<Option<u16>>,
}

impl Fate<'_> {
    /// portmux answers the client itself (a refusal).
    async fn say(&self, client: tls::Stream, answer: Reply) {
        self.status.set(answer.status());
        // A 5xx is a failure to deliver (no backend, no fds); others refuse the request.
        let refused = answer.status().is_some_and(|s| s < 500);
        self.outcome.set(Some(if refused { Outcome::Refused } else { Outcome::Dropped }));
        say(client, answer).await;
    }

    /// The path it takes now records it.
    fn counted_elsewhere(&self) {
        self.outcome.set(None);
    }
}

impl Drop for Fate<'_> {
    fn drop(&mut self) {
        if let Some(outcome) = self.outcome.get() {
            let (route, status) = (self.route.borrow().clone(), self.status.get());
            super::record(self.shared, Some(&route), self.peer, "portmux", outcome, status, (0, 0), self.arrived);
        }
    }
}

/// Answers through TLS, then closes (close_notify), within a short linger.
async fn say(mut client: tls::Stream, answer: Reply) {
    let _ = tokio::time::timeout(ANSWER_LINGER, async {
        if let Some(bytes) = answer.bytes() {
            client.write_all(&bytes).await?;
        }
        client.shutdown().await
    })
    .await;
}
