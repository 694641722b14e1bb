//! Claiming routes: sessions registering (all or nothing), the admin API
//! setting and removing routes with backends, conflicts and who holds what,
//! listening addresses that overlap, reservations while a service is away.

use super::{Core, Mode, OpId, Outcome, RouteState, RouteTarget, ServiceRoute, SessionState};
use crate::config::limits::Limit;
use crate::config::policy::Peer;
use crate::control::error::{ControlError, Holder};
use crate::forward::backend::{Backend, BackendPool, BackendSpec, Policy, ProxyVersion, Resolved};
use crate::ids::SessionId;
use crate::route::{RouteKey, route_key};
use portmux_wire::Bound;
use portmux_wire::spec::{HostPattern, RouteSpec, Scheme};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What an operation does once its listeners are bound.
#[derive(Debug)]
pub(super) enum Commit {
    /// A session claims these routes.
    Register { session: SessionId, plan: Vec<(RouteKey, RouteSpec)> },
    /// A route forwards to this pool.
    Backends { key: RouteKey, spec: RouteSpec, pool: Arc<BackendPool> },
    /// A service's route comes back (after a crash), reserved for its service.
    Reserved { key: RouteKey, spec: RouteSpec, service: String, uid: u32, until: Instant },
}

impl Commit {
    /// The route (as the user wrote it) that needs the listener on `addr`.
    pub(super) fn route_for(&self, addr: SocketAddr) -> String {
        match self {
            Commit::Register { plan, .. } => {
                plan.iter().find(|(k, _)| k.0 == addr).map(|(_, s)| s.to_string()).unwrap_or_default()
            }
            Commit::Backends { spec, .. } | Commit::Reserved { spec, .. } => spec.key(),
        }
    }
}

/// Why a service may not claim `spec`'s health check, if it may not: portmux
/// checks a service by handing it a request (`health=/PATH`) on an HTTP
/// route; whether its session is alive it knows already.
fn service_health_problem(spec: &RouteSpec) -> Option<&'static str> {
    let health = spec.health.as_deref()?;
    if !matches!(spec.scheme, Scheme::Http | Scheme::Https) {
        return Some(
            "a service's health check is an HTTP request portmux hands it; claim health=/PATH on an http:// or https:// route",
        );
    }
    (health == "tcp").then_some(
        "health=tcp checks a backend's address; a service's route takes health=/PATH (portmux hands the service a GET and expects its status)",
    )
}

/// Two listening addresses that cannot both be bound (same port, one a wildcard covering the other).
fn clashes(a: SocketAddr, b: SocketAddr) -> bool {
    if a == b || a.port() != b.port() {
        return false;
    }
    let covers = |w: SocketAddr, o: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    covers(a, b) || covers(b, a)
}

impl Core {
    /// A service connected and said Hello.
    pub fn open_session(&mut self, name: String, peer: Peer) -> SessionId {
        self.next_session += 1;
        let id = SessionId(self.next_session);
        self.sessions.insert(id, SessionState { name, peer, routes: Vec::new(), draining: false, usable: true });
        id
    }

    /// A session the previous process had, on its routes (already imported).
    pub fn import_session(&mut self, id: SessionId, state: SessionState, routes: &[String]) {
        self.next_session = self.next_session.max(id.0);
        let mut state = SessionState { routes: Vec::new(), ..state };
        for text in routes {
            let Ok(spec) = RouteSpec::parse(text) else { continue };
            let key = route_key(&spec, self.config.default_bind);
            if let Some(RouteState { target: RouteTarget::Service(s), .. }) = self.routes.get_mut(&key) {
                s.sessions.push(id);
                s.reserved_until = None;
                // A route from an older release learns its owner from the session holding it.
                if s.uid == portmux_wire::UNKNOWN_OWNER {
                    s.uid = state.peer.uid;
                }
                state.routes.push(key);
            }
        }
        self.sessions.insert(id, state);
    }

    /// Why the route at `key` cannot be claimed by someone else.
    fn holder(&self, now: Instant, r: &RouteState) -> Holder {
        let linger = self.config.linger;
        match &r.target {
            RouteTarget::Backends(_) => Holder::Backends,
            RouteTarget::Service(s) => match (s.sessions.iter().find_map(|id| self.sessions.get(id)), s.reserved_until)
            {
                (Some(e), _) => Holder::Service { service: s.service.clone(), pid: e.peer.pid, uid: e.peer.uid },
                (None, Some(until)) => {
                    let left = until.saturating_duration_since(now);
                    Holder::Reserved {
                        service: s.service.clone(),
                        uid: s.uid,
                        left_s: linger.saturating_sub(left).as_secs(),
                        release_in_s: left.as_secs().max(1),
                    }
                }
                (None, None) => Holder::Away { service: s.service.clone(), uid: s.uid },
            },
        }
    }

    /// Refuses what an unprivileged session would take from another uid: a
    /// service name another uid uses, a port another uid holds whole (tcp://,
    /// or a route for any host), a host another uid serves (its paths
    /// included), or names under another uid's `*.suffix` (the more specific
    /// route would win). Reserved routes count: their service is coming back.
    fn check_ownership(
        &self,
        now: Instant,
        peer: &Peer,
        name: &str,
        spec: &RouteSpec,
        port: u16,
    ) -> Result<(), ControlError> {
        if self.config.policy.privileged(peer) {
            return Ok(());
        }
        let owned =
            |what: String, r: &RouteState| ControlError::Owned { route: spec.key(), what, holder: self.holder(now, r) };
        // A name belongs to the uid whose routes (held or reserved) carry it; a
        // session that registered nothing owns nothing. A route handed over by
        // an older release has no known owner: its own service takes it back.
        let ours = |s: &ServiceRoute| s.uid == peer.uid || (s.uid == portmux_wire::UNKNOWN_OWNER && s.service == name);
        for r in self.routes.values() {
            if let RouteTarget::Service(s) = &r.target
                && s.service == name
                && !ours(s)
            {
                return Err(owned(format!("the service name '{name}'"), r));
            }
        }
        let whole = |s: &RouteSpec| s.scheme == Scheme::Tcp || s.host == HostPattern::Any;
        let under = |name: &str, domain: &str| name.strip_suffix(domain).is_some_and(|rest| rest.ends_with('.'));
        for (key, r) in self.routes.iter().filter(|(k, _)| k.0.port() == port) {
            let mine = match &r.target {
                RouteTarget::Service(s) => ours(s),
                RouteTarget::Backends(_) => false,
            };
            if mine {
                continue;
            }
            let what = if whole(&r.spec) {
                Some(format!("port {port} (all of it, by route {})", r.display))
            } else {
                match (&spec.host, &r.spec.host) {
                    // A catch-all would get what the other's routes do not
                    // match: its host's other paths, names under its suffix.
                    _ if whole(spec) => Some(format!("a route on port {port} ({})", r.display)),
                    (HostPattern::Exact(h), HostPattern::Exact(t)) if h == t => {
                        Some(format!("host {h} on port {port}"))
                    }
                    (HostPattern::Exact(h), HostPattern::Suffix(t)) if under(h, t) => {
                        Some(format!("{h}, which is under *.{t} on port {port}"))
                    }
                    (HostPattern::Suffix(h), HostPattern::Suffix(t)) if h == t || under(h, t) => {
                        Some(format!("*.{h}, which is under *.{t} on port {port}"))
                    }
                    _ => None,
                }
            };
            if let Some(what) = what {
                tracing::debug!(route = %key.1, "ownership refusal");
                return Err(owned(what, r));
            }
        }
        Ok(())
    }

    /// The TLS rules of an `https://` claim: file options only from root or
    /// portmux's own uid (portmux reads them itself); an instance joining a
    /// route claims it with the route's TLS options; and the `https://`
    /// routes of one host on one listener ask for the same client
    /// certificate (the handshake, made before the path is known, asks for
    /// the most specific route's).
    fn check_tls(&self, peer: Option<&Peer>, key: &RouteKey, spec: &RouteSpec) -> Result<(), ControlError> {
        if spec.scheme != Scheme::Https {
            return Ok(());
        }
        let refuse = |reason: String| ControlError::Certificate { route: spec.key(), reason };
        if let Some(peer) = peer
            && (spec.cert.is_some() || spec.client_ca.is_some())
            && !self.config.policy.privileged(peer)
        {
            return Err(refuse(format!(
                "portmux reads cert=, key= and client_ca= files itself, so only root or portmux's own user may name \
                 them (this is uid {}); send the certificate with the registration (RegisterTls, \
                 Builder::certificate) instead",
                peer.uid
            )));
        }
        let options = |s: &RouteSpec| (s.cert.clone(), s.key.clone(), s.client_ca.clone(), s.acme);
        if let Some(r) = self.routes.get(key)
            && peer.is_some()
            && options(&r.spec) != options(spec)
        {
            return Err(refuse(format!(
                "it is served as {} now; an instance joining it claims it with the same cert=, key=, client_ca= and acme",
                r.display
            )));
        }
        let other = self.routes.iter().find(|(k, r)| {
            k.0 == key.0
                && *k != key
                && r.spec.scheme == Scheme::Https
                && r.spec.host == spec.host
                && r.spec.client_ca != spec.client_ca
        });
        if let Some((_, r)) = other {
            return Err(refuse(format!(
                "{} on the same host asks for {}: every https:// route of a host on one port asks for the same client \
                 certificate, since the handshake comes before the path",
                r.display,
                r.spec.client_ca.as_deref().map_or("no client certificate".to_string(), |ca| format!("client_ca={ca}"))
            )));
        }
        Ok(())
    }

    /// Refuses a listening address that overlaps an existing or planned one on the same port.
    fn check_clash(&self, route: &str, addr: SocketAddr, planned: &[SocketAddr]) -> Result<(), ControlError> {
        let existing = self.listeners.values().map(|l| l.addr);
        match existing.chain(planned.iter().copied()).find(|a| clashes(*a, addr)) {
            Some(other) => Err(ControlError::Clash { route: route.to_string(), addr, other }),
            None => Ok(()),
        }
    }

    /// Session `session` claims `routes`, all or nothing. The outcome comes as
    /// [`super::Effect::Done`] (after the listeners it needs are bound).
    pub fn register(&mut self, now: Instant, session: SessionId, routes: &[String]) -> OpId {
        let result = self.plan_registration(now, session, routes);
        let op = match result {
            Ok(plan) => {
                let addrs: Vec<(SocketAddr, String)> = plan.iter().map(|(k, s)| (k.0, s.to_string())).collect();
                self.start_op(now, &addrs, Commit::Register { session, plan })
            }
            Err(e) => {
                let op = self.next_op();
                self.emit(super::Effect::Done { op, result: Err(e) });
                op
            }
        };
        self.settle();
        op
    }

    /// What `register` would refuse, without doing anything (the driver asks
    /// before it reads the certificate files the routes name).
    pub fn check_claim(&self, now: Instant, session: SessionId, routes: &[String]) -> Result<(), ControlError> {
        self.plan_registration(now, session, routes).map(drop)
    }

    fn plan_registration(
        &self,
        now: Instant,
        session: SessionId,
        routes: &[String],
    ) -> Result<Vec<(RouteKey, RouteSpec)>, ControlError> {
        let Some((name, peer)) = self.sessions.get(&session).map(|s| (s.name.clone(), s.peer.clone())) else {
            return Err(ControlError::SessionClosing);
        };
        match self.mode {
            Mode::Serving => {}
            Mode::Frozen => return Err(ControlError::Upgrading),
            Mode::HandedOver | Mode::Stopped => return Err(ControlError::Stopping),
        }
        if routes.is_empty() {
            return Err(ControlError::NoRoutes);
        }
        let limits = &self.config.limits;
        let held = self.sessions.get(&session).map_or(&[][..], |s| &s.routes[..]);
        // Checked on what is asked before anything is parsed (a long list costs
        // nothing to refuse), and then on the distinct routes it makes.
        let too_many = |more: usize| {
            self.config.hits.hit(Limit::RoutesPerSession);
            ControlError::Limit {
                route: String::new(),
                limit: Limit::RoutesPerSession,
                what: format!("a session with {} routes asked for {more} more", held.len()),
                most: limits.routes_per_session,
            }
        };
        if routes.len() > limits.routes_per_session {
            return Err(too_many(routes.len()));
        }
        let mut plan: Vec<(RouteKey, RouteSpec)> = Vec::new();
        for text in routes {
            let route = || text.clone();
            let spec = RouteSpec::parse(text).map_err(|source| ControlError::Spec { route: route(), source })?;
            if spec.redirect.is_some() || (spec.scheme == Scheme::Http && spec.acme) {
                return Err(ControlError::BadOption {
                    route: route(),
                    reason: "a service does not claim a redirect; add it with portmux route add 'http://HOST?redirect=https'"
                        .into(),
                });
            }
            if let Some(reason) = service_health_problem(&spec) {
                return Err(ControlError::BadOption { route: route(), reason: reason.into() });
            }
            if let Some(n) = &spec.name
                && *n != name
            {
                return Err(ControlError::NameMismatch { route: route(), spec: n.clone(), hello: name });
            }
            if spec.lb.is_some() || spec.proxy.is_some() {
                return Err(ControlError::BackendOptions { route: route() });
            }
            if let Err(refusal) = self.config.policy.may_claim(&peer, &spec, &name) {
                return Err(ControlError::Policy { route: spec.key(), refusal });
            }
            let key = route_key(&spec, self.config.default_bind);
            if let Some(r) = self.routes.get(&key) {
                let theirs = match &r.target {
                    RouteTarget::Service(s) => s.service != name,
                    RouteTarget::Backends(_) => true,
                };
                if theirs {
                    return Err(ControlError::Held { route: r.display.to_string(), holder: self.holder(now, r) });
                }
            }
            self.check_ownership(now, &peer, &name, &spec, key.0.port())?;
            self.check_tls(Some(&peer), &key, &spec)?;
            let same_host =
                |(k, s): &&(RouteKey, RouteSpec)| k.0 == key.0 && s.scheme == Scheme::Https && s.host == spec.host;
            if spec.scheme == Scheme::Https
                && let Some((_, s)) = plan.iter().find(|p| same_host(p) && p.1.client_ca != spec.client_ca)
            {
                return Err(ControlError::Certificate {
                    route: spec.key(),
                    reason: format!(
                        "{s} in the same registration asks for another client certificate; every https:// route of a host on one port asks for the same"
                    ),
                });
            }
            let planned: Vec<SocketAddr> = plan.iter().map(|(k, _)| k.0).collect();
            self.check_clash(text, key.0, &planned)?;
            self.check_lend(Some(&peer), &key, &spec, &plan)?;
            if !plan.iter().any(|(k, _)| *k == key) {
                plan.push((key, spec));
            }
        }
        let new = plan.iter().filter(|(k, _)| !held.contains(k)).count();
        if held.len() + new > limits.routes_per_session {
            return Err(too_many(new));
        }
        let mut addrs: Vec<SocketAddr> = held.iter().map(|k| k.0).chain(plan.iter().map(|(k, _)| k.0)).collect();
        addrs.sort();
        addrs.dedup();
        if addrs.len() > limits.listeners_per_session {
            self.config.hits.hit(Limit::ListenersPerSession);
            return Err(ControlError::Limit {
                route: String::new(),
                limit: Limit::ListenersPerSession,
                what: format!("these routes need {} listening addresses", addrs.len()),
                most: limits.listeners_per_session,
            });
        }
        Ok(plan)
    }

    /// Applies an operation whose listeners are all bound.
    pub(super) fn apply_commit(&mut self, now: Instant, commit: Commit) -> Result<Outcome, ControlError> {
        match commit {
            Commit::Register { session, plan } => {
                let Some((name, uid)) = self.sessions.get(&session).map(|s| (s.name.clone(), s.peer.uid)) else {
                    return Err(ControlError::SessionClosing);
                };
                let mut bound = Vec::new();
                for (key, spec) in plan {
                    self.use_listener(key.0);
                    let display: Arc<str> = spec.key().into();
                    let newer = spec.clone();
                    let r = self.routes.entry(key.clone()).or_insert_with(|| RouteState {
                        display,
                        spec,
                        target: RouteTarget::Service(ServiceRoute::new(name.clone(), uid, None)),
                    });
                    // The newest instance's health check applies (a rolling
                    // deploy that adds or changes health= takes effect).
                    if r.spec != newer && r.spec.without_health() == newer.without_health() {
                        tracing::info!(route = %r.display, now = %newer.key(), "the route's health check changes with its newest instance");
                        r.display = newer.key().into();
                        r.spec = newer;
                        // The new check judges every session afresh.
                        if let RouteTarget::Service(s) = &mut r.target {
                            s.down.clear();
                        }
                        self.table_dirty = true;
                    }
                    if let RouteTarget::Service(s) = &mut r.target {
                        if !s.sessions.contains(&session) {
                            s.sessions.push(session);
                        }
                        if s.uid == portmux_wire::UNKNOWN_OWNER {
                            s.uid = uid;
                        }
                        s.reserved_until = None;
                        // A new instance: whatever waited for a backoff may go to it now.
                        s.retry_at = None;
                    }
                    bound.push(Bound { route: r.display.to_string(), listen: key.0 });
                    if let Some(e) = self.sessions.get_mut(&session)
                        && !e.routes.contains(&key)
                    {
                        e.routes.push(key.clone());
                    }
                    self.try_flush(now, &key);
                }
                self.table_dirty = true;
                self.routes_dirty = true;
                Ok(Outcome::Registered(bound))
            }
            Commit::Backends { key, spec, pool } => {
                self.use_listener(key.0);
                let display: Arc<str> = spec.key().into();
                self.routes.insert(key.clone(), RouteState { display, spec, target: RouteTarget::Backends(pool) });
                self.table_dirty = true;
                self.routes_dirty = true;
                Ok(Outcome::RouteSet(key))
            }
            Commit::Reserved { key, spec, service, uid, until } => {
                self.use_listener(key.0);
                let display: Arc<str> = spec.key().into();
                let target = RouteTarget::Service(ServiceRoute::new(service, uid, Some(until)));
                self.routes.insert(key.clone(), RouteState { display, spec, target });
                self.table_dirty = true;
                self.routes_dirty = true;
                Ok(Outcome::RouteSet(key))
            }
        }
    }

    /// A route now uses the listener on `addr`: it no longer idles.
    fn use_listener(&mut self, addr: SocketAddr) {
        if let Some(id) = self.listener_at(addr)
            && let Some(l) = self.listeners.get_mut(&id)
        {
            l.idle_since = None;
        }
    }

    /// The service will take no new connections on this session.
    pub fn drain(&mut self, session: SessionId) {
        if let Some(e) = self.sessions.get_mut(&session)
            && !e.draining
        {
            e.draining = true;
            tracing::info!(session = %session, service = %e.name, "draining: no new connections");
            self.table_dirty = true;
        }
        self.settle();
    }

    /// The session ended: it leaves its routes; a route left without sessions
    /// is reserved for the linger period (connections queue meanwhile). Its
    /// unacked connections come back through [`Core::arrived`].
    pub fn session_ended(&mut self, now: Instant, session: SessionId) {
        let linger = self.config.linger;
        let Some(entry) = self.sessions.remove(&session) else { return };
        for key in &entry.routes {
            let Some(r) = self.routes.get_mut(key) else { continue };
            let RouteTarget::Service(s) = &mut r.target else { continue };
            s.sessions.retain(|id| *id != session);
            s.down.remove(&session);
            if s.sessions.is_empty() {
                s.reserved_until = Some(now + linger);
                tracing::info!(
                    route = %r.display,
                    service = %s.service,
                    "service left; route reserved for {}, connections queue meanwhile",
                    humantime::format_duration(linger)
                );
            }
        }
        self.table_dirty = true;
        self.routes_dirty = true;
        self.settle();
    }

    /// Reservations that ended: the routes go, their queues are answered.
    pub(super) fn release_expired(&mut self, now: Instant) {
        let linger = self.config.linger;
        let released: Vec<RouteKey> = self
            .routes
            .iter()
            .filter(|(_, r)| matches!(&r.target, RouteTarget::Service(s) if s.reserved_until.is_some_and(|t| t <= now)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in released {
            let Some(r) = self.routes.remove(&key) else { continue };
            let RouteTarget::Service(s) = r.target else { continue };
            tracing::info!(
                route = %r.display,
                service = %s.service,
                waiting = s.queue.len(),
                "route released: the service did not come back within {}",
                humantime::format_duration(linger)
            );
            let detail = format!(
                "service '{}' for route {} did not come back within {}",
                s.service,
                r.display,
                humantime::format_duration(linger)
            );
            for id in s.queue {
                if let Some(held) = self.conns.remove(&id) {
                    let reply = super::queue::unavailable(&held.desc.meta, &detail);
                    self.emit(super::Effect::Answer { conn: id, reply });
                }
            }
            if r.spec.lend {
                // Lent by this process or an earlier one: taken back, shut down.
                if let Some(l) = self.listeners.values_mut().find(|l| l.addr == key.0) {
                    l.lent_once = true;
                }
            }
            self.release_listener_of(key.0, now);
            self.table_dirty = true;
            self.routes_dirty = true;
        }
    }

    /// Creates or replaces a route that forwards to `backends`. A backend kept
    /// across the change keeps its counters and health; connections already
    /// relayed are never touched. The outcome comes as [`super::Effect::Done`].
    pub fn set_backends(&mut self, now: Instant, spec: RouteSpec, backends: Resolved) -> OpId {
        let result = self.plan_backends(now, spec, backends);
        let op = match result {
            Ok((key, spec, pool)) => {
                let addrs = [(key.0, spec.key())];
                self.start_op(now, &addrs, Commit::Backends { key, spec, pool })
            }
            Err(e) => {
                let op = self.next_op();
                self.emit(super::Effect::Done { op, result: Err(e) });
                op
            }
        };
        self.settle();
        op
    }

    fn plan_backends(
        &self,
        now: Instant,
        spec: RouteSpec,
        backends: Resolved,
    ) -> Result<(RouteKey, RouteSpec, Arc<BackendPool>), ControlError> {
        let route = spec.key();
        let answered = spec.redirect.is_some() || (spec.scheme == Scheme::Http && spec.acme);
        if answered != backends.is_empty() {
            let reason = if backends.is_empty() {
                "a route with no backends must be a redirect (?redirect=https or ?redirect=URL)"
            } else {
                "a redirect (or ACME challenge) route answers every request itself and takes no backends"
            };
            return Err(ControlError::BadOption { route, reason: reason.into() });
        }
        if spec.scheme == Scheme::Https && spec.cert.is_none() && !spec.acme {
            return Err(ControlError::Certificate {
                route,
                reason: "https:// with backends needs its certificate: ?cert=CHAIN.pem&key=KEY.pem (or ?acme)".into(),
            });
        }
        if spec.name.is_some() {
            return Err(ControlError::ServiceName { route });
        }
        if spec.lend {
            let reason = "lend hands the port to the service that claims it; a route with backends is served by portmux (drop lend)";
            return Err(ControlError::BadOption { route, reason: reason.into() });
        }
        match self.mode {
            Mode::Serving => {}
            Mode::Frozen if self.importing => {}
            Mode::Frozen => return Err(ControlError::Upgrading),
            Mode::HandedOver | Mode::Stopped => return Err(ControlError::Stopping),
        }
        let most = self.config.limits.backends_per_route;
        if backends.len() > most {
            self.config.hits.hit(Limit::BackendsPerRoute);
            let what = format!("route {route} was given {} backends", backends.len());
            return Err(ControlError::Limit { route, limit: Limit::BackendsPerRoute, what, most });
        }
        let bad = |reason: String| ControlError::BadOption { route: route.clone(), reason };
        let policy = Policy::parse(spec.lb.as_deref().unwrap_or("round_robin")).map_err(bad)?;
        let proxy = ProxyVersion::parse(spec.proxy.as_deref().unwrap_or("")).map_err(bad)?;
        let key = route_key(&spec, self.config.default_bind);
        self.check_tls(None, &key, &spec)?;
        let previous: Vec<Arc<Backend>> = match self.routes.get(&key) {
            Some(RouteState { target: RouteTarget::Backends(pool), .. }) => pool.backends.clone(),
            Some(r) => {
                // Backends cannot take a service's route; the holder is named.
                let holder = self.holder(now, r);
                return Err(ControlError::Held { route: r.display.to_string(), holder });
            }
            None => {
                self.check_clash(&route, key.0, &[])?;
                self.check_lend(None, &key, &spec, &[])?;
                Vec::new()
            }
        };
        let backends: Vec<Arc<Backend>> = backends
            .into_iter()
            .map(|(b, endpoints)| match previous.iter().find(|p| p.spec == b && p.endpoints == endpoints) {
                Some(same) => same.clone(),
                None => Arc::new(Backend::new(b, endpoints)),
            })
            .collect();
        let names: Vec<String> = backends.iter().map(|b| b.spec.to_string()).collect();
        tracing::info!(route = %route, backends = %names.join(","), policy = policy.as_str(), "forwarding");
        Ok((key, spec, Arc::new(BackendPool::new(backends, policy, proxy))))
    }

    /// Removes a route with backends; established connections carry on.
    pub fn remove_route(&mut self, now: Instant, text: &str) -> Result<String, ControlError> {
        match self.mode {
            Mode::Serving => {}
            Mode::Frozen => return Err(ControlError::Upgrading),
            Mode::HandedOver | Mode::Stopped => return Err(ControlError::Stopping),
        }
        let spec = RouteSpec::parse(text).map_err(|source| ControlError::Spec { route: text.to_string(), source })?;
        let key = route_key(&spec, self.config.default_bind);
        match self.routes.get(&key) {
            None => return Err(ControlError::NotFound { route: spec.key() }),
            Some(RouteState { display, target: RouteTarget::Service(s), .. }) => {
                return Err(ControlError::ServiceRoute { route: display.to_string(), service: s.service.clone() });
            }
            Some(_) => {}
        }
        let removed = self.routes.remove(&key).map(|r| r.display.to_string()).unwrap_or_default();
        self.release_listener_of(key.0, now);
        tracing::info!(route = %removed, "route removed");
        self.table_dirty = true;
        self.routes_dirty = true;
        self.settle();
        Ok(removed)
    }

    /// The route with backends named by `route` (or the only one), and its backends.
    pub fn backends_of(&self, route: Option<&str>) -> Result<(String, Vec<BackendSpec>), ControlError> {
        let forwarding: Vec<(&RouteState, &Arc<BackendPool>)> = self
            .routes
            .values()
            .filter_map(|r| match &r.target {
                RouteTarget::Backends(pool) => Some((r, pool)),
                RouteTarget::Service(_) => None,
            })
            .collect();
        let (r, pool) = match route {
            Some(text) => {
                let spec =
                    RouteSpec::parse(text).map_err(|source| ControlError::Spec { route: text.to_string(), source })?;
                let key = route_key(&spec, self.config.default_bind);
                match self.routes.get(&key) {
                    Some(r @ RouteState { target: RouteTarget::Backends(pool), .. }) => (r, pool),
                    _ => return Err(ControlError::NoBackendsAt { route: spec.key() }),
                }
            }
            None => match forwarding.as_slice() {
                [one] => *one,
                [] => return Err(ControlError::NoBackendRoute),
                _ => return Err(ControlError::SeveralBackendRoutes),
            },
        };
        Ok((r.spec.to_string(), pool.backends.iter().map(|b| b.spec.clone()).collect()))
    }

    /// After a restart (a crash, systemd restarting portmux): a service's route
    /// comes back reserved for the linger period, so connections queue until
    /// the service (its client library reconnects by itself) registers again.
    pub fn restore_service_route(&mut self, now: Instant, route: &str, service: String, uid: u32) -> OpId {
        let result = RouteSpec::parse(route).map_err(|source| ControlError::Spec { route: route.to_string(), source });
        let op = match result {
            Ok(spec) => {
                let key = route_key(&spec, self.config.default_bind);
                let until = now + self.config.linger;
                let addrs = [(key.0, spec.key())];
                self.start_op(now, &addrs, Commit::Reserved { key, spec, service, uid, until })
            }
            Err(e) => {
                let op = self.next_op();
                self.emit(super::Effect::Done { op, result: Err(e) });
                op
            }
        };
        self.settle();
        op
    }

    /// In a new process: a service's route as the previous process had it
    /// (its listener was passed along), reserved for `reserved` if no session holds it.
    pub fn import_service_route(
        &mut self,
        route: &str,
        service: String,
        uid: u32,
        reserved: Option<(Instant, Duration)>,
    ) -> Result<(), ControlError> {
        let spec = RouteSpec::parse(route).map_err(|source| ControlError::Spec { route: route.to_string(), source })?;
        let key = route_key(&spec, self.config.default_bind);
        let display: Arc<str> = spec.key().into();
        let until = reserved.map(|(now, left)| now + left);
        let target = RouteTarget::Service(ServiceRoute::new(service, uid, until));
        self.routes.insert(key, RouteState { display, spec, target });
        self.routes_dirty = true;
        Ok(())
    }
}
