//! The control plane's decisions, without I/O (as quinn-proto does it): the
//! listeners, service sessions, routes, reservations, queues and the upgrade
//! state, changed only by inputs (method calls, each given the current time),
//! acting only through the effects they leave ([`Core::poll_effect`]), and
//! waking only at [`Core::poll_timeout`]. No tokio, no fds, no clock: the
//! driver (`control::driver`) owns the sockets and carries the effects out.
//!
//! - `routes.rs`: claiming routes (sessions and the admin API), conflicts,
//!   listening addresses, reservations;
//! - `queue.rs`: connections the control plane holds: routing them, queueing
//!   in arrival order, delivering one at a time per route, hang-ups, expiry;
//! - `plan.rs`: the workers' table, and the ports lent to `?lend` routes.

mod plan;
mod queue;
mod routes;
#[cfg(test)]
mod tests;

use super::error::ControlError;
use crate::config::limits::{Hits, Limits};
use crate::config::policy::{Peer, Policy};
use crate::forward::backend::BackendPool;
use crate::handoff::ConnDesc;
use crate::ids::{ConnId, ListenerId, SessionId};
use crate::reply::Reply;
use crate::route::{Matcher, RouteKey};
use portmux_wire::spec::RouteSpec;
use portmux_wire::{Bound, ConnMeta, Handover};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use plan::{Plan, PlanTarget, PortPlan, RoutePlan};

/// How long a rejected connection avoids the session that rejected it.
pub const REJECT_BACKOFF: Duration = Duration::from_millis(250);
/// How long a route waits before trying again a session whose socket was full.
pub const BUSY_BACKOFF: Duration = Duration::from_millis(50);

/// What the core is told at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a departed service's routes stay reserved, how long a
    /// connection may wait in a queue, and how long an unused listener stays open.
    pub linger: Duration,
    /// Most connections queued per route.
    pub park_limit: usize,
    /// Listening address for routes whose spec names none.
    pub default_bind: IpAddr,
    /// Who may claim what.
    pub policy: Arc<Policy>,
    /// What one session or route may take, and how often a limit refused.
    pub limits: Limits,
    pub hits: Arc<Hits>,
}

/// Where the core is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serving,
    /// An upgrade froze the state: every route queues through the control
    /// plane, nothing is delivered, no route changes.
    Frozen,
    /// The upgrade committed: a new process serves; what reaches this one goes there.
    HandedOver,
    /// portmux is stopping: connections are answered, not queued.
    Stopped,
}

/// Identifies an operation whose outcome comes as [`Effect::Done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

/// What an operation achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A session's routes are served, as these.
    Registered(Vec<Bound>),
    /// A route (with backends, or restored) exists.
    RouteSet(RouteKey),
}

/// What the driver must do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Open a listening socket on `addr` and keep it in systemd's fd store;
    /// then call [`Core::bound`] with the result, before any other input.
    Bind { listener: ListenerId, addr: SocketAddr },
    /// Close a listening socket (no route for the linger period, or a failed
    /// registration opened it), and take it out of the fd store. `revoke`:
    /// it was lent, so it is shut down first: a borrower that kept a copy
    /// can no longer accept from it.
    Close { listener: ListenerId, addr: SocketAddr, revoke: bool },
    /// Send the listening socket `listener` (at `addr`) to `session`, lent
    /// for `route`; on failure call [`Core::loan_failed`].
    Lend { session: SessionId, listener: ListenerId, route: Arc<str>, addr: SocketAddr },
    /// The table changed: publish [`Core::plan`] to the workers.
    Publish,
    /// The routes changed: keep [`Core::route_messages`] in the fd store.
    Persist,
    /// The outcome of an operation (a registration, a route change).
    Done { op: OpId, result: Result<Outcome, ControlError> },
    /// Watch a queued connection for its client hanging up; report with
    /// [`Core::hung_up`]. Watching stops when the connection leaves.
    Watch { conn: ConnId },
    /// Send a connection to a session; report with [`Core::delivered`] or
    /// [`Core::undelivered`], naming the attempt.
    Deliver { session: SessionId, desc: ConnDesc, attempt: u64 },
    /// Relay a connection to a backend of `pool`; the core forgets it.
    Forward { conn: ConnId, meta: ConnMeta, pool: Arc<BackendPool> },
    /// Answer a connection and close it; the core forgets it.
    Answer { conn: ConnId, reply: Reply },
    /// Give a connection to the process that replaced this one; `listener`
    /// is the address of the listener it came through.
    HandOn { desc: ConnDesc, listener: SocketAddr },
    /// Drop portmux's copy of a connection without a word (its client hung
    /// up, or the new process holds its own copy).
    Forget { conn: ConnId },
}

/// A listening socket.
#[derive(Debug, Clone)]
pub struct ListenerState {
    pub addr: SocketAddr,
    /// Since when no route uses it.
    pub idle_since: Option<Instant>,
    /// systemd owns it (socket activation): it never closes when idle.
    pub pinned: bool,
    /// False while its [`Effect::Bind`] is unanswered.
    pub bound: bool,
    /// It was lent to a service since it opened: it closes as soon as its
    /// route goes (and is shut down then), not after the linger period.
    pub lent_once: bool,
}

/// A route and where it goes.
#[derive(Debug)]
pub struct RouteState {
    /// Canonical spec shown to services and in logs.
    pub display: Arc<str>,
    pub spec: RouteSpec,
    pub target: RouteTarget,
}

#[derive(Debug)]
pub enum RouteTarget {
    /// A service's: its sessions (a pool, round robin) and its queue.
    Service(ServiceRoute),
    /// Backend addresses set through the admin API.
    Backends(Arc<BackendPool>),
}

#[derive(Debug)]
pub struct ServiceRoute {
    /// The service holding the route.
    pub service: String,
    /// The uid that claimed it: while the route exists (reserved too), no other
    /// unprivileged uid may claim it, a path under its host, or the service's name.
    pub uid: u32,
    /// Registered sessions, draining ones included.
    pub sessions: Vec<SessionId>,
    /// Connections waiting, in arrival order.
    pub queue: VecDeque<ConnId>,
    /// Set while no session holds the route: when it is released.
    pub reserved_until: Option<Instant>,
    /// The connection being delivered (one at a time, to keep the order).
    pub delivering: Option<ConnId>,
    /// Do not deliver before this (a full session socket, a reject backoff).
    pub retry_at: Option<Instant>,
    /// Sessions the route's health check (`health=/PATH`) took out of its
    /// rotation: they get no new connections while another session passes.
    pub down: BTreeSet<SessionId>,
    next: usize,
}

impl ServiceRoute {
    fn new(service: String, uid: u32, reserved_until: Option<Instant>) -> ServiceRoute {
        ServiceRoute {
            service,
            uid,
            sessions: Vec::new(),
            queue: VecDeque::new(),
            reserved_until,
            delivering: None,
            retry_at: None,
            down: BTreeSet::new(),
            next: 0,
        }
    }
}

/// A service's control session.
#[derive(Debug, Clone)]
pub struct SessionState {
    pub name: String,
    /// Who the service is, as the kernel says.
    pub peer: Peer,
    pub routes: Vec<RouteKey>,
    /// The service asked for no new connections.
    pub draining: bool,
    /// False once a hand-over found its socket closed.
    pub usable: bool,
}

/// A connection the core holds, and where.
#[derive(Debug)]
pub struct Held {
    pub desc: ConnDesc,
    pub place: Place,
    /// Its client shut down its sending side while it waited.
    pub half_closed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Queued(RouteKey),
    /// Being sent to a session, in delivery attempt number `.2`.
    Delivering(RouteKey, SessionId, u64),
    /// Arrived while frozen; handed on at the commit, re-routed at a thaw.
    Buffered,
}

/// How a hand-over failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undelivered {
    /// The session's socket is closed: it takes nothing more.
    Dead,
    /// Its socket stayed full (or it holds too many unacked): try again shortly.
    Busy,
    /// The session was closed to new connections (it ended, or it is frozen).
    Closed,
    /// The connection cannot be described to any service (its connection
    /// message would exceed the protocol's size limit): it is answered.
    Unsendable,
}

/// How a waiting client hung up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HangUp {
    /// The connection is gone (reset, or both directions shut).
    Gone,
    /// The client shut down its sending side (FIN). It may be waiting for
    /// the answer (HTTP/1.0 style), or gone: there is no telling, so it keeps
    /// its place (as HAProxy does without `abortonclose`) and is the first to
    /// give it up when the queue is full.
    HalfClosed,
}

/// An operation waiting for its listeners to be bound.
#[derive(Debug)]
struct PendingOp {
    op: OpId,
    waiting: BTreeSet<ListenerId>,
    /// Listeners this operation asked for (closed again if it fails).
    opened: Vec<ListenerId>,
    failure: Option<ControlError>,
    commit: routes::Commit,
}

/// The control plane's state.
#[derive(Debug)]
pub struct Core {
    config: Config,
    mode: Mode,
    /// Receiving the previous process's state: nothing is published yet.
    importing: bool,
    listeners: BTreeMap<ListenerId, ListenerState>,
    routes: BTreeMap<RouteKey, RouteState>,
    sessions: BTreeMap<SessionId, SessionState>,
    conns: HashMap<ConnId, Held>,
    /// Arrived while frozen, in order.
    buffered: VecDeque<ConnId>,
    pending: Vec<PendingOp>,
    /// Route matching per listening address, rebuilt after route changes.
    matchers: HashMap<SocketAddr, Matcher<RouteKey>>,
    /// After a commit: the addresses of the listeners handed over, to name
    /// them when later connections are handed on.
    handed_over: BTreeMap<ListenerId, SocketAddr>,
    /// Lent listeners and the sessions holding them (see `plan.rs`).
    loans: BTreeMap<ListenerId, BTreeSet<SessionId>>,
    /// Loans that could not be sent: not offered again to that session.
    loan_refused: BTreeSet<(ListenerId, SessionId)>,
    next_listener: u64,
    next_session: u64,
    next_op: u64,
    next_attempt: u64,
    effects: VecDeque<Effect>,
    table_dirty: bool,
    routes_dirty: bool,
}

impl Core {
    pub fn new(config: Config) -> Core {
        Core {
            config,
            mode: Mode::Serving,
            importing: false,
            listeners: BTreeMap::new(),
            routes: BTreeMap::new(),
            sessions: BTreeMap::new(),
            conns: HashMap::new(),
            buffered: VecDeque::new(),
            pending: Vec::new(),
            matchers: HashMap::new(),
            handed_over: BTreeMap::new(),
            loans: BTreeMap::new(),
            loan_refused: BTreeSet::new(),
            next_listener: 0,
            next_session: 0,
            next_op: 0,
            next_attempt: 0,
            effects: VecDeque::new(),
            table_dirty: false,
            routes_dirty: false,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn listeners(&self) -> &BTreeMap<ListenerId, ListenerState> {
        &self.listeners
    }

    pub fn routes(&self) -> &BTreeMap<RouteKey, RouteState> {
        &self.routes
    }

    pub fn sessions(&self) -> &BTreeMap<SessionId, SessionState> {
        &self.sessions
    }

    pub fn conn(&self, id: ConnId) -> Option<&Held> {
        self.conns.get(&id)
    }

    /// The next thing to do, in order.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    fn emit(&mut self, effect: Effect) {
        self.effects.push_back(effect);
    }

    fn next_op(&mut self) -> OpId {
        self.next_op += 1;
        OpId(self.next_op)
    }

    /// Ends every input: asks for a new table and for the routes to be kept
    /// when they changed.
    fn settle(&mut self) {
        if self.routes_dirty {
            self.matchers.clear();
        }
        self.update_loans();
        if self.importing || self.mode == Mode::HandedOver {
            return;
        }
        if std::mem::take(&mut self.table_dirty) {
            self.emit(Effect::Publish);
        }
        if std::mem::take(&mut self.routes_dirty) {
            self.emit(Effect::Persist);
        }
    }

    /// When [`Core::timeout`] is next due. Nothing is due unless serving: a
    /// frozen state must stay as it was exported.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.mode != Mode::Serving {
            return None;
        }
        let linger = self.config.linger;
        let routes = self.routes.values().filter_map(|r| match &r.target {
            RouteTarget::Service(s) => {
                let waited = s.queue.front().and_then(|id| self.conns.get(id)).map(|h| h.desc.arrived + linger);
                // A backoff matters only while there is something to deliver, to someone.
                let retry =
                    s.retry_at.filter(|_| !s.queue.is_empty() && s.delivering.is_none() && !self.live(s).is_empty());
                [s.reserved_until, waited, retry].into_iter().flatten().min()
            }
            RouteTarget::Backends(_) => None,
        });
        let listeners = self.listeners.values().filter(|l| !l.pinned).filter_map(|l| l.idle_since.map(|t| t + linger));
        routes.chain(listeners).min()
    }

    /// Time passed: releases expired reservations, answers connections queued
    /// too long, retries deliveries that were waiting, closes listeners idle
    /// for the linger period.
    pub fn timeout(&mut self, now: Instant) {
        if self.mode != Mode::Serving {
            return;
        }
        self.release_expired(now);
        self.expire_queued(now);
        let due: Vec<RouteKey> = self
            .routes
            .iter()
            .filter(|(_, r)| matches!(&r.target, RouteTarget::Service(s) if s.retry_at.is_some_and(|t| t <= now)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.try_flush(now, &key);
        }
        self.close_idle_listeners(now);
        self.settle();
    }

    /// A listening socket this process got without binding it (socket
    /// activation, the fd store, the previous process). `id` keeps the
    /// previous process's number.
    pub fn adopt_listener(
        &mut self,
        now: Instant,
        id: Option<ListenerId>,
        addr: SocketAddr,
        pinned: bool,
    ) -> ListenerId {
        let id = id.unwrap_or(ListenerId(self.next_listener + 1));
        self.next_listener = self.next_listener.max(id.0);
        let used = self.routes.keys().any(|k| k.0 == addr);
        let idle_since = if used { None } else { Some(now) };
        self.listeners.insert(id, ListenerState { addr, idle_since, pinned, bound: true, lent_once: false });
        self.table_dirty = true;
        self.settle();
        id
    }

    /// The listener a connection came through, by the address it reached: its
    /// exact address, else the wildcard listener on the same port.
    pub fn listener_for(&self, addr: SocketAddr) -> Option<ListenerId> {
        let exact = self.listeners.iter().find(|(_, l)| l.addr == addr);
        let wildcard =
            || self.listeners.iter().find(|(_, l)| l.addr.port() == addr.port() && l.addr.ip().is_unspecified());
        exact.or_else(wildcard).map(|(id, _)| *id)
    }

    /// The address of listener `id` (also after a commit handed it over).
    pub fn listener_address(&self, id: ListenerId) -> Option<SocketAddr> {
        self.listeners.get(&id).map(|l| l.addr).or_else(|| self.handed_over.get(&id).copied())
    }

    /// The listener serving `addr`, if one is open (or being opened).
    fn listener_at(&self, addr: SocketAddr) -> Option<ListenerId> {
        self.listeners.iter().find(|(_, l)| l.addr == addr).map(|(id, _)| *id)
    }

    /// A listener whose route left: it idles if no route is left on it.
    fn release_listener_of(&mut self, addr: SocketAddr, now: Instant) {
        if self.routes.keys().any(|k| k.0 == addr) {
            return;
        }
        if let Some(id) = self.listener_at(addr)
            && let Some(l) = self.listeners.get_mut(&id)
        {
            l.idle_since = Some(now);
            if l.lent_once && !l.pinned {
                // A borrower may still hold a copy: the port is taken back now.
                tracing::info!(%addr, "closed listener: its lent route is gone");
                self.listeners.remove(&id);
                self.emit(Effect::Close { listener: id, addr, revoke: true });
                self.table_dirty = true;
            }
        }
    }

    fn close_idle_listeners(&mut self, now: Instant) {
        let linger = self.config.linger;
        let idle: Vec<ListenerId> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.bound && !l.pinned && l.idle_since.is_some_and(|t| t + linger <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(l) = self.listeners.remove(&id) {
                tracing::info!(addr = %l.addr, "closed listener: no routes for {}", humantime::format_duration(linger));
                self.emit(Effect::Close { listener: id, addr: l.addr, revoke: l.lent_once });
                self.table_dirty = true;
            }
        }
    }

    /// A [`Effect::Bind`] was carried out.
    pub fn bound(&mut self, now: Instant, listener: ListenerId, result: std::io::Result<()>) {
        let addr = self.listeners.get(&listener).map(|l| l.addr);
        let mut error = None;
        match result {
            Ok(()) => {
                if let Some(l) = self.listeners.get_mut(&listener) {
                    l.bound = true;
                    tracing::info!(addr = %l.addr, "listening");
                }
                self.table_dirty = true;
            }
            Err(e) => {
                self.listeners.remove(&listener);
                error = Some(e);
            }
        }
        for p in self.pending.iter_mut().filter(|p| p.waiting.contains(&listener)) {
            p.waiting.remove(&listener);
            if let (Some(e), Some(addr), None) = (&mut error, addr, &p.failure) {
                // The first operation gets the error itself; any other, the same errno.
                let source = match e.raw_os_error() {
                    Some(errno) => std::mem::replace(e, std::io::Error::from_raw_os_error(errno)),
                    None => std::io::Error::new(e.kind(), e.to_string()),
                };
                p.failure = Some(ControlError::Bind { route: p.commit.route_for(addr), addr, source });
            }
        }
        while let Some(i) = self.pending.iter().position(|p| p.waiting.is_empty()) {
            let op = self.pending.remove(i);
            self.finish(now, op);
        }
        self.settle();
    }

    /// Starts an operation that needs listeners on `addrs` (with the route
    /// each is for): asks for the missing ones, and commits at once if none is.
    fn start_op(&mut self, now: Instant, addrs: &[(SocketAddr, String)], commit: routes::Commit) -> OpId {
        let op = self.next_op();
        let mut pending = PendingOp { op, waiting: BTreeSet::new(), opened: Vec::new(), failure: None, commit };
        for (addr, _) in addrs {
            match self.listener_at(*addr) {
                Some(id) if self.listeners.get(&id).is_some_and(|l| !l.bound) => {
                    pending.waiting.insert(id);
                }
                Some(_) => {}
                None => {
                    self.next_listener += 1;
                    let id = ListenerId(self.next_listener);
                    self.listeners.insert(
                        id,
                        ListenerState { addr: *addr, idle_since: None, pinned: false, bound: false, lent_once: false },
                    );
                    pending.waiting.insert(id);
                    pending.opened.push(id);
                    self.emit(Effect::Bind { listener: id, addr: *addr });
                }
            }
        }
        if pending.waiting.is_empty() {
            self.finish(now, pending);
        } else {
            self.pending.push(pending);
        }
        op
    }

    /// Every listener bind of `op` is answered: commit it, or undo what it opened.
    fn finish(&mut self, now: Instant, op: PendingOp) {
        let result = match op.failure {
            Some(e) => {
                for id in op.opened {
                    let unused = self.listeners.get(&id).is_some_and(|l| !self.routes.keys().any(|k| k.0 == l.addr));
                    if unused && let Some(l) = self.listeners.remove(&id) {
                        self.emit(Effect::Close { listener: id, addr: l.addr, revoke: l.lent_once });
                    }
                }
                Err(e)
            }
            None => self.apply_commit(now, op.commit),
        };
        self.emit(Effect::Done { op: op.op, result });
    }

    /// Every route as a handover message: what a new process, or this one
    /// after a crash, needs to recreate it.
    pub fn route_messages(&self, now: Instant) -> Vec<Handover> {
        self.routes
            .values()
            .map(|r| match &r.target {
                RouteTarget::Backends(pool) => Handover::BackendRoute {
                    route: r.spec.to_string(),
                    backends: pool.backends.iter().map(|b| b.spec.to_string()).collect(),
                },
                RouteTarget::Service(s) => Handover::OwnedServiceRoute {
                    route: r.display.to_string(),
                    service: s.service.clone(),
                    uid: s.uid,
                    reserved_ms: s.reserved_until.map(|t| t.saturating_duration_since(now).as_millis() as u64),
                },
            })
            .collect()
    }

    /// Sessions that may receive new connections for a route: those that
    /// are neither draining nor dead, and of them the ones passing the
    /// route's health check (all of them if none passes, as for backends).
    fn live(&self, s: &ServiceRoute) -> Vec<SessionId> {
        let alive =
            s.sessions.iter().copied().filter(|id| self.sessions.get(id).is_some_and(|e| !e.draining && e.usable));
        let alive: Vec<SessionId> = alive.collect();
        if alive.iter().all(|id| s.down.contains(id)) {
            return alive;
        }
        alive.into_iter().filter(|id| !s.down.contains(id)).collect()
    }

    /// The route's health check of `session` changed its verdict: `up` puts
    /// it back in the rotation, else it leaves it.
    pub fn session_checked(&mut self, now: Instant, key: &RouteKey, session: SessionId, up: bool) {
        let Some(RouteState { target: RouteTarget::Service(s), .. }) = self.routes.get_mut(key) else { return };
        if !s.sessions.contains(&session) {
            return;
        }
        let changed = if up { s.down.remove(&session) } else { s.down.insert(session) };
        if changed {
            self.table_dirty = true;
            if up {
                self.try_flush(now, key);
            }
        }
        self.settle();
    }

    /// An upgrade freezes the state: every route queues here, nothing is
    /// delivered or changed until [`Core::commit`] or [`Core::thaw`].
    pub fn freeze(&mut self) {
        self.mode = Mode::Frozen;
        self.table_dirty = true;
        self.settle();
    }

    /// The address of the listener a connection came through, for the new process.
    pub(super) fn handed_over_address(&self, desc: &ConnDesc) -> SocketAddr {
        self.handed_over.get(&desc.listener).copied().unwrap_or(desc.meta.local)
    }

    /// The upgrade failed: serve again, deliver what waited.
    pub fn thaw(&mut self, now: Instant) {
        if self.mode != Mode::Frozen {
            return;
        }
        self.mode = Mode::Serving;
        self.table_dirty = true;
        for id in std::mem::take(&mut self.buffered) {
            if let Some(held) = self.conns.remove(&id) {
                self.route_conn(now, held.desc);
            }
        }
        let keys: Vec<RouteKey> = self.routes.keys().cloned().collect();
        for key in keys {
            self.try_flush(now, &key);
        }
        self.settle();
    }

    /// The new process serves: it has its own copies of everything exported;
    /// what arrived since the freeze goes to it. The published (frozen) table
    /// stays, so that connections accepted before the freeze still find their
    /// listener and come here, to be handed on.
    pub fn commit(&mut self) {
        if self.mode != Mode::Frozen {
            return;
        }
        self.mode = Mode::HandedOver;
        self.handed_over = self.listeners.iter().map(|(id, l)| (*id, l.addr)).collect();
        for id in std::mem::take(&mut self.buffered) {
            if let Some(held) = self.conns.remove(&id) {
                let listener = self.handed_over_address(&held.desc);
                self.emit(Effect::HandOn { desc: held.desc, listener });
            }
        }
        let queued: Vec<ConnId> =
            self.conns.iter().filter(|(_, h)| matches!(h.place, Place::Queued(_))).map(|(id, _)| *id).collect();
        for id in queued {
            self.conns.remove(&id);
            self.emit(Effect::Forget { conn: id });
        }
        self.routes.clear();
        self.sessions.clear();
        self.listeners.clear();
        self.loans.clear();
        self.pending.clear();
        self.matchers.clear();
    }

    /// portmux is stopping: every waiting connection gets its answer.
    pub fn stop(&mut self) {
        self.mode = Mode::Stopped;
        let mut waiting: Vec<&Held> =
            self.conns.values().filter(|h| !matches!(h.place, Place::Delivering(..))).collect();
        waiting.sort_by_key(|h| h.desc.id);
        let answers: Vec<(ConnId, Reply)> =
            waiting.into_iter().map(|h| (h.desc.id, queue::unavailable(&h.desc.meta, "portmux is stopping"))).collect();
        for (id, reply) in answers {
            self.conns.remove(&id);
            self.emit(Effect::Answer { conn: id, reply });
        }
        for r in self.routes.values_mut() {
            if let RouteTarget::Service(s) = &mut r.target {
                s.queue.clear();
            }
        }
        self.buffered.clear();
    }

    /// The connections queued now, route by route, each in arrival order
    /// (what an upgrade hands over for the new process to deliver).
    pub fn queued(&self) -> Vec<&ConnDesc> {
        let mut out = Vec::new();
        for r in self.routes.values() {
            if let RouteTarget::Service(s) = &r.target {
                out.extend(s.queue.iter().filter_map(|id| self.conns.get(id)).map(|h| &h.desc));
            }
        }
        out
    }

    /// Receiving the previous process's state: nothing is published until
    /// [`Core::end_import`].
    pub fn begin_import(&mut self) {
        self.importing = true;
    }

    /// The previous process's state is in: routes nobody holds are reserved for
    /// the linger period (their services reconnect), unused listeners idle;
    /// then the table is published.
    pub fn end_import(&mut self, now: Instant) {
        self.importing = false;
        let until = now + self.config.linger;
        for r in self.routes.values_mut() {
            if let RouteTarget::Service(s) = &mut r.target
                && s.sessions.is_empty()
                && s.reserved_until.is_none()
            {
                s.reserved_until = Some(until);
            }
        }
        let used: BTreeSet<SocketAddr> = self.routes.keys().map(|k| k.0).collect();
        for l in self.listeners.values_mut() {
            l.idle_since = if used.contains(&l.addr) { None } else { Some(now) };
        }
        self.table_dirty = true;
        self.routes_dirty = true;
        self.settle();
    }
}
