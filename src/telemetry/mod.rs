//! What portmux tells its operators about the traffic: Prometheus metrics
//! (prometheus-client's registry, exposed at the admin API's `/metrics`)
//! and the access log (`access.rs`), both fed from the same records made
//! where a connection or a request ends.
//!
//! Each route's counters are made once, when a table is published, and
//! carried in the route (`RouteCounters`): the hot path only adds to atomics.

pub mod access;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::net::SocketAddr;
use std::time::Duration;

/// What became of a connection, as the metrics and the access log name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Its fd went to a service.
    HandedOff,
    /// It waited in portmux for a service (queued, parked).
    Parked,
    /// It was relayed to a backend.
    Forwarded,
    /// The per-request engine served it (its requests are counted apart).
    Engine,
    /// portmux answered it itself: a redirect, an ACME challenge, `/services`.
    Answered,
    /// Refused: no route matches, or a limit.
    Refused,
    /// Closed without delivery: it sent nothing usable in time, or no
    /// backend or service could take it.
    Dropped,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::HandedOff,
        Outcome::Parked,
        Outcome::Forwarded,
        Outcome::Engine,
        Outcome::Answered,
        Outcome::Refused,
        Outcome::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::HandedOff => "handed_off",
            Outcome::Parked => "parked",
            Outcome::Forwarded => "forwarded",
            Outcome::Engine => "engine",
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
            Outcome::Dropped => "dropped",
        }
    }
}

/// Which side an error is on (as pingora-error records it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Backend,
    Service,
    Internal,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
            Side::Service => "service",
            Side::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteOutcome {
    route: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteDirection {
    route: String,
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteClass {
    route: String,
    class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SideLabel {
    side: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabel {
    limit: String,
    flag: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CertLabel {
    route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// A route's counters, shared by every table that has the route.
#[derive(Debug, Clone, Default)]
pub struct RouteCounters {
    outcomes: [Counter; Outcome::ALL.len()],
    pub from_clients: Counter,
    pub to_clients: Counter,
    /// Requests answered, by status class (1xx to 5xx).
    classes: [Counter; 5],
}

impl RouteCounters {
    pub fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].inc();
    }

    pub fn get(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome as usize].get()
    }

    /// A request answered with `status`.
    pub fn answered(&self, status: u16) {
        if let Some(c) = self.classes.get(usize::from(status / 100).wrapping_sub(1)) {
            c.inc();
        }
    }

    /// Requests answered so far, by class (1xx first).
    pub fn requests(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.classes[i].get())
    }

    /// Bytes relayed: from the client, to the client.
    pub fn relayed(&self, from_client: u64, to_client: u64) {
        self.from_clients.inc_by(from_client);
        self.to_clients.inc_by(to_client);
    }
}

/// Every metric portmux keeps, and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    accepted: Family<ListenerLabel, Counter>,
    connections: Family<RouteOutcome, Counter>,
    bytes: Family<RouteDirection, Counter>,
    requests: Family<RouteClass, Counter>,
    errors: Family<SideLabel, Counter>,
    /// From accept to the route decided (the first bytes peeked).
    pub peek: Histogram,
    /// From accept to the fd in the service's socket.
    pub handoff: Histogram,
    upgrades: Counter,
    upgrade_seconds: Histogram,
    limit: Family<LimitLabel, Gauge>,
    limit_hits: Family<LimitLabel, Counter>,
    cert_expiry: Family<CertLabel, Gauge>,
    open: Gauge,
    parked: Gauge,
    sessions: Gauge,
    routes: Gauge,
    uptime: Gauge,
    log_dropped: Counter,
    /// The routes that have series, to drop those of routes that are gone.
    known: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The counters of connections no route took (`route=""`), and of errors by side.
    unrouted: RouteCounters,
    sides: [Counter; 4],
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portmux");
        let seconds = || Histogram::new(exponential_buckets(0.000_05, 4.0, 10));
        let mut m = Metrics {
            registry: Registry::default(),
            accepted: Family::default(),
            connections: Family::default(),
            bytes: Family::default(),
            requests: Family::default(),
            errors: Family::default(),
            peek: seconds(),
            handoff: seconds(),
            upgrades: Counter::default(),
            upgrade_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
            limit: Family::default(),
            limit_hits: Family::default(),
            cert_expiry: Family::default(),
            open: Gauge::default(),
            parked: Gauge::default(),
            sessions: Gauge::default(),
            routes: Gauge::default(),
            uptime: Gauge::default(),
            log_dropped: Counter::default(),
            known: Default::default(),
            unrouted: RouteCounters::default(),
            sides: Default::default(),
        };
        let r = &mut registry;
        r.register("accepted_connections", "Connections accepted, by listener", m.accepted.clone());
        r.register(
            "connections",
            "Connections by route and what became of them (handed_off, parked, forwarded, engine, answered, refused, dropped)",
            m.connections.clone(),
        );
        r.register("relayed_bytes", "Bytes relayed, by route and direction", m.bytes.clone());
        r.register(
            "http_requests",
            "Requests the per-request engine answered, by route and status class",
            m.requests.clone(),
        );
        r.register("errors", "Errors by the side at fault (client, backend, service, internal)", m.errors.clone());
        r.register_with_unit("peek_duration", "From accept until the route was decided", Unit::Seconds, m.peek.clone());
        let handoff = "From accept until the fd was in the service's socket";
        r.register_with_unit("handoff_duration", handoff, Unit::Seconds, m.handoff.clone());
        r.register("upgrades", "Upgrades that led to this process (portmux upgrade, SIGUSR2)", m.upgrades.clone());
        let upgrade = "How long the upgrade to this process took";
        r.register_with_unit("upgrade_duration", upgrade, Unit::Seconds, m.upgrade_seconds.clone());
        r.register("limit", "Each limit's value", m.limit.clone());
        r.register("limit_hits", "How often each limit refused something", m.limit_hits.clone());
        let expiry = "When each https:// route's certificate expires (Unix time)";
        r.register_with_unit("certificate_expiry_timestamp", expiry, Unit::Seconds, m.cert_expiry.clone());
        r.register("open_connections", "Connections this process is working on", m.open.clone());
        r.register("parked_connections", "Connections waiting for a service", m.parked.clone());
        r.register("sessions", "Service sessions connected", m.sessions.clone());
        r.register("routes", "Routes", m.routes.clone());
        r.register_with_unit("uptime", "Since this process started", Unit::Seconds, m.uptime.clone());
        let dropped = "Access log lines dropped because its writer fell behind";
        r.register("access_log_dropped_lines", dropped, m.log_dropped.clone());
        for side in [Side::Client, Side::Backend, Side::Service, Side::Internal] {
            m.sides[side as usize] = m.errors.get_or_create_owned(&SideLabel { side: side.as_str() });
        }
        m.unrouted = m.route("");
        let info: Family<VersionLabel, Gauge> = Family::default();
        info.get_or_create(&VersionLabel { version: env!("CARGO_PKG_VERSION") }).set(1);
        r.register("build_info", "portmux's version", info);
        Metrics { registry, ..m }
    }

    /// Drops the series of routes not in `routes` (removed ones: their
    /// counts would otherwise stay until the process ends).
    pub fn retain_routes(&self, routes: &std::collections::HashSet<&str>) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.retain(|route| {
            if route.is_empty() || routes.contains(route.as_str()) {
                return true;
            }
            for o in Outcome::ALL {
                self.connections.remove(&RouteOutcome { route: route.clone(), outcome: o.as_str() });
            }
            for direction in ["from_client", "to_client"] {
                self.bytes.remove(&RouteDirection { route: route.clone(), direction });
            }
            for class in CLASSES {
                self.requests.remove(&RouteClass { route: route.clone(), class });
            }
            self.cert_expiry.remove(&CertLabel { route: route.clone() });
            false
        });
    }

    /// Whether `route` has series (it is in a published table).
    fn has(&self, route: &str) -> bool {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).contains(route)
    }

    /// The counters of route `route` (its canonical spec), made on first use.
    pub fn route(&self, route: &str) -> RouteCounters {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).insert(route.to_string());
        let outcome = |o: Outcome| {
            self.connections.get_or_create_owned(&RouteOutcome { route: route.to_string(), outcome: o.as_str() })
        };
        let direction = |d| self.bytes.get_or_create_owned(&RouteDirection { route: route.to_string(), direction: d });
        RouteCounters {
            outcomes: Outcome::ALL.map(outcome),
            from_clients: direction("from_client"),
            to_clients: direction("to_client"),
            classes: CLASSES
                .map(|class| self.requests.get_or_create_owned(&RouteClass { route: route.to_string(), class })),
        }
    }

    /// A connection no route took (`route` ""), or one counted late.
    pub fn count(&self, route: &str, outcome: Outcome) {
        if route.is_empty() {
            // Made once: refusals come in floods.
            return self.unrouted.count(outcome);
        }
        if !self.has(route) {
            return; // The route went meanwhile: its series are gone.
        }
        self.connections.get_or_create(&RouteOutcome { route: route.to_string(), outcome: outcome.as_str() }).inc();
    }

    /// A request answered with `status` on `route` (counted late, or on no route: "").
    pub fn request(&self, route: &str, status: u16) {
        if let Some(class) = CLASSES.get(usize::from(status / 100).wrapping_sub(1)) {
            self.requests.get_or_create(&RouteClass { route: route.to_string(), class }).inc();
        }
    }

    /// The accept counter of `listener`.
    pub fn accepted(&self, listener: SocketAddr) -> Counter {
        self.accepted.get_or_create_owned(&ListenerLabel { listener: listener.to_string() })
    }

    /// A relay of `route` ended (one resumed after an upgrade, or forwarded
    /// by the control plane), with its bytes.
    pub fn forwarded(&self, route: &str, reached: bool, from_client: u64, to_client: u64) {
        if !self.has(route) {
            return;
        }
        self.count(route, if reached { Outcome::Forwarded } else { Outcome::Dropped });
        self.relayed(route, from_client, to_client);
    }

    /// Bytes a connection of `route` carried whose outcome is counted
    /// already (a switched request's connection, resumed after an upgrade).
    pub fn relayed(&self, route: &str, from_client: u64, to_client: u64) {
        if !self.has(route) {
            return;
        }
        let bytes = |direction| RouteDirection { route: route.to_string(), direction };
        self.bytes.get_or_create(&bytes("from_client")).inc_by(from_client);
        self.bytes.get_or_create(&bytes("to_client")).inc_by(to_client);
    }

    /// The control plane handed a queued connection of `route` over.
    pub fn delivered(&self, route: &str, arrived: std::time::Instant) {
        self.count(route, Outcome::HandedOff);
        self.handoff.observe(arrived.elapsed().as_secs_f64());
    }

    pub fn error(&self, side: Side) {
        self.sides[side as usize].inc();
    }

    /// The previous process had come from `count` upgrades in a row.
    pub fn inherit_upgrades(&self, count: u64) {
        self.upgrades.inc_by(count.saturating_sub(self.upgrades.get()));
    }

    /// This process came from an upgrade that took `took`.
    pub fn upgraded(&self, took: Duration) {
        self.upgrades.inc();
        self.upgrade_seconds.observe(took.as_secs_f64());
    }

    pub fn upgrades(&self) -> u64 {
        self.upgrades.get()
    }

    /// Renders every metric in the text exposition format, with the values
    /// only known at a scrape.
    pub fn render(&self, now: &Snapshot) -> String {
        for (limit, flag, value, hits) in &now.limits {
            let label = LimitLabel { limit: limit.clone(), flag: flag.clone() };
            self.limit.get_or_create(&label).set(i64::try_from(*value).unwrap_or(i64::MAX));
            let counter = self.limit_hits.get_or_create(&label);
            counter.inc_by(hits.saturating_sub(counter.get()));
        }
        self.cert_expiry.clear();
        for (route, at) in &now.certificates {
            self.cert_expiry.get_or_create(&CertLabel { route: route.clone() }).set(*at);
        }
        let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.open.set(gauge(now.open));
        self.parked.set(gauge(now.parked));
        self.sessions.set(gauge(now.sessions));
        self.routes.set(gauge(now.routes));
        self.uptime.set(i64::try_from(now.uptime_s).unwrap_or(i64::MAX));
        self.log_dropped.inc_by(now.log_dropped.saturating_sub(self.log_dropped.get()));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What a scrape reads from the running state.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// (name, flag, value, hits) of each limit.
    pub limits: Vec<(String, String, u64, u64)>,
    /// (route, expiry as Unix time) of each certificate in use.
    pub certificates: Vec<(String, i64)>,
    pub open: usize,
    pub parked: usize,
    pub sessions: usize,
    pub routes: usize,
    pub uptime_s: u64,
    /// Access log lines dropped so far.
    pub log_dropped: u64,
}
