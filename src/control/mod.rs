//! The control plane: owns listeners, service sessions, routes and queued
//! connections; serves the control socket; publishes route tables to workers.
//!
//! It runs on one thread (a tokio-uring runtime). State lives in a `RefCell`
//! that is never borrowed across an `.await`.

mod session;

use crate::handoff::{Conn, Refusal, Session, SessionId};
use crate::reply::{self, Reply};
use crate::route::{Listener, Pool, PortRoutes, Route, RouteKey, Table, Target};
use crate::runtime::Shared;
use crate::sys::{net, uring};
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

#[derive(Debug, Default)]
struct State {
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
            let target = if r.queue.is_empty() && !r.flushing && !live.is_empty() {
                Target::Pool(Pool::new(live))
            } else {
                Target::Queue
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

    fn next_deadline(&self, linger: Duration) -> Option<Instant> {
        let routes = self.routes.values().flat_map(|r| {
            let parked = r.queue.front().map(|p| p.conn.arrived + linger);
            r.reserved_until.into_iter().chain(parked)
        });
        let listeners = self.listeners.values().filter_map(|l| l.idle_since.map(|t| t + linger));
        routes.chain(listeners).min()
    }
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
}

/// A registration that was refused: the route and the reason.
pub(crate) type Refused = (String, String);

impl ControlPlane {
    fn new(shared: Arc<Shared>) -> ControlPlane {
        ControlPlane { shared, state: RefCell::default(), timer: Notify::new(), acked: Notify::new() }
    }

    fn linger(&self) -> Duration {
        self.shared.settings.linger
    }

    /// Publishes a new table built from the current state.
    fn publish(&self) {
        let table = self.state.borrow().build_table();
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
            let addr = spec.listen_addr(settings.bind);
            let mut ident = spec.clone();
            ident.bind = None;
            ident.name = None;
            let key: RouteKey = (addr, ident.to_string().into());
            if let Some(r) = st.routes.get(&key)
                && r.service != name
            {
                return Err(refuse(st.holder(&r.display, r, self.linger())));
            }
            let clash = st.listeners.keys().chain(plan.iter().map(|(k, _)| &k.0)).find(|a| clashes(**a, addr)).copied();
            if let Some(other) = clash {
                return Err(refuse(format!(
                    "portmux already listens on {other}, which overlaps {addr}; routes on port {} must use the same \
                     listening address (drop or change bind=)",
                    addr.port()
                )));
            }
            if !plan.iter().any(|(k, _)| *k == key) {
                plan.push((key, spec));
            }
        }
        // Open the listeners that do not exist yet; on failure nothing is kept.
        let mut opened: Vec<(SocketAddr, OwnedFd)> = Vec::new();
        for (key, spec) in &plan {
            if st.listeners.contains_key(&key.0) || opened.iter().any(|(a, _)| *a == key.0) {
                continue;
            }
            match net::tcp_listener(key.0) {
                Ok(fd) => opened.push((key.0, fd)),
                Err(e) => return Err((spec.to_string(), bind_error(key.0, &e))),
            }
        }
        for (addr, fd) in opened {
            st.next_listener += 1;
            let listener = Arc::new(Listener { id: st.next_listener, addr, fd });
            tracing::info!(%addr, "listening");
            st.listeners.insert(addr, ListenerEntry { listener, idle_since: None });
        }
        let mut bound = Vec::new();
        for (key, spec) in plan {
            if let Some(l) = st.listeners.get_mut(&key.0) {
                l.idle_since = None;
            }
            let display: Arc<str> = spec.key().into();
            let route = st.routes.entry(key.clone()).or_insert_with(|| RouteState {
                display: display.clone(),
                spec,
                service: name.clone(),
                sessions: Vec::new(),
                queue: VecDeque::new(),
                reserved_until: None,
                flushing: false,
                next: 0,
            });
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
                if !st.routes.keys().any(|k| k.0 == key.0)
                    && let Some(l) = st.listeners.get_mut(&key.0)
                {
                    l.idle_since = Some(now);
                }
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
                .filter(|(_, l)| l.idle_since.is_some_and(|t| t + linger <= now))
                .map(|(a, _)| *a)
                .collect();
            for addr in idle {
                st.listeners.remove(&addr);
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

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop portmux with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

/// Runs the control plane until SIGTERM/SIGINT, then stops everything in order.
pub async fn run(shared: Arc<Shared>, control_fd: OwnedFd, mut from_workers: mpsc::UnboundedReceiver<Conn>) {
    let cp = Rc::new(ControlPlane::new(shared.clone()));
    let timer_task = tokio_uring::spawn(timer(cp.clone()));
    let intake = tokio_uring::spawn({
        let cp = cp.clone();
        async move {
            while let Some(conn) = from_workers.recv().await {
                cp.route_conn(conn);
            }
        }
    });
    let acceptor = tokio_uring::spawn(session::accept_sessions(cp.clone(), control_fd));

    stop_signal().await;

    // 1. No new sessions; workers stop accepting and finish what they hold.
    acceptor.abort();
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
    timer_task.abort();
    tracing::info!("stopped");
}
