//! The control plane's state on its way to the process that replaces this one
//! (an upgrade): freeze, export, then commit or thaw; in the new process,
//! import; after a crash, restore the routes kept in the fd store. The process
//! side (spawning, the socketpair, timeouts) is the `upgrade` module's.

use super::core::{Outcome, SessionState};
use super::driver::{Control, Lifecycle};
use super::error::HandoverError;
use crate::config::policy::Peer;
use crate::forward::backend::BackendSpec;
use crate::forward::{Paused, Resume, relay};
use crate::handoff::{Conn, ConnDesc, Session};
use crate::ids::{ConnId, ListenerId, SessionId};
use crate::route::Listener;
use crate::shared::{Idle, Job};
use portmux_wire::{Handover, RouteSpec};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// One handover message to send, with the fds it carries.
pub type Outgoing = (Handover, Vec<OwnedFd>);

/// What a freeze took out of the sessions, kept until the upgrade commits
/// (then dropped: the new process holds its own copies) or fails (then put back).
#[derive(Debug, Default)]
pub struct Frozen {
    unacked: Vec<(Arc<Session>, Vec<Conn>)>,
}

/// The message that asks the new process to deliver a connection.
pub(super) fn deliver_message(desc: &ConnDesc, listener: SocketAddr) -> Handover {
    let (id, meta, waited_ms) = (desc.id.0, desc.meta.clone(), desc.arrived.elapsed().as_millis() as u64);
    match &desc.tls {
        None => Handover::Deliver { id, listener, meta, waited_ms },
        Some(tls) => Handover::DeliverTls { id, listener, meta, tls: (**tls).clone(), waited_ms },
    }
}

/// The message that asks the new process to go on relaying.
pub(super) fn relay_message(paused: &Paused) -> Handover {
    if let Some(at) = paused.in_map {
        return Handover::RelayInKernel {
            route: paused.meta.route.clone(),
            backend: paused.backend_name.clone(),
            meta: paused.meta.clone(),
            client_closed: paused.closed.client,
            backend_closed: paused.closed.backend,
            slots: at.even,
            base: (at.base[0], at.base[1]),
        };
    }
    Handover::Relay {
        route: paused.meta.route.clone(),
        backend: paused.backend_name.clone(),
        meta: paused.meta.clone(),
        client_closed: paused.closed.client,
        backend_closed: paused.closed.backend,
    }
}

/// Waits for `done` to hold, woken by `wake`, until `deadline`. False if it timed out.
pub(super) async fn wait_until(
    deadline: tokio::time::Instant,
    mut done: impl FnMut() -> bool,
    wake: &tokio::sync::Notify,
) -> bool {
    loop {
        let woken = wake.notified();
        if done() {
            return true;
        }
        if tokio::time::timeout_at(deadline, woken).await.is_err() {
            return done();
        }
    }
}

impl Control {
    /// Stops everything that changes the state: workers stop accepting (the
    /// listeners stay open, the kernel queues), session readers stop at their
    /// receive point, the control socket's acceptor and the admin API pause;
    /// every route queues through here. Hand-overs in progress end (those that
    /// could not finish come back through the control plane), so the unacked
    /// connections taken out are exactly those the services were sent. Every
    /// wait ends by `within`.
    pub async fn freeze(self: &Rc<Self>, within: Duration) -> Frozen {
        let deadline = tokio::time::Instant::now() + within;
        self.core.borrow_mut().freeze();
        self.apply();
        self.lifecycle.send_replace(Lifecycle::Frozen);
        self.shared.handing_over.send_replace(true);
        // Every accept loop has handled its last accept (a connection accepted
        // meanwhile is a counted task, which ends in the new process).
        let shared = self.shared.clone();
        if !wait_until(deadline, || shared.accepting.load(Ordering::Relaxed) == 0, &shared.accepts_over).await {
            tracing::warn!("accept loops did not stop before the upgrade's deadline");
        }
        if !wait_until(deadline, || self.readers.borrow().is_empty(), &self.readers_idle).await {
            let left = self.readers.borrow().len();
            tracing::warn!(readers = left, "session readers did not stop before the upgrade's deadline");
        }
        let sessions: Vec<Arc<Session>> = self.sessions.borrow().values().cloned().collect();
        for s in &sessions {
            s.freeze();
        }
        for s in &sessions {
            if tokio::time::timeout_at(deadline, s.sends_done()).await.is_err() {
                tracing::warn!(session = %s.id, "a hand-over was still in progress at the upgrade's deadline");
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !self.deliveries_done(left).await {
            tracing::warn!("a delivery from a queue was still in progress at the upgrade's deadline");
        }
        // A health check's connection stays here: its check fails in time.
        let checks = self.health.borrow();
        let unacked = |s: &Arc<Session>| s.take_unacked().into_iter().filter(|c| !checks.is_probe(c.id())).collect();
        Frozen { unacked: sessions.into_iter().map(|s| (s.clone(), unacked(&s))).collect() }
    }

    /// Sends the frozen state to the new process (each fd as a duplicate).
    pub fn export(&self, frozen: &Frozen, out: &mpsc::UnboundedSender<Outgoing>) -> Result<(), HandoverError> {
        let dup = |what: &dyn Fn() -> String, fd: BorrowedFd<'_>| {
            fd.try_clone_to_owned().map_err(|source| HandoverError::Dup { what: what(), source })
        };
        let send = |msg: Handover, fds: Vec<OwnedFd>| out.send((msg, fds)).map_err(|_| HandoverError::ChannelClosed);
        let now = Instant::now();
        let core = self.core.borrow();
        let listeners = self.listeners.borrow();
        let addr_of = |id: ListenerId, fallback: SocketAddr| core.listeners().get(&id).map_or(fallback, |l| l.addr);
        for (id, l) in core.listeners() {
            let Some(socket) = listeners.get(id) else { continue };
            let fd = dup(&|| format!("the listening socket {}", l.addr), socket.fd.as_fd())?;
            let msg = if l.pinned {
                Handover::PinnedListener { id: id.0, addr: l.addr }
            } else {
                Handover::Listener { id: id.0, addr: l.addr }
            };
            send(msg, vec![fd])?;
        }
        let sockets = self.sockets.borrow();
        if let Some(fd) = sockets.control.as_ref() {
            send(
                Handover::ControlSocket { owned: sockets.control_owned },
                vec![dup(&|| "the control socket".into(), fd.as_fd())?],
            )?;
        }
        if let Some(l) = sockets.admin.as_ref() {
            send(Handover::AdminSocket, vec![dup(&|| "the admin API's socket".into(), l.as_fd())?])?;
        }
        if let Some(l) = sockets.admin_unix.as_ref() {
            let msg = Handover::AdminUnixSocket { owned: sockets.admin_owned };
            send(msg, vec![dup(&|| "the admin socket".into(), l.as_fd())?])?;
        }
        if let Some(k) = crate::forward::kernel::in_force() {
            let fds = k.maps().fds().into_iter().map(|m| dup(&|| "a map of the kernel relay".into(), m));
            let fds = fds.collect::<Result<Vec<_>, _>>()?;
            send(Handover::RelayMaps { layout: portmux_sys::sockmap::LAYOUT }, fds)?;
        }
        let upgrades = Handover::Upgrades { count: self.shared.metrics.upgrades() };
        for msg in core.route_messages(now).into_iter().chain(self.file_routes_message(&core)).chain([upgrades]) {
            send(msg, vec![])?;
        }
        for msg in self.tls.borrow().handover_messages(&core, &self.shared) {
            send(msg, vec![])?;
        }
        if let Some(file) = self.state_file.borrow().as_ref() {
            send(Handover::StateFile, vec![dup(&|| "the route state file".into(), file.fd())?])?;
        }
        for (session, conns) in &frozen.unacked {
            let state = core.sessions().get(&session.id);
            let routes = state
                .map(|e| e.routes.iter().filter_map(|k| core.routes().get(k)).map(|r| r.display.to_string()).collect())
                .unwrap_or_default();
            let msg = Handover::Session {
                id: session.id.0,
                name: session.name.clone(),
                pid: session.pid,
                uid: session.uid,
                draining: state.is_some_and(|e| e.draining),
                routes,
            };
            send(msg, vec![dup(&|| format!("the session socket of '{}'", session.name), session.socket())?])?;
            for conn in conns {
                tracing::debug!(conn = %conn.id(), peer = %conn.desc.meta.peer, session = %session.id, "handing over an unacked connection");
                let listener = addr_of(conn.desc.listener, conn.desc.meta.local);
                let (session, id, meta) = (session.id.0, conn.id().0, conn.desc.meta.clone());
                let msg = match &conn.desc.tls {
                    None => Handover::Unacked { session, id, listener, meta },
                    Some(tls) => Handover::UnackedTls { session, id, listener, meta, tls: (**tls).clone() },
                };
                send(msg, vec![dup(&|| format!("connection {}", conn.id()), conn.fd.as_fd())?])?;
            }
        }
        for desc in core.queued() {
            tracing::debug!(conn = %desc.id, peer = %desc.meta.peer, "handing over a queued connection");
            let fd = match self.parking.dup(desc.id) {
                Some(fd) => {
                    fd.map_err(|source| HandoverError::Dup { what: format!("connection {}", desc.id), source })?
                }
                None => continue,
            };
            send(deliver_message(desc, addr_of(desc.listener, desc.meta.local)), vec![fd])?;
        }
        let next = self.shared.next_conn_id.load(Ordering::Relaxed);
        send(Handover::StateEnd { next_conn_id: next }, vec![])
    }

    /// The new process serves: everything this process still gets goes there,
    /// and this process lets go of its state (and its copies of every fd).
    pub fn commit(self: &Rc<Self>, frozen: Frozen, out: mpsc::UnboundedSender<Outgoing>) {
        *self.handover.borrow_mut() = Some(out);
        self.core.borrow_mut().commit();
        self.apply();
        drop(frozen);
        self.sessions.borrow_mut().clear();
        // The frozen table stays published, holding the listeners: a
        // connection accepted before the freeze whose task reads the table only
        // now must still find its listener, so that it is queued here and
        // handed over (an empty table would close it, its request unread: a reset).
        self.listeners.borrow_mut().clear();
        let mut sockets = self.sockets.borrow_mut();
        sockets.control.take();
        sockets.admin.take();
        sockets.admin_unix.take();
        sockets.admin_owned = false;
        // The control socket's file is the new process's now.
        sockets.control_owned = false;
        self.lifecycle.send_replace(Lifecycle::HandedOver);
    }

    /// The upgrade failed: everything is this process's again, as before.
    pub fn thaw(self: &Rc<Self>, frozen: Frozen) {
        let mut orphans = Vec::new();
        for (session, conns) in frozen.unacked {
            orphans.extend(session.thaw(conns));
        }
        self.core.borrow_mut().thaw(Instant::now());
        self.apply();
        self.shared.handing_over.send_replace(false);
        self.lifecycle.send_replace(Lifecycle::Serving);
        self.start_readers();
        for conn in orphans {
            self.arrived(conn);
        }
    }

    /// The upgrade is over: nothing more goes to the new process.
    pub fn drop_handover(&self) {
        self.handover.borrow_mut().take();
    }

    /// In the new process: the previous process's state arrives; nothing is
    /// published until [`Control::end_import`].
    pub fn begin_import(&self) -> Importer {
        self.core.borrow_mut().begin_import();
        Importer::default()
    }

    /// Takes one message of the previous process's state. `Ok(true)` at its end.
    pub fn import(
        self: &Rc<Self>,
        importer: &mut Importer,
        msg: Handover,
        mut fds: Vec<OwnedFd>,
    ) -> Result<bool, HandoverError> {
        let kind = msg.kind();
        let mut fd = || fds.pop().ok_or(HandoverError::MissingFd { kind });
        let now = Instant::now();
        let settings = &self.shared.settings;
        match msg {
            Handover::Listener { id, addr } | Handover::PinnedListener { id, addr } => {
                let pinned = kind == "PinnedListener";
                let id = self.core.borrow_mut().adopt_listener(now, Some(ListenerId(id)), addr, pinned);
                self.listeners.borrow_mut().insert(id, Arc::new(Listener::new(id, addr, fd()?)));
            }
            Handover::ControlSocket { owned } => {
                let mut sockets = self.sockets.borrow_mut();
                sockets.control = Some(fd()?);
                sockets.control_owned = owned;
            }
            Handover::AdminSocket => self.sockets.borrow_mut().admin = Some(std::net::TcpListener::from(fd()?)),
            Handover::AdminUnixSocket { owned } => {
                let mut sockets = self.sockets.borrow_mut();
                sockets.admin_unix = Some(std::os::unix::net::UnixListener::from(fd()?));
                sockets.admin_owned = owned;
            }
            Handover::StateFile => *self.state_file.borrow_mut() = Some(crate::systemd::StateFile::adopt(fd()?)),
            Handover::FileRoutes { routes } => self.inherit_file_routes(&routes),
            Handover::Upgrades { count } => self.shared.metrics.inherit_upgrades(count),
            Handover::RelayMaps { layout } => {
                use crate::forward::kernel::{InForce, InKernel, set};
                let fds: Result<[OwnedFd; 5], _> = std::mem::take(&mut fds).try_into();
                set(match fds {
                    Ok(_) if layout != portmux_sys::sockmap::LAYOUT => InForce::User(format!(
                        "the previous portmux's kernel relay has map layout {layout}, this one {}",
                        portmux_sys::sockmap::LAYOUT
                    )),
                    Ok(fds) => match InKernel::adopt(fds) {
                        Ok(k) => InForce::Kernel(k),
                        Err(why) => InForce::User(format!("the previous portmux's maps: {why}")),
                    },
                    Err(_) => InForce::User("the previous portmux sent its maps without their fds".into()),
                });
            }
            Handover::BackendRoute { route, backends } => {
                let failed = |reason: String| HandoverError::Route { route: route.clone(), reason };
                let spec = RouteSpec::parse(&route).map_err(|e| failed(e.to_string()))?;
                let resolved = resolve(&backends).map_err(failed)?;
                self.set_backends(spec, resolved).map_err(|e| failed(e.to_string()))?;
            }
            Handover::ServiceRoute { route, service, reserved_ms } => {
                let reserved = reserved_ms.map(|ms| (now, Duration::from_millis(ms)));
                self.core
                    .borrow_mut()
                    .import_service_route(&route, service, portmux_wire::UNKNOWN_OWNER, reserved)
                    .map_err(|e| HandoverError::Route { route: route.clone(), reason: e.to_string() })?;
            }
            Handover::OwnedServiceRoute { route, service, uid, reserved_ms } => {
                let reserved = reserved_ms.map(|ms| (now, Duration::from_millis(ms)));
                self.core
                    .borrow_mut()
                    .import_service_route(&route, service, uid, reserved)
                    .map_err(|e| HandoverError::Route { route: route.clone(), reason: e.to_string() })?;
            }
            Handover::Session { id, name, pid, uid, draining, routes } => {
                let sid = SessionId(id);
                let session = Arc::new(Session::new(sid, name.clone(), pid, uid, fd()?, settings.max_unacked));
                let peer = Peer::from_pid(pid, uid);
                let state = SessionState { name, peer, routes: Vec::new(), draining, usable: true };
                self.core.borrow_mut().import_session(sid, state, &routes);
                self.sessions.borrow_mut().insert(sid, session.clone());
                importer.sessions.insert(sid, session);
            }
            Handover::TicketKeys { keys, age_ms } => {
                if !self.shared.tls.tickets.import(&keys, Duration::from_millis(age_ms)) {
                    tracing::warn!(
                        "the previous portmux's session-ticket keys are malformed; clients make full handshakes"
                    );
                }
                zeroize::Zeroize::zeroize(&mut { keys });
            }
            Handover::ServiceCert { route, chain, key } => {
                let default_bind = self.core.borrow().config().default_bind;
                let (chain, key) = (zeroize::Zeroizing::new(chain), zeroize::Zeroizing::new(key));
                if let Err(e) = self.tls.borrow_mut().adopt_service_cert(&route, chain, key, default_bind, &self.shared)
                {
                    tracing::warn!(route = %route, "the certificate its service sent is unusable here: {e}");
                }
            }
            Handover::Unacked { session, id, listener, meta } => {
                self.adopt_unacked(importer, session, id, listener, meta, None, fd()?)
            }
            Handover::UnackedTls { session, id, listener, meta, tls } => {
                self.adopt_unacked(importer, session, id, listener, meta, Some(Box::new(tls)), fd()?)
            }
            Handover::Deliver { id, listener, meta, waited_ms } => {
                let conn = self.delivered_conn(id, listener, meta, None, waited_ms, fd()?);
                importer.pending.push(conn);
            }
            Handover::DeliverTls { id, listener, meta, tls, waited_ms } => {
                let conn = self.delivered_conn(id, listener, meta, Some(Box::new(tls)), waited_ms, fd()?);
                importer.pending.push(conn);
            }
            Handover::StateEnd { next_conn_id } => {
                self.shared.next_conn_id.fetch_max(next_conn_id, Ordering::Relaxed);
                if crate::forward::kernel::in_force().is_none() && !crate::forward::kernel::decided() {
                    let why = match settings.relay {
                        crate::config::Relay::User => "--relay user".to_string(),
                        _ => "the previous portmux relayed in user space; only it could load the kernel relay"
                            .to_string(),
                    };
                    crate::forward::kernel::set(crate::forward::kernel::InForce::User(why));
                }
                return Ok(true);
            }
            other => return Err(HandoverError::Unexpected { kind: other.kind() }),
        }
        Ok(false)
    }

    #[allow(clippy::too_many_arguments)]
    fn adopt_unacked(
        &self,
        importer: &mut Importer,
        session: u64,
        id: u64,
        listener: SocketAddr,
        meta: portmux_wire::ConnMeta,
        tls: Option<Box<portmux_wire::TlsInfo>>,
        fd: OwnedFd,
    ) {
        {
            let listener = self.core.borrow().listener_for(listener).unwrap_or_default();
            let desc = ConnDesc {
                id: ConnId(id),
                listener,
                meta,
                arrived: Instant::now(),
                rejected_by: None,
                returned: false,
                tls,
            };
            let conn = Conn { fd: Arc::new(fd), desc };
            tracing::debug!(conn = id, peer = %conn.desc.meta.peer, session, "adopted an unacked connection");
            match importer.sessions.get(&SessionId(session)) {
                Some(s) => s.adopt(conn),
                None => importer.pending.push(conn),
            }
        }
    }

    fn delivered_conn(
        &self,
        id: u64,
        listener: SocketAddr,
        meta: portmux_wire::ConnMeta,
        tls: Option<Box<portmux_wire::TlsInfo>>,
        waited_ms: u64,
        fd: OwnedFd,
    ) -> Conn {
        let arrived = Instant::now().checked_sub(Duration::from_millis(waited_ms)).unwrap_or_else(Instant::now);
        let listener = self.core.borrow().listener_for(listener).unwrap_or_default();
        Conn {
            fd: Arc::new(fd),
            desc: ConnDesc { id: ConnId(id), listener, meta, arrived, rejected_by: None, returned: false, tls },
        }
    }

    /// The previous process's state is all in: publish, read the sessions,
    /// route the connections it handed over.
    pub fn end_import(self: &Rc<Self>, importer: Importer) {
        self.core.borrow_mut().end_import(Instant::now());
        self.apply();
        self.start_readers();
        for conn in importer.pending {
            self.arrived(conn);
        }
    }

    /// In the new process, once serving: what the previous process still
    /// hands over (late connections, paused relays). False for anything else.
    pub fn take_late(self: &Rc<Self>, msg: Handover, mut fds: Vec<OwnedFd>) -> bool {
        match msg {
            Handover::Deliver { id, listener, meta, waited_ms } => {
                self.late_delivery(id, listener, meta, None, waited_ms, fds.pop());
                true
            }
            Handover::DeliverTls { id, listener, meta, tls, waited_ms } => {
                self.late_delivery(id, listener, meta, Some(Box::new(tls)), waited_ms, fds.pop());
                true
            }
            Handover::Relay { route, backend, meta, client_closed, backend_closed } => {
                let (Some(server), Some(client)) = (fds.pop(), fds.pop()) else {
                    tracing::warn!(client = %meta.peer, "the previous portmux sent a relay without both its sockets");
                    return true;
                };
                let closed = relay::Closed { client: client_closed, backend: backend_closed };
                let paused = Paused { client, backend: server, meta, backend_name: backend, closed, in_map: None };
                let pool = self.pool_of(&route);
                self.shared.to_worker(Job::Resume(Resume { paused, pool }));
                true
            }
            Handover::RelayInKernel { route, backend, meta, client_closed, backend_closed, slots, base } => {
                let (Some(server), Some(client)) = (fds.pop(), fds.pop()) else {
                    tracing::warn!(client = %meta.peer, "the previous portmux sent a relay without both its sockets");
                    return true;
                };
                let closed = relay::Closed { client: client_closed, backend: backend_closed };
                let in_map = Some(crate::forward::kernel::InMap { even: slots, base: [base.0, base.1] });
                let paused = Paused { client, backend: server, meta, backend_name: backend, closed, in_map };
                let pool = self.pool_of(&route);
                self.shared.to_worker(Job::Resume(Resume { paused, pool }));
                true
            }
            Handover::Idle { listener, peer, local, idle_ms } => {
                let Some(fd) = fds.pop() else {
                    tracing::warn!(client = %peer, "the previous portmux sent an idle connection without its fd");
                    return true;
                };
                let Some(listener) = self.core.borrow().listener_for(listener) else {
                    tracing::warn!(client = %peer, %listener, "an idle connection for a listener this process lacks is closed");
                    return true;
                };
                let since = Instant::now().checked_sub(Duration::from_millis(idle_ms)).unwrap_or_else(Instant::now);
                self.shared.to_worker(Job::Idle(Idle { fd, listener, peer, local, since, tls: None }));
                true
            }
            _ => false,
        }
    }

    fn late_delivery(
        self: &Rc<Self>,
        id: u64,
        listener: SocketAddr,
        meta: portmux_wire::ConnMeta,
        tls: Option<Box<portmux_wire::TlsInfo>>,
        waited_ms: u64,
        fd: Option<OwnedFd>,
    ) {
        let Some(fd) = fd else {
            tracing::warn!(conn = id, "the previous portmux sent a connection without its fd");
            return;
        };
        tracing::debug!(conn = id, peer = %meta.peer, "received a connection to deliver");
        let conn = self.delivered_conn(id, listener, meta, tls, waited_ms, fd);
        self.arrived(conn);
    }

    /// After a restart (a crash, systemd restarting portmux): recreates the
    /// routes kept in the fd store. Routes with backends come back whole; a
    /// service's route comes back reserved for the linger period, so
    /// connections queue until the service (its client library reconnects by
    /// itself) registers again.
    pub fn restore(self: &Rc<Self>, routes: Vec<Handover>) {
        let restored = self.restore_from(routes, "the fd store");
        if restored > 0 {
            tracing::info!(
                routes = restored,
                "restored the routes kept in the fd store; services' routes wait for them"
            );
        }
    }

    /// Recreates routes kept in `from`; how many came back (each failure is logged).
    pub(super) fn restore_from(self: &Rc<Self>, routes: Vec<Handover>, from: &str) -> usize {
        let mut restored = 0;
        for msg in routes {
            let result = match msg {
                Handover::BackendRoute { route, backends } => {
                    let spec = RouteSpec::parse(&route).map_err(|e| e.to_string());
                    match (spec, resolve(&backends)) {
                        (Ok(spec), Ok(resolved)) => {
                            self.set_backends(spec, resolved).map(|_| ()).map_err(|e| e.to_string())
                        }
                        (Err(e), _) | (_, Err(e)) => Err(e),
                    }
                    .map_err(|e| (route, e))
                }
                Handover::ServiceRoute { route, service, .. } => {
                    self.restore_service(route, service, portmux_wire::UNKNOWN_OWNER)
                }
                Handover::OwnedServiceRoute { route, service, uid, .. } => self.restore_service(route, service, uid),
                Handover::FileRoutes { routes } => {
                    self.inherit_file_routes(&routes);
                    continue;
                }
                other => Err((String::new(), format!("unexpected {} in the route state", other.kind()))),
            };
            match result {
                Ok(()) => restored += 1,
                Err((route, e)) => tracing::warn!(%route, "cannot restore the route from {from}: {e}"),
            }
        }
        restored
    }

    /// A service's route from the fd store, reserved for its owner `uid`.
    fn restore_service(self: &Rc<Self>, route: String, service: String, uid: u32) -> Result<(), (String, String)> {
        let op = self.core.borrow_mut().restore_service_route(Instant::now(), &route, service, uid);
        self.apply();
        match self.outcome(op) {
            Ok(Outcome::RouteSet(_) | Outcome::Registered(_)) => Ok(()),
            Err(e) => Err((route, e.to_string())),
        }
    }
}

/// What an import collected before the state was complete.
#[derive(Debug, Default)]
pub struct Importer {
    sessions: HashMap<SessionId, Arc<Session>>,
    /// Connections to route once serving (queued ones, and unacked ones whose
    /// session did not come along).
    pending: Vec<Conn>,
}

/// Resolves backend specs (host names through the system resolver; this may block).
fn resolve(backends: &[String]) -> Result<Vec<(BackendSpec, Vec<portmux_sys::net::Endpoint>)>, String> {
    backends
        .iter()
        .map(|b| {
            let spec = BackendSpec::parse(b)?;
            let endpoints = spec.resolve()?;
            Ok((spec, endpoints))
        })
        .collect()
}
