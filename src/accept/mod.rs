//! Worker threads: io_uring accept loops on every listener of the current
//! table, and the life of a new connection up to its delivery (handoff) or
//! its relay (forward).

mod direct;
mod engine;
mod targets;
mod tls;

use crate::classify;
use crate::config::limits::Limit;
use crate::forward;
use crate::handoff::{Conn, ConnDesc, Refusal};
use crate::ids::ListenerId;
use crate::reply;
use crate::route::{Listener, Route, Target};
use crate::shared::{Idle, Job, Queued, Shared, TaskGuard, ToControl};
use crate::telemetry::{Outcome, Side, access};
use portmux_sys::{net, uring};
use portmux_wire::spec::Scheme;
use portmux_wire::{ConnMeta, Proto};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};

struct AcceptLoop {
    stop: Rc<Notify>,
    done: tokio::task::JoinHandle<()>,
}

/// One worker: follows the table's listeners until portmux stops; runs the
/// relays handed to it (after an upgrade) and holds the connections services
/// gave back; pauses its relays when asked.
pub async fn worker(shared: Arc<Shared>, index: usize, mut inbox: mpsc::UnboundedReceiver<Queued>) {
    let mut version = shared.table_version.subscribe();
    let mut stopping = shared.stopping.subscribe();
    let mut handing_over = shared.handing_over.subscribe();
    let mut pause = shared.pause_relays.subscribe();
    let mut loops: HashMap<ListenerId, AcceptLoop> = HashMap::new();
    tracing::debug!(worker = index, "worker started");
    while !*stopping.borrow_and_update() {
        version.mark_unchanged();
        let accepting = !*handing_over.borrow_and_update();
        if *pause.borrow_and_update() {
            forward::pause_all();
            crate::l7::pause_all();
        }
        let table = shared.table.load_full();
        loops.retain(|id, l| {
            let keep = accepting && table.port(*id).is_some_and(|p| !p.lent);
            if !keep {
                l.stop.notify_one(); // The loop ends by itself and releases its listener.
            }
            keep
        });
        if accepting {
            for (id, port) in table.ports.iter().filter(|(_, p)| !p.lent) {
                loops.entry(*id).or_insert_with(|| {
                    let stop = Rc::new(Notify::new());
                    let done = tokio_uring::spawn(accept_loop(port.listener.clone(), shared.clone(), stop.clone()));
                    AcceptLoop { stop, done }
                });
            }
        }
        tokio::select! {
            _ = version.changed() => {}
            _ = stopping.changed() => {}
            _ = handing_over.changed() => {}
            _ = pause.changed() => {}
            Some(Queued { job, guard }) = inbox.recv() => {
                let shared = shared.clone();
                tokio_uring::spawn(async move {
                    match job {
                        Job::Resume(job) => {
                            let route = job.paused.meta.route.clone();
                            let switched = job.paused.switched();
                            let served = forward::resume(job, &shared.settings).await;
                            let (from, to) = (served.from_client, served.to_client);
                            match served.paused {
                                Some(paused) => drop(shared.to_control.send(ToControl::Relay(paused))),
                                // A switched request's connection was counted where it came in.
                                None if switched => shared.metrics.relayed(&route, from, to),
                                // Counted where it ends, as the process it started in could not.
                                None => shared.metrics.forwarded(&route, true, from, to),
                            }
                        }
                        Job::Idle(idle) => Box::pin(hold(idle, &shared)).await,
                    }
                    drop(guard);
                });
            }
        }
    }
    for (_, l) in loops.drain() {
        l.stop.notify_one();
        let _ = l.done.await;
    }
    // Engine connections between requests close; those in a request finish
    // it; relays and requests in flight have until --drain.
    crate::l7::pause_all();
    if !shared.tasks_done(shared.settings.drain).await {
        let left = shared.in_flight.load(Ordering::Relaxed);
        tracing::warn!(worker = index, connections = left, "closing connections still open after --drain");
    }
    tracing::debug!(worker = index, "worker stopped");
    shared.workers_running.send_modify(|n| *n -= 1);
}

/// Accepts on `listener` until told to stop; the in-flight accept is cancelled,
/// never abandoned, so no connection is lost in the kernel.
async fn accept_loop(listener: Arc<Listener>, shared: Arc<Shared>, stop: Rc<Notify>) {
    /// Counts the loop among the running ones until it has handled its last accept.
    struct Running(Arc<Shared>);
    impl Drop for Running {
        fn drop(&mut self) {
            if self.0.accepting.fetch_sub(1, Ordering::Relaxed) == 1 {
                self.0.accepts_over.notify_waiters();
            }
        }
    }
    shared.accepting.fetch_add(1, Ordering::Relaxed);
    let _running = Running(shared.clone());
    let fd = listener.fd.as_fd();
    let accepted = shared.metrics.accepted(listener.addr);
    let mut last_warning: Option<Instant> = None;
    loop {
        let (result, stopped) = match uring::race(fd, uring::accept(fd), stop.notified()).await {
            uring::Raced::Done(r) => (r, false),
            uring::Raced::Stopped(r) => (r, true),
        };
        match result {
            Ok((conn, peer)) => {
                accepted.inc();
                let guard = TaskGuard::new(&shared);
                let shared = shared.clone();
                let id = listener.id;
                // A listener bound to one address: each connection's own
                // address is the listener's (no getsockname needed).
                let local = Some(listener.addr).filter(|a| !a.ip().is_unspecified());
                tokio_uring::spawn(async move {
                    serve(conn, id, peer.zip(local), &shared).await;
                    drop(guard);
                });
            }
            // EAGAIN: a borrower of the (then non-blocking) listener took it first.
            Err(e) if stopped || matches!(e.raw_os_error(), Some(libc::ECANCELED | libc::EAGAIN)) => {}
            // Shut down: a lent listener taken back as its route went.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            Err(e) => {
                let resource =
                    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    last_warning = Some(Instant::now());
                    if resource {
                        tracing::warn!(
                            listener = %listener.addr,
                            "cannot accept: {e}; connections wait in the backlog (raise LimitNOFILE / ulimit -n)"
                        );
                    } else {
                        tracing::warn!(listener = %listener.addr, "accept failed: {e}");
                    }
                }
                // Back off so a full fd table does not spin the ring; the
                // connection stays queued in the kernel meanwhile.
                if resource {
                    shared.metrics.error(Side::Internal);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if stopped {
            return;
        }
    }
}

/// A new connection: peek (unless its port has only a raw TCP route), decide,
/// then deliver it or answer it.
async fn serve(fd: OwnedFd, listener: ListenerId, addrs: Option<(SocketAddr, SocketAddr)>, shared: &Arc<Shared>) {
    let Some((mut peer, mut local)) = addrs.or_else(|| net::tcp_addrs(fd.as_fd()).ok()) else {
        return; // Gone already.
    };
    tracing::trace!(%peer, pid = std::process::id(), "accepted");
    let arrived = Instant::now();
    let deadline = tokio::time::Instant::from_std(arrived + shared.settings.peek_timeout);
    let trusted = shared.settings.proxy_trusted(peer.ip());
    if trusted {
        // The client is known once the header is read: it is counted then.
        let _peeking = shared.peeking();
        match forward::proxy::receive(fd.as_fd(), deadline).await {
            Ok(Some((client, destination))) => (peer, local) = (client, destination),
            Ok(None) => {}
            Err(why) => {
                tracing::debug!(%peer, port = local.port(), "closed: {why}");
                return;
            }
        }
    }
    let _permit = match shared.admit(peer.ip()) {
        Ok(permit) => permit,
        Err(limit) => {
            let started = Instant::now();
            let status = refuse(fd, listener, peer, limit, shared).await;
            return record(shared, None, peer, "portmux", Outcome::Refused, status, (0, 0), started);
        }
    };
    if !trusted
        && !shared.settings.accept_proxy.is_empty()
        && shared.table.load().port(listener).is_some_and(|p| p.routes.needs_peek())
    {
        let peeking = shared.peeking();
        let sent = forward::proxy::sent_unasked(fd.as_fd(), deadline).await;
        drop(peeking);
        if sent {
            tracing::warn!(%peer, port = local.port(), "refused a PROXY header from outside --accept-proxy's networks");
            return reply::send(fd, reply::Reply::Close).await;
        }
    }
    route(fd, listener, peer, local, arrived, false, shared).await;
}

/// How long a connection refused by a limit may take to read its answer.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// A connection over a limit: HTTP clients are told (429 over the
/// per-address limit, 503 otherwise), others closed. The status it got.
async fn refuse(fd: OwnedFd, listener: ListenerId, peer: SocketAddr, limit: Limit, shared: &Shared) -> Option<u16> {
    let http = shared.table.load().port(listener).is_some_and(|p| p.routes.http_only());
    let limits = &shared.settings.limits;
    tracing::debug!(%peer, limit = limit.name(), "refused: over {} {}", limit.flag(), limit.value(limits));
    let reply = match limit {
        _ if !http => reply::Reply::Close,
        Limit::ConnsPerIp => reply::Reply::too_many(limits.conns_per_ip),
        _ => reply::Reply::unavailable(&format!("portmux is at its limit of {} ({})", limit.name(), limit.flag())),
    };
    let status = reply.status();
    reply::send_within(fd, reply, REFUSAL_LINGER).await;
    status
}

/// Counts what became of a connection (on its route, or on none) and logs it.
#[allow(clippy::too_many_arguments)]
fn record(
    shared: &Shared,
    route: Option<&Route>,
    client: SocketAddr,
    target: &str,
    outcome: Outcome,
    status: Option<u16>,
    (from_client, to_client): (u64, u64),
    started: Instant,
) {
    match route {
        Some(r) => {
            r.counters.count(outcome);
            if from_client + to_client > 0 {
                r.counters.relayed(from_client, to_client);
            }
        }
        None => shared.metrics.count("", outcome),
    }
    if shared.access.is_on() {
        let route = route.map_or("", |r| &r.key);
        let outcome = outcome.as_str();
        let e =
            access::Entry { client, route, target, outcome, status, request: None, from_client, to_client, started };
        shared.access.write(&e);
    }
}

/// Answers `fd` with `answer` and records it.
async fn answered<F: AsFd>(
    fd: F,
    answer: reply::Reply,
    route: Option<&Route>,
    outcome: Outcome,
    peer: SocketAddr,
    started: Instant,
    shared: &Shared,
) {
    let status = answer.status();
    Box::pin(reply::send(fd, answer)).await;
    record(shared, route, peer, "portmux", outcome, status, (0, 0), started);
}

/// How a given-back connection's wait for its next request ended.
enum Woken {
    /// Bytes arrived: route them.
    Request,
    /// The client closed, or the keep-alive timeout passed: close.
    Done,
    /// An upgrade committed: the wait goes on in the new process.
    Moving,
}

/// Holds a connection a service gave back until its next request arrives (at
/// most `--keepalive-timeout` after it was given back), then routes that
/// request like a new connection's. After an upgrade's commit the wait moves
/// to the new process.
async fn hold(idle: Idle, shared: &Arc<Shared>) {
    // A port with only raw TCP routes needs no bytes to route (and the
    // server may be the one to speak first): routed at once.
    let raw = shared.table.load().port(idle.listener).is_some_and(|p| !p.routes.needs_peek());
    shared.idle_held.fetch_add(1, Ordering::Relaxed);
    let woken = if raw { Woken::Request } else { wait_for_request(&idle, shared).await };
    shared.idle_held.fetch_sub(1, Ordering::Relaxed);
    match woken {
        Woken::Request => {
            let Idle { fd, listener, peer, local, tls, .. } = idle;
            match tls {
                None => route(fd, listener, peer, local, Instant::now(), true, shared).await,
                Some(tls) => Box::pin(tls::returned(fd, listener, (peer, local), tls, shared)).await,
            }
        }
        Woken::Done => reply::send(idle.fd, reply::Reply::Close).await,
        // Its TLS session stays in this process, which relays it until the
        // client closes: the client makes its next request on a new
        // connection, to the new process.
        Woken::Moving if idle.tls.is_some() => reply::send(idle.fd, reply::Reply::Close).await,
        Woken::Moving => {
            let _ = shared.to_control.send(ToControl::Idle(idle));
        }
    }
}

async fn wait_for_request(idle: &Idle, shared: &Shared) -> Woken {
    let deadline = tokio::time::Instant::from_std(idle.since + shared.settings.keepalive_timeout);
    let mut pause = shared.pause_relays.subscribe();
    let mut stopping = shared.stopping.subscribe();
    let sock = idle.fd.as_fd();
    loop {
        let mut moving = false;
        let give_up = async {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                _ = stopping.wait_for(|s| *s) => {}
                _ = pause.wait_for(|p| *p) => moving = true,
            }
        };
        let mask = (libc::POLLIN | libc::POLLRDHUP) as u32;
        match uring::race(sock, uring::poll(sock, mask), give_up).await {
            uring::Raced::Done(Ok(_)) => {
                // Readable: a request, or the client's FIN (nothing to read).
                let mut one = [0u8; 1];
                return match net::peek(sock, &mut one) {
                    Ok(n) if n > 0 => Woken::Request,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    _ => Woken::Done,
                };
            }
            uring::Raced::Done(Err(e)) if e.raw_os_error() == Some(libc::ECANCELED) => {}
            uring::Raced::Done(Err(_)) => return Woken::Done,
            uring::Raced::Stopped(_) if moving => return Woken::Moving,
            uring::Raced::Stopped(_) => return Woken::Done,
        }
    }
}

/// Peeks at a connection (unless its port has only a raw TCP route), decides,
/// then delivers it or answers it. A connection given back (`returned`) that
/// cannot be routed is closed, not answered: its client retries elsewhere.
async fn route(
    fd: OwnedFd,
    listener: ListenerId,
    peer: SocketAddr,
    local: SocketAddr,
    arrived: Instant,
    returned: bool,
    shared: &Arc<Shared>,
) {
    let Some(mut port) = shared.table.load().port(listener).cloned() else {
        // The listener was just closed: a clean end, the client retries.
        reply::send(fd, reply::Reply::Close).await;
        return;
    };
    let deadline = tokio::time::Instant::from_std(arrived + shared.settings.peek_timeout);
    let mut meta = ConnMeta::unpeeked(String::new(), Proto::Tcp, peer, local);
    let mut chacha_first = false;
    let route = if port.routes.needs_peek() {
        let peeking = shared.peeking();
        let peek = classify::peek(fd.as_fd(), port.routes.want(), deadline, shared.settings.peek_max).await;
        drop(peeking);
        shared.metrics.peek.observe(arrived.elapsed().as_secs_f64());
        meta.peeked = peek.bytes as u32;
        // ACME's HTTP-01 validation, answered whoever holds the name on this port.
        if let classify::Peeked::Http(head) = &peek.outcome
            && let Some(key_authorization) = shared.tls.challenges.http_answer(&head.target)
        {
            tracing::info!(%peer, host = ?head.host, "answered an ACME HTTP-01 challenge");
            let answer = reply::Reply::Http { status: 200, body: key_authorization };
            return answered(fd, answer, None, Outcome::Answered, peer, arrived, shared).await;
        }
        // Routes may have changed while the client was sending.
        let table = shared.table.load();
        if let Some(now) = table.port(listener) {
            port = now.clone();
        }
        if let classify::Peeked::Http(head) = &peek.outcome
            && let Some(answer) = table.services(&head.target, peer.ip())
        {
            return answered(fd, answer, None, Outcome::Answered, peer, arrived, shared).await;
        }
        chacha_first = matches!(&peek.outcome, classify::Peeked::Tls(h) if h.chacha_first);
        match port.decide(peek.outcome, &mut meta) {
            Ok(route) => route,
            Err(answer) => {
                tracing::debug!(%peer, port = local.port(), ?answer, returned, "not delivered");
                let answer = if returned { reply::Reply::Close } else { answer };
                let outcome = if answer.status().is_some() { Outcome::Refused } else { Outcome::Dropped };
                return answered(fd, answer, None, outcome, peer, arrived, shared).await;
            }
        }
    } else {
        match port.routes.tcp() {
            Some(r) => {
                meta.route = r.key.to_string();
                r.clone()
            }
            None => return,
        }
    };
    if route.spec.scheme == Scheme::Https {
        let at = (arrived, chacha_first);
        return Box::pin(tls::terminate(fd, listener, meta, route, port, at, shared)).await;
    }
    if route.spec.acme {
        // An ACME challenge route: its pending tokens were answered above.
        let answer = reply::Reply::Http { status: 404, body: "portmux: no such ACME challenge is pending\n".into() };
        return answered(fd, answer, Some(&route), Outcome::Answered, peer, arrived, shared).await;
    }
    if route.spec.redirect.is_some() {
        let answer = reply::Reply::redirect(&route.spec, meta.host.as_deref(), meta.path.as_deref().unwrap_or("/"));
        return answered(fd, answer, Some(&route), Outcome::Answered, peer, arrived, shared).await;
    }
    if meta.proto == Proto::Http
        && route.spec.scheme == Scheme::Http
        && route.per_request(&port.routes, meta.host.as_deref())
    {
        route.counters.count(Outcome::Engine);
        return Box::pin(engine::serve_plain(fd, listener, (meta.peer, meta.local), shared)).await;
    }
    if let Target::Forward(pool) = &route.target {
        let served = forward::serve(fd, meta, pool.clone(), &shared.settings).await;
        let bytes = (served.from_client, served.to_client);
        let outcome = if served.backend.is_some() { Outcome::Forwarded } else { Outcome::Dropped };
        let target: std::borrow::Cow<'_, str> = match &served.backend {
            Some(b) if shared.access.is_on() => format!("backend {}", b.spec.name).into(),
            _ => "portmux".into(),
        };
        if served.backend.is_none() {
            shared.metrics.error(Side::Backend);
        }
        match served.paused {
            // Counted by the process that finishes the relay.
            Some(paused) => drop(shared.to_control.send(ToControl::Relay(paused))),
            None => record(shared, Some(&route), peer, &target, outcome, served.status, bytes, arrived),
        }
        return;
    }
    let desc = ConnDesc { id: shared.conn_id(), listener, meta, arrived, rejected_by: None, returned, tls: None };
    // Boxed, like every phase that ends before a relay does: a task's state is
    // as large as its largest phase, for as long as the task lives.
    Box::pin(deliver(Conn { fd: Arc::new(fd), desc }, &route, shared)).await;
}

/// Delivers `conn` on `route` to a live session (round robin, trying each
/// once), or gives it to the control plane to queue.
async fn deliver(mut conn: Conn, route: &Route, shared: &Shared) {
    let (peer, arrived) = (conn.desc.meta.peer, conn.desc.arrived);
    if let Target::Pool(pool) = &route.target {
        for session in pool.order() {
            match session.hand_over(conn, shared.settings.handoff_patience).await {
                Ok(()) => {
                    shared.metrics.handoff.observe(arrived.elapsed().as_secs_f64());
                    let target = if shared.access.is_on() {
                        format!("service {} pid {}", session.name, session.pid)
                    } else {
                        String::new()
                    };
                    return record(shared, Some(route), peer, &target, Outcome::HandedOff, None, (0, 0), arrived);
                }
                Err(Refusal::Unsendable(c)) => {
                    let answer = match c.desc.meta.proto {
                        Proto::Http => reply::Reply::too_large(),
                        Proto::Tls => reply::Reply::tls_alert(reply::ALERT_DECODE_ERROR),
                        Proto::Tcp => reply::Reply::Close,
                    };
                    shared.metrics.error(Side::Client);
                    return answered(c.fd, answer, Some(route), Outcome::Dropped, peer, arrived, shared).await;
                }
                Err(refusal) => {
                    if matches!(refusal, Refusal::Dead(_)) {
                        shared.metrics.error(Side::Service);
                    }
                    conn = refusal.into_conn();
                }
            }
        }
    }
    // Waits in the control plane, which records its hand-over.
    record(shared, Some(route), peer, "queue", Outcome::Parked, None, (0, 0), arrived);
    // If the control plane is gone (shutting down), the connection closes here.
    let _ = shared.to_control.send(ToControl::Conn(conn));
}
