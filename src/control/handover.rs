//! Moving the control plane's state to the process that replaces this one (an
//! upgrade): freeze, export, then commit or thaw; and, in the new process,
//! import. The process side (spawning, the socketpair) is in `crate::upgrade`.

use super::{ControlPlane, Exit, ListenerEntry, RouteState, SessionEntry, route_key, session};
use crate::forward::backend::{BackendPool, BackendSpec, Policy};
use crate::forward::{Paused, Resume, relay};
use crate::handoff::{Conn, Session, SessionId};
use crate::route::{Listener, RouteKey};
use crate::upgrade::{Channel, Outgoing};
use portmux_wire::{Handover, PROTOCOL_VERSION, RouteSpec};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What a freeze took out of the state, kept until the upgrade commits (then
/// dropped: the new process holds its own copies) or fails (then put back).
#[derive(Debug, Default)]
pub(crate) struct Frozen {
    unacked: Vec<(Arc<Session>, Vec<Conn>)>,
    queued: Vec<Conn>,
}

/// Queues a connection for the new process to deliver.
pub(super) fn send_deliver(out: &mpsc::UnboundedSender<Outgoing>, conn: Conn) {
    let Ok(fd) = conn.fd.try_clone() else { return };
    tracing::debug!(conn = conn.id, peer = %conn.meta.peer, "handing over a connection to deliver");
    let msg = Handover::Deliver {
        id: conn.id,
        listener: conn.meta.local,
        waited_ms: conn.arrived.elapsed().as_millis() as u64,
        meta: conn.meta,
    };
    let _ = out.send((msg, vec![fd]));
}

impl ControlPlane {
    /// Claims the right to upgrade; false if one is under way.
    pub(crate) fn begin_upgrade(&self) -> bool {
        !self.upgrading.replace(true)
    }

    pub(crate) fn end_upgrade(&self) {
        self.upgrading.set(false);
    }

    pub(crate) fn request_exit(&self, exit: Exit) {
        self.exit.send_replace(Some(exit));
    }

    /// Stops everything that changes the state: workers stop accepting (the
    /// listeners stay open, the kernel queues), session readers stop at their
    /// receive point, the acceptor, admin API and timer stop; every route now
    /// queues through here. Takes the unacked and queued connections out.
    pub(crate) async fn freeze(self: &Rc<Self>) -> Frozen {
        self.state.borrow_mut().frozen = true;
        self.publish();
        self.shared.handing_over.send_replace(true);
        self.stop_tasks();
        self.freeze.send_replace(true);
        // Every accept loop has handled its last accept (a connection accepted
        // meanwhile is a counted task, which ends in the new process).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let over = self.shared.accepts_over.notified();
            if self.shared.accepting.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, over).await.is_err() {
                tracing::warn!("accept loops did not stop within 5 s");
                break;
            }
        }
        loop {
            let idle = self.readers_idle.notified();
            if self.readers.get() == 0 {
                break;
            }
            idle.await;
        }
        let mut frozen = Frozen::default();
        let mut st = self.state.borrow_mut();
        let mut sessions: Vec<&SessionEntry> = st.sessions.values().collect();
        sessions.sort_by_key(|e| e.session.id);
        for e in sessions {
            frozen.unacked.push((e.session.clone(), e.session.freeze()));
        }
        let mut keys: Vec<RouteKey> = st.routes.keys().cloned().collect();
        keys.sort();
        for key in keys {
            if let Some(r) = st.routes.get_mut(&key) {
                for p in r.queue.drain(..) {
                    p.stop_watch.notify_one();
                    frozen.queued.push(p.conn);
                }
            }
        }
        frozen
    }

    /// Sends the frozen state to the new process (each fd as a duplicate).
    pub(crate) fn export(&self, frozen: &Frozen, out: &mpsc::UnboundedSender<Outgoing>) -> Result<(), String> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map_err(|e| format!("dup: {e}"));
        let send =
            |msg: Handover, fds: Vec<OwnedFd>| out.send((msg, fds)).map_err(|_| "handover channel closed".to_string());
        let st = self.state.borrow();
        let mut addrs: HashMap<u64, SocketAddr> = HashMap::new();
        for (addr, l) in &st.listeners {
            addrs.insert(l.listener.id, *addr);
            send(Handover::Listener { id: l.listener.id, addr: *addr }, vec![dup(l.listener.fd.as_fd())?])?;
        }
        if let Some(fd) = self.control_fd.borrow().as_ref() {
            send(Handover::ControlSocket { owned: self.control_owned.get() }, vec![dup(fd.as_fd())?])?;
        }
        if let Some(l) = self.admin_listener.borrow().as_ref() {
            send(Handover::AdminSocket, vec![dup(l.as_fd())?])?;
        }
        for msg in st.route_messages() {
            send(msg, vec![])?;
        }
        if let Some(file) = self.state_file.borrow().as_ref() {
            send(Handover::StateFile, vec![dup(file.fd())?])?;
        }
        for (session, conns) in &frozen.unacked {
            let entry = st.sessions.get(&session.id);
            let routes = entry
                .map(|e| e.routes.iter().filter_map(|k| st.routes.get(k)).map(|r| r.display.to_string()).collect())
                .unwrap_or_default();
            let msg = Handover::Session {
                id: session.id,
                name: session.name.clone(),
                pid: session.pid,
                uid: session.uid,
                draining: entry.is_some_and(|e| e.draining),
                routes,
            };
            send(msg, vec![dup(session.socket())?])?;
            for conn in conns {
                tracing::debug!(conn = conn.id, peer = %conn.meta.peer, session = session.id, "handing over an unacked connection");
                let listener = addrs.get(&conn.listener).copied().unwrap_or(conn.meta.local);
                let msg = Handover::Unacked { session: session.id, id: conn.id, listener, meta: conn.meta.clone() };
                send(msg, vec![dup(conn.fd.as_fd())?])?;
            }
        }
        for conn in &frozen.queued {
            tracing::debug!(conn = conn.id, peer = %conn.meta.peer, "handing over a queued connection");
            let listener = addrs.get(&conn.listener).copied().unwrap_or(conn.meta.local);
            let msg = Handover::Deliver {
                id: conn.id,
                listener,
                meta: conn.meta.clone(),
                waited_ms: conn.arrived.elapsed().as_millis() as u64,
            };
            send(msg, vec![dup(conn.fd.as_fd())?])?;
        }
        let next = self.shared.next_conn_id.load(std::sync::atomic::Ordering::Relaxed);
        send(Handover::StateEnd { next_conn_id: next }, vec![])
    }

    /// The new process serves: everything this process still gets goes there,
    /// and this process lets go of its state (and its copies of every fd).
    pub(crate) fn commit(self: &Rc<Self>, frozen: Frozen, out: mpsc::UnboundedSender<Outgoing>) {
        for conn in self.buffered.take() {
            send_deliver(&out, conn);
        }
        *self.handover.borrow_mut() = Some(out);
        drop(frozen);
        {
            let mut st = self.state.borrow_mut();
            st.routes.clear();
            st.sessions.clear();
            st.listeners.clear();
        }
        // The frozen table stays published: a connection accepted before the
        // freeze whose task reads the table only now must still find its
        // listener, so that it is queued here and handed over (an empty table
        // would close it, with its request unread: a reset).
        self.control_fd.borrow_mut().take();
        self.admin_listener.borrow_mut().take();
    }

    /// The upgrade failed: everything is this process's again, as before.
    pub(crate) fn thaw(self: &Rc<Self>, frozen: Frozen) {
        for (session, conns) in frozen.unacked {
            session.thaw(conns);
        }
        self.state.borrow_mut().frozen = false;
        self.freeze.send_replace(false);
        self.shared.handing_over.send_replace(false);
        self.publish();
        self.start_tasks();
        for session in self.sessions() {
            tokio_uring::spawn(session::run(self.clone(), session));
        }
        for conn in frozen.queued.into_iter().chain(self.buffered.take()) {
            self.route_conn(conn);
        }
    }

    /// A relay paused for the upgrade: its sockets go to the new process.
    pub(crate) fn relay_paused(&self, paused: Paused) {
        match self.handover.borrow().as_ref() {
            Some(out) => {
                let msg = Handover::Relay {
                    route: paused.meta.route.clone(),
                    backend: paused.backend_name,
                    meta: paused.meta,
                    client_closed: paused.closed.client,
                    backend_closed: paused.closed.backend,
                };
                let _ = out.send((msg, vec![paused.client, paused.backend]));
            }
            // Not upgrading (a pause nobody asked for): relay on here.
            None => {
                let pool = self.pool_of(&paused.meta.route);
                self.shared.to_worker(Resume { paused, pool });
            }
        }
    }

    /// The backend pool of a forwarding route (named by its text), or an empty one.
    fn pool_of(&self, route: &str) -> Arc<BackendPool> {
        RouteSpec::parse(route)
            .ok()
            .and_then(|spec| {
                self.state.borrow().routes.get(&route_key(&spec, self.shared.settings.bind))?.forward.clone()
            })
            .unwrap_or_else(|| Arc::new(BackendPool::new(Vec::new(), Policy::RoundRobin, None)))
    }
}

/// In the new process: receives the previous process's state and installs it,
/// without publishing a table until it is complete.
pub(super) async fn import(cp: &Rc<ControlPlane>, fd: OwnedFd) -> Result<Rc<Channel>, String> {
    let channel = Rc::new(Channel::new(fd).map_err(|e| format!("handover socket: {e}"))?);
    let start = Handover::Start { version: PROTOCOL_VERSION, pid: std::process::id() };
    channel.send(&start, Vec::new()).await.map_err(|e| format!("handover: {e}"))?;
    cp.state.borrow_mut().importing = true;
    let result = receive_state(cp, &channel).await;
    cp.state.borrow_mut().importing = false;
    let pending = match result {
        Ok(p) => p,
        Err(e) => {
            // The previous process thaws and keeps serving.
            let _ = channel.send(&Handover::Failed { reason: e.clone() }, Vec::new()).await;
            return Err(e);
        }
    };
    {
        let now = Instant::now();
        let linger = cp.linger();
        let mut st = cp.state.borrow_mut();
        for r in st.routes.values_mut() {
            if r.forward.is_none() && r.sessions.is_empty() && r.reserved_until.is_none() {
                r.reserved_until = Some(now + linger);
            }
        }
        let used: Vec<SocketAddr> = st.routes.keys().map(|k| k.0).collect();
        for (addr, l) in st.listeners.iter_mut() {
            if !used.contains(addr) {
                l.idle_since = Some(now);
            }
        }
    }
    cp.publish();
    for session in cp.sessions() {
        tokio_uring::spawn(session::run(cp.clone(), session));
    }
    for conn in pending {
        cp.route_conn(conn);
    }
    Ok(channel)
}

async fn receive_state(cp: &Rc<ControlPlane>, channel: &Channel) -> Result<Vec<Conn>, String> {
    let settings = &cp.shared.settings;
    let mut pending = Vec::new();
    let mut sessions: HashMap<SessionId, Arc<Session>> = HashMap::new();
    let mut ids: HashMap<SocketAddr, u64> = HashMap::new();
    loop {
        let (msg, mut fds) = match channel.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err("the previous portmux closed the handover before sending its state".into()),
            Err(e) => return Err(format!("handover: {e}")),
        };
        let mut fd = || fds.pop().ok_or_else(|| format!("handover: {} arrived without its fd", msg.kind()));
        match msg.clone() {
            Handover::Listener { id, addr } => {
                let listener = Arc::new(Listener::new(id, addr, fd()?));
                // A listener passed by socket activation is not in the fd store.
                let pinned = false;
                ids.insert(addr, id);
                let mut st = cp.state.borrow_mut();
                st.next_listener = st.next_listener.max(id);
                st.listeners.insert(addr, ListenerEntry { listener, idle_since: None, pinned });
            }
            Handover::ControlSocket { owned } => {
                *cp.control_fd.borrow_mut() = Some(fd()?);
                cp.control_owned.set(owned);
            }
            Handover::StateFile => *cp.state_file.borrow_mut() = Some(crate::systemd::StateFile::adopt(fd()?)),
            Handover::AdminSocket => *cp.admin_listener.borrow_mut() = Some(std::net::TcpListener::from(fd()?)),
            Handover::BackendRoute { route, backends } => {
                let spec = RouteSpec::parse(&route).map_err(|e| e.to_string())?;
                let resolved = backends
                    .iter()
                    .map(|b| {
                        let spec = BackendSpec::parse(b)?;
                        let endpoints = spec.resolve()?;
                        Ok((spec, endpoints))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                cp.set_backends(spec, resolved).map_err(|e| format!("route {route}: {e:?}"))?;
            }
            Handover::ServiceRoute { route, service, reserved_ms } => {
                let spec = RouteSpec::parse(&route).map_err(|e| e.to_string())?;
                let key = route_key(&spec, settings.bind);
                let reserved_until = reserved_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
                let state = RouteState::new(spec, service, None, reserved_until);
                cp.state.borrow_mut().routes.insert(key, state);
            }
            Handover::Session { id, name, pid, uid, draining, routes } => {
                let session = Arc::new(Session::new(id, name, pid, uid, fd()?, settings.max_unacked));
                let mut st = cp.state.borrow_mut();
                st.next_session = st.next_session.max(id);
                let mut keys = Vec::new();
                for text in &routes {
                    let Ok(spec) = RouteSpec::parse(text) else { continue };
                    let key = route_key(&spec, settings.bind);
                    if let Some(r) = st.routes.get_mut(&key) {
                        r.sessions.push(id);
                        r.reserved_until = None;
                        keys.push(key);
                    }
                }
                st.sessions.insert(id, SessionEntry { session: session.clone(), routes: keys, draining });
                sessions.insert(id, session);
            }
            Handover::Unacked { session, id, listener, meta } => {
                let conn = Conn {
                    id,
                    fd: Arc::new(fd()?),
                    listener: ids.get(&listener).copied().unwrap_or_else(|| cp.listener_id(listener)),
                    meta,
                    arrived: Instant::now(),
                    rejected_by: None,
                };
                tracing::debug!(conn = conn.id, peer = %conn.meta.peer, session, "adopted an unacked connection");
                match sessions.get(&session) {
                    Some(s) => s.adopt(conn),
                    None => pending.push(conn),
                }
            }
            Handover::Deliver { id, listener, meta, waited_ms } => {
                let arrived = Instant::now().checked_sub(Duration::from_millis(waited_ms)).unwrap_or_else(Instant::now);
                let listener = ids.get(&listener).copied().unwrap_or_else(|| cp.listener_id(listener));
                pending.push(Conn { id, fd: Arc::new(fd()?), listener, meta, arrived, rejected_by: None });
            }
            Handover::StateEnd { next_conn_id } => {
                cp.shared.next_conn_id.fetch_max(next_conn_id, std::sync::atomic::Ordering::Relaxed);
                return Ok(pending);
            }
            other => return Err(format!("handover: unexpected {} while receiving the state", other.kind())),
        }
    }
}

/// After a restart (a crash, systemd restarting portmux): recreates the routes
/// kept in the fd store. Routes with backends come back whole; a service's
/// route comes back reserved for the linger period, so connections queue until
/// the service (its client library reconnects by itself) registers again.
pub(super) fn restore(cp: &Rc<ControlPlane>, routes: Vec<Handover>) {
    let mut restored = 0;
    for msg in routes {
        match msg {
            Handover::BackendRoute { route, backends } => {
                let resolved: Result<Vec<_>, String> = backends
                    .iter()
                    .map(|b| {
                        let spec = BackendSpec::parse(b)?;
                        let endpoints = spec.resolve()?;
                        Ok((spec, endpoints))
                    })
                    .collect();
                match (RouteSpec::parse(&route), resolved) {
                    (Ok(spec), Ok(resolved)) => match cp.set_backends(spec, resolved) {
                        Ok(_) => restored += 1,
                        Err(e) => tracing::warn!(%route, "cannot restore the route: {e:?}"),
                    },
                    _ => tracing::warn!(%route, "cannot restore the route: bad spec or backends"),
                }
            }
            Handover::ServiceRoute { route, service, .. } => {
                let Ok(spec) = RouteSpec::parse(&route) else { continue };
                let key = route_key(&spec, cp.shared.settings.bind);
                let addr = key.0;
                let mut st = cp.state.borrow_mut();
                if let Err((_, e)) = st.open_listeners(&[(addr, route.clone())]) {
                    tracing::warn!(%route, "cannot restore the route: {e}");
                    continue;
                }
                st.routes.insert(key, RouteState::new(spec, service, None, Some(Instant::now() + cp.linger())));
                restored += 1;
            }
            other => tracing::warn!("unexpected {} in the route state", other.kind()),
        }
    }
    if restored > 0 {
        tracing::info!(routes = restored, "restored the routes kept in the fd store; services' routes wait for them");
    }
}

/// In the new process, once serving: tells the previous process, then takes
/// what it still hands over (late connections, paused relays) until it is done.
pub(super) fn finish_import(cp: &Rc<ControlPlane>, channel: Rc<Channel>) {
    let cp = cp.clone();
    tokio_uring::spawn(async move {
        if let Err(e) = channel.send(&Handover::Ready, Vec::new()).await {
            tracing::warn!("could not tell the previous portmux that this one is ready: {e}");
        }
        let mut relays = 0usize;
        loop {
            match channel.recv().await {
                Ok(Some((Handover::Deliver { id, listener, meta, waited_ms }, mut fds))) => {
                    let Some(fd) = fds.pop() else { continue };
                    let arrived =
                        Instant::now().checked_sub(Duration::from_millis(waited_ms)).unwrap_or_else(Instant::now);
                    let listener = cp.listener_id(listener);
                    tracing::debug!(conn = id, peer = %meta.peer, "received a connection to deliver");
                    cp.route_conn(Conn { id, fd: Arc::new(fd), listener, meta, arrived, rejected_by: None });
                }
                Ok(Some((Handover::Relay { route, backend, meta, client_closed, backend_closed }, mut fds))) => {
                    let (Some(server), Some(client)) = (fds.pop(), fds.pop()) else { continue };
                    relays += 1;
                    let closed = relay::Closed { client: client_closed, backend: backend_closed };
                    let paused = Paused { client, backend: server, meta, backend_name: backend, closed };
                    let pool = cp.pool_of(&route);
                    cp.shared.to_worker(Resume { paused, pool });
                }
                Ok(Some((Handover::Done, _))) | Ok(None) => break,
                Ok(Some((other, _))) => tracing::warn!("handover: unexpected {} after ready", other.kind()),
                Err(e) => {
                    tracing::warn!("handover: {e}");
                    break;
                }
            }
        }
        tracing::info!(relays, "the previous portmux handed over everything");
    });
}

impl ControlPlane {
    /// The listener a connection came through: its exact address, else the
    /// wildcard listener on the same port (a client's local address is specific).
    fn listener_id(&self, addr: SocketAddr) -> u64 {
        let st = self.state.borrow();
        st.listeners
            .get(&addr)
            .or_else(|| {
                st.listeners
                    .values()
                    .find(|l| l.listener.addr.port() == addr.port() && l.listener.addr.ip().is_unspecified())
            })
            .map_or(0, |l| l.listener.id)
    }
}
