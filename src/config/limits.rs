//! Limits on what one client, user or session can take, each with a safe
//! default (`portmux run --help` lists the flags) and counted when hit
//! (`/status` shows each limit and how often it refused).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The limits in force.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections portmux holds at once (being peeked at, queued, held, relayed).
    pub conns: usize,
    /// Connections one client address holds at once (being peeked at, held, relayed).
    pub conns_per_ip: usize,
    /// Connections being peeked at (their first bytes not in yet).
    pub peeking: usize,
    /// Connections queued for services that are away, all routes together.
    pub parked: usize,
    /// Control sessions (services connected), and per uid (root's and portmux's own are not limited per uid).
    pub sessions: usize,
    pub sessions_per_uid: usize,
    /// Routes one session may claim, and distinct listening addresses they may need.
    pub routes_per_session: usize,
    pub listeners_per_session: usize,
    /// Backends of one route.
    pub backends_per_route: usize,
    /// Admin API connections at once, how long one may take to send a request
    /// head, and the largest body it may send.
    pub admin_conns: usize,
    pub admin_header_timeout: Duration,
    pub admin_body: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            conns: 16384,
            conns_per_ip: 1024,
            peeking: 8192,
            parked: 8192,
            sessions: 4096,
            sessions_per_uid: 256,
            routes_per_session: 256,
            listeners_per_session: 64,
            backends_per_route: 256,
            admin_conns: 64,
            admin_header_timeout: Duration::from_secs(10),
            admin_body: 256 * 1024,
        }
    }
}

/// How many connections an open-file limit allows: a relayed one takes two
/// fds; 1024 are kept for listeners, sessions and the rest.
pub fn conns_for(nofile: u64) -> usize {
    let usable = nofile.saturating_sub(1024) / 2;
    usable.clamp(64, 1 << 20) as usize
}

/// Each limit, as named in `/status` and in refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Conns,
    ConnsPerIp,
    Peeking,
    Parked,
    Sessions,
    SessionsPerUid,
    RoutesPerSession,
    ListenersPerSession,
    BackendsPerRoute,
    AdminConns,
    AdminHeaderTimeout,
    AdminBody,
}

impl Limit {
    pub const ALL: [Limit; 12] = [
        Limit::Conns,
        Limit::ConnsPerIp,
        Limit::Peeking,
        Limit::Parked,
        Limit::Sessions,
        Limit::SessionsPerUid,
        Limit::RoutesPerSession,
        Limit::ListenersPerSession,
        Limit::BackendsPerRoute,
        Limit::AdminConns,
        Limit::AdminHeaderTimeout,
        Limit::AdminBody,
    ];

    /// The name in `/status`, and the flag that sets it (`--max-NAME`, or `--NAME` for the timeout).
    pub fn name(self) -> &'static str {
        match self {
            Limit::Conns => "conns",
            Limit::ConnsPerIp => "conns-per-ip",
            Limit::Peeking => "peeking",
            Limit::Parked => "parked",
            Limit::Sessions => "sessions",
            Limit::SessionsPerUid => "sessions-per-uid",
            Limit::RoutesPerSession => "routes-per-session",
            Limit::ListenersPerSession => "listeners-per-session",
            Limit::BackendsPerRoute => "backends-per-route",
            Limit::AdminConns => "admin-conns",
            Limit::AdminHeaderTimeout => "admin-header-timeout",
            Limit::AdminBody => "admin-body",
        }
    }

    /// The flag that sets it.
    pub fn flag(self) -> String {
        match self {
            Limit::AdminHeaderTimeout => "--admin-header-timeout".into(),
            Limit::AdminBody => "--max-admin-body".into(),
            l => format!("--max-{}", l.name()),
        }
    }

    /// Its value in `limits` (seconds for the timeout, bytes for the body).
    pub fn value(self, limits: &Limits) -> u64 {
        let n = match self {
            Limit::Conns => limits.conns,
            Limit::ConnsPerIp => limits.conns_per_ip,
            Limit::Peeking => limits.peeking,
            Limit::Parked => limits.parked,
            Limit::Sessions => limits.sessions,
            Limit::SessionsPerUid => limits.sessions_per_uid,
            Limit::RoutesPerSession => limits.routes_per_session,
            Limit::ListenersPerSession => limits.listeners_per_session,
            Limit::BackendsPerRoute => limits.backends_per_route,
            Limit::AdminConns => limits.admin_conns,
            Limit::AdminHeaderTimeout => return limits.admin_header_timeout.as_secs(),
            Limit::AdminBody => limits.admin_body,
        };
        n as u64
    }
}

/// How often each limit refused something.
#[derive(Debug, Default)]
pub struct Hits([AtomicU64; Limit::ALL.len()]);

impl Hits {
    pub fn hit(&self, limit: Limit) {
        self.0[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, limit: Limit) -> u64 {
        self.0[limit as usize].load(Ordering::Relaxed)
    }
}
