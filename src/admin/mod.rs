//! The admin API: JSON over HTTP (routes, backends, weights, health), and
//! seamless's plain-text verbs (`/set`, `/add`, `/remove`, `/get`). It runs on
//! the control plane's thread; `portmux route …` is a thin client of it.

mod client;
pub mod guard;

pub use client::{AdminAddr, encode_query, request};

use crate::config::limits::{Hits, Limit};
use crate::config::policy::Peer;
use crate::control::{Control, ControlError, Kind, Lifecycle};
use crate::forward::backend::BackendSpec;
use guard::{Guard, Transport};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use portmux_wire::RouteSpec;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::future::Future;
use std::rc::Rc;

pub use crate::control::views::{
    BackendView, CountsView, InstanceView, LimitView, ListenerView, RouteView, StatusView, TargetView,
};

/// One backend in a request: `"host:port@weight"` or `{"addr": …, "weight": …}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BackendEntry {
    Text(String),
    Full { addr: String, weight: Option<u32> },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteRequest {
    route: String,
    backends: Vec<BackendEntry>,
}

/// Why the admin API refused a request; each says what to send instead.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "body must be JSON like {{\"route\": \"http://:8000\", \"backends\": [\"127.0.0.1:9001\", \"127.0.0.1:9002@3\"]}}: {0}"
    )]
    Body(#[source] serde_json::Error),
    #[error("request body: {reason} (limit {limit} bytes, --max-admin-body)")]
    TooLarge { reason: String, limit: usize },
    #[error("{0}")]
    Backend(String),
    #[error("no backends given; a route needs at least one")]
    NoBackends,
    #[error("DELETE /routes needs ?route=SPEC")]
    NoRouteParam,
    #[error("{method} is not allowed on {path}")]
    Method { method: Method, path: String },
    #[error("no endpoint {method} {path}; the API has /routes, /status, /get, /set, /add and /remove")]
    NoEndpoint { method: Method, path: String },
    #[error(transparent)]
    Control(#[from] ControlError),
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            AdminError::Body(_) | AdminError::Backend(_) | AdminError::NoBackends | AdminError::NoRouteParam => {
                StatusCode::BAD_REQUEST
            }
            AdminError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::NoEndpoint { .. } => StatusCode::NOT_FOUND,
            AdminError::Control(e) => match e.kind() {
                Kind::Invalid => StatusCode::BAD_REQUEST,
                Kind::NotFound => StatusCode::NOT_FOUND,
                Kind::Conflict => StatusCode::CONFLICT,
            },
        }
    }
}

/// The admin API's listening sockets.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The Unix socket (authorised by the kernel's peer credentials and the policy).
    pub unix: Option<std::os::unix::net::UnixListener>,
    /// A TCP address (loopback unless `--admin-public`; changes need the token).
    pub tcp: Option<std::net::TcpListener>,
}

/// Serves the admin API on its sockets while the control plane serves; pauses
/// during an upgrade's freeze (requests wait in the kernel for whichever
/// process serves next) and ends once this process handed over or stops.
pub async fn serve(control: Rc<Control>, listeners: Listeners) {
    let s = &control.shared().settings;
    let guard = Rc::new(Guard {
        policy: s.policy.clone(),
        token: s.admin_token.clone(),
        seamless: s.seamless,
        public: s.admin_public,
    });
    // Each transport has its own --max-admin-conns: TCP clients (anyone, a
    // browser) cannot keep root off the socket.
    let open = || Rc::new(std::cell::Cell::new(0usize));
    if let Some(l) = listeners.unix {
        let accept = match l.set_nonblocking(true).and_then(|()| tokio::net::UnixListener::from_std(l)) {
            Ok(l) => Rc::new(l),
            Err(e) => return tracing::error!("admin socket: {e}"),
        };
        let (control, guard) = (control.clone(), guard.clone());
        tokio_uring::spawn(accept_loop(control, guard, open(), move || {
            let accept = accept.clone();
            async move {
                let (stream, _) = accept.accept().await?;
                let cred = stream.peer_cred()?;
                let fd = std::os::fd::AsFd::as_fd(&stream);
                let peer = Peer::from_socket(fd, cred.pid().unwrap_or(0), cred.uid(), cred.gid());
                Ok((Io::Unix(stream), Transport::Unix(peer)))
            }
        }));
    }
    if let Some(l) = listeners.tcp {
        let accept = match l.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(l)) {
            Ok(l) => Rc::new(l),
            Err(e) => return tracing::error!("admin API: {e}"),
        };
        tokio_uring::spawn(accept_loop(control, guard, open(), move || {
            let accept = accept.clone();
            async move {
                let (stream, _) = accept.accept().await?;
                Ok((Io::Tcp(stream), Transport::Tcp))
            }
        }));
    }
}

/// An accepted admin connection.
enum Io {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept_loop<F, Fut>(control: Rc<Control>, guard: Rc<Guard>, open: Rc<std::cell::Cell<usize>>, accept: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = std::io::Result<(Io, Transport)>>,
{
    let settings = &control.shared().settings;
    let limits = settings.limits.clone();
    let hits = settings.limit_hits.clone();
    let mut lifecycle = control.lifecycle();
    loop {
        match lifecycle.wait_for(|l| *l != Lifecycle::Frozen).await.map(|l| *l) {
            Ok(Lifecycle::Serving) => {}
            _ => return,
        }
        let (io, via) = tokio::select! {
            accepted = accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("admin API: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = lifecycle.changed() => continue,
        };
        if open.get() >= limits.admin_conns {
            hits.hit(Limit::AdminConns);
            tracing::debug!("admin API: closed a connection over --max-admin-conns ({})", limits.admin_conns);
            continue;
        }
        open.set(open.get() + 1);
        let (control, guard, open, hits) = (control.clone(), guard.clone(), open.clone(), hits.clone());
        let (body_max, header_timeout) = (limits.admin_body, limits.admin_header_timeout);
        tokio_uring::spawn(async move {
            let service = hyper::service::service_fn(|req| {
                let (control, guard, via, hits) = (control.clone(), guard.clone(), via.clone(), hits.clone());
                async move { Ok::<_, Infallible>(handle(&control, &guard, &via, &hits, body_max, req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).max_buf_size(64 * 1024);
            let served = match io {
                Io::Unix(s) => builder.serve_connection(TokioIo::new(s), service).await,
                Io::Tcp(s) => builder.serve_connection(TokioIo::new(s), service).await,
            };
            if let Err(e) = served
                && e.is_timeout()
            {
                hits.hit(Limit::AdminHeaderTimeout);
            }
            open.set(open.get() - 1);
        });
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

fn admin_error(e: AdminError) -> Response<Full<Bytes>> {
    error(e.status(), e.to_string())
}

/// Decodes an `application/x-www-form-urlencoded` query string.
fn query(q: Option<&str>) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let b = s.replace('+', " ");
        let b = b.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            let hex = b.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
            match (b[i], hex) {
                (b'%', Some(v)) => {
                    out.push(v);
                    i += 3;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

async fn handle(
    control: &Rc<Control>,
    guard: &Guard,
    via: &Transport,
    hits: &Hits,
    body_max: usize,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let method = parts.method;
    let path = parts.uri.path();
    let refused = guard.check(via, &method, path, &parts.headers).err();
    // The body is read (up to the cap) even for a refusal: closing on unread
    // bytes would reset the connection under the answer.
    let body = Limited::new(body, body_max).collect().await;
    if let Some(d) = refused {
        tracing::warn!(%method, path, via = ?via, "admin API refused a request: {}", d.message);
        return error(d.status, d.message);
    }
    let q = query(parts.uri.query());
    let body = match body {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            hits.hit(Limit::AdminBody);
            return admin_error(AdminError::TooLarge { reason: e.to_string(), limit: body_max });
        }
    };
    let result = match (method.clone(), path) {
        (Method::GET, "/routes") => Ok(json(StatusCode::OK, &serde_json::json!({ "routes": control.views() }))),
        (Method::POST | Method::PUT, "/routes") => add_route(control, &body).await,
        (Method::DELETE, "/routes") => match param(&q, "route") {
            None => Err(AdminError::NoRouteParam),
            Some(r) => control
                .remove_route(r)
                .map(|removed| json(StatusCode::OK, &serde_json::json!({ "removed": removed })))
                .map_err(AdminError::from),
        },
        (Method::GET, "/status") => Ok(json(StatusCode::OK, &control.status())),
        (Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(control.metrics())));
            let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
            Ok(r)
        }
        (Method::POST, "/reload") => Ok(match control.reload().await {
            Ok(done) => json(StatusCode::OK, &done),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        }),
        (Method::GET | Method::POST, verb @ ("/get" | "/set" | "/add" | "/remove")) => {
            return seamless(control, verb, &q)
                .await
                .unwrap_or_else(|m| text(StatusCode::BAD_REQUEST, format!("error: {m}\n")));
        }
        (_, "/routes" | "/status" | "/metrics" | "/reload" | "/get" | "/set" | "/add" | "/remove") => {
            Err(AdminError::Method { method, path: path.to_string() })
        }
        (_, path) => Err(AdminError::NoEndpoint { method, path: path.to_string() }),
    };
    result.unwrap_or_else(admin_error)
}

/// `POST /routes`: a route forwarding to backends.
async fn add_route(control: &Rc<Control>, body: &[u8]) -> Result<Response<Full<Bytes>>, AdminError> {
    let req: RouteRequest = serde_json::from_slice(body).map_err(AdminError::Body)?;
    let mut backends = Vec::new();
    for entry in req.backends {
        let parsed = match entry {
            BackendEntry::Text(t) => BackendSpec::parse(&t),
            BackendEntry::Full { addr, weight } => BackendSpec::parse(&addr).and_then(|mut b| {
                if let Some(w) = weight {
                    b = BackendSpec::parse(&format!("{}@{w}", b.name))?;
                }
                Ok(b)
            }),
        };
        backends.push(parsed.map_err(AdminError::Backend)?);
    }
    let redirect = RouteSpec::parse(&req.route).is_ok_and(|s| s.redirect.is_some());
    if backends.is_empty() && !redirect {
        return Err(AdminError::NoBackends);
    }
    let view = set_backends(control, &req.route, backends).await?;
    Ok(json(StatusCode::OK, &view))
}

/// Resolves the backends (host names may need the resolver, off this thread)
/// and gives the route to the control plane.
async fn set_backends(control: &Rc<Control>, route: &str, backends: Vec<BackendSpec>) -> Result<RouteView, AdminError> {
    let spec = RouteSpec::parse(route).map_err(|source| ControlError::Spec { route: route.to_string(), source })?;
    let resolved = tokio::task::spawn_blocking(move || {
        backends.into_iter().map(|b| b.resolve().map(|e| (b, e))).collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| AdminError::Backend(format!("resolver: {e}")))?
    .map_err(AdminError::Backend)?;
    Ok(control.set_backends(spec, resolved)?)
}

/// seamless's verbs, on the one route with backends (or the one named by `route=`).
async fn seamless(control: &Rc<Control>, verb: &str, q: &[(String, String)]) -> Result<Response<Full<Bytes>>, String> {
    let (route, mut backends) = control.backends_of(param(q, "route")).map_err(|e| e.to_string())?;
    match verb {
        "/set" => {
            let list = param(q, "backends").filter(|v| !v.is_empty()).ok_or("missing 'backends' parameter")?;
            backends = BackendSpec::parse_list(list)?;
        }
        "/add" => {
            let b = BackendSpec::parse(
                param(q, "backend").filter(|v| !v.is_empty()).ok_or("missing 'backend' parameter")?,
            )?;
            if !backends.iter().any(|x| x.name == b.name) {
                backends.push(b);
            }
        }
        "/remove" => {
            let name = param(q, "backend").filter(|v| !v.is_empty()).ok_or("missing 'backend' parameter")?;
            let before = backends.len();
            backends.retain(|b| b.name != name && b.to_string() != name);
            if backends.len() == before {
                return Err(format!("backend '{name}' not found"));
            }
        }
        _ => {}
    }
    if verb != "/get" {
        set_backends(control, &route, backends.clone()).await.map_err(|e| e.to_string())?;
    }
    let list: Vec<String> = backends.iter().map(ToString::to_string).collect();
    Ok(text(StatusCode::OK, format!("{}\n", list.join(","))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        let q = query(Some("backends=a%3A1%2Cb:2&x=y+z&flag"));
        assert_eq!(param(&q, "backends"), Some("a:1,b:2"));
        assert_eq!(param(&q, "x"), Some("y z"));
        assert_eq!(param(&q, "flag"), Some(""));
        assert_eq!(param(&q, "none"), None);
    }

    #[test]
    fn route_requests_take_strings_or_objects() {
        let r: RouteRequest =
            serde_json::from_str(r#"{"route":"tcp://:1","backends":["a:1",{"addr":"b:2","weight":3}]}"#).unwrap();
        assert!(matches!(&r.backends[1], BackendEntry::Full { weight: Some(3), .. }));
        assert!(serde_json::from_str::<RouteRequest>(r#"{"route":"tcp://:1","backends":[],"extra":1}"#).is_err());
    }
}
