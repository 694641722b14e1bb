//! Backends of a forwarding route: their addresses, weights, passive health and
//! live counts, and the load-balancing choice among them (lock-free).

pub use crate::config::{BackendSpec, Resolved};
use portmux_sys::net::Endpoint;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How a route chooses among its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest active connections relative to weight.
    LeastConn,
}

impl Policy {
    pub fn parse(s: &str) -> Result<Policy, String> {
        match s.replace('-', "_").as_str() {
            "round_robin" | "rr" => Ok(Policy::RoundRobin),
            "least_conn" | "least_connections" | "lc" => Ok(Policy::LeastConn),
            _ => Err(format!("unknown policy '{s}'; use round_robin or least_conn")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastConn => "least_conn",
        }
    }
}

/// Which PROXY protocol header, if any, a route sends to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyVersion {
    V1,
    V2,
}

impl ProxyVersion {
    pub fn parse(s: &str) -> Result<Option<ProxyVersion>, String> {
        match s {
            "v1" | "1" => Ok(Some(ProxyVersion::V1)),
            "v2" | "2" => Ok(Some(ProxyVersion::V2)),
            "" | "none" | "off" => Ok(None),
            _ => Err(format!("unknown PROXY protocol version '{s}'; use v1, v2 or none")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

/// Milliseconds since the process started; 0 means "never".
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One backend, shared by every route that lists it under the same name, and
/// by every connection relayed to it (so removing it never touches those).
#[derive(Debug)]
pub struct Backend {
    pub spec: BackendSpec,
    /// Addresses to try, in order (a host name may resolve to several).
    pub endpoints: Vec<Endpoint>,
    active: AtomicUsize,
    connections: AtomicU64,
    failures: AtomicU64,
    down_until: AtomicU64,
    /// Active health checks failed it (`health_fall` in a row) and have not
    /// passed it again (`health_rise` in a row) since.
    checked_down: AtomicBool,
    /// Checks in a row that passed (> 0) or failed (< 0).
    streak: AtomicI64,
}

impl Backend {
    pub fn new(spec: BackendSpec, endpoints: Vec<Endpoint>) -> Backend {
        Backend {
            spec,
            endpoints,
            active: AtomicUsize::new(0),
            connections: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            down_until: AtomicU64::new(0),
            checked_down: AtomicBool::new(false),
            streak: AtomicI64::new(0),
        }
    }

    /// Whether health (active checks, or passive after a failed connect) currently skips it.
    pub fn is_down(&self) -> bool {
        self.checked_down.load(Ordering::Relaxed) || self.down_until.load(Ordering::Relaxed) > now_ms()
    }

    /// Whether active checks have it in the rotation (true without checks).
    pub fn passes_checks(&self) -> bool {
        !self.checked_down.load(Ordering::Relaxed)
    }

    /// No active check follows it any more: back in the rotation.
    pub fn unchecked(&self) {
        self.checked_down.store(false, Ordering::Relaxed);
        self.streak.store(0, Ordering::Relaxed);
    }

    /// One active check's result; `Some(in rotation)` when it changes the
    /// backend's state. A passing check also ends a passive cooldown (it
    /// connected, and got the answer a check wants).
    pub fn checked(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.down_until.store(0, Ordering::Relaxed);
        }
        // One task checks a backend: these loads and stores do not race.
        let mut verdict = super::health::Verdict {
            streak: self.streak.load(Ordering::Relaxed),
            down: self.checked_down.load(Ordering::Relaxed),
        };
        let changed = verdict.record(ok, rise, fall);
        self.streak.store(verdict.streak, Ordering::Relaxed);
        self.checked_down.store(verdict.down, Ordering::Relaxed);
        changed
    }

    /// A connect failed: skip it for `cooldown`.
    pub fn mark_failed(&self, cooldown: Duration) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.down_until.store(now_ms() + cooldown.as_millis() as u64, Ordering::Relaxed);
    }

    /// A connect succeeded: counts one more active connection until the guard drops.
    pub fn connected(self: &Arc<Self>) -> ActiveGuard {
        self.down_until.store(0, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// Counts a relayed connection as active on its backend while it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backends of one route and how to choose among them.
#[derive(Debug)]
pub struct BackendPool {
    pub backends: Vec<Arc<Backend>>,
    pub policy: Policy,
    pub proxy: Option<ProxyVersion>,
    /// Smooth weighted round-robin order of backend indexes.
    schedule: Vec<usize>,
    cursor: AtomicUsize,
    /// How many requests may still be tried again on another backend.
    pub budget: RetryBudget,
}

/// Retries may add at most a fifth to a route's requests, plus a reserve of
/// ten (the rule of Finagle's and linkerd's retry budgets): each request
/// deposits a fifth of a retry (up to a hundred kept), each retry takes one.
/// So a failing backend cannot make retries multiply the load on the others.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a retry.
    milli: AtomicI64,
    refused: AtomicU64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget { milli: AtomicI64::new(10_000), refused: AtomicU64::new(0) }
    }
}

impl RetryBudget {
    /// A request arrived.
    pub fn deposit(&self) {
        let _ = self.milli.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| (m < 100_000).then_some(m + 200));
    }

    /// Takes one retry; false when the budget is spent (counted).
    pub fn withdraw(&self) -> bool {
        let ok = self.milli.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| (m >= 1000).then_some(m - 1000));
        if ok.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok.is_ok()
    }

    /// Retries the budget refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl BackendPool {
    pub fn new(backends: Vec<Arc<Backend>>, policy: Policy, proxy: Option<ProxyVersion>) -> BackendPool {
        let schedule = smooth_schedule(&backends.iter().map(|b| b.spec.weight).collect::<Vec<_>>());
        BackendPool { backends, policy, proxy, schedule, cursor: AtomicUsize::new(0), budget: RetryBudget::default() }
    }

    /// The next backend to try, never one in `tried`. Backends marked down are
    /// skipped unless every untried backend is down (then they are tried anyway:
    /// a guess beats certain failure).
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let untried: Vec<usize> = (0..self.backends.len()).filter(|i| !tried.contains(i)).collect();
        if untried.is_empty() {
            return None;
        }
        let any_up = untried.iter().any(|&i| !self.backends[i].is_down());
        let eligible = |i: usize| !tried.contains(&i) && (!any_up || !self.backends[i].is_down());
        let turn = self.cursor.fetch_add(1, Ordering::Relaxed);
        match self.policy {
            Policy::RoundRobin => {
                let n = self.schedule.len();
                (0..n).map(|k| self.schedule[(turn + k) % n]).find(|&i| eligible(i))
            }
            Policy::LeastConn => {
                let n = self.backends.len();
                // Rotate the starting point so ties spread across backends.
                (0..n).map(|k| (turn + k) % n).filter(|&i| eligible(i)).min_by_key(|&i| {
                    let b = &self.backends[i];
                    // active / weight, compared exactly: a/w < c/v ⇔ a·v < c·w.
                    (b.active() as u64 * 1_000_000) / u64::from(b.spec.weight)
                })
            }
        }
    }
}

/// Smooth weighted round robin (as nginx does it), precomputed: with weights
/// 5,1,1 the order is a a b a c a a, never five a's in a row.
fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let Some((best, _)) = current.iter().enumerate().max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i))) else {
            break;
        };
        current[best] -= total;
        out.push(best);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(weights: &[u32], policy: Policy) -> BackendPool {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let spec = BackendSpec { name: format!("127.0.0.1:{}", 9000 + i), weight: w };
                Arc::new(Backend::new(spec, vec![]))
            })
            .collect();
        BackendPool::new(backends, policy, None)
    }

    #[test]
    fn the_retry_budget_allows_ten_then_a_fifth_of_the_requests() {
        let b = RetryBudget::default();
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10, "the reserve");
        for _ in 0..50 {
            b.deposit();
        }
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10, "a fifth of 50 requests");
        assert_eq!(b.refused(), 20);
        for _ in 0..10_000 {
            b.deposit();
        }
        assert_eq!((0..200).filter(|_| b.withdraw()).count(), 100, "at most a hundred are kept");
    }

    #[test]
    fn checks_take_a_backend_out_after_fall_failures_and_back_after_rise_passes() {
        let p = pool(&[1, 1], Policy::RoundRobin);
        let b = &p.backends[0];
        assert_eq!(b.checked(false, 2, 3), None);
        assert_eq!(b.checked(true, 2, 3), None, "a pass resets the failures");
        assert_eq!((b.checked(false, 2, 3), b.checked(false, 2, 3)), (None, None));
        assert_eq!(b.checked(false, 2, 3), Some(false), "three in a row: out");
        assert!(b.is_down() && !b.passes_checks());
        assert!((0..4).all(|_| p.pick(&[]) == Some(1)), "only the other is chosen");
        assert_eq!(p.pick(&[1]), Some(0), "when nothing else is left, a checked-out backend is still tried");
        assert_eq!((b.checked(true, 2, 3), b.checked(true, 2, 3)), (None, Some(true)), "two passes: back");
        b.mark_failed(Duration::from_secs(60));
        assert!(b.is_down());
        b.checked(true, 2, 3);
        assert!(!b.is_down(), "a passing check ends a passive cooldown");
    }

    #[test]
    fn backend_specs_parse_with_clear_errors() {
        assert_eq!(
            BackendSpec::parse("127.0.0.1:9001").unwrap(),
            BackendSpec { name: "127.0.0.1:9001".into(), weight: 1 }
        );
        assert_eq!(BackendSpec::parse(" localhost:80@3 ").unwrap().weight, 3);
        assert_eq!(BackendSpec::parse("[::1]:80").unwrap().name, "[::1]:80");
        assert_eq!(BackendSpec::parse("unix:/run/a.sock@2").unwrap().name, "unix:/run/a.sock");
        assert!(BackendSpec::parse("localhost").unwrap_err().contains("host:port"));
        assert!(BackendSpec::parse("localhost:0").is_err());
        assert!(BackendSpec::parse("a:1@0").unwrap_err().contains("out of range"));
        assert!(BackendSpec::parse("a:1@101").unwrap_err().contains("out of range"));
        assert!(BackendSpec::parse("unix:run.sock").unwrap_err().contains("absolute path"));
        assert_eq!(BackendSpec::parse_list("a:1, b:2,").unwrap().len(), 2);
        assert!(BackendSpec::parse_list(" , ").unwrap_err().contains("no backends"));
        assert_eq!(BackendSpec::parse("a:1@3").unwrap().to_string(), "a:1@3");
        assert!(matches!(BackendSpec::parse("localhost:1").unwrap().resolve().unwrap()[0], Endpoint::Tcp(_)));
    }

    #[test]
    fn smooth_round_robin_interleaves_by_weight() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[1, 1, 1]), [0, 1, 2]);
        let p = pool(&[3, 1], Policy::RoundRobin);
        let picks: Vec<usize> = (0..8).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6);
    }

    #[test]
    fn down_backends_are_skipped_unless_all_are_down() {
        let p = pool(&[1, 1, 1], Policy::RoundRobin);
        p.backends[1].mark_failed(Duration::from_secs(60));
        for _ in 0..9 {
            assert_ne!(p.pick(&[]), Some(1));
        }
        assert_eq!(p.pick(&[0, 2]), Some(1), "the only untried backend is tried even if down");
        assert_eq!(p.pick(&[0, 1, 2]), None);
        let _up = p.backends[1].connected();
        assert!(!p.backends[1].is_down(), "a success clears the mark");
    }

    #[test]
    fn least_connections_prefers_the_idlest_relative_to_weight() {
        let p = pool(&[1, 1, 2], Policy::LeastConn);
        let _a = p.backends[0].connected();
        let _b = (p.backends[1].connected(), p.backends[1].connected());
        let _c = (p.backends[2].connected(), p.backends[2].connected());
        // active/weight: 1, 2, 1 → 0 or 2; with one more on 0 only 2 remains.
        assert!(matches!(p.pick(&[]), Some(0 | 2)));
        let _a2 = p.backends[0].connected();
        assert_eq!(p.pick(&[]), Some(2));
        drop(_c);
        assert_eq!(p.backends[2].active(), 0);
        assert_eq!(p.pick(&[]), Some(2));
    }
}
