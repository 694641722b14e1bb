//! Where the engine sends a routed request: a backend of the route (a
//! pooled HTTP/1.1 connection, or the backend's HTTP/2 connection with
//! `backend_proto=h2`), or the route's service (a socketpair stream handed
//! over once per client connection, then reused). Requests that fail before
//! anything was sent, or a bodyless request on a kept-alive connection the
//! target had just closed, are tried again; errors become 502, 504 and 413.

use super::engine::Client;
use crate::forward::{self, backend::BackendPool};
use crate::handoff::{Conn, ConnDesc};
use crate::l7::body::TooLarge;
use crate::l7::headers::{self, Forwarding};
use crate::l7::pool::{self, Lease};
use crate::l7::{self, ReqBody, RespBody};
use crate::reply::Reply;
use crate::route::{Owner, Route};
use crate::shared::{Shared, TaskGuard};
use crate::telemetry::RouteCounters;
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderValue};
use hyper::http::request::Parts;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use portmux_wire::ConnMeta;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The target's side of a connection that switched protocols, and what
/// must stay open meanwhile.
pub(super) struct Switched {
    pub upgraded: hyper::upgrade::OnUpgrade,
    pub lease: Option<Box<dyn std::any::Any>>,
    /// The request that switched: a backend's connection may then be
    /// relayed as a forwarded flow (in the kernel).
    pub meta: ConnMeta,
    /// The counters of the route it took: what the relay moves counts there.
    pub counters: RouteCounters,
}

/// A stream to a service: portmux's end of a socketpair whose other end the service holds.
pub(super) struct ServiceStream {
    sender: http1::SendRequest<ReqBody>,
    id: Option<(u64, u64)>,
    shared: Arc<Shared>,
}

impl Drop for ServiceStream {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shared.engine_ends.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }
}

/// What a bodyless request is made again from, if it must be tried again.
struct Template {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Template {
    fn of(parts: &Parts) -> Template {
        let (method, uri, version, headers) =
            (parts.method.clone(), parts.uri.clone(), parts.version, parts.headers.clone());
        Template { method, uri, version, headers }
    }

    fn request(&self) -> Request<ReqBody> {
        let mut r = Request::new(ReqBody::empty());
        (*r.method_mut(), *r.uri_mut(), *r.version_mut()) = (self.method.clone(), self.uri.clone(), self.version);
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// Sends `req` on `route` and answers with the target's response.
pub(super) async fn send(
    client: &Client,
    req: Request<Incoming>,
    route: &Arc<Route>,
    meta: ConnMeta,
    upgrade: bool,
) -> Response<RespBody> {
    let http = &client.shared.settings.http;
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let (Some(max), Some(n)) = (http.max_request_body, declared.or(req.body().size_hint().exact()))
        && n > max
    {
        return l7::answer(StatusCode::PAYLOAD_TOO_LARGE, &TooLarge(max).to_string());
    }
    let (mut parts, body) = req.into_parts();
    // The authority as the client wrote it (its port included): HTTP/2's
    // `:authority`, an absolute target's, or the Host header (the guard and
    // the engine checked they agree).
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(|h| h.trim().to_string()));
    let forwarding = Forwarding {
        client: client.peer.ip(),
        proto: if client.tls.is_some() { "https" } else { "http" },
        host: authority.clone(),
        trusted: http.trusted_proxies.iter().any(|n| n.contains(&client.peer.ip().to_canonical())),
        add: route.spec.forwarded.as_deref() != Some("off"),
        via: http.via,
    };
    headers::request(&mut parts.headers, &forwarding, upgrade);
    let h2 = route.spec.backend_proto.as_deref() == Some("h2") && matches!(route.owner, Owner::Backends(_));
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let host = authority.unwrap_or_else(|| "localhost".into());
    if h2 {
        parts.version = Version::HTTP_2;
        parts.uri = Uri::try_from(format!("http://{host}{path}")).unwrap_or_default();
        parts.headers.remove(header::HOST);
    } else {
        parts.version = Version::HTTP_11;
        parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    // Only an idempotent request may be sent twice (RFC 9110 §9.2.2).
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let template = (idempotent && body.is_end_stream()).then(|| Template::of(&parts));
    let req = Request::from_parts(parts, ReqBody::new(body, http.max_request_body.unwrap_or(u64::MAX)));
    match &route.owner {
        Owner::Backends(pool) if h2 => backend_h2(client, req, route, pool, &meta).await,
        Owner::Backends(pool) => backend(client, req, template, route, pool, &meta, upgrade).await,
        Owner::Service(_) => service(client, req, template, route, meta, upgrade).await,
    }
}

/// Why no connection to a backend could be had.
pub(super) enum Unconnected {
    /// portmux is out of fds or memory: no backend is to blame.
    Local(std::io::Error),
    Backend(std::io::Error),
}

/// Connects to `backend` and sends the PROXY header if the route asks.
pub(super) async fn connect(
    backend: &forward::backend::Backend,
    pool: &BackendPool,
    meta: &ConnMeta,
    client: &Client,
) -> Result<OwnedFd, Unconnected> {
    let settings = &client.shared.settings;
    let fd = match forward::connect(backend, settings).await {
        Ok(fd) => fd,
        Err(e) if forward::is_local_exhaustion(&e) => {
            client.shared.metrics.error(crate::telemetry::Side::Internal);
            return Err(Unconnected::Local(e));
        }
        Err(e) => {
            client.shared.metrics.error(crate::telemetry::Side::Backend);
            return Err(Unconnected::Backend(e));
        }
    };
    if let Some(version) = pool.proxy {
        let header = forward::proxy::header(version, meta.peer, meta.local);
        let deadline = tokio::time::Instant::now() + settings.connect_timeout;
        if !crate::reply::write_all(fd.as_fd(), &header, deadline).await {
            return Err(Unconnected::Backend(std::io::Error::other("the PROXY header could not be sent")));
        }
    }
    Ok(fd)
}

pub(super) fn out_of_fds(meta: &ConnMeta, e: &std::io::Error) -> Response<RespBody> {
    tracing::warn!(route = %meta.route, client = %meta.peer, "portmux is out of resources for a backend connection: {e} (raise LimitNOFILE / ulimit -n)");
    l7::reply(Reply::unavailable("portmux is out of file descriptors; retry shortly"))
}

pub(super) fn timed_out(meta: &ConnMeta, target: &str, after: Duration) -> Response<RespBody> {
    tracing::warn!(route = %meta.route, target, client = %meta.peer, "no response within {}", humantime::format_duration(after));
    let text = format!("{target} did not answer within {} (--response-timeout)", humantime::format_duration(after));
    l7::answer(StatusCode::GATEWAY_TIMEOUT, &text)
}

/// Whether a failed exchange failed because the request body was over the limit.
fn too_large(e: &hyper::Error) -> Option<u64> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<TooLarge>() {
            return Some(t.0);
        }
        source = s.source();
    }
    None
}

fn failed(meta: &ConnMeta, target: &str, e: &hyper::Error) -> Response<RespBody> {
    if let Some(max) = too_large(e) {
        return l7::answer(StatusCode::PAYLOAD_TOO_LARGE, &TooLarge(max).to_string());
    }
    tracing::warn!(route = %meta.route, target, client = %meta.peer, "target failed: {e}");
    l7::reply(Reply::bad_gateway(&format!("{target} failed: {e}")))
}

async fn backend(
    client: &Client,
    req: Request<ReqBody>,
    template: Option<Template>,
    route: &Route,
    pool: &BackendPool,
    meta: &ConnMeta,
    upgrade: bool,
) -> Response<RespBody> {
    let settings = &client.shared.settings;
    let timeout = settings.http.response_timeout;
    let mut req = Some(req);
    let mut tried = Vec::new();
    pool.budget.deposit();
    for _ in 0..2 * forward::TRIES + 2 {
        let Some(i) = pool.pick(&tried) else { break };
        let backend = &pool.backends[i];
        let Some(request) = req.take().or_else(|| template.as_ref().map(Template::request)) else { break };
        let pooled = pool.proxy.is_none();
        let checked_out = if pooled { pool::checkout(backend).await } else { None };
        let (mut lease, reused) = match checked_out {
            Some(lease) => (lease, true),
            None => {
                let sender = match connect(backend, pool, meta, client).await {
                    Ok(fd) => pool::handshake_h1(fd, settings.peek_max).await.map_err(Unconnected::Backend),
                    Err(e) => Err(e),
                };
                match sender {
                    Ok(sender) => (Lease::new(backend, sender, pooled), false),
                    Err(Unconnected::Local(e)) => return out_of_fds(meta, &e),
                    Err(Unconnected::Backend(e)) => {
                        backend.mark_failed(settings.backend_cooldown);
                        tracing::warn!(route = %meta.route, backend = %backend.spec.name, "backend failed to connect: {e}");
                        tried.push(i);
                        req = Some(request);
                        if tried.len() >= forward::TRIES || !pool.budget.withdraw() {
                            break;
                        }
                        continue;
                    }
                }
            }
        };
        let name = || format!("backend {}", backend.spec.name);
        match tokio::time::timeout(timeout, lease.sender().try_send_request(request)).await {
            Err(_) => return timed_out(meta, &name(), timeout),
            Ok(Ok(resp)) => return respond(client, resp, Some(Box::new(lease)), upgrade.then_some((meta, route))),
            Ok(Err(mut e)) => {
                if let Some(unsent) = e.take_message() {
                    req = Some(unsent);
                    continue;
                }
                let e = e.into_error();
                if reused && template.is_some() && too_large(&e).is_none() {
                    tracing::debug!(route = %meta.route, backend = %backend.spec.name, "a kept-alive connection closed under a request ({e}); sent again");
                    continue;
                }
                // Closed before an answer: an idempotent bodyless request goes to another backend.
                if template.is_some()
                    && e.is_incomplete_message()
                    && tried.len() + 1 < forward::TRIES
                    && pool.budget.withdraw()
                {
                    backend.mark_failed(settings.backend_cooldown);
                    tracing::warn!(route = %meta.route, backend = %backend.spec.name, "backend closed the connection before answering ({e}); trying another");
                    tried.push(i);
                    continue;
                }
                return failed(meta, &name(), &e);
            }
        }
    }
    tracing::warn!(route = %meta.route, client = %meta.peer, tried = tried.len(), "no backend reachable");
    let text = format!("no backend of route {} accepted the connection ({} tried)", route.key, tried.len());
    l7::reply(Reply::bad_gateway(&text))
}

async fn backend_h2(
    client: &Client,
    req: Request<ReqBody>,
    route: &Route,
    pool: &BackendPool,
    meta: &ConnMeta,
) -> Response<RespBody> {
    let settings = &client.shared.settings;
    let mut tried = Vec::new();
    while tried.len() < forward::TRIES {
        let Some(i) = pool.pick(&tried) else { break };
        tried.push(i);
        let backend = &pool.backends[i];
        let mut sender = match pool::h2(backend) {
            Some(s) => s,
            None => {
                let made = match connect(backend, pool, meta, client).await {
                    Ok(fd) => pool::handshake_h2(fd).await.map_err(Unconnected::Backend),
                    Err(e) => Err(e),
                };
                match made {
                    Ok(s) => {
                        pool::put_h2(backend, s.clone());
                        s
                    }
                    Err(Unconnected::Local(e)) => return out_of_fds(meta, &e),
                    Err(Unconnected::Backend(e)) => {
                        backend.mark_failed(settings.backend_cooldown);
                        tracing::warn!(route = %meta.route, backend = %backend.spec.name, "backend failed to connect: {e}");
                        continue;
                    }
                }
            }
        };
        let name = format!("backend {}", backend.spec.name);
        let timeout = settings.http.response_timeout;
        let sent = async {
            sender.ready().await?;
            sender.send_request(req).await
        };
        return match tokio::time::timeout(timeout, sent).await {
            Err(_) => timed_out(meta, &name, timeout),
            Ok(Ok(resp)) => respond(client, resp, None, None),
            Ok(Err(e)) => failed(meta, &name, &e),
        };
    }
    let text = format!("no backend of route {} accepted the connection ({} tried)", route.key, tried.len());
    l7::reply(Reply::bad_gateway(&text))
}

async fn service(
    client: &Client,
    req: Request<ReqBody>,
    template: Option<Template>,
    route: &Arc<Route>,
    meta: ConnMeta,
    upgrade: bool,
) -> Response<RespBody> {
    let timeout = client.shared.settings.http.response_timeout;
    let name = format!("the service of route {}", route.key);
    let mut req = Some(req);
    for _ in 0..3 {
        let Some(request) = req.take().or_else(|| template.as_ref().map(Template::request)) else { break };
        let (mut stream, reused) = match take_stream(client, &route.key).await {
            Some(s) => (s, true),
            None => match open_stream(client, route, &meta).await {
                Ok(s) => (s, false),
                Err(e) => {
                    tracing::warn!(route = %route.key, client = %client.peer, "cannot open a stream to the service: {e}");
                    return l7::reply(Reply::unavailable("portmux is out of file descriptors; retry shortly"));
                }
            },
        };
        match tokio::time::timeout(timeout, stream.sender.try_send_request(request)).await {
            Err(_) => return timed_out(&meta, &name, timeout),
            Ok(Ok(resp)) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    return respond(client, resp, Some(Box::new(stream)), upgrade.then_some((&meta, route)));
                }
                client.services.borrow_mut().entry(route.key.clone()).or_default().push(stream);
                return respond(client, resp, None, upgrade.then_some((&meta, route)));
            }
            Ok(Err(mut e)) => {
                if let Some(unsent) = e.take_message() {
                    req = Some(unsent);
                    continue;
                }
                let e = e.into_error();
                if reused && template.is_some() {
                    // The service gave the stream back as the request went out (a restart).
                    tracing::debug!(route = %route.key, "a service stream closed under a request ({e}); sent again");
                    continue;
                }
                return failed(&meta, &name, &e);
            }
        }
    }
    l7::answer(StatusCode::BAD_GATEWAY, &format!("{name} closed every stream it was given"))
}

/// A stream to the route's service that is ready for a request, if this client has one.
async fn take_stream(client: &Client, key: &Arc<str>) -> Option<ServiceStream> {
    for _ in 0..2 {
        let busy = {
            let mut services = client.services.borrow_mut();
            let list = services.get_mut(key)?;
            list.retain(|s| !s.sender.is_closed());
            if let Some(i) = list.iter().position(|s| s.sender.is_ready()) {
                return Some(list.swap_remove(i));
            }
            // An HTTP/1 client asks one request at a time: its stream is
            // about to be ready (the last response just ended).
            if client.ctl.is_none() || list.is_empty() {
                return None;
            }
            list.pop()
        };
        let mut stream = busy?;
        if tokio::time::timeout(Duration::from_millis(100), stream.sender.ready()).await.is_ok_and(|r| r.is_ok()) {
            return Some(stream);
        }
    }
    None
}

/// A new stream to the route's service: one socketpair end goes through
/// the usual hand-over (with the request's metadata), hyper speaks
/// HTTP/1.1 on the other.
async fn open_stream(client: &Client, route: &Arc<Route>, meta: &ConnMeta) -> std::io::Result<ServiceStream> {
    let shared = &client.shared;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let id = crate::shared::socket_id(theirs.as_fd());
    if let Some(id) = id {
        shared.engine_ends.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
    }
    let stream_id = id;
    let stream = |sender| ServiceStream { sender, id: stream_id, shared: shared.clone() };
    let desc = ConnDesc {
        id: shared.conn_id(),
        listener: client.listener,
        meta: meta.clone(),
        arrived: Instant::now(),
        rejected_by: None,
        returned: false,
        tls: client.tls.as_ref().map(|t| Box::new(t.info.clone())),
    };
    let (shared2, route2) = (shared.clone(), route.clone());
    let guard = TaskGuard::new(shared);
    tokio::task::spawn_local(async move {
        super::deliver(Conn { fd: Arc::new(OwnedFd::from(theirs)), desc }, &route2, &shared2).await;
        drop(guard);
    });
    let sender = pool::handshake_h1(OwnedFd::from(ours), shared.settings.peek_max).await?;
    Ok(stream(sender))
}

/// The target's response, on its way to the client. `upgrade`: the client
/// asked to switch protocols, in the request `meta` describes, on this route.
fn respond(
    client: &Client,
    mut resp: Response<Incoming>,
    lease: Option<Box<dyn std::any::Any>>,
    upgrade: Option<(&ConnMeta, &Route)>,
) -> Response<RespBody> {
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching {
        let Some((meta, route)) = upgrade else {
            return l7::answer(StatusCode::BAD_GATEWAY, "the target switched protocols though the client did not ask");
        };
        let upgraded = hyper::upgrade::on(&mut resp);
        let counters = route.counters.clone();
        *client.upgraded.borrow_mut() = Some(Switched { upgraded, lease, meta: meta.clone(), counters });
        let (mut parts, _) = resp.into_parts();
        headers::response(&mut parts.headers, true, client.shared.settings.http.via);
        return Response::from_parts(parts, RespBody::empty());
    }
    let (mut parts, body) = resp.into_parts();
    headers::response(&mut parts.headers, false, client.shared.settings.http.via);
    let lease = lease.and_then(|l| l.downcast::<Lease>().ok()).map(|l| *l);
    let body = if body.is_end_stream() {
        if let Some(lease) = lease {
            lease.release();
        }
        RespBody::Target { inner: body, lease: None }
    } else {
        RespBody::Target { inner: body, lease }
    };
    Response::from_parts(parts, body)
}
