//! The per-request engine's client connections: hyper serves HTTP/1.1 (on
//! plain and terminated connections, every request checked by
//! `l7::guard`) and HTTP/2 (ALPN `h2`), and each request is routed by its
//! own Host and path, to a backend (pooled connections) or to a service
//! (a socketpair stream handed to it once per client connection and
//! reused). `Upgrade` turns the connection into a relay after a 101. On an
//! upgrade of portmux, a plain connection between requests moves to the new
//! process; HTTP/2 connections get a GOAWAY.

use super::{direct, targets};
use crate::forward::{self, stream};
use crate::ids::ListenerId;
use crate::l7::guard::{Control, Fault, Guarded};
use crate::l7::{self, RespBody, pool};
use crate::reply::{self, Reply};
use crate::shared::{Idle, Shared, ToControl};
use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use portmux_wire::spec::{HostPattern, host_from_header, normalize_path};
use portmux_wire::{ConnMeta, Proto, TlsInfo};
use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// What a terminated connection's requests are checked against.
#[derive(Debug, Clone)]
pub(super) struct TlsSide {
    pub sni: Option<String>,
    pub info: TlsInfo,
    /// The route the handshake chose: its host (without SNI, requests must be
    /// for it) and its client CA (every route used must ask for the same).
    pub host: HostPattern,
    pub client_ca: Option<String>,
}

/// One client connection of the engine.
pub(super) struct Client {
    pub shared: Arc<Shared>,
    pub listener: ListenerId,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: Option<TlsSide>,
    /// HTTP/1: what the guard and the engine share.
    pub ctl: Option<Rc<Control>>,
    /// The target's side of a switch of protocols, once a 101 went out.
    pub upgraded: RefCell<Option<targets::Switched>>,
    /// Streams to services, by route, reused for this client's requests.
    pub services: RefCell<HashMap<Arc<str>, Vec<targets::ServiceStream>>>,
}

impl Client {
    fn new(shared: &Arc<Shared>, listener: ListenerId, (peer, local): (SocketAddr, SocketAddr)) -> Client {
        pool::configure(pool::Limits {
            idle_timeout: shared.settings.http.pool_idle_timeout,
            max_idle: shared.settings.http.pool_max_idle,
        });
        Client {
            shared: shared.clone(),
            listener,
            peer,
            local,
            tls: None,
            ctl: None,
            upgraded: RefCell::new(None),
            services: RefCell::default(),
        }
    }

    async fn handle(self: Rc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        let upgrade =
            self.ctl.is_some() && req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE);
        let started = Instant::now();
        let from_client = declared_length(req.headers());
        let logged = self.shared.access.is_on().then(|| {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
            (req.method().to_string(), request_host(&req).unwrap_or_else(|| "-".into()), path)
        });
        let mut routed = None;
        let resp = self.dispatch(req, upgrade, &mut routed).await;
        if upgrade && let Some(ctl) = &self.ctl {
            ctl.decide_upgrade(resp.status() == StatusCode::SWITCHING_PROTOCOLS);
        }
        let (status, to_client) = (resp.status().as_u16(), declared_length(resp.headers()));
        match &routed {
            Some(r) => {
                r.counters.answered(status);
                r.counters.relayed(from_client, to_client);
            }
            None => self.shared.metrics.request("", status),
        }
        if let Some((method, host, path)) = logged {
            let target = match routed.as_ref().map(|r| &r.owner) {
                Some(crate::route::Owner::Service(name)) => format!("service {name}"),
                Some(crate::route::Owner::Backends(_)) => "backends".to_string(),
                None => "portmux".to_string(),
            };
            let e = crate::telemetry::access::Entry {
                client: self.peer,
                route: routed.as_ref().map_or("", |r| &r.key),
                target: &target,
                outcome: "request",
                status: Some(status),
                request: Some((&method, &host, &path)),
                from_client,
                to_client,
                started,
            };
            self.shared.access.write(&e);
        }
        resp
    }

    /// Routes one request and answers it; `routed`: the route it took.
    async fn dispatch(
        &self,
        req: Request<Incoming>,
        upgrade: bool,
        routed: &mut Option<Arc<crate::route::Route>>,
    ) -> Response<RespBody> {
        let host = request_host(&req);
        if let (Some(authority), Some(h)) = (req.uri().authority(), req.headers().get(header::HOST)) {
            // HTTP/2 (RFC 9113 §8.3.1) and absolute targets: one host, not two.
            let named = h.to_str().ok().and_then(|h| host_from_header(h.trim()));
            if named != host_from_header(authority.as_str()) {
                return l7::reply(Reply::bad_request("the Host header names another host than :authority"));
            }
        }
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        if let Some(tls) = &self.tls {
            if let Some(answer) = super::tls::misdirected(host.as_deref(), tls.sni.as_deref()) {
                return l7::reply(answer);
            }
            // Without SNI the handshake used the default route's certificate: its host only.
            if let (Some(h), None) = (&host, &tls.sni)
                && !tls.host.matches(Some(h))
            {
                return l7::reply(Reply::misdirected(h, "no server name: the default certificate"));
            }
        } else if let Some(key_authorization) = self.shared.tls.challenges.http_answer(&target) {
            tracing::info!(client = %self.peer, ?host, "answered an ACME HTTP-01 challenge");
            return Response::new(RespBody::full(key_authorization));
        }
        let table = self.shared.table.load();
        if let Some(answer) = table.services(&target, self.peer.ip()) {
            return l7::reply(answer);
        }
        let Some(port) = table.port(self.listener).cloned() else {
            return l7::reply(Reply::unavailable("this port is closing"));
        };
        let path = normalize_path(&target);
        let found = if let Some(tls) = &self.tls {
            let found = port.routes.terminated(host.as_deref(), &path).cloned();
            if let Some(r) = &found
                && r.spec.client_ca != tls.client_ca
            {
                let why = "this path asks for a client certificate from another CA than the one this connection was made with";
                return l7::reply(Reply::forbidden(why));
            }
            found
        } else {
            let meta = self.meta(host.clone(), target.clone(), String::new());
            port.routes.lookup(&meta).filter(|r| r.spec.scheme == portmux_wire::spec::Scheme::Http).cloned()
        };
        let Some(route) = found else {
            return l7::reply(Reply::not_found(host.as_deref(), Some(&target), self.local.port()));
        };
        *routed = Some(route.clone());
        if route.spec.acme && self.tls.is_none() {
            // An ACME challenge route (its pending tokens were answered above).
            return l7::answer(StatusCode::NOT_FOUND, "no such ACME challenge is pending");
        }
        if route.spec.redirect.is_some() {
            return l7::reply(Reply::redirect(&route.spec, host.as_deref(), &target));
        }
        let meta = self.meta(host, target, route.key.to_string());
        targets::send(self, req, &route, meta, upgrade).await
    }

    /// The metadata a service would get for this request as a connection of its own.
    pub fn meta(&self, host: Option<String>, target: String, route: String) -> ConnMeta {
        let (sni, alpn) = match &self.tls {
            Some(t) => (t.sni.clone(), t.info.alpn.iter().cloned().collect()),
            None => (None, Vec::new()),
        };
        ConnMeta {
            route,
            proto: Proto::Http,
            peer: self.peer,
            local: self.local,
            sni,
            alpn,
            host,
            path: Some(target),
            peeked: 0,
        }
    }
}

/// The request's Host: the absolute target's authority (HTTP/2's
/// `:authority`), else the Host header; normalised like routes' hosts.
/// A message's Content-Length (0 when it has none: the access log's bytes
/// on the engine's hyper path are the declared lengths).
fn declared_length(headers: &hyper::HeaderMap) -> u64 {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0)
}

fn request_host<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return host_from_header(a.as_str());
    }
    req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).and_then(|h| host_from_header(h.trim()))
}

/// How an HTTP/1 connection's service ended.
enum Ended<T> {
    /// hyper gave the socket back (the connection is done, or switched
    /// protocols, or paused between requests); with what hyper read ahead.
    Parts(Guarded<T>, bytes::Bytes),
    Failed,
}

/// Serves HTTP/1.1 on `io` until the connection ends, is refused by the
/// guard, switches protocols, or pauses for an upgrade (`pause`).
async fn run_h1<T>(io: Guarded<T>, client: &Rc<Client>) -> Ended<T>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let settings = &client.shared.settings;
    let svc_client = client.clone();
    let svc = hyper::service::service_fn(move |req| {
        let c = svc_client.clone();
        async move { Ok::<_, Infallible>(c.handle(req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(settings.keepalive_timeout)
        .max_buf_size(settings.peek_max.max(8192) * 2);
    match builder.serve_connection(TokioIo::new(io), svc).without_shutdown().await {
        Ok(parts) => Ended::Parts(parts.io.into_inner(), parts.read_buf),
        Err(e) => {
            tracing::debug!(client = %client.peer, "HTTP/1 connection ended: {e}");
            Ended::Failed
        }
    }
}

/// A plain HTTP connection whose first request (peeked, still unread) the
/// engine serves.
pub(super) async fn serve_plain(
    fd: OwnedFd,
    listener: ListenerId,
    (peer, local): (SocketAddr, SocketAddr),
    shared: &Arc<Shared>,
) {
    // A TCP client (accepted on a public listener): no need to ask its family.
    let std = std::net::TcpStream::from(fd);
    let stream = match std.set_nonblocking(true).and_then(|()| tokio::net::TcpStream::from_std(std)) {
        Ok(s) => s,
        Err(e) => return tracing::debug!(client = %peer, "client socket unusable: {e}"),
    };
    let ctl = Rc::new(Control::default());
    // A pause (an upgrade, a stop) reaches the connection through this
    // thread's registry: nothing shared is polled per request.
    l7::register(&ctl);
    let mut client = Client::new(shared, listener, (peer, local));
    client.ctl = Some(ctl.clone());
    let client = Rc::new(client);
    let (mut stream, mut served) = (stream, false);
    loop {
        let (s, read, once) = match direct::serve(&client, &ctl, stream, served).await {
            direct::Outcome::Closed => return,
            direct::Outcome::Paused(s) => return move_between_requests(s, client, listener, (peer, local)),
            direct::Outcome::Hyper { stream, read, once } => (stream, read, once),
        };
        ctl.lend(once);
        let _ = s.set_nodelay(true);
        let io = Guarded::new(s, read, shared.settings.peek_max, ctl.clone());
        let Ended::Parts(io, read_ahead) = run_h1(io, &client).await else { return };
        let (s, rest) = io.into_inner();
        let between = ctl.paused_between_requests() && read_ahead.is_empty() && rest.is_empty();
        if once && between && !ctl.pause_asked() && ctl.fault().is_none() && client.upgraded.borrow().is_none() {
            // hyper served its one request: the direct path goes on.
            (stream, served) = (s, true);
            continue;
        }
        return after_hyper(s, (read_ahead, rest), &client, &ctl, listener, (peer, local)).await;
    }
}

/// What is left of a plain connection when hyper gives it back: a refusal to
/// answer, a relay after a switch of protocols, or a move between requests.
async fn after_hyper(
    stream: tokio::net::TcpStream,
    (read_ahead, rest): (bytes::Bytes, Vec<u8>),
    client: &Rc<Client>,
    ctl: &Control,
    listener: ListenerId,
    (peer, local): (SocketAddr, SocketAddr),
) {
    if let Some(fault) = ctl.fault() {
        if ctl.fault_after_head() {
            // hyper answered that request already (its body failed): close.
            return tracing::debug!(client = %peer, ?fault, "request body refused");
        }
        let fd = match stream.into_std() {
            Ok(s) => OwnedFd::from(s),
            Err(_) => return,
        };
        tracing::debug!(client = %peer, ?fault, "request refused");
        return reply::send(fd, refusal(fault)).await;
    }
    let switched = client.upgraded.borrow_mut().take();
    if let Some(switched) = switched {
        return relay_plain(stream, [read_ahead.as_ref(), &rest].concat(), switched, client).await;
    }
    if ctl.paused_between_requests() && read_ahead.is_empty() && rest.is_empty() {
        move_between_requests(stream, client.clone(), listener, (peer, local));
    }
}

/// A plain connection paused between requests, nothing read ahead: on an
/// upgrade it moves to the new process, which waits for its next request
/// (the client notices nothing); on a stop it closes.
fn move_between_requests(
    stream: tokio::net::TcpStream,
    client: Rc<Client>,
    listener: ListenerId,
    (peer, local): (SocketAddr, SocketAddr),
) {
    let shared = client.shared.clone();
    drop(client);
    if !*shared.pause_relays.borrow() || *shared.stopping.borrow() {
        return;
    }
    if let Ok(std) = stream.into_std() {
        let fd = OwnedFd::from(std);
        let idle = Idle { fd, listener, peer, local, since: Instant::now(), tls: None };
        let _ = shared.to_control.send(ToControl::Idle(idle));
    }
}

/// The answer to a request the guard refused.
fn refusal(fault: Fault) -> Reply {
    match fault {
        Fault::Bad(why) => Reply::bad_request(why),
        Fault::TooLarge => Reply::too_large(),
    }
}

/// A terminated connection the engine serves: HTTP/2 (`h2`), or HTTP/1.1
/// whose first bytes (`prefix`) were read already.
pub(super) async fn serve_tls(
    stream: crate::tls::Stream,
    prefix: Vec<u8>,
    h2: bool,
    tls: TlsSide,
    listener: ListenerId,
    addrs: (SocketAddr, SocketAddr),
    shared: &Arc<Shared>,
) {
    let mut client = Client::new(shared, listener, addrs);
    client.tls = Some(tls);
    if h2 {
        return serve_h2(stream, Rc::new(client)).await;
    }
    let ctl = Rc::new(Control::default());
    l7::register(&ctl);
    client.ctl = Some(ctl.clone());
    let client = Rc::new(client);
    let io = Guarded::new(stream, prefix, shared.settings.peek_max, ctl.clone());
    let Ended::Parts(io, read_ahead) = run_h1(io, &client).await else { return };
    let (mut stream, rest) = io.into_inner();
    if let Some(fault) = ctl.fault() {
        tracing::debug!(client = %addrs.0, ?fault, "request refused");
        if ctl.fault_after_head() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.shutdown()).await;
            return;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            if let Some(bytes) = refusal(fault).bytes() {
                stream.write_all(&bytes).await?;
            }
            stream.shutdown().await
        })
        .await;
        return;
    }
    let switched = client.upgraded.borrow_mut().take();
    if let Some(switched) = switched {
        return relay(stream, [read_ahead.as_ref(), &rest].concat(), switched, &client).await;
    }
    // TLS cannot move to another process: a connection paused between
    // requests is closed (close_notify); its client reconnects and resumes.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.shutdown()).await;
}

async fn serve_h2(stream: crate::tls::Stream, client: Rc<Client>) {
    let settings = &client.shared.settings;
    let svc_client = client.clone();
    let svc = hyper::service::service_fn(move |req| {
        let c = svc_client.clone();
        async move { Ok::<_, Infallible>(c.handle(req).await) }
    });
    let max_head = u32::try_from(settings.peek_max).unwrap_or(u32::MAX);
    let mut builder = hyper::server::conn::http2::Builder::new(l7::LocalExec);
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.http.h2_max_streams)
        .max_header_list_size(max_head)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_send_buf_size(256 * 1024)
        // CVE-2023-44487: streams the client opens and resets at once count
        // against this; past it, the connection ends with ENHANCE_YOUR_CALM.
        .max_pending_accept_reset_streams(Some(32))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(settings.keepalive_timeout / 2))
        .keep_alive_timeout(settings.peek_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let ctl = Rc::new(Control::default());
    l7::register(&ctl);
    let mut asked = false;
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(client = %client.peer, "HTTP/2 connection ended: {e}");
                }
                return;
            }
            () = ctl.paused(), if !asked => { asked = true; conn.as_mut().graceful_shutdown(); }
        }
    }
}

/// After a 101: relays the client's socket and the target's until both end.
async fn relay<T>(client_io: T, read_ahead: Vec<u8>, switched: targets::Switched, client: &Client)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let target = match switched.upgraded.await {
        Ok(u) => TokioIo::new(u),
        Err(e) => return tracing::debug!(client = %client.peer, "the target did not switch protocols: {e}"),
    };
    let (from_client, to_client) = relay_io(client_io, &read_ahead, target, &[], client).await;
    switched.counters.relayed(from_client, to_client);
    drop(switched.lease);
}

/// After a 101 on a plain connection: a backend's flow goes to the
/// forwarding relay when the kernel relay is in force (both sockets in the
/// sockhash, as a connection-level forward's, and across upgrades as one);
/// any other is relayed here.
async fn relay_plain(
    mut stream: tokio::net::TcpStream,
    read_ahead: Vec<u8>,
    switched: targets::Switched,
    client: &Client,
) {
    let settings = &client.shared.settings;
    // A backend's connection (a pooled lease), not a service's stream.
    let backend = switched.lease.as_ref().and_then(|l| l.downcast_ref::<pool::Lease>()).and_then(pool::Lease::backend);
    let (Some(backend), Some(_)) = (backend, forward::kernel_for_new_flows(settings)) else {
        return relay(stream, read_ahead, switched, client).await;
    };
    let upgraded = match switched.upgraded.await {
        Ok(u) => u,
        Err(e) => return tracing::debug!(client = %client.peer, "the target did not switch protocols: {e}"),
    };
    // The backend's socket itself, as the pool made it (hyper hands it back).
    let counters = switched.counters;
    let parts = match upgraded.downcast::<TokioIo<pool::Stream>>() {
        Ok(parts) => parts,
        Err(upgraded) => {
            let (from_client, to_client) = relay_io(stream, &read_ahead, TokioIo::new(upgraded), &[], client).await;
            return counters.relayed(from_client, to_client);
        }
    };
    let mut target = match parts.io.into_inner() {
        pool::Stream::Tcp(t) => t,
        // A backend on a Unix socket: the sockhash takes TCP only.
        unix => {
            let (from_client, to_client) = relay_io(stream, &read_ahead, unix, &parts.read_buf, client).await;
            return counters.relayed(from_client, to_client);
        }
    };
    // What each side sent past the switch goes on first: the backend's
    // (hyper read it with the 101) to the client, the client's to the backend.
    if stream.write_all(&parts.read_buf).await.is_err() || target.write_all(&read_ahead).await.is_err() {
        return;
    }
    let ahead = (read_ahead.len() as u64, parts.read_buf.len() as u64);
    drop(switched.lease); // The relay counts the backend's connection from here.
    let (Ok(c), Ok(t)) = (stream.into_std(), target.into_std()) else { return };
    let served = Box::pin(forward::relay_established(c.into(), t.into(), switched.meta, &backend, settings)).await;
    match served.paused {
        // A portmux upgrade: the flow moves to the new process, as forwarded
        // ones do, and is counted there from then on.
        Some(paused) => {
            counters.relayed(ahead.0, ahead.1);
            drop(client.shared.to_control.send(ToControl::Relay(paused)));
        }
        None => counters.relayed(ahead.0 + served.from_client, ahead.1 + served.to_client),
    }
}

/// Relays a switched connection: first `to_target` (the client's bytes past
/// the switch) and `to_client` (the target's), then both ways until both
/// end. Returns the bytes from the client and to it (those written ahead,
/// and, if the relay ended cleanly, what it moved).
async fn relay_io<C, T>(
    mut client_io: C,
    to_target: &[u8],
    mut target: T,
    to_client: &[u8],
    client: &Client,
) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    if (!to_client.is_empty() && client_io.write_all(to_client).await.is_err())
        || (!to_target.is_empty() && target.write_all(to_target).await.is_err())
    {
        return (0, 0);
    }
    let ahead = (to_target.len() as u64, to_client.len() as u64);
    match stream::relay(client_io, target, client.shared.settings.idle_timeout).await {
        stream::Ended::Failed(e) => tracing::debug!(client = %client.peer, "upgraded connection ended: {e}"),
        stream::Ended::Idle => tracing::debug!(client = %client.peer, "upgraded connection closed: idle"),
        stream::Ended::Done(from_client, to_client) => return (ahead.0 + from_client, ahead.1 + to_client),
    }
    ahead
}
