//! The immutable route table that workers match against, and the decision of
//! what to do with a classified connection.
//!
//! The control plane builds a new [`Table`] on every change and publishes it as
//! an `Arc`; workers load it without locks. [`Matcher`] holds the matching
//! rules alone, so the control plane's core matches exactly as workers do.

mod services;
pub use services::ServicesApi;

use crate::classify::Peeked;
use crate::forward::backend::BackendPool;
use crate::handoff::Session;
use crate::ids::ListenerId;
use crate::reply::Reply;
use portmux_wire::spec::{RouteSpec, Scheme, normalize_path};
use portmux_wire::{ConnMeta, Proto};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Identifies a route: its listening address and its canonical spec without
/// the listening address and the service name.
pub type RouteKey = (SocketAddr, Arc<str>);

/// A route's identity on its listening address.
pub fn route_key(spec: &RouteSpec, default_bind: std::net::IpAddr) -> RouteKey {
    (spec.listen_addr(default_bind), spec.identity().into())
}

/// A public listening socket, shared by all workers (each accepts on it).
#[derive(Debug)]
pub struct Listener {
    pub id: ListenerId,
    pub addr: SocketAddr,
    pub fd: OwnedFd,
    /// What `defer_accept` last set: 0 unknown (inherited socket), 1 off, 2 on.
    deferred: AtomicU8,
}

impl Listener {
    pub fn new(id: ListenerId, addr: SocketAddr, fd: OwnedFd) -> Listener {
        Listener { id, addr, fd, deferred: AtomicU8::new(0) }
    }

    /// Lets the kernel hold new connections until their first bytes arrive
    /// (TCP_DEFER_ACCEPT, 1 s) when every route on the port is one where the
    /// client speaks first (http://, tls://): each connection then reaches a
    /// worker with its head already there, which saves a readiness wait and a
    /// wakeup per connection. A client that stays silent is accepted after
    /// about a second and meets the peek deadline as before. Off while a
    /// tcp:// route may serve a protocol where the server speaks first.
    pub fn defer_accept(&self, on: bool) {
        let want = if on { 2 } else { 1 };
        if self.deferred.swap(want, Ordering::Relaxed) == want {
            return;
        }
        if let Err(e) = portmux_sys::net::set_defer_accept(self.fd.as_fd(), u32::from(on)) {
            self.deferred.store(0, Ordering::Relaxed);
            tracing::warn!(addr = %self.addr, "cannot set TCP_DEFER_ACCEPT: {e}");
        }
    }
}

/// One snapshot of everything workers need.
#[derive(Debug, Default)]
pub struct Table {
    pub ports: HashMap<ListenerId, Arc<PortRoutes>>,
    /// Who may read `GET /services` (`services.rs`).
    pub services: ServicesApi,
}

impl Table {
    pub fn port(&self, id: ListenerId) -> Option<&Arc<PortRoutes>> {
        self.ports.get(&id)
    }
}

/// The routes of one listening socket, most specific first, each with a
/// value: the workers' [`Route`], the control core's route key.
#[derive(Debug, Clone)]
pub struct Matcher<T> {
    /// The whole-port route: takes what no other route on the port matches.
    tcp: Option<T>,
    /// Most specific first (host rank, then path length).
    http: Vec<(RouteSpec, T)>,
    /// By SNI, most specific first: `tls://` (passed through) and `https://`
    /// (terminated, then matched again by Host and path).
    tls: Vec<(RouteSpec, T)>,
}

impl<T> Default for Matcher<T> {
    fn default() -> Self {
        Matcher { tcp: None, http: Vec::new(), tls: Vec::new() }
    }
}

impl<T> Matcher<T> {
    /// Sorts `routes` most specific first.
    pub fn new(routes: impl IntoIterator<Item = (RouteSpec, T)>) -> Matcher<T> {
        let mut m = Matcher::default();
        for (spec, value) in routes {
            match spec.scheme {
                Scheme::Tcp => m.tcp = Some(value),
                Scheme::Http => m.http.push((spec, value)),
                Scheme::Tls | Scheme::Https => m.tls.push((spec, value)),
            }
        }
        let specificity = |(s, _): &(RouteSpec, T)| (s.host.rank(), s.path.as_ref().map_or(0, String::len));
        m.http.sort_by_key(|r| std::cmp::Reverse(specificity(r)));
        m.tls.sort_by_key(|r| std::cmp::Reverse(specificity(r)));
        m
    }

    /// After termination: the `https://` route for the request's Host and
    /// (normalised) path.
    pub fn terminated(&self, host: Option<&str>, path: &str) -> Option<&T> {
        self.tls
            .iter()
            .find(|(s, _)| s.scheme == Scheme::Https && s.host.matches(host) && s.matches_path(path))
            .map(|(_, v)| v)
    }

    /// The HTTP routes (plain, or terminated) that a request with this Host may reach.
    pub fn reachable<'a>(&'a self, host: Option<&'a str>, terminated: bool) -> impl Iterator<Item = &'a T> + 'a {
        let list = if terminated { &self.tls } else { &self.http };
        let scheme = if terminated { Scheme::Https } else { Scheme::Http };
        list.iter().filter(move |(s, _)| s.scheme == scheme && s.host.matches(host)).map(|(_, v)| v)
    }

    /// Every route of the port.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.tcp.iter().chain(self.http.iter().chain(&self.tls).map(|(_, v)| v))
    }

    /// The whole-port route, if there is one.
    pub fn tcp(&self) -> Option<&T> {
        self.tcp.as_ref()
    }

    /// A port with only a whole-port route is not peeked at all (server-speaks-first
    /// protocols work); any other port is.
    pub fn needs_peek(&self) -> bool {
        !(self.tcp.is_some() && self.http.is_empty() && self.tls.is_empty())
    }

    /// Whether every route here is an HTTP one (a refusal can be an HTTP answer).
    pub fn http_only(&self) -> bool {
        self.tcp.is_none() && self.tls.is_empty() && !self.http.is_empty()
    }

    /// Whether every route here is one where the client speaks first.
    pub fn client_speaks_first(&self) -> bool {
        self.tcp.is_none()
    }

    /// What is worth parsing on this port. Without a whole-port route, HTTP is
    /// parsed even on a TLS-only port, to answer plain HTTP with a readable 400.
    pub fn want(&self) -> crate::classify::Want {
        crate::classify::Want { tls: !self.tls.is_empty(), http: !self.http.is_empty() || self.tcp.is_none() }
    }

    /// The route for a connection with this metadata (SNI for TLS, Host and
    /// path for HTTP, the whole-port route otherwise or as a fallback).
    pub fn lookup(&self, meta: &ConnMeta) -> Option<&T> {
        let specific = match meta.proto {
            Proto::Tls => self.tls.iter().find(|(s, _)| s.host.matches(meta.sni.as_deref())).or_else(|| {
                // A client that sends no server name gets the default
                // certificate: the first (most specific) `https://` route's.
                meta.sni.is_none().then(|| self.tls.iter().find(|(s, _)| s.scheme == Scheme::Https)).flatten()
            }),
            Proto::Http => {
                let path = normalize_path(meta.path.as_deref().unwrap_or("/"));
                self.http.iter().find(|(s, _)| s.host.matches(meta.host.as_deref()) && s.matches_path(&path))
            }
            Proto::Tcp => None,
        };
        specific.map(|(_, v)| v).or(self.tcp.as_ref())
    }

    /// The answer when nothing on this port (`port`) matches.
    pub fn no_route(&self, meta: &ConnMeta, port: u16) -> Reply {
        match meta.proto {
            Proto::Tls => Reply::tls_alert(crate::reply::ALERT_UNRECOGNIZED_NAME),
            Proto::Http if self.http.is_empty() && !self.tls.is_empty() => {
                Reply::bad_request("plain HTTP was sent to a port that expects TLS")
            }
            Proto::Http => Reply::not_found(meta.host.as_deref(), meta.path.as_deref(), port),
            Proto::Tcp => Reply::Close,
        }
    }
}

/// The routes of one listening socket, as workers use them.
#[derive(Debug)]
pub struct PortRoutes {
    pub listener: Arc<Listener>,
    pub routes: Matcher<Arc<Route>>,
    /// Lent to the sessions of its `?lend` route: no worker accepts on it.
    pub lent: bool,
}

/// A route and where its connections go now.
#[derive(Debug)]
pub struct Route {
    /// Canonical spec (without the service name); what services see in `ConnMeta::route`.
    pub key: Arc<str>,
    pub ident: RouteKey,
    pub spec: RouteSpec,
    pub target: Target,
    /// `https://`: the TLS server side (its certificate); `None` if it could not be loaded.
    pub tls: Option<Arc<crate::tls::Terminator>>,
    /// Who serves it, whatever its target is now (while an upgrade has the
    /// state frozen, every target is the queue).
    pub owner: Owner,
    /// Its metrics (the same counters in every table that has the route).
    pub counters: crate::telemetry::RouteCounters,
}

/// Who serves a route.
#[derive(Debug, Clone)]
pub enum Owner {
    /// The sessions of this service.
    Service(Arc<str>),
    /// These backends.
    Backends(Arc<BackendPool>),
}

impl Route {
    /// Whether the per-request engine serves this route's HTTP connections
    /// (`host`: the first request's): a route to backends unless it asks for
    /// `mode=connection`; a service's route when another owner has a route
    /// the same Host can reach (a path route of another service, or
    /// backends), so that each request must be routed by itself.
    pub fn per_request(&self, routes: &Matcher<Arc<Route>>, host: Option<&str>) -> bool {
        match &self.owner {
            Owner::Backends(_) => !self.spec.connection_mode(),
            Owner::Service(me) => routes.reachable(host, self.spec.scheme == Scheme::Https).any(|r| match &r.owner {
                Owner::Service(other) => other != me,
                Owner::Backends(_) => !r.spec.connection_mode(),
            }),
        }
    }
}

/// Where a route's connections go.
#[derive(Debug)]
pub enum Target {
    /// Straight to one of these sessions (round robin).
    Pool(Pool),
    /// Through the control plane, which queues them in arrival order (the
    /// service is restarting, draining, or older connections are still queued).
    Queue,
    /// To one of these backend addresses (the worker connects and relays).
    Forward(Arc<BackendPool>),
}

/// Live, non-draining sessions of one service for a route.
#[derive(Debug)]
pub struct Pool {
    pub sessions: Vec<Arc<Session>>,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(sessions: Vec<Arc<Session>>) -> Pool {
        Pool { sessions, next: AtomicUsize::new(0) }
    }

    /// The sessions in the order to try them: round robin, each once.
    pub fn order(&self) -> impl Iterator<Item = &Arc<Session>> {
        let n = self.sessions.len();
        let start = if n > 1 { self.next.fetch_add(1, Ordering::Relaxed) % n } else { 0 };
        (0..n).map(move |i| &self.sessions[(start + i) % n])
    }
}

impl PortRoutes {
    /// Builds a port's routes, sorting them most specific first.
    pub fn new(listener: Arc<Listener>, routes: Vec<Arc<Route>>) -> PortRoutes {
        PortRoutes { listener, routes: Matcher::new(routes.into_iter().map(|r| (r.spec.clone(), r))), lent: false }
    }

    /// Decides what happens to a peeked connection: the route to deliver it on
    /// (with `meta` completed), or the answer portmux gives itself.
    pub fn decide(&self, peek: Peeked, meta: &mut ConnMeta) -> Result<Arc<Route>, Reply> {
        let fallback = |reply: Reply| self.routes.tcp().cloned().ok_or(reply);
        let mut tls12 = true;
        match peek {
            Peeked::Tls(hello) => {
                meta.proto = Proto::Tls;
                meta.sni = hello.sni;
                meta.alpn = hello.alpn;
                tls12 = hello.tls12;
            }
            Peeked::Http(head) => {
                meta.proto = Proto::Http;
                meta.host = head.host;
                meta.path = Some(head.target);
            }
            Peeked::Other { tls: true } => return fallback(Reply::tls_alert(crate::reply::ALERT_UNRECOGNIZED_NAME)),
            Peeked::Other { tls: false } => return fallback(Reply::Close),
            Peeked::Invalid { tls: true, .. } => return fallback(Reply::tls_alert(crate::reply::ALERT_DECODE_ERROR)),
            Peeked::Invalid { tls: false, reason } => return fallback(Reply::bad_request(reason)),
            Peeked::TooLarge { tls: true } => return fallback(Reply::tls_alert(crate::reply::ALERT_DECODE_ERROR)),
            Peeked::TooLarge { tls: false } => return fallback(Reply::too_large()),
            Peeked::TimedOut => return fallback(Reply::Abort),
            // Consume what it sent so the close is a FIN, not a reset.
            Peeked::HungUp => return Err(Reply::Close),
            Peeked::Failed(_) => return Err(Reply::Abort),
        }
        if let Some(route) = self.routes.lookup(meta) {
            if route.spec.scheme == Scheme::Https && !tls12 {
                // portmux terminates TLS 1.2 and 1.3 only (tls:// leaves it to the service).
                return Err(Reply::tls_alert(crate::reply::ALERT_PROTOCOL_VERSION));
            }
            meta.route = route.key.to_string();
            return Ok(route.clone());
        }
        Err(self.routes.no_route(meta, self.listener.addr.port()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{http::RequestHead, tls::ClientHello};

    fn listener() -> Arc<Listener> {
        let fd = portmux_sys::net::tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        Arc::new(Listener::new(ListenerId(1), "127.0.0.1:8000".parse().unwrap(), fd))
    }

    fn route(spec: &str) -> Arc<Route> {
        let spec = RouteSpec::parse(spec).unwrap();
        let ident = ("127.0.0.1:8000".parse().unwrap(), spec.key().into());
        let owner = Owner::Service("a".into());
        let counters = Default::default();
        Arc::new(Route { key: spec.key().into(), ident, spec, target: Target::Queue, tls: None, owner, counters })
    }

    fn meta() -> ConnMeta {
        ConnMeta {
            route: String::new(),
            proto: Proto::Tcp,
            peer: "127.0.0.1:1".parse().unwrap(),
            local: "127.0.0.1:8000".parse().unwrap(),
            sni: None,
            alpn: vec![],
            host: None,
            path: None,
            peeked: 0,
        }
    }

    fn http(port: &PortRoutes, host: Option<&str>, target: &str) -> Result<String, Reply> {
        let head = RequestHead {
            host: host.map(Into::into),
            target: target.into(),
            len: 0,
            body: crate::classify::http::Framing::None,
            upgrade: false,
        };
        port.decide(Peeked::Http(head), &mut meta()).map(|r| r.key.to_string())
    }

    fn tls(port: &PortRoutes, sni: Option<&str>) -> Result<String, Reply> {
        let hello = ClientHello { sni: sni.map(Into::into), alpn: vec![], tls12: true, chacha_first: false };
        port.decide(Peeked::Tls(hello), &mut meta()).map(|r| r.key.to_string())
    }

    #[test]
    fn most_specific_route_wins() {
        let port = PortRoutes::new(
            listener(),
            [
                "http://:8000",
                "http://:8000/a",
                "http://:8000/a/b",
                "http://*.example.test:8000",
                "http://*.b.example.test:8000",
                "http://api.example.test:8000",
                "http://api.example.test:8000/v2",
            ]
            .into_iter()
            .map(route)
            .collect(),
        );
        assert_eq!(http(&port, None, "/").unwrap(), "http://:8000");
        assert_eq!(http(&port, None, "/a/x").unwrap(), "http://:8000/a");
        assert_eq!(http(&port, None, "/a/b/c?q").unwrap(), "http://:8000/a/b");
        assert_eq!(http(&port, None, "/ab").unwrap(), "http://:8000");
        assert_eq!(http(&port, None, "/x/../a/b").unwrap(), "http://:8000/a/b");
        assert_eq!(http(&port, Some("www.example.test"), "/a").unwrap(), "http://*.example.test:8000");
        assert_eq!(http(&port, Some("x.b.example.test"), "/").unwrap(), "http://*.b.example.test:8000");
        assert_eq!(http(&port, Some("api.example.test"), "/a").unwrap(), "http://api.example.test:8000");
        assert_eq!(http(&port, Some("api.example.test"), "/v2/x").unwrap(), "http://api.example.test:8000/v2");
        assert_eq!(http(&port, Some("other.test"), "/a").unwrap(), "http://:8000/a");
    }

    #[test]
    fn no_match_answers_by_protocol_and_tcp_is_the_fallback() {
        let port = PortRoutes::new(listener(), vec![route("http://a.test:8000"), route("tls://b.test:8000")]);
        assert!(port.routes.needs_peek());
        assert!(matches!(http(&port, Some("z.test"), "/"), Err(Reply::Http { status: 404, .. })));
        assert!(matches!(tls(&port, Some("z.test")), Err(Reply::TlsAlert(_))));
        assert!(matches!(tls(&port, None), Err(Reply::TlsAlert(_))));
        assert_eq!(tls(&port, Some("b.test")).unwrap(), "tls://b.test:8000");

        let with_tcp = PortRoutes::new(listener(), vec![route("tls://b.test:8000"), route("tcp://:8000")]);
        assert_eq!(tls(&with_tcp, Some("z.test")).unwrap(), "tcp://:8000");
        assert_eq!(http(&with_tcp, Some("z.test"), "/").unwrap(), "tcp://:8000");
        let mut m = meta();
        assert_eq!(with_tcp.decide(Peeked::TimedOut, &mut m).unwrap().key.as_ref(), "tcp://:8000");
        assert!(with_tcp.decide(Peeked::HungUp, &mut m).is_err());

        let tcp_only = PortRoutes::new(listener(), vec![route("tcp://:8000")]);
        assert!(!tcp_only.routes.needs_peek());

        let shared = PortRoutes::new(
            listener(),
            vec![
                route("tls://pass.test:8000"),
                route("https://term.test:8000"),
                route("https://term.test:8000/api"),
                route("https://*.wild.test:8000"),
            ],
        );
        assert_eq!(tls(&shared, Some("pass.test")).unwrap(), "tls://pass.test:8000");
        assert_eq!(tls(&shared, Some("term.test")).unwrap(), "https://term.test:8000/api");
        assert_eq!(tls(&shared, Some("a.wild.test")).unwrap(), "https://*.wild.test:8000");
        assert_eq!(tls(&shared, None).unwrap(), "https://term.test:8000/api", "the default certificate");
        assert!(matches!(tls(&shared, Some("z.test")), Err(Reply::TlsAlert(_))));
        let after = |host, path| shared.routes.terminated(Some(host), path).map(|r| r.key.to_string());
        assert_eq!(after("term.test", "/").as_deref(), Some("https://term.test:8000"));
        assert_eq!(after("term.test", "/api/x").as_deref(), Some("https://term.test:8000/api"));
        assert_eq!(after("pass.test", "/"), None, "a passthrough route is not one to terminate");

        let tls_only = PortRoutes::new(listener(), vec![route("tls://b.test:8000")]);
        assert!(tls_only.routes.want().http, "plain HTTP on a TLS port is parsed to answer 400");
        assert!(matches!(http(&tls_only, Some("b.test"), "/"), Err(Reply::Http { status: 400, .. })));
    }
}
