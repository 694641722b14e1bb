//! What the admin API and `portmux route list` show: routes with their owners
//! or backends, queues and health, and the state of the whole process, built
//! from the core's state (and the sessions' live counts).

use super::core::{Core, Mode, RouteTarget};
use crate::handoff::Session;
use crate::ids::SessionId;
use crate::route::RouteKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

impl super::driver::Control {
    /// Every route, for the admin API.
    pub fn views(&self) -> Vec<RouteView> {
        routes(&self.core.borrow(), &self.sessions.borrow(), &self.shared.metrics, Instant::now())
    }

    /// The process, for the admin API.
    pub fn status(&self) -> StatusView {
        let s = &self.shared;
        let control = s.settings.control.as_ref().map(|p| p.display().to_string());
        let connections = s.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        let idle = s.idle_held.load(std::sync::atomic::Ordering::Relaxed);
        StatusView {
            peeking: s.admission.peeking(),
            limits: limits(&s.settings.limits, &s.settings.limit_hits),
            sandbox: s.settings.sandboxed.clone(),
            upgrades: s.metrics.upgrades(),
            relay: crate::forward::kernel::describe(),
            relayed: crate::forward::kernel::flows(),
            ..status(&self.core.borrow(), control, self.started.elapsed().as_secs(), connections, idle)
        }
    }

    /// Every metric, in the text exposition format (`GET /metrics`).
    pub fn metrics(&self) -> String {
        let status = self.status();
        let core = self.core.borrow();
        let display = |k: &RouteKey| core.routes().get(k).map(|r| r.display.to_string());
        let certificates =
            self.tls.borrow().expiries().into_iter().filter_map(|(k, at)| Some((display(&k)?, at))).collect();
        let snapshot = crate::telemetry::Snapshot {
            limits: status.limits.iter().map(|l| (l.name.clone(), l.flag.clone(), l.limit, l.hits)).collect(),
            certificates,
            open: status.connections,
            parked: status.queued,
            sessions: status.sessions,
            routes: status.routes,
            uptime_s: status.uptime_s,
            log_dropped: self.shared.access.dropped.load(std::sync::atomic::Ordering::Relaxed),
        };
        self.shared.metrics.render(&snapshot)
    }
}

/// A route as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct RouteView {
    pub route: String,
    pub listen: String,
    #[serde(flatten)]
    pub target: TargetView,
    /// What became of its connections and requests since this process started.
    #[serde(default)]
    pub counts: Option<CountsView>,
}

/// A route's counters (the metrics' `portmux_connections_total` and friends).
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq, Default)]
pub struct CountsView {
    pub handed_off: u64,
    pub parked: u64,
    pub forwarded: u64,
    pub engine: u64,
    pub answered: u64,
    pub refused: u64,
    pub dropped: u64,
    /// Requests answered, by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub requests: [u64; 5],
    pub bytes_from_clients: u64,
    pub bytes_to_clients: u64,
}

impl CountsView {
    pub fn of(c: &crate::telemetry::RouteCounters) -> CountsView {
        use crate::telemetry::Outcome as O;
        CountsView {
            handed_off: c.get(O::HandedOff),
            parked: c.get(O::Parked),
            forwarded: c.get(O::Forwarded),
            engine: c.get(O::Engine),
            answered: c.get(O::Answered),
            refused: c.get(O::Refused),
            dropped: c.get(O::Dropped),
            requests: c.requests(),
            bytes_from_clients: c.from_clients.get(),
            bytes_to_clients: c.to_clients.get(),
        }
    }
}

/// Where a route's connections go.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TargetView {
    /// Handed to a service's instances.
    Service {
        service: String,
        instances: Vec<InstanceView>,
        /// Connections waiting for an instance.
        queued: usize,
        /// Of those, clients that shut down their sending side (they keep
        /// their place, and are the first to give it up when the queue is full).
        #[serde(default)]
        half_closed: usize,
        /// Seconds until the route is released, while no instance holds it.
        reserved_for_s: Option<u64>,
        /// Its port is lent (`?lend`): the instances holding it accept
        /// from it themselves, so its connections are not counted here.
        #[serde(default)]
        lent: bool,
    },
    /// Forwarded to backend addresses.
    Backends { policy: String, proxy: Option<String>, backends: Vec<BackendView> },
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct InstanceView {
    pub pid: i32,
    pub uid: u32,
    pub draining: bool,
    /// Connections sent and not yet acknowledged.
    pub unacked: usize,
    /// Hand-overs waiting for room in the session's socket (the service is
    /// not reading its control messages).
    #[serde(default)]
    pub waiting_for_room: usize,
    /// False while the route's health check (`health=/PATH`) keeps the
    /// session out of the rotation.
    #[serde(default = "yes")]
    pub healthy: bool,
    /// It holds the route's port (`?lend`) and accepts from it itself.
    #[serde(default)]
    pub lent: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct BackendView {
    pub addr: String,
    pub weight: u32,
    /// False while passive health skips it after a failed connect.
    pub healthy: bool,
    pub active: usize,
    pub connections: u64,
    pub failures: u64,
    pub endpoints: Vec<String>,
}

/// A listening socket as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct ListenerView {
    pub addr: String,
    /// Passed by socket activation: systemd owns it, it never closes.
    pub pinned: bool,
    pub routes: usize,
}

/// The process as the API shows it.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct StatusView {
    pub version: String,
    pub pid: u32,
    pub uptime_s: u64,
    /// serving, upgrading (frozen for a handover), handed_over, stopping.
    pub state: String,
    pub control: Option<String>,
    pub listeners: Vec<ListenerView>,
    pub sessions: usize,
    pub routes: usize,
    pub queued: usize,
    /// Connections this process is working on: being peeked at, relayed, answered.
    #[serde(default)]
    pub connections: usize,
    /// Of those, connections waiting for their next request: given back by
    /// services, or moved here between requests by the previous process.
    #[serde(default)]
    pub idle: usize,
    /// Connections being peeked at now.
    #[serde(default)]
    pub peeking: usize,
    /// Each limit, its value, and how often it refused something.
    #[serde(default)]
    pub limits: Vec<LimitView>,
    /// What the sandbox put in force (none: `--no-sandbox`).
    #[serde(default)]
    pub sandbox: Option<String>,
    /// Upgrades in a row that led to this process.
    #[serde(default)]
    pub upgrades: u64,
    /// Where forwarded flows are relayed: "kernel", or "user (why)".
    #[serde(default)]
    pub relay: String,
    /// Forwarded flows relayed so far in the kernel, and in user space.
    #[serde(default)]
    pub relayed: (u64, u64),
}

/// A limit as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitView {
    pub name: String,
    /// The flag that sets it.
    pub flag: String,
    pub limit: u64,
    pub hits: u64,
}

/// Every limit of `settings` with its count of hits.
pub fn limits(limits: &crate::config::Limits, hits: &crate::config::limits::Hits) -> Vec<LimitView> {
    crate::config::limits::Limit::ALL
        .iter()
        .map(|l| LimitView { name: l.name().into(), flag: l.flag(), limit: l.value(limits), hits: hits.get(*l) })
        .collect()
}

/// The view of the route at `key`.
pub fn route(
    core: &Core,
    sessions: &BTreeMap<SessionId, Arc<Session>>,
    key: &RouteKey,
    now: Instant,
) -> Option<RouteView> {
    let r = core.routes().get(key)?;
    let borrowers = core.listener_for(key.0).and_then(|l| core.borrowers(l));
    let holds = |id: &SessionId| borrowers.is_some_and(|b| b.contains(id));
    let target = match &r.target {
        RouteTarget::Backends(pool) => TargetView::Backends {
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
        RouteTarget::Service(s) => TargetView::Service {
            lent: s.sessions.iter().any(&holds),
            service: s.service.clone(),
            instances: s
                .sessions
                .iter()
                .filter_map(|id| Some((id, core.sessions().get(id)?, sessions.get(id))))
                .map(|(id, state, live)| InstanceView {
                    pid: state.peer.pid,
                    uid: state.peer.uid,
                    draining: state.draining,
                    unacked: live.map_or(0, |s| s.unacked_len()),
                    waiting_for_room: live.map_or(0, |s| s.waiting_for_room()),
                    healthy: !s.down.contains(id),
                    lent: holds(id),
                })
                .collect(),
            queued: s.queue.len(),
            half_closed: s.queue.iter().filter(|id| core.conn(**id).is_some_and(|h| h.half_closed)).count(),
            reserved_for_s: s.reserved_until.map(|t| t.saturating_duration_since(now).as_secs()),
        },
    };
    Some(RouteView { route: r.display.to_string(), listen: key.0.to_string(), target, counts: None })
}

/// Every route, in key order, with its counts.
pub fn routes(
    core: &Core,
    sessions: &BTreeMap<SessionId, Arc<Session>>,
    metrics: &crate::telemetry::Metrics,
    now: Instant,
) -> Vec<RouteView> {
    let counted = |mut v: RouteView| {
        v.counts = Some(CountsView::of(&metrics.route(&v.route)));
        v
    };
    core.routes().keys().filter_map(|k| route(core, sessions, k, now)).map(counted).collect()
}

/// The whole process.
pub fn status(core: &Core, control: Option<String>, uptime_s: u64, connections: usize, idle: usize) -> StatusView {
    let state = match core.mode() {
        Mode::Serving => "serving",
        Mode::Frozen => "upgrading",
        Mode::HandedOver => "handed_over",
        Mode::Stopped => "stopping",
    };
    let listeners = core
        .listeners()
        .values()
        .filter(|l| l.bound)
        .map(|l| ListenerView {
            addr: l.addr.to_string(),
            pinned: l.pinned,
            routes: core.routes().keys().filter(|k| k.0 == l.addr).count(),
        })
        .collect();
    let queued = core
        .routes()
        .values()
        .map(|r| match &r.target {
            RouteTarget::Service(s) => s.queue.len(),
            RouteTarget::Backends(_) => 0,
        })
        .sum();
    StatusView {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        uptime_s,
        state: state.into(),
        control,
        listeners,
        sessions: core.sessions().len(),
        routes: core.routes().len(),
        queued,
        connections,
        idle,
        peeking: 0,
        limits: Vec::new(),
        sandbox: None,
        upgrades: 0,
        relay: String::new(),
        relayed: (0, 0),
    }
}

impl super::driver::Control {
    /// The line printed once portmux serves (scripts may wait for it).
    pub fn ready_line(&self) -> String {
        let settings = &self.shared.settings;
        let sockets = self.sockets.borrow();
        let control = match (&settings.control, sockets.control.is_some()) {
            (Some(path), true) => format!("control socket {} (mode 0660)", path.display()),
            _ => "no control socket".into(),
        };
        let mut admin: Vec<String> = Vec::new();
        if let (Some(path), true) = (&settings.admin_socket, sockets.admin_unix.is_some()) {
            admin.push(format!("unix:{}", path.display()));
        }
        if let Some(addr) = sockets.admin.as_ref().and_then(|l| l.local_addr().ok()) {
            admin.push(format!("http://{addr}"));
        }
        let admin = if admin.is_empty() { "no admin API".into() } else { format!("admin API {}", admin.join(" ")) };
        format!(
            "portmux {} ready: {control}; {admin}; {} workers; listeners open on demand (default address {})",
            env!("CARGO_PKG_VERSION"),
            settings.workers,
            settings.bind
        )
    }
}
