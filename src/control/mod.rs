//! The control plane: owns listeners, service sessions, routes and queued
//! connections; serves the control socket; publishes route tables to workers.
//!
//! It runs on one thread (a tokio-uring runtime). State lives in a `RefCell`
//! that is never borrowed across an `.await`.

mod handover;
mod session;

use crate::admin::{BackendView, InstanceView, RouteView, TargetView};
use crate::forward::backend::{Backend, BackendPool, BackendSpec, Policy, ProxyVersion, Resolved};
use crate::handoff::{Conn, Refusal, Session, SessionId};
use crate::reply::{self, Reply};
use crate::route::{Listener, Pool, PortRoutes, Route, RouteKey, Table, Target};
use crate::runtime::{Shared, ToControl};
use portmux_sys::{net, uring};
use portmux_wire::spec::{RouteSpec, Scheme};
use portmux_wire::{Bound, Proto};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};

/// How long a rejected connection avoids the session that rejected it.
const REJECT_BACKOFF: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct ListenerEntry {
    listener: Arc<Listener>,
    /// Since when it has had no routes.
    idle_since: Option<Instant>,
    /// Passed by socket activation: systemd owns it; it never closes when idle.
    pinned: bool,
}

#[derive(Debug)]
struct SessionEntry {
    session: Arc<Session>,
    routes: Vec<RouteKey>,
    draining: bool,
}

/// A connection waiting in a route's queue, and the stop switch of the task
/// that watches it for a hang-up.
#[derive(Debug)]
struct Parked {
    conn: Conn,
    stop_watch: Rc<Notify>,
}

#[derive(Debug)]
struct RouteState {
    /// Canonical spec shown to services and in logs.
    display: Arc<str>,
    spec: RouteSpec,
    /// Backends set through the admin API; `None` for a service's route.
    forward: Option<Arc<BackendPool>>,
    /// The service holding the route (empty for a route with backends).
    service: String,
    /// Registered sessions, draining ones included.
    sessions: Vec<SessionId>,
    queue: VecDeque<Parked>,
    /// Set while no session holds the route: when it is released.
    reserved_until: Option<Instant>,
    /// A flush task is delivering the queue.
    flushing: bool,
    next: usize,
}

impl RouteState {
    /// A route nobody has joined yet: no session, nothing queued.
    fn new(
        spec: RouteSpec,
        service: String,
        forward: Option<Arc<BackendPool>>,
        reserved_until: Option<Instant>,
    ) -> Self {
        RouteState {
            display: spec.key().into(),
            spec,
            forward,
            service,
            sessions: Vec::new(),
            queue: VecDeque::new(),
            reserved_until,
            flushing: false,
            next: 0,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// An upgrade froze the state: every route queues (through the control plane).
    frozen: bool,
    /// Importing from the previous process: no table is published until the end.
    importing: bool,
    listeners: HashMap<SocketAddr, ListenerEntry>,
    routes: HashMap<RouteKey, RouteState>,
    sessions: HashMap<SessionId, SessionEntry>,
    next_listener: u64,
    next_session: u64,
}

impl State {
    /// Sessions that may receive new connections for `route`.
    fn live(&self, route: &RouteState) -> Vec<Arc<Session>> {
        route
            .sessions
            .iter()
            .filter_map(|id| self.sessions.get(id))
            .filter(|e| !e.draining && e.session.is_usable())
            .map(|e| e.session.clone())
            .collect()
    }

    fn build_table(&self) -> Table {
        let mut per_listener: HashMap<SocketAddr, Vec<Arc<Route>>> = HashMap::new();
        for (key, r) in &self.routes {
            let live = self.live(r);
            let target = match &r.forward {
                _ if self.frozen => Target::Queue,
                Some(pool) => Target::Forward(pool.clone()),
                None if r.queue.is_empty() && !r.flushing && !live.is_empty() => Target::Pool(Pool::new(live)),
                None => Target::Queue,
            };
            let route = Route { key: r.display.clone(), ident: key.clone(), spec: r.spec.clone(), target };
            per_listener.entry(key.0).or_default().push(Arc::new(route));
        }
        let ports = self
            .listeners
            .values()
            .map(|l| {
                let routes = per_listener.remove(&l.listener.addr).unwrap_or_default();
                (l.listener.id, Arc::new(PortRoutes::new(l.listener.clone(), routes)))
            })
            .collect();
        Table { ports }
    }

    /// Why `route` cannot be claimed by another service.
    fn holder(&self, display: &str, r: &RouteState, linger: Duration) -> String {
        if r.forward.is_some() {
            return format!(
                "route {display} forwards to backends set through the admin API; remove it first \
                 (portmux route remove '{display}')"
            );
        }
        let first = r.sessions.iter().find_map(|id| self.sessions.get(id));
        match (first, r.reserved_until) {
            (Some(e), _) => format!(
                "route {display} is held by service '{}' (pid {}, uid {}); register under the name '{}' to join its pool, \
                 or choose another route",
                r.service, e.session.pid, e.session.uid, r.service
            ),
            (None, Some(until)) => format!(
                "route {display} is reserved for service '{}', which left {}s ago; it is released in {}s unless '{}' registers again",
                r.service,
                linger.saturating_sub(until.saturating_duration_since(Instant::now())).as_secs(),
                until.saturating_duration_since(Instant::now()).as_secs().max(1),
                r.service
            ),
            (None, None) => format!("route {display} is held by service '{}'", r.service),
        }
    }

    /// Every route as a handover message: what a new process, or this one after
    /// a crash, needs to recreate it.
    fn route_messages(&self) -> Vec<portmux_wire::Handover> {
        let mut keys: Vec<&RouteKey> = self.routes.keys().collect();
        keys.sort();
        keys.into_iter()
            .map(|key| {
                let r = &self.routes[key];
                match &r.forward {
                    Some(pool) => portmux_wire::Handover::BackendRoute {
                        route: r.spec.to_string(),
                        backends: pool.backends.iter().map(|b| b.spec.to_string()).collect(),
                    },
                    None => portmux_wire::Handover::ServiceRoute {
                        route: r.display.to_string(),
                        service: r.service.clone(),
                        reserved_ms: r
                            .reserved_until
                            .map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64),
                    },
                }
            })
            .collect()
    }

    /// Refuses a listening address that overlaps an existing or planned one on the same port.
    fn check_clash(&self, addr: SocketAddr, planned: &[SocketAddr]) -> Result<(), String> {
        match self.listeners.keys().chain(planned).find(|a| clashes(**a, addr)) {
            Some(other) => Err(format!(
                "portmux already listens on {other}, which overlaps {addr}; routes on port {} must use the same \
                 listening address (drop or change bind=)",
                addr.port()
            )),
            None => Ok(()),
        }
    }

    /// Opens the listeners among `addrs` (address, and the route that needs it)
    /// that do not exist yet. On a failure nothing is kept.
    fn open_listeners(&mut self, addrs: &[(SocketAddr, String)]) -> Result<(), Refused> {
        let mut opened: Vec<(SocketAddr, OwnedFd)> = Vec::new();
        for (addr, route) in addrs {
            if self.listeners.contains_key(addr) || opened.iter().any(|(a, _)| a == addr) {
                continue;
            }
            match net::tcp_listener(*addr) {
                Ok(fd) => opened.push((*addr, fd)),
                Err(e) => return Err((route.clone(), bind_error(*addr, &e))),
            }
        }
        for (addr, fd) in opened {
            self.next_listener += 1;
            // Kept in systemd's fd store: a restart after a crash takes it back,
            // with whatever connections the kernel queued meanwhile.
            crate::systemd::store(fd.as_fd(), &crate::systemd::listener_name(addr));
            let listener = Arc::new(Listener::new(self.next_listener, addr, fd));
            tracing::info!(%addr, "listening");
            self.listeners.insert(addr, ListenerEntry { listener, idle_since: None, pinned: false });
        }
        for (addr, _) in addrs {
            if let Some(l) = self.listeners.get_mut(addr) {
                l.idle_since = None;
            }
        }
        Ok(())
    }

    /// A route was removed: its listener idles if no route is left on it.
    fn release_listener_of(&mut self, key: &RouteKey, now: Instant) {
        if !self.routes.keys().any(|k| k.0 == key.0)
            && let Some(l) = self.listeners.get_mut(&key.0)
        {
            l.idle_since = Some(now);
        }
    }

    fn next_deadline(&self, linger: Duration) -> Option<Instant> {
        let routes = self.routes.values().flat_map(|r| {
            let parked = r.queue.front().map(|p| p.conn.arrived + linger);
            r.reserved_until.into_iter().chain(parked)
        });
        let listeners = self.listeners.values().filter(|l| !l.pinned).filter_map(|l| l.idle_since.map(|t| t + linger));
        routes.chain(listeners).min()
    }
}

/// How the control plane ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT: everything stopped here; `control_owned`: remove the
    /// control socket's file (portmux created it).
    Stopped { control_owned: bool },
    /// An upgrade: a new process serves everything; this one handed it all over.
    Upgraded,
}

/// What the control plane shares with its tasks.
#[derive(Debug)]
pub(crate) struct ControlPlane {
    shared: Arc<Shared>,
    state: RefCell<State>,
    /// Deadlines changed: the timer task recomputes its sleep.
    timer: Notify,
    /// An ack arrived (used while stopping).
    acked: Notify,
    /// The control socket and the admin API's listener, kept to restart their
    /// tasks (after a failed upgrade) and to hand them on.
    control_fd: RefCell<Option<OwnedFd>>,
    /// portmux created the control socket's file (not a socket unit).
    control_owned: std::cell::Cell<bool>,
    admin_listener: RefCell<Option<std::net::TcpListener>>,
    /// The acceptor, admin and timer tasks.
    tasks: RefCell<Vec<tokio::task::AbortHandle>>,
    /// Session readers stop at their receive point when this turns true.
    freeze: tokio::sync::watch::Sender<bool>,
    readers: std::cell::Cell<usize>,
    readers_idle: Notify,
    /// Connections that reached the control plane while frozen.
    buffered: RefCell<Vec<Conn>>,
    /// After a committed upgrade: where connections and relays go.
    handover: RefCell<Option<mpsc::UnboundedSender<crate::upgrade::Outgoing>>>,
    upgrading: std::cell::Cell<bool>,
    exit: tokio::sync::watch::Sender<Option<Exit>>,
    /// The route state kept in systemd's fd store (under systemd only).
    state_file: RefCell<Option<crate::systemd::StateFile>>,
}

/// Counts a running session reader.
pub(crate) struct ReaderGuard(Rc<ControlPlane>);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        let n = self.0.readers.get() - 1;
        self.0.readers.set(n);
        if n == 0 {
            self.0.readers_idle.notify_waiters();
        }
    }
}

/// A registration that was refused: the route and the reason.
pub(crate) type Refused = (String, String);

impl ControlPlane {
    fn new(shared: Arc<Shared>) -> ControlPlane {
        ControlPlane {
            shared,
            state: RefCell::default(),
            timer: Notify::new(),
            acked: Notify::new(),
            control_fd: RefCell::new(None),
            control_owned: std::cell::Cell::new(false),
            admin_listener: RefCell::new(None),
            tasks: RefCell::new(Vec::new()),
            freeze: tokio::sync::watch::Sender::new(false),
            readers: std::cell::Cell::new(0),
            readers_idle: Notify::new(),
            buffered: RefCell::new(Vec::new()),
            handover: RefCell::new(None),
            upgrading: std::cell::Cell::new(false),
            exit: tokio::sync::watch::Sender::new(None),
            state_file: RefCell::new(None),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Whether an upgrade froze the state (sessions, queues, routes).
    pub(crate) fn is_frozen(&self) -> bool {
        self.state.borrow().frozen
    }

    pub(crate) fn reader_started(self: &Rc<Self>) -> ReaderGuard {
        self.readers.set(self.readers.get() + 1);
        ReaderGuard(self.clone())
    }

    pub(crate) fn freeze_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.freeze.subscribe()
    }

    /// Starts (again) the control socket's acceptor, the admin API and the timer.
    fn start_tasks(self: &Rc<Self>) {
        let mut tasks = self.tasks.borrow_mut();
        tasks.push(tokio_uring::spawn(timer(self.clone())).abort_handle());
        if let Some(fd) = self.control_fd.borrow().as_ref().and_then(|fd| fd.try_clone().ok()) {
            tasks.push(tokio_uring::spawn(session::accept_sessions(self.clone(), fd)).abort_handle());
        }
        if let Some(l) = self.admin_listener.borrow().as_ref().and_then(|l| l.try_clone().ok()) {
            tasks.push(tokio_uring::spawn(crate::admin::serve(self.clone(), l)).abort_handle());
        }
    }

    /// The upgrade is over: nothing more goes to the new process.
    pub(crate) fn drop_handover(&self) {
        self.handover.borrow_mut().take();
    }

    fn stop_tasks(&self) {
        for t in self.tasks.borrow_mut().drain(..) {
            t.abort();
        }
    }

    fn linger(&self) -> Duration {
        self.shared.settings.linger
    }

    /// Publishes a new table built from the current state.
    fn publish(&self) {
        if self.state.borrow().importing {
            return;
        }
        if let Some(file) = self.state_file.borrow_mut().as_mut() {
            let routes = self.state.borrow().route_messages();
            if let Err(e) = file.write(&routes) {
                tracing::warn!("cannot keep the route state in the fd store: {e}");
            }
        }
        let table = self.state.borrow().build_table();
        for port in table.ports.values() {
            port.listener.defer_accept(port.tcp.is_none());
        }
        self.shared.table.store(Arc::new(table));
        self.shared.table_version.send_modify(|v| *v += 1);
    }

    fn new_session_id(&self) -> SessionId {
        let mut st = self.state.borrow_mut();
        st.next_session += 1;
        st.next_session
    }

    fn add_session(&self, session: Arc<Session>) {
        let entry = SessionEntry { session: session.clone(), routes: Vec::new(), draining: false };
        self.state.borrow_mut().sessions.insert(session.id, entry);
    }

    /// Claims `specs` for session `sid`, all or nothing.
    fn register(&self, sid: SessionId, specs: &[String]) -> Result<Vec<Bound>, Refused> {
        let settings = &self.shared.settings;
        let mut st = self.state.borrow_mut();
        let name = match st.sessions.get(&sid) {
            Some(e) => e.session.name.clone(),
            None => return Err((String::new(), "the session is closing".into())),
        };
        if specs.is_empty() {
            return Err((String::new(), "Register needs at least one route".into()));
        }
        let mut plan: Vec<(RouteKey, RouteSpec)> = Vec::new();
        for text in specs {
            let refuse = |reason: String| (text.clone(), reason);
            let spec = RouteSpec::parse(text).map_err(|e| refuse(e.to_string()))?;
            if spec.scheme == Scheme::Https {
                return Err(refuse(
                    "https:// (TLS termination in portmux) is not available in this version; use tls:// and terminate \
                     TLS in the service"
                        .into(),
                ));
            }
            if let Some(n) = &spec.name
                && *n != name
            {
                return Err(refuse(format!(
                    "the spec names service '{n}' but this session said Hello as '{name}'; use one name"
                )));
            }
            if spec.lb.is_some() || spec.proxy.is_some() {
                return Err(refuse(
                    "lb= and proxy= apply to routes with backends (portmux route add), not to services".into(),
                ));
            }
            let key = route_key(&spec, settings.bind);
            let addr = key.0;
            if let Some(r) = st.routes.get(&key)
                && (r.forward.is_some() || r.service != name)
            {
                return Err(refuse(st.holder(&r.display, r, self.linger())));
            }
            let planned: Vec<SocketAddr> = plan.iter().map(|(k, _)| k.0).collect();
            if let Err(reason) = st.check_clash(addr, &planned) {
                return Err(refuse(reason));
            }
            if !plan.iter().any(|(k, _)| *k == key) {
                plan.push((key, spec));
            }
        }
        let addrs: Vec<(SocketAddr, String)> = plan.iter().map(|(k, spec)| (k.0, spec.to_string())).collect();
        st.open_listeners(&addrs)?;
        let mut bound = Vec::new();
        for (key, spec) in plan {
            let route = st.routes.entry(key.clone()).or_insert_with(|| RouteState::new(spec, name.clone(), None, None));
            if !route.sessions.contains(&sid) {
                route.sessions.push(sid);
            }
            route.reserved_until = None;
            bound.push(Bound { route: route.display.to_string(), listen: key.0 });
            if let Some(e) = st.sessions.get_mut(&sid)
                && !e.routes.contains(&key)
            {
                e.routes.push(key);
            }
        }
        drop(st);
        self.publish();
        self.timer.notify_one();
        Ok(bound)
    }

    /// Starts delivering the queues of every route of `sid`.
    fn flush_routes_of(self: &Rc<Self>, sid: SessionId) {
        let keys = self.state.borrow().sessions.get(&sid).map(|e| e.routes.clone()).unwrap_or_default();
        for key in keys {
            self.ensure_flush(&key);
        }
    }

    /// The service will take no new connections on this session.
    fn drain(&self, sid: SessionId) {
        if let Some(e) = self.state.borrow_mut().sessions.get_mut(&sid) {
            e.draining = true;
            tracing::info!(session = sid, service = %e.session.name, "draining: no new connections");
        }
        self.publish();
    }

    /// Takes the session out of its routes; a route left without sessions is
    /// reserved for the linger period.
    fn end_session(&self, sid: SessionId) {
        let now = Instant::now();
        let linger = self.linger();
        {
            let mut st = self.state.borrow_mut();
            let Some(entry) = st.sessions.remove(&sid) else { return };
            for key in &entry.routes {
                let Some(r) = st.routes.get_mut(key) else { continue };
                r.sessions.retain(|s| *s != sid);
                if r.sessions.is_empty() {
                    r.reserved_until = Some(now + linger);
                    tracing::info!(
                        route = %r.display,
                        service = %r.service,
                        "service left; route reserved for {}, connections queue meanwhile",
                        humantime::format_duration(linger)
                    );
                }
            }
        }
        self.publish();
        self.timer.notify_one();
    }

    /// Routes `conn` through the control plane: into its route's queue (from
    /// which it is delivered in arrival order), or answered if nothing matches.
    fn route_conn(self: &Rc<Self>, mut conn: Conn) {
        if let Some(out) = self.handover.borrow().as_ref() {
            // Upgraded: the new process delivers it.
            return handover::send_deliver(out, conn);
        }
        if self.state.borrow().frozen {
            return self.buffered.borrow_mut().push(conn);
        }
        let table = self.shared.table.load();
        let found = table.port(conn.listener).map(|port| match port.lookup(&conn.meta) {
            Some(route) => Ok(route.ident.clone()),
            None => Err(port.no_route(&conn.meta)),
        });
        let key = match found {
            Some(Ok(key)) => key,
            Some(Err(answer)) => return answer_conn(conn, answer),
            None => return answer_conn(conn, Reply::Close),
        };
        let limit = self.shared.settings.park_limit;
        let mut st = self.state.borrow_mut();
        let Some(r) = st.routes.get_mut(&key) else {
            drop(st);
            return answer_conn(conn, Reply::Close);
        };
        if let Some(pool) = r.forward.clone() {
            // The route became a forwarding one after a worker chose it.
            drop(st);
            return forward_conn(self.shared.clone(), conn, pool);
        }
        if r.queue.len() >= limit {
            tracing::warn!(route = %r.display, service = %r.service, limit, "queue full; refusing a connection (raise --park-limit)");
            let detail = format!("the queue of route {} is full ({limit} connections)", r.display);
            let answer = unavailable(&conn, &detail);
            drop(st);
            return answer_conn(conn, answer);
        }
        conn.meta.route = r.display.to_string();
        tracing::debug!(route = %r.display, conn = conn.id, depth = r.queue.len() + 1, "queued");
        let was_empty = r.queue.is_empty();
        let parked = self.park(&key, conn);
        r.queue.push_back(parked);
        drop(st);
        if was_empty {
            self.publish(); // Workers now queue too, behind this one.
            self.timer.notify_one();
        }
        self.ensure_flush(&key);
    }

    /// Wraps `conn` for a queue, with a task that drops it if the client hangs up.
    fn park(self: &Rc<Self>, key: &RouteKey, conn: Conn) -> Parked {
        let stop_watch = Rc::new(Notify::new());
        tokio_uring::spawn(watch_hangup(self.clone(), key.clone(), conn.id, conn.fd.clone(), stop_watch.clone()));
        Parked { conn, stop_watch }
    }

    /// A parked client hung up: free its slot.
    fn hung_up(&self, key: &RouteKey, id: u64) {
        let mut st = self.state.borrow_mut();
        if let Some(r) = st.routes.get_mut(key)
            && let Some(i) = r.queue.iter().position(|p| p.conn.id == id)
        {
            let p = r.queue.remove(i);
            tracing::debug!(route = %r.display, conn = id, "queued client hung up");
            drop(p);
        }
    }

    /// Starts a flush task for `key` if it has a queue and live sessions.
    fn ensure_flush(self: &Rc<Self>, key: &RouteKey) {
        let mut st = self.state.borrow_mut();
        let Some(r) = st.routes.get(key) else { return };
        if r.flushing || r.queue.is_empty() || st.live(r).is_empty() {
            return;
        }
        if let Some(r) = st.routes.get_mut(key) {
            r.flushing = true;
        }
        drop(st);
        tokio_uring::spawn(flush(self.clone(), key.clone()));
    }

    /// The next thing the flush task of `key` should do.
    fn next_flush_step(&self, key: &RouteKey) -> FlushStep {
        let mut st = self.state.borrow_mut();
        let Some(r) = st.routes.get(key) else { return FlushStep::Stop };
        let live = st.live(r);
        let Some(r) = st.routes.get_mut(key) else { return FlushStep::Stop };
        let Some(front) = r.queue.front() else {
            r.flushing = false;
            drop(st);
            self.publish(); // Workers deliver directly again.
            return FlushStep::Stop;
        };
        if live.is_empty() {
            r.flushing = false;
            return FlushStep::Stop;
        }
        let avoid = front.conn.rejected_by.filter(|(_, at)| at.elapsed() < REJECT_BACKOFF);
        let candidates: Vec<&Arc<Session>> = live.iter().filter(|s| avoid.is_none_or(|(sid, _)| s.id != sid)).collect();
        if candidates.is_empty() {
            let wait = avoid.map_or(REJECT_BACKOFF, |(_, at)| REJECT_BACKOFF.saturating_sub(at.elapsed()));
            return FlushStep::Wait(wait);
        }
        let session = candidates[r.next % candidates.len()].clone();
        r.next = r.next.wrapping_add(1);
        let Some(parked) = r.queue.pop_front() else { return FlushStep::Stop };
        parked.stop_watch.notify_one();
        FlushStep::Deliver(parked.conn, session)
    }

    /// Puts a connection that could not be delivered back at the head of its queue.
    fn requeue_front(self: &Rc<Self>, key: &RouteKey, conn: Conn) {
        if self.state.borrow().frozen {
            // The queues went (or go) to a new process; this one follows them.
            return self.route_conn(conn);
        }
        let mut st = self.state.borrow_mut();
        if !st.routes.contains_key(key) {
            drop(st);
            return self.route_conn(conn);
        }
        let parked = self.park(key, conn);
        if let Some(r) = st.routes.get_mut(key) {
            r.queue.push_front(parked);
        }
    }

    /// Releases expired reservations, answers connections queued too long,
    /// and closes listeners idle for the linger period.
    fn expire(&self) {
        let now = Instant::now();
        let linger = self.linger();
        let mut answers: Vec<(Conn, Reply)> = Vec::new();
        let mut changed = false;
        {
            let mut st = self.state.borrow_mut();
            let released: Vec<RouteKey> = st
                .routes
                .iter()
                .filter(|(_, r)| r.reserved_until.is_some_and(|t| t <= now))
                .map(|(k, _)| k.clone())
                .collect();
            for key in released {
                let Some(r) = st.routes.remove(&key) else { continue };
                tracing::info!(
                    route = %r.display,
                    service = %r.service,
                    waiting = r.queue.len(),
                    "route released: the service did not come back within {}",
                    humantime::format_duration(linger)
                );
                let detail = format!(
                    "service '{}' for route {} did not come back within {}",
                    r.service,
                    r.display,
                    humantime::format_duration(linger)
                );
                for p in r.queue {
                    p.stop_watch.notify_one();
                    let answer = unavailable(&p.conn, &detail);
                    answers.push((p.conn, answer));
                }
                st.release_listener_of(&key, now);
                changed = true;
            }
            for r in st.routes.values_mut() {
                while r.queue.front().is_some_and(|p| p.conn.arrived + linger <= now) {
                    let Some(p) = r.queue.pop_front() else { break };
                    p.stop_watch.notify_one();
                    let detail = format!(
                        "service '{}' took no connection for route {} within {}",
                        r.service,
                        r.display,
                        humantime::format_duration(linger)
                    );
                    let answer = unavailable(&p.conn, &detail);
                    answers.push((p.conn, answer));
                    changed = true;
                }
            }
            let idle: Vec<SocketAddr> = st
                .listeners
                .iter()
                .filter(|(_, l)| !l.pinned && l.idle_since.is_some_and(|t| t + linger <= now))
                .map(|(a, _)| *a)
                .collect();
            for addr in idle {
                st.listeners.remove(&addr);
                crate::systemd::unstore(&crate::systemd::listener_name(addr));
                tracing::info!(%addr, "closed listener: no routes for {}", humantime::format_duration(linger));
                changed = true;
            }
        }
        if changed {
            self.publish();
        }
        for (conn, answer) in answers {
            answer_conn(conn, answer);
        }
    }

    /// Stopping: answers every queued connection, as at the end of a reservation.
    fn answer_all_queued(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let mut st = self.state.borrow_mut();
        let mut tasks = Vec::new();
        for r in st.routes.values_mut() {
            for p in r.queue.drain(..) {
                p.stop_watch.notify_one();
                let answer = unavailable(&p.conn, "portmux is stopping");
                tasks.push(tokio_uring::spawn(reply::send(p.conn.fd, answer)));
            }
        }
        tasks
    }

    fn sessions(&self) -> Vec<Arc<Session>> {
        self.state.borrow().sessions.values().map(|e| e.session.clone()).collect()
    }
}

/// Why the admin API refused a change.
#[derive(Debug)]
pub(crate) enum AdminError {
    Bad(String),
    NotFound(String),
    Conflict(String),
}

impl ControlPlane {
    /// Creates or replaces a route that forwards to `backends`. A backend kept
    /// across the change keeps its counters and health; connections already
    /// relayed are never touched.
    pub(crate) fn set_backends(&self, spec: RouteSpec, backends: Resolved) -> Result<RouteView, AdminError> {
        if spec.scheme == Scheme::Https {
            return Err(AdminError::Bad(
                "https:// (TLS termination in portmux) is not available in this version".into(),
            ));
        }
        if spec.name.is_some() {
            return Err(AdminError::Bad("name= names a service; a route with backends has none".into()));
        }
        if self.is_frozen() && !self.state.borrow().importing {
            return Err(AdminError::Conflict("an upgrade is in progress; try again in a moment".into()));
        }
        let policy = Policy::parse(spec.lb.as_deref().unwrap_or("round_robin")).map_err(AdminError::Bad)?;
        let proxy = ProxyVersion::parse(spec.proxy.as_deref().unwrap_or("")).map_err(AdminError::Bad)?;
        let key = route_key(&spec, self.shared.settings.bind);
        let shown: Arc<str> = spec.key().into();
        let mut st = self.state.borrow_mut();
        let previous: Vec<Arc<Backend>> = match st.routes.get(&key) {
            Some(r) if r.forward.is_none() => {
                return Err(AdminError::Conflict(st.holder(&r.display, r, self.linger())));
            }
            Some(r) => r.forward.as_ref().map(|p| p.backends.clone()).unwrap_or_default(),
            None => {
                st.check_clash(key.0, &[]).map_err(AdminError::Conflict)?;
                Vec::new()
            }
        };
        st.open_listeners(&[(key.0, shown.to_string())]).map_err(|(_, reason)| AdminError::Conflict(reason))?;
        let backends: Vec<Arc<Backend>> = backends
            .into_iter()
            .map(|(b, endpoints)| match previous.iter().find(|p| p.spec == b && p.endpoints == endpoints) {
                Some(same) => same.clone(),
                None => Arc::new(Backend::new(b, endpoints)),
            })
            .collect();
        let names: Vec<String> = backends.iter().map(|b| b.spec.to_string()).collect();
        tracing::info!(route = %shown, backends = %names.join(","), policy = policy.as_str(), "forwarding");
        let pool = Arc::new(BackendPool::new(backends, policy, proxy));
        st.routes.insert(key.clone(), RouteState::new(spec, String::new(), Some(pool), None));
        let view = st.view(&key);
        drop(st);
        self.publish();
        view.ok_or_else(|| AdminError::NotFound("the route vanished".into()))
    }

    /// Removes a route with backends; established connections carry on.
    pub(crate) fn remove_route(&self, text: &str) -> Result<String, AdminError> {
        if self.is_frozen() {
            return Err(AdminError::Conflict("an upgrade is in progress; try again in a moment".into()));
        }
        let spec = RouteSpec::parse(text).map_err(|e| AdminError::Bad(e.to_string()))?;
        let key = route_key(&spec, self.shared.settings.bind);
        let mut st = self.state.borrow_mut();
        match st.routes.get(&key) {
            None => return Err(AdminError::NotFound(format!("no route {}; GET /routes lists them", spec.key()))),
            Some(r) if r.forward.is_none() => {
                return Err(AdminError::Conflict(format!(
                    "route {} is held by service '{}'; a service's route goes when the service leaves",
                    r.display, r.service
                )));
            }
            Some(_) => {}
        }
        let removed = st.routes.remove(&key).map(|r| r.display.to_string()).unwrap_or_default();
        st.release_listener_of(&key, Instant::now());
        drop(st);
        tracing::info!(route = %removed, "route removed");
        self.publish();
        self.timer.notify_one();
        Ok(removed)
    }

    /// The route with backends named by `route` (or the only one), and its backends.
    pub(crate) fn backends_of(&self, route: Option<&str>) -> Result<(String, Vec<BackendSpec>), AdminError> {
        let st = self.state.borrow();
        let forwarding: Vec<&RouteState> = st.routes.values().filter(|r| r.forward.is_some()).collect();
        let chosen = match route {
            Some(text) => {
                let spec = RouteSpec::parse(text).map_err(|e| AdminError::Bad(e.to_string()))?;
                let key = route_key(&spec, self.shared.settings.bind);
                st.routes
                    .get(&key)
                    .filter(|r| r.forward.is_some())
                    .ok_or_else(|| AdminError::NotFound(format!("no route with backends is {}", spec.key())))?
            }
            None => match forwarding.as_slice() {
                [one] => one,
                [] => return Err(AdminError::NotFound("no route has backends; create one with POST /routes".into())),
                _ => return Err(AdminError::Bad("several routes have backends; name one with route=SPEC".into())),
            },
        };
        let backends = chosen.forward.as_ref().map(|p| p.backends.iter().map(|b| b.spec.clone()).collect());
        Ok((chosen.spec.to_string(), backends.unwrap_or_default()))
    }

    /// Every route, for the admin API.
    pub(crate) fn views(&self) -> Vec<RouteView> {
        let st = self.state.borrow();
        let mut keys: Vec<&RouteKey> = st.routes.keys().collect();
        keys.sort();
        keys.into_iter().filter_map(|k| st.view(k)).collect()
    }

    /// Listeners and counts, for the admin API.
    pub(crate) fn status(&self) -> serde_json::Value {
        let st = self.state.borrow();
        let mut listeners: Vec<String> = st.listeners.keys().map(ToString::to_string).collect();
        listeners.sort();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "control": self.shared.settings.control.as_ref().map(|p| p.display().to_string()),
            "listeners": listeners,
            "sessions": st.sessions.len(),
            "routes": st.routes.len(),
            "queued": st.routes.values().map(|r| r.queue.len()).sum::<usize>(),
        })
    }
}

impl State {
    fn view(&self, key: &RouteKey) -> Option<RouteView> {
        let r = self.routes.get(key)?;
        let target = match &r.forward {
            Some(pool) => TargetView::Backends {
                policy: pool.policy.as_str().into(),
                proxy: pool.proxy.map(|v| v.as_str().into()),
                backends: pool
                    .backends
                    .iter()
                    .map(|b| BackendView {
                        addr: b.spec.name.clone(),
                        weight: b.spec.weight,
                        healthy: !b.is_down(),
                        active: b.active(),
                        connections: b.connections(),
                        failures: b.failures(),
                        endpoints: b.endpoints.iter().map(ToString::to_string).collect(),
                    })
                    .collect(),
            },
            None => TargetView::Service {
                service: r.service.clone(),
                instances: r
                    .sessions
                    .iter()
                    .filter_map(|id| self.sessions.get(id))
                    .map(|e| InstanceView {
                        pid: e.session.pid,
                        uid: e.session.uid,
                        draining: e.draining,
                        unacked: e.session.unacked_len(),
                    })
                    .collect(),
                queued: r.queue.len(),
                reserved_for_s: r.reserved_until.map(|t| t.saturating_duration_since(Instant::now()).as_secs()),
            },
        };
        Some(RouteView { route: r.display.to_string(), listen: key.0.to_string(), target })
    }
}

/// A route's identity on its listening address.
fn route_key(spec: &RouteSpec, default_bind: std::net::IpAddr) -> RouteKey {
    (spec.listen_addr(default_bind), spec.identity().into())
}

/// Forwards a connection the control plane holds (it was meant for a service).
fn forward_conn(shared: Arc<Shared>, conn: Conn, pool: Arc<BackendPool>) {
    match Arc::try_unwrap(conn.fd) {
        Ok(fd) => {
            let guard = crate::accept::Guard::new(&shared);
            tokio_uring::spawn(async move {
                crate::forward::serve(fd, conn.meta, pool, &shared).await;
                drop(guard);
            });
        }
        Err(fd) => answer_conn(Conn { fd, ..conn }, Reply::Close),
    }
}

/// Two listening addresses that cannot both be bound (same port, one a wildcard covering the other).
fn clashes(a: SocketAddr, b: SocketAddr) -> bool {
    if a == b || a.port() != b.port() {
        return false;
    }
    let covers = |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    covers(a, b) || covers(b, a)
}

fn bind_error(addr: SocketAddr, e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => format!("cannot listen on {addr}: another process uses this address"),
        Some(libc::EACCES) => {
            format!("cannot listen on {addr}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)")
        }
        Some(libc::EADDRNOTAVAIL) => format!("cannot listen on {addr}: not an address of this host"),
        _ => format!("cannot listen on {addr}: {e}"),
    }
}

/// The answer to a connection that will not be delivered: 503 for HTTP, a clean close otherwise.
fn unavailable(conn: &Conn, detail: &str) -> Reply {
    match conn.meta.proto {
        Proto::Http => Reply::unavailable(detail),
        Proto::Tls | Proto::Tcp => Reply::Close,
    }
}

fn answer_conn(conn: Conn, answer: Reply) {
    tokio_uring::spawn(reply::send(conn.fd, answer));
}

#[expect(clippy::large_enum_variant, reason = "one short-lived value per step; boxing would allocate per delivery")]
enum FlushStep {
    Deliver(Conn, Arc<Session>),
    Wait(Duration),
    Stop,
}

/// Delivers a route's queue in arrival order while it has live sessions.
async fn flush(cp: Rc<ControlPlane>, key: RouteKey) {
    let patience = cp.shared.settings.handoff_patience;
    let mut delivered: u32 = 0;
    loop {
        match cp.next_flush_step(&key) {
            FlushStep::Stop => return,
            FlushStep::Wait(d) => tokio::time::sleep(d).await,
            FlushStep::Deliver(conn, session) => match session.hand_over(conn, patience).await {
                Ok(()) => {
                    delivered += 1;
                    if delivered.is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                }
                Err(Refusal::Dead(conn)) => cp.requeue_front(&key, conn),
                Err(Refusal::Busy(conn)) => {
                    cp.requeue_front(&key, conn);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Watches a queued client for a hang-up (POLLRDHUP) until told to stop.
async fn watch_hangup(cp: Rc<ControlPlane>, key: RouteKey, id: u64, fd: Arc<OwnedFd>, stop: Rc<Notify>) {
    let sock = fd.as_fd();
    loop {
        let mask = (libc::POLLRDHUP) as u32;
        match uring::race(sock, uring::poll(sock, mask), stop.notified()).await {
            uring::Raced::Done(Ok(_)) => return cp.hung_up(&key, id),
            // A sibling watcher on the same fd was cancelled; watch again.
            uring::Raced::Done(Err(e)) if e.raw_os_error() == Some(libc::ECANCELED) => {}
            uring::Raced::Done(Err(_)) | uring::Raced::Stopped(_) => return,
        }
    }
}

/// The timer: sleeps until the next deadline, or until deadlines change.
async fn timer(cp: Rc<ControlPlane>) {
    loop {
        let next = cp.state.borrow().next_deadline(cp.linger());
        let sleep = match next {
            Some(t) => tokio::time::sleep_until(t.into()),
            None => tokio::time::sleep(Duration::from_secs(3600)),
        };
        tokio::select! {
            () = sleep => cp.expire(),
            () = cp.timer.notified() => {}
        }
    }
}

/// What the control plane starts with.
#[derive(Debug)]
pub struct Start {
    /// The bound control socket, if any.
    pub control: Option<OwnedFd>,
    /// portmux created its file (it removes it on a clean stop).
    pub control_owned: bool,
    /// The bound admin API listener, if any.
    pub admin: Option<std::net::TcpListener>,
    /// Routes with backends to create first (resolved).
    pub routes: Vec<(RouteSpec, Resolved)>,
    /// Started by an upgrade: the socket to the previous process.
    pub handover: Option<OwnedFd>,
    /// Listening sockets from systemd (address, pinned).
    pub listeners: Vec<(OwnedFd, SocketAddr, bool)>,
    /// The route state from systemd's fd store (after a restart).
    pub state_file: Option<OwnedFd>,
}

impl ControlPlane {
    /// The line printed once portmux serves (tests and scripts wait for it).
    fn ready_line(&self) -> String {
        let settings = &self.shared.settings;
        let control = match (&settings.control, self.control_fd.borrow().is_some()) {
            (Some(path), true) => format!("control socket {} (mode 0660)", path.display()),
            _ => "no control socket".into(),
        };
        let admin = match self.admin_listener.borrow().as_ref().and_then(|l| l.local_addr().ok()) {
            Some(addr) => format!("admin API http://{addr}"),
            None => "no admin API".into(),
        };
        format!(
            "portmux {} ready: {control}; {admin}; {} workers; listeners open on demand (default address {})",
            env!("CARGO_PKG_VERSION"),
            settings.workers,
            settings.bind
        )
    }
}

/// Runs the control plane until SIGTERM/SIGINT (then stops everything in
/// order), or until an upgrade handed everything to a new process.
/// Fails (before serving anyone) if the start-up state cannot be set up.
pub async fn run(
    shared: Arc<Shared>,
    start: Start,
    mut from_workers: mpsc::UnboundedReceiver<ToControl>,
) -> Result<Exit, String> {
    let cp = Rc::new(ControlPlane::new(shared.clone()));
    *cp.control_fd.borrow_mut() = start.control;
    cp.control_owned.set(start.control_owned);
    *cp.admin_listener.borrow_mut() = start.admin;
    let fail = |e: String| {
        shared.stopping.send_replace(true);
        Err(e)
    };
    let previous = match start.handover {
        Some(fd) => match handover::import(&cp, fd).await {
            Ok(channel) => Some(channel),
            Err(e) => return fail(e),
        },
        None => None,
    };
    for (fd, addr, pinned) in start.listeners {
        let mut st = cp.state.borrow_mut();
        st.next_listener += 1;
        let listener = Arc::new(Listener::new(st.next_listener, addr, fd));
        st.listeners.insert(addr, ListenerEntry { listener, idle_since: Some(Instant::now()), pinned });
    }
    if let Some(fd) = start.state_file {
        let file = crate::systemd::StateFile::adopt(fd);
        match file.read() {
            Ok(routes) => handover::restore(&cp, routes),
            Err(e) => tracing::warn!("cannot read the route state from the fd store: {e}"),
        }
        *cp.state_file.borrow_mut() = Some(file);
    } else if crate::systemd::managed() && cp.state_file.borrow().is_none() {
        match crate::systemd::StateFile::create() {
            Ok(file) => *cp.state_file.borrow_mut() = Some(file),
            Err(e) => tracing::info!("the route state is not kept across crashes: {e}"),
        }
    }
    cp.publish();
    for (spec, backends) in start.routes {
        let text = spec.key();
        if let Err(AdminError::Bad(e) | AdminError::NotFound(e) | AdminError::Conflict(e)) =
            cp.set_backends(spec, backends)
        {
            return fail(format!("cannot create route {text}: {e}"));
        }
    }
    cp.start_tasks();
    let intake = tokio_uring::spawn({
        let cp = cp.clone();
        async move {
            while let Some(item) = from_workers.recv().await {
                match item {
                    ToControl::Conn(conn) => cp.route_conn(conn),
                    ToControl::Relay(paused) => cp.relay_paused(paused),
                    ToControl::Marker(done) => {
                        let _ = done.send(());
                    }
                }
            }
        }
    });
    let upgraded = previous.is_some();
    if let Some(channel) = previous {
        handover::finish_import(&cp, channel);
    }
    println!("{}", cp.ready_line());
    let mut ready = vec!["READY=1".to_string(), "STATUS=serving".to_string()];
    if upgraded {
        ready.push(format!("MAINPID={}", std::process::id()));
    }
    crate::systemd::notify(&ready.iter().map(String::as_str).collect::<Vec<_>>());

    let exit = wait_for_exit(&cp).await;
    if exit == Exit::Upgraded {
        // Everything was handed over; only this process's own tasks remain.
        cp.stop_tasks();
        shared.stopping.send_replace(true);
        let mut running = shared.workers_running.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(3), running.wait_for(|n| *n == 0)).await;
        intake.abort();
        tracing::info!("handed over; exiting");
        return Ok(Exit::Upgraded);
    }

    // 1. No new sessions; workers stop accepting and finish what they hold.
    crate::systemd::notify(&["STOPPING=1", "STATUS=stopping"]);
    cp.stop_tasks();
    shared.stopping.send_replace(true);
    let mut running = shared.workers_running.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(3), running.wait_for(|n| *n == 0)).await;
    // 2. Queued connections get their answer.
    let answers = cp.answer_all_queued();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        for t in answers {
            let _ = t.await;
        }
    })
    .await;
    // 3. Services ack what is in flight; then their sessions end (they reconnect
    //    to the next portmux by themselves, keeping the connections they hold).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while cp.sessions().iter().any(|s| s.unacked_len() > 0) {
        if tokio::time::timeout_at(deadline, cp.acked.notified()).await.is_err() {
            break;
        }
    }
    for s in cp.sessions() {
        let n = s.abandon();
        if n > 0 {
            tracing::warn!(service = %s.name, "{n} connections were not acked before stopping");
        }
    }
    intake.abort();
    tracing::info!("stopped");
    Ok(Exit::Stopped { control_owned: cp.control_owned.get() })
}

/// Waits for SIGTERM/SIGINT, or for a completed upgrade; SIGUSR2 starts an upgrade.
async fn wait_for_exit(cp: &Rc<ControlPlane>) -> Exit {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut usr2)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::user_defined2()))
    else {
        tracing::error!("cannot install signal handlers; stop portmux with SIGKILL");
        return std::future::pending().await;
    };
    let mut exit = cp.exit.subscribe();
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                return Exit::Stopped { control_owned: false };
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping");
                return Exit::Stopped { control_owned: false };
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: upgrading");
                let cp = cp.clone();
                tokio_uring::spawn(async move {
                    match crate::upgrade::upgrade(&cp, None).await {
                        Ok(pid) => tracing::info!(pid, "upgrade done: the new process serves"),
                        Err(e) => tracing::error!("upgrade failed, this process keeps serving: {e}"),
                    }
                });
            }
            Ok(e) = exit.wait_for(Option::is_some) => return (*e).unwrap_or(Exit::Stopped { control_owned: false }),
        }
    }
}
