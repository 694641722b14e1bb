//! The control plane's driver: owns the [`Core`] and everything it names by
//! id (listening sockets, sessions, parked connections), feeds it inputs with
//! the time, and carries out its effects: binding, publishing tables to the
//! workers, delivering, forwarding, answering, keeping state in the fd store.
//! It runs on one thread; nothing here is borrowed across an `.await`.

use super::core::{Config, Core, Effect, HangUp, Mode, OpId, Outcome, PlanTarget, Undelivered};
use super::error::ControlError;
mod effects;

use super::handover::Outgoing;
use super::parking::Parking;
use super::views::{self, RouteView};
use crate::config::policy::Peer;
use crate::forward::backend::{BackendPool, BackendSpec, Policy, Resolved};
use crate::forward::{self, Paused, Resume};
use crate::handoff::{Conn, ConnDesc, Refusal, Session};
use crate::ids::{ConnId, ListenerId, SessionId};
use crate::reply::{self, Reply};
use crate::route::{Listener, Pool, PortRoutes, Route, Table, Target};
use crate::shared::{Job, Shared, TaskGuard, ToControl};
use crate::systemd;
use portmux_sys::net;
use portmux_wire::spec::{RouteSpec, Scheme};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// Where the control plane is in its life; tasks that take requests (the
/// control socket's acceptor, the admin API) pause while it is not serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Serving,
    /// An upgrade froze the state: take no request that would change it.
    Frozen,
    /// A new process serves; this one only finishes its last work.
    HandedOver,
    Stopping,
}

/// How the control plane ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM/SIGINT: everything stopped here.
    Stopped,
    /// An upgrade: a new process serves everything; this one handed it all over.
    Upgraded,
}

/// A request to replace this process (`portmux upgrade`, SIGUSR2), for the
/// composition root, which owns the upgrade machinery.
#[derive(Debug)]
pub struct UpgradeRequest {
    pub binary: Option<std::path::PathBuf>,
    /// The new process's pid, or why it failed.
    pub reply: Option<oneshot::Sender<Result<u32, String>>>,
}

/// The sockets the control plane serves requests on.
#[derive(Debug, Default)]
pub struct Sockets {
    /// The control socket (listening `SOCK_SEQPACKET`).
    pub control: Option<OwnedFd>,
    /// portmux created the control socket's file (not a socket unit).
    pub control_owned: bool,
    /// The admin API's listening sockets: TCP, and the Unix socket.
    pub admin: Option<std::net::TcpListener>,
    pub admin_unix: Option<std::os::unix::net::UnixListener>,
    /// portmux bound the admin socket's file (not a socket unit).
    pub admin_owned: bool,
}

/// The control plane: one per process, on the main thread.
#[derive(Debug)]
pub struct Control {
    pub(super) shared: Arc<Shared>,
    pub(super) core: RefCell<Core>,
    pub(super) sessions: RefCell<BTreeMap<SessionId, Arc<Session>>>,
    pub(super) listeners: RefCell<BTreeMap<ListenerId, Arc<Listener>>>,
    pub(super) parking: Parking,
    outcomes: RefCell<HashMap<OpId, Result<Outcome, ControlError>>>,
    publish_due: Cell<bool>,
    persist_due: Cell<bool>,
    pub(super) sockets: RefCell<Sockets>,
    pub(super) state_file: RefCell<Option<systemd::StateFile>>,
    /// The run-time routes' file in the state directory (`saved.rs`).
    pub(super) saved: RefCell<Option<super::saved::RouteFile>>,
    /// The routes the config file made (not saved; a reload may change them).
    pub(super) file_routes: RefCell<std::collections::BTreeSet<crate::route::RouteKey>>,
    pub(super) health: RefCell<super::health::Checks>,
    /// Who may read `/services` (the config file's; a reload replaces them).
    pub(super) api_subnets: RefCell<Vec<ipnet::IpNet>>,
    /// Deadlines may have changed: the timer recomputes its sleep.
    timer: Notify,
    /// An ack arrived (waited for while stopping).
    pub(super) acked: Notify,
    pub(super) lifecycle: watch::Sender<Lifecycle>,
    /// Sessions whose reader runs, and a wake-up when none does.
    pub(super) readers: RefCell<std::collections::BTreeSet<SessionId>>,
    pub(super) readers_idle: Notify,
    /// Deliveries (hand-overs from the queues) in progress.
    deliveries: Cell<usize>,
    deliveries_idle: Notify,
    /// After a committed upgrade: where connections and relays go.
    pub(super) handover: RefCell<Option<mpsc::UnboundedSender<Outgoing>>>,
    upgrading: Cell<bool>,
    /// Stopping during an upgrade: it is undone first.
    abort_upgrade: Notify,
    upgrades: RefCell<Option<mpsc::UnboundedSender<UpgradeRequest>>>,
    exit: watch::Sender<Option<Exit>>,
    pub(super) started: Instant,
    /// Control connections open, by uid (for the session limits).
    pub(super) session_counts: super::session::Counts,
    /// The `https://` routes' certificates.
    pub(super) tls: RefCell<super::certs::TlsRoutes>,
}

/// Marks a session's reader as running.
#[derive(Debug)]
pub(super) struct ReaderGuard(Rc<Control>, SessionId);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        let mut readers = self.0.readers.borrow_mut();
        readers.remove(&self.1);
        if readers.is_empty() {
            self.0.readers_idle.notify_waiters();
        }
    }
}

impl Control {
    pub fn new(shared: Arc<Shared>, sockets: Sockets) -> Rc<Control> {
        let s = &shared.settings;
        let subnets = s.api_subnets.clone();
        let config = Config {
            linger: s.linger,
            park_limit: s.park_limit,
            default_bind: s.bind,
            policy: s.policy.clone(),
            limits: s.limits.clone(),
            hits: s.limit_hits.clone(),
        };
        Rc::new(Control {
            core: RefCell::new(Core::new(config)),
            shared,
            sessions: RefCell::default(),
            listeners: RefCell::default(),
            parking: Parking::default(),
            outcomes: RefCell::default(),
            publish_due: Cell::new(false),
            persist_due: Cell::new(false),
            sockets: RefCell::new(sockets),
            state_file: RefCell::new(None),
            saved: RefCell::new(None),
            file_routes: RefCell::default(),
            health: RefCell::default(),
            api_subnets: RefCell::new(subnets),
            timer: Notify::new(),
            acked: Notify::new(),
            lifecycle: watch::Sender::new(Lifecycle::Serving),
            readers: RefCell::default(),
            readers_idle: Notify::new(),
            deliveries: Cell::new(0),
            deliveries_idle: Notify::new(),
            handover: RefCell::new(None),
            upgrading: Cell::new(false),
            abort_upgrade: Notify::new(),
            upgrades: RefCell::new(None),
            exit: watch::Sender::new(None),
            started: Instant::now(),
            session_counts: super::session::Counts::default(),
            tls: RefCell::default(),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Follows the lifecycle (tasks that take requests pause unless serving).
    pub fn lifecycle(&self) -> watch::Receiver<Lifecycle> {
        self.lifecycle.subscribe()
    }

    /// Where `portmux upgrade` and SIGUSR2 requests go.
    pub fn set_upgrader(&self, requests: mpsc::UnboundedSender<UpgradeRequest>) {
        *self.upgrades.borrow_mut() = Some(requests);
    }

    /// Asks for an upgrade; the answer comes on the returned channel.
    pub fn request_upgrade(&self, binary: Option<std::path::PathBuf>) -> oneshot::Receiver<Result<u32, String>> {
        let (reply, answer) = oneshot::channel();
        let request = UpgradeRequest { binary, reply: Some(reply) };
        match self.upgrades.borrow().as_ref() {
            Some(tx) => {
                if let Err(mpsc::error::SendError(r)) = tx.send(request)
                    && let Some(reply) = r.reply
                {
                    let _ = reply.send(Err("portmux is not taking upgrade requests now".into()));
                }
            }
            None => {
                let _ = request.reply.map(|r| r.send(Err("this portmux cannot upgrade itself".into())));
            }
        }
        answer
    }

    /// Ends the control plane's run with `exit`.
    pub fn request_exit(&self, exit: Exit) {
        self.exit.send_replace(Some(exit));
    }

    pub fn exit_signal(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.subscribe()
    }

    /// Claims the right to upgrade; false if one is under way.
    pub fn begin_upgrade(&self) -> bool {
        !self.upgrading.replace(true)
    }

    pub fn end_upgrade(&self) {
        self.upgrading.set(false);
    }

    /// Resolves when portmux, stopping, wants the upgrade in progress undone.
    pub async fn upgrade_aborted(&self) {
        self.abort_upgrade.notified().await;
    }

    /// Whether portmux is stopping.
    pub fn is_stopping(&self) -> bool {
        *self.lifecycle.borrow() == Lifecycle::Stopping || *self.exit.borrow() == Some(Exit::Stopped)
    }

    pub(super) fn reader_started(self: &Rc<Self>, session: SessionId) -> ReaderGuard {
        self.readers.borrow_mut().insert(session);
        ReaderGuard(self.clone(), session)
    }

    /// Starts the reader of every session that has none running.
    pub(super) fn start_readers(self: &Rc<Self>) {
        let sessions: Vec<Arc<Session>> = self.sessions.borrow().values().cloned().collect();
        for session in sessions {
            if !self.readers.borrow().contains(&session.id) {
                // A session from before the upgrade: its protocol version is not known here.
                tokio_uring::spawn(super::session::run(self.clone(), session, None));
            }
        }
    }

    /// Carries out the core's effects, then publishes and persists once.
    pub(super) fn apply(self: &Rc<Self>) {
        loop {
            let effect = self.core.borrow_mut().poll_effect();
            let Some(effect) = effect else { break };
            self.execute(effect);
        }
        if self.publish_due.take() {
            self.publish();
            self.sync_health();
        }
        if self.persist_due.take() {
            self.persist();
            self.save_routes();
        }
        self.shared.admission.parked.store(self.parking.len(), std::sync::atomic::Ordering::Relaxed);
        self.timer.notify_one();
    }

    fn execute(self: &Rc<Self>, effect: Effect) {
        match effect {
            Effect::Bind { listener, addr } => {
                let result = net::tcp_listener(addr).map(|fd| {
                    // Kept in systemd's fd store: a restart after a crash takes it
                    // back, with whatever connections the kernel queued meanwhile.
                    systemd::store(fd.as_fd(), &systemd::listener_name(addr));
                    self.listeners.borrow_mut().insert(listener, Arc::new(Listener::new(listener, addr, fd)));
                });
                self.core.borrow_mut().bound(Instant::now(), listener, result);
            }
            Effect::Close { listener, addr, revoke } => {
                let closed = self.listeners.borrow_mut().remove(&listener);
                if let Some(l) = closed.filter(|_| revoke) {
                    // Stops the listening for every copy, a borrower's too.
                    let _ = net::shutdown_both(l.fd.as_fd());
                }
                systemd::unstore(&systemd::listener_name(addr));
            }
            Effect::Lend { session, listener, route, addr } => self.lend(session, listener, route, addr),
            Effect::Publish => self.publish_due.set(true),
            Effect::Persist => self.persist_due.set(true),
            Effect::Done { op, result } => {
                self.tls.borrow_mut().settle(op, result.is_ok());
                self.outcomes.borrow_mut().insert(op, result);
            }
            Effect::Watch { conn } => {
                let me = Rc::downgrade(self);
                self.parking.watch(conn, move |how| {
                    if let Some(me) = me.upgrade() {
                        me.hung_up(conn, how);
                    }
                });
            }
            Effect::Deliver { session, desc, attempt } => self.deliver(session, desc, attempt),
            Effect::Forward { conn, meta, pool } => self.forward(conn, meta, pool),
            Effect::Answer { conn, reply } => {
                if let Some(fd) = self.parking.take(conn) {
                    self.answer(fd, reply);
                }
            }
            Effect::HandOn { desc, listener } => self.hand_on(desc, listener),
            Effect::Forget { conn } => drop(self.parking.take(conn)),
        }
    }

    /// Answers a connection and closes it (counted as a connection task, so
    /// stopping and upgrades wait for the answer to go out).
    fn answer(&self, fd: Arc<OwnedFd>, reply: Reply) {
        let guard = TaskGuard::new(&self.shared);
        tokio_uring::spawn(async move {
            reply::send(fd, reply).await;
            drop(guard);
        });
    }

    /// The outcome of an operation, once its effects were carried out.
    pub(super) fn outcome(&self, op: OpId) -> Result<Outcome, ControlError> {
        self.outcomes.borrow_mut().remove(&op).unwrap_or(Err(ControlError::SessionClosing))
    }

    /// Publishes the table the core plans, with this driver's sockets and sessions.
    pub(super) fn publish(&self) {
        let plan = self.core.borrow().plan();
        let listeners = self.listeners.borrow();
        let sessions = self.sessions.borrow();
        let mut tls = self.tls.borrow_mut();
        tls.retain(&self.core.borrow());
        let mut ports = HashMap::new();
        for port in plan.ports {
            let Some(listener) = listeners.get(&port.listener) else { continue };
            let routes = port
                .routes
                .into_iter()
                .map(|r| {
                    let target = match r.target {
                        PlanTarget::Sessions(ids) => Target::Pool(Pool::new(
                            ids.iter().filter_map(|id| sessions.get(id)).filter(|s| s.is_usable()).cloned().collect(),
                        )),
                        PlanTarget::Queue => Target::Queue,
                        PlanTarget::Forward(pool) => Target::Forward(pool),
                    };
                    let tls =
                        (r.spec.scheme == Scheme::Https).then(|| tls.get(&r.key, &r.spec, &self.shared)).flatten();
                    let counters = self.shared.metrics.route(&r.display);
                    Arc::new(Route {
                        key: r.display,
                        ident: r.key,
                        spec: r.spec,
                        target,
                        tls,
                        owner: r.owner,
                        counters,
                    })
                })
                .collect();
            let mut routes = PortRoutes::new(listener.clone(), routes);
            routes.lent = port.lent;
            // Lent, the service accepts as a server on its own port does:
            // at once (deferring costs it here: 0.89 against 0.93 × direct).
            listener.defer_accept(routes.routes.client_speaks_first() && !port.lent);
            ports.insert(port.listener, Arc::new(routes));
        }
        let core = self.core.borrow();
        self.shared.metrics.retain_routes(&core.routes().values().map(|r| &*r.display).collect());
        drop(core);
        let services = crate::route::ServicesApi { subnets: self.api_subnets.borrow().clone() };
        self.shared.publish(Table { ports, services });
    }

    /// A relay paused for an upgrade: its sockets go to the new process.
    pub(super) fn relay_paused(&self, paused: Paused) {
        let out = self.handover.borrow().clone();
        match out {
            Some(out) => {
                let msg = super::handover::relay_message(&paused);
                if out.send((msg, vec![paused.client, paused.backend])).is_err() {
                    tracing::warn!(client = %paused.meta.peer, "cannot hand a paused relay to the new process: the handover channel is closed; it is closed");
                }
            }
            // Not upgrading (a pause nobody asked for): relay on here.
            None => {
                let pool = self.pool_of(&paused.meta.route);
                self.shared.to_worker(Job::Resume(Resume { paused, pool }));
            }
        }
    }

    /// The backend pool of a forwarding route (named by its text), or an empty one.
    pub(super) fn pool_of(&self, route: &str) -> Arc<BackendPool> {
        let core = self.core.borrow();
        RouteSpec::parse(route)
            .ok()
            .and_then(|spec| {
                let key = crate::route::route_key(&spec, core.config().default_bind);
                match &core.routes().get(&key)?.target {
                    super::core::RouteTarget::Backends(pool) => Some(pool.clone()),
                    super::core::RouteTarget::Service(_) => None,
                }
            })
            .unwrap_or_else(|| Arc::new(BackendPool::new(Vec::new(), Policy::RoundRobin, None)))
    }

    // ----- inputs -----

    /// A connection for the control plane to route (from a worker, a reject,
    /// or a session that ended).
    pub fn arrived(self: &Rc<Self>, conn: Conn) {
        if self.health.borrow().is_probe(conn.id()) {
            return; // A health check's connection, given back or rejected: the check fails.
        }
        self.parking.hold(conn.id(), conn.fd);
        self.core.borrow_mut().arrived(Instant::now(), conn.desc);
        self.apply();
    }

    /// A service connected and said Hello.
    pub(super) fn open_session(self: &Rc<Self>, name: String, peer: Peer, sock: OwnedFd) -> Arc<Session> {
        let (pid, uid) = (peer.pid, peer.uid);
        let id = self.core.borrow_mut().open_session(name.clone(), peer);
        let session = Arc::new(Session::new(id, name, pid, uid, sock, self.shared.settings.max_unacked));
        self.sessions.borrow_mut().insert(id, session.clone());
        session
    }

    /// A session claims `routes`: the routes as served, or why not.
    pub(super) fn register(
        self: &Rc<Self>,
        session: SessionId,
        routes: &[String],
        cert: Option<Arc<crate::tls::certs::CertSlot>>,
    ) -> Result<Vec<portmux_wire::Bound>, ControlError> {
        let specs: Vec<RouteSpec> = routes.iter().filter_map(|r| RouteSpec::parse(r).ok()).collect();
        // The core's checks (the policy, file options) before portmux reads any file a spec names.
        self.core.borrow().check_claim(Instant::now(), session, routes)?;
        let prepared = self.tls.borrow_mut().prepare(&specs, cert.as_ref(), self.shared.settings.bind, &self.shared)?;
        let op = self.core.borrow_mut().register(Instant::now(), session, routes);
        self.tls.borrow_mut().pending(op, prepared);
        self.apply();
        match self.outcome(op)? {
            Outcome::Registered(bound) => Ok(bound),
            Outcome::RouteSet(_) => Err(ControlError::SessionClosing),
        }
    }

    pub(super) fn drain(self: &Rc<Self>, session: SessionId) {
        self.core.borrow_mut().drain(session);
        self.apply();
    }

    /// The session ended (its routes are reserved); then `unacked` (what it
    /// had not acked, once its service closed its end) is routed again.
    pub(super) fn end_session(self: &Rc<Self>, session: SessionId) {
        self.core.borrow_mut().session_ended(Instant::now(), session);
        self.sessions.borrow_mut().remove(&session);
        self.apply();
    }

    /// Creates or replaces a route that forwards to `backends`.
    pub fn set_backends(self: &Rc<Self>, spec: RouteSpec, backends: Resolved) -> Result<RouteView, ControlError> {
        let prepared = self.tls.borrow_mut().prepare([&spec], None, self.shared.settings.bind, &self.shared)?;
        let op = self.core.borrow_mut().set_backends(Instant::now(), spec, backends);
        self.tls.borrow_mut().pending(op, prepared);
        self.apply();
        match self.outcome(op)? {
            Outcome::RouteSet(key) => {
                let core = self.core.borrow();
                views::route(&core, &self.sessions.borrow(), &key, Instant::now())
                    .ok_or(ControlError::NotFound { route: key.1.to_string() })
            }
            Outcome::Registered(_) => Err(ControlError::SessionClosing),
        }
    }

    /// Removes a route with backends; established connections carry on.
    pub fn remove_route(self: &Rc<Self>, route: &str) -> Result<String, ControlError> {
        let removed = self.core.borrow_mut().remove_route(Instant::now(), route);
        self.apply();
        removed
    }

    /// The route with backends named by `route` (or the only one), and its backends.
    pub fn backends_of(&self, route: Option<&str>) -> Result<(String, Vec<BackendSpec>), ControlError> {
        self.core.borrow().backends_of(route)
    }

    pub(super) fn mode(&self) -> Mode {
        self.core.borrow().mode()
    }

    /// A listening socket passed by systemd (socket activation, or the fd
    /// store after a crash).
    pub fn adopt_listener(self: &Rc<Self>, fd: OwnedFd, addr: std::net::SocketAddr, pinned: bool) {
        let id = self.core.borrow_mut().adopt_listener(Instant::now(), None, addr, pinned);
        self.listeners.borrow_mut().insert(id, Arc::new(Listener::new(id, addr, fd)));
        self.apply();
    }

    /// Routes with backends to create at start (seamless mode); the first
    /// that cannot be, and why.
    pub fn start_routes(self: &Rc<Self>, routes: Vec<(RouteSpec, Resolved)>) -> Result<(), (String, ControlError)> {
        for (spec, backends) in routes {
            let text = spec.key();
            self.set_backends(spec, backends).map_err(|e| (text, e))?;
        }
        Ok(())
    }

    /// Runs the timer, the intake from the workers and the control socket's
    /// acceptor; returns when SIGTERM/SIGINT or a completed upgrade ends it.
    pub async fn serve(self: &Rc<Self>, mut intake: mpsc::UnboundedReceiver<ToControl>) -> Exit {
        let timer = tokio_uring::spawn(timer(self.clone()));
        let certs = tokio_uring::spawn(super::certs::watch(self.clone()));
        let acme = tokio_uring::spawn(super::acme::run(self.clone()));
        let intake = tokio_uring::spawn({
            let me = self.clone();
            async move {
                while let Some(item) = intake.recv().await {
                    match item {
                        ToControl::Conn(conn) => me.arrived(conn),
                        ToControl::Relay(paused) => me.relay_paused(paused),
                        ToControl::Idle(idle) => me.idle_moving(idle),
                        ToControl::Marker(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            }
        });
        let acceptor = self
            .sockets
            .borrow()
            .control
            .as_ref()
            .and_then(|fd| fd.try_clone().ok())
            .map(|fd| tokio_uring::spawn(super::session::accept_sessions(self.clone(), fd)));
        let mut exit = self.exit.subscribe();
        let mut exit = match exit.wait_for(Option::is_some).await {
            Ok(e) => e.unwrap_or(Exit::Stopped),
            Err(_) => Exit::Stopped,
        };
        if exit == Exit::Stopped && self.mode() == Mode::Frozen {
            // Stopping in the middle of an upgrade: the new process holds
            // copies of everything; undo the upgrade first (or let its commit
            // finish), so that no connection ends up with two owners.
            tracing::info!("stopping: undoing the upgrade in progress first");
            self.abort_upgrade.notify_one();
            let mut lifecycle = self.lifecycle.subscribe();
            let within = self.shared.settings.upgrade_timeout + Duration::from_secs(5);
            let _ = tokio::time::timeout(within, lifecycle.wait_for(|l| *l != Lifecycle::Frozen)).await;
            if self.mode() == Mode::HandedOver {
                exit = Exit::Upgraded;
            }
        }
        timer.abort();
        certs.abort();
        acme.abort();
        if let Some(a) = acceptor {
            a.abort();
        }
        if exit == Exit::Upgraded {
            self.shared.stopping.send_replace(true);
            let mut running = self.shared.workers_running.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(3), running.wait_for(|n| *n == 0)).await;
            intake.abort();
            tracing::info!("handed over; exiting");
            return exit;
        }
        self.stop().await;
        intake.abort();
        tracing::info!("stopped");
        exit
    }

    /// Stops in order: no new sessions or connections; workers finish what
    /// they hold; queued connections get their answer; services ack what is
    /// in flight; then their sessions end (they reconnect to the next portmux
    /// by themselves, keeping the connections they hold).
    async fn stop(self: &Rc<Self>) {
        systemd::notify(&["STOPPING=1", "STATUS=stopping"]);
        self.lifecycle.send_replace(Lifecycle::Stopping);
        self.shared.stopping.send_replace(true);
        let mut running = self.shared.workers_running.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let shared = &self.shared;
        let accepting = || shared.accepting.load(std::sync::atomic::Ordering::Relaxed) == 0;
        super::handover::wait_until(deadline, accepting, &shared.accepts_over).await;
        if !systemd::managed() {
            // Nobody accepts any more: new clients are refused now rather than
            // left waiting in the backlog until the drain is over. (Under
            // systemd the listeners wait in its fd store for the next start;
            // a socket-activated one is the manager's too.)
            let core = self.core.borrow();
            for (id, l) in self.listeners.borrow().iter() {
                if core.listeners().get(id).is_some_and(|s| !s.pinned) {
                    let _ = rustix::net::shutdown(&l.fd, rustix::net::Shutdown::Read);
                }
            }
        }
        let within = self.shared.settings.drain + Duration::from_secs(3);
        let _ = tokio::time::timeout(within, running.wait_for(|n| *n == 0)).await;
        self.core.borrow_mut().stop();
        let answering = self.parking.len();
        self.apply();
        if answering > 0 {
            tracing::info!(connections = answering, "answered the queued connections");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let sessions: Vec<Arc<Session>> = self.sessions.borrow().values().cloned().collect();
        while sessions.iter().any(|s| s.unacked_len() > 0) {
            if tokio::time::timeout_at(deadline, self.acked.notified()).await.is_err() {
                break;
            }
        }
        for s in sessions {
            let n = s.abandon();
            if n > 0 {
                tracing::warn!(service = %s.name, "{n} connections were not acked before stopping");
            }
        }
        // Answers in flight (lingering closes) get a moment to finish.
        let _ = self.shared.tasks_done(Duration::from_secs(2)).await;
    }

    /// Whether portmux created the control and admin sockets' files (it removes them on a clean stop).
    pub fn sockets_owned(&self) -> (bool, bool) {
        let s = self.sockets.borrow();
        (s.control_owned, s.admin_owned)
    }

    /// Copies of the admin API's listening sockets (Unix, TCP), to serve them.
    pub fn admin_listeners(&self) -> (Option<std::os::unix::net::UnixListener>, Option<std::net::TcpListener>) {
        let sockets = self.sockets.borrow();
        (
            sockets.admin_unix.as_ref().and_then(|l| l.try_clone().ok()),
            sockets.admin.as_ref().and_then(|l| l.try_clone().ok()),
        )
    }

    pub(super) fn hung_up(self: &Rc<Self>, conn: ConnId, how: HangUp) {
        self.core.borrow_mut().hung_up(conn, how);
        self.apply();
    }
}

/// Sleeps until the core's next deadline, or until deadlines change.
async fn timer(control: Rc<Control>) {
    loop {
        let next = control.core.borrow().poll_timeout();
        let sleep = match next {
            Some(t) => tokio::time::sleep_until(t.into()),
            None => tokio::time::sleep(Duration::from_secs(3600)),
        };
        tokio::select! {
            () = sleep => {
                control.core.borrow_mut().timeout(Instant::now());
                control.apply();
            }
            () = control.timer.notified() => {}
        }
    }
}
