//! The engine's direct path: the plain HTTP/1.1 requests most clients send
//! (origin-form target, no upgrade, no `Expect`, a body that is all read
//! already) to routes with backends, served without hyper. Each request head
//! is checked by `classify::http` exactly as the guard checks it, written on
//! with the header rules (`l7::h1`), and the backend's response goes back
//! through `l7::h1`'s head and framing checks, over the connections of
//! `l7::pool`. One task, one buffer per side, one read and one write per side
//! for a small exchange.
//!
//! Anything else (a request the guard would refuse, a chunked or large
//! upload, an upgrade, a service route, HTTP/2 or PROXY backends, a route
//! that answers itself) goes to hyper with the bytes read so far, for the
//! rest of the connection: the direct path never answers what it does not
//! serve, so every refusal and rule stays in one place.

use super::engine::Client;
use super::targets::{self, Unconnected};
use crate::classify::http::{self, Framing, RequestHead};
use crate::forward::{self, backend::BackendPool};
use crate::l7::guard::{self, Control};
use crate::l7::h1::{self, BodyLen, Chunks, ResponseHead};
use crate::l7::headers::{ForwardText, Forwarding};
use crate::l7::pool::{self, Stream};
use crate::l7::{self, RespBody};
use crate::reply::Reply;
use crate::route::{Owner, Route};
use hyper::Response;
use portmux_wire::spec::Scheme;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Room kept free for a read from either side.
const READ: usize = 8 * 1024;
/// A body's reads, once one fills the room.
const BULK: usize = 64 * 1024;

/// How the direct path left a connection.
pub(super) enum Outcome {
    /// Done: closed by either side, timed out, or answered and closed.
    Closed,
    /// Paused between requests, nothing read ahead: it may move to a new process.
    Paused(TcpStream),
    /// A request the direct path does not serve: hyper goes on from it (these
    /// bytes were read), for that request only (`once`, the connection comes
    /// back at the next boundary) or for the rest of the connection (its
    /// route is one hyper serves: a service, HTTP/2 or PROXY backends).
    Hyper { stream: TcpStream, read: Vec<u8>, once: bool },
}

/// What happened to one request.
enum Step {
    Next,
    Close,
    /// To hyper: for this request only, or (`false`) for good.
    Hyper(bool),
}

/// How an exchange with one backend connection went.
enum Exchanged {
    /// The response was passed on; the connection may serve another.
    Done {
        reusable: bool,
        close: bool,
    },
    /// The request could not be written: the backend closed the connection.
    Unsent(io::Error),
    /// Sent, and the connection ended before any byte of a response.
    Stale(io::Error),
    /// The backend failed before anything reached the client.
    Failed(String),
    TimedOut,
    /// Part of the response reached the client and then a side failed: only closing is left.
    Broken,
}

struct Conn<'a> {
    client: &'a Client,
    ctl: &'a Control,
    io: TcpStream,
    /// Read from the client: `buf[start..]` is not served yet.
    buf: Vec<u8>,
    start: usize,
    /// A request was served: a pause may end the connection between requests.
    served: bool,
    trusted: bool,
    /// Responses on their way out.
    out: Vec<u8>,
    /// Writes so far, and whether TCP_NODELAY is on: set before the second
    /// write (a first write goes out at once anyway; a connection that ends
    /// after one answer is spared the call).
    writes: u32,
    nodelay: bool,
    /// The forwarding values for the last Host seen.
    text: Option<(String, ForwardText)>,
    timer: Timer,
    /// What the last request got: its status, the bytes sent to the client
    /// so far, and its backend (kept only for the access log).
    status: u16,
    sent: u64,
    backend: Option<Arc<forward::backend::Backend>>,
}

/// The connection's one timer, for whichever deadline applies (the next
/// head, a response, the next bytes of a body). It is moved only when a
/// deadline comes sooner than it is set for; firing early, it is set again.
/// So a keep-alive exchange, whose deadlines only move later, registers
/// nothing with the timer wheel.
struct Timer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    due: Instant,
}

impl Timer {
    fn new() -> Timer {
        let due = Instant::now() + Duration::from_secs(24 * 3600);
        Timer { sleep: Box::pin(tokio::time::sleep_until(due)), due }
    }

    fn set(&mut self, due: Instant) {
        self.due = due;
        if self.sleep.deadline() > due {
            self.sleep.as_mut().reset(due);
        }
    }

    /// Resolves once the deadline last set has passed.
    async fn expired(&mut self) {
        loop {
            self.sleep.as_mut().await;
            if Instant::now() >= self.due {
                return;
            }
            let due = self.due;
            self.sleep.as_mut().reset(due);
        }
    }
}

/// Serves `io`'s requests for as long as they suit the direct path
/// (`served`: the connection served requests already).
pub(super) async fn serve(client: &Client, ctl: &Control, io: TcpStream, served: bool) -> Outcome {
    let http = &client.shared.settings.http;
    let trusted = http.trusted_proxies.iter().any(|n| n.contains(&client.peer.ip().to_canonical()));
    let buf = Vec::with_capacity(READ);
    let out = Vec::new();
    let mut conn = Conn {
        client,
        ctl,
        io,
        buf,
        start: 0,
        served,
        trusted,
        out,
        writes: 0,
        nodelay: served,
        text: None,
        timer: Timer::new(),
        status: 0,
        sent: 0,
        backend: None,
    };
    let mut request = Vec::new();
    let mut rbuf = Vec::new();
    loop {
        let end = match conn.head().await {
            Wait::Head(end) => end,
            Wait::Closed => return Outcome::Closed,
            Wait::Paused => return Outcome::Paused(conn.io),
            Wait::Other => return conn.into_hyper(true),
        };
        match conn.request(end, &mut request, &mut rbuf).await {
            Step::Next => conn.served = true,
            Step::Close => {
                if conn.start < conn.buf.len() {
                    // Requests came after the last one: a plain close could reset the answer.
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.io.shutdown()).await;
                }
                return Outcome::Closed;
            }
            Step::Hyper(once) => return conn.into_hyper(once),
        }
    }
}

enum Wait {
    /// A whole head is read; it ends here.
    Head(usize),
    Closed,
    Paused,
    /// Something the direct path leaves to hyper (a head too long, a half one at the end).
    Other,
}

impl Conn<'_> {
    /// Writes to the client.
    async fn write(&mut self, data: Option<&[u8]>) -> io::Result<()> {
        self.writes += 1;
        if self.writes > 1 && !self.nodelay {
            self.nodelay = true;
            let _ = self.io.set_nodelay(true);
        }
        let data = data.unwrap_or(&self.out);
        self.sent += data.len() as u64;
        self.io.write_all(data).await
    }

    fn into_hyper(self, once: bool) -> Outcome {
        Outcome::Hyper { stream: self.io, read: self.buf[self.start..].to_vec(), once }
    }

    /// Waits for a whole request head (the guard's search for its end).
    async fn head(&mut self) -> Wait {
        let settings = &self.client.shared.settings;
        let (mut line, mut text) = (0, false);
        self.timer.set(Instant::now() + settings.keepalive_timeout);
        loop {
            let pending = &self.buf[self.start..];
            if let Some(end) = guard::head_end(pending, &mut line, &mut text) {
                // Over the limit: the guard refuses it (431).
                return if end > settings.peek_max { Wait::Other } else { Wait::Head(self.start + end) };
            }
            if pending.len() >= settings.peek_max {
                return Wait::Other;
            }
            let boundary = pending.is_empty();
            if boundary && self.served && self.ctl.pause_asked() {
                return Wait::Paused;
            }
            if self.start > 0 && boundary {
                self.buf.clear();
                self.start = 0;
            } else if self.buf.capacity() - self.buf.len() < READ / 2 {
                self.buf.drain(..self.start);
                self.start = 0;
                self.buf.reserve(READ);
            }
            let read = tokio::select! {
                biased;
                r = self.io.read_buf(&mut self.buf) => r,
                () = self.ctl.paused(), if boundary && self.served => return Wait::Paused,
                () = self.timer.expired() => return Wait::Closed,
            };
            match read {
                Ok(0) if boundary => return Wait::Closed,
                Ok(0) => return Wait::Other,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(client = %self.client.peer, "client connection failed: {e}");
                    return Wait::Closed;
                }
            }
        }
    }

    /// Serves the request whose head ends at `end`, if it suits the direct path.
    async fn request(&mut self, end: usize, request: &mut Vec<u8>, rbuf: &mut Vec<u8>) -> Step {
        // Parsed and written in a plain function: the parser's fields are not
        // kept in the connection's future while the exchange goes on.
        let ready = match self.prepare(end, request) {
            Ok(ready) => ready,
            Err(step) => return step,
        };
        let ex = Exchange { request, again: ready.again, head: ready.head_request, close: ready.close };
        let (started, sent) = (std::time::Instant::now(), self.sent);
        // What the client sent (the backend got it with forwarding headers added).
        let from_client = (ready.req_end - self.start) as u64;
        self.status = 0;
        let step = self.forward(&ready.route, &ready.pool, &ready.head, &ex, rbuf).await;
        self.start = ready.req_end;
        let counters = &ready.route.counters;
        counters.answered(self.status);
        counters.relayed(from_client, self.sent - sent);
        let shared = &self.client.shared;
        if shared.access.is_on() {
            let method = ex.request.split(|b| *b == b' ').next().unwrap_or_default();
            let method = std::str::from_utf8(method).unwrap_or("-");
            let target = self.backend.take().map_or_else(|| "portmux".into(), |b| format!("backend {}", b.spec.name));
            let e = crate::telemetry::access::Entry {
                client: self.client.peer,
                route: &ready.route.key,
                target: &target,
                outcome: "request",
                status: (self.status > 0).then_some(self.status),
                request: Some((method, ready.head.host.as_deref().unwrap_or("-"), &ready.head.target)),
                from_client,
                to_client: self.sent - sent,
                started,
            };
            shared.access.write(&e);
        }
        step
    }

    /// Checks the request whose head ends at `end` and writes what the backend gets into `request`.
    fn prepare(&mut self, end: usize, request: &mut Vec<u8>) -> Result<Ready, Step> {
        let mut fields = [httparse::EMPTY_HEADER; http::MAX_HEADERS];
        // The guard refuses what classify::http refuses, and answers.
        let once = Err(Step::Hyper(true));
        let Ok((head, req)) = http::parse_into(&self.buf[self.start..end], &mut fields) else { return once };
        let Some(body) = plain(&head, &req) else { return once };
        let Some(req_end) = usize::try_from(body).ok().and_then(|b| end.checked_add(b)) else { return once };
        if req_end > self.buf.len() {
            return once; // An upload still on its way: hyper streams it.
        }
        let (close, odd) = h1::connection_options(req.headers);
        if odd {
            return once;
        }
        let (route, pool) = match self.route(&head) {
            Routed::Direct(route, pool) => (route, pool),
            Routed::Answer => return once,
            Routed::Elsewhere => return Err(Step::Hyper(false)),
        };
        let http = &self.client.shared.settings.http;
        if http.max_request_body.is_some_and(|max| body > max) {
            return once;
        }
        let method = req.method.unwrap_or_default();
        let host = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")).map_or(&b""[..], |h| h.value);
        let host = std::str::from_utf8(host).unwrap_or("").trim();
        if self.text.as_ref().is_none_or(|(h, _)| h != host) {
            // The forwarding values of this client and Host, made once per connection.
            let f = self.forwarding(Some(host.to_string()), true);
            self.text = Some((host.to_string(), f.text()));
        }
        let forwarding = self.forwarding(None, route.spec.forwarded.as_deref() != Some("off"));
        let text = &self.text.as_ref().expect("made above").1;
        request.clear();
        h1::request_head(request, &req, &head.target, &forwarding, text, host);
        request.extend_from_slice(&self.buf[end..req_end]);
        // Only an idempotent request may be sent twice (RFC 9110 §9.2.2).
        let again = body == 0 && matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE");
        Ok(Ready { route, pool, again, head_request: method == "HEAD", close, req_end, head })
    }

    fn forwarding(&self, host: Option<String>, add: bool) -> Forwarding {
        let via = self.client.shared.settings.http.via;
        Forwarding { client: self.client.peer.ip(), proto: "http", host, trusted: self.trusted, add, via }
    }

    /// The route of a request the direct path serves: one with backends
    /// (HTTP/1.1, no PROXY header) that neither redirects nor answers ACME.
    fn route(&self, head: &RequestHead) -> Routed {
        let shared = &self.client.shared;
        if shared.tls.challenges.http_answer(&head.target).is_some() {
            return Routed::Answer;
        }
        let table = shared.table.load();
        if table.services.wants(&head.target) {
            return Routed::Answer;
        }
        let Some(port) = table.port(self.client.listener) else { return Routed::Answer };
        let meta = self.client.meta(head.host.clone(), head.target.clone(), String::new());
        let Some(route) = port.routes.lookup(&meta).filter(|r| r.spec.scheme == Scheme::Http) else {
            return Routed::Answer;
        };
        if route.spec.acme || route.spec.redirect.is_some() {
            return Routed::Answer;
        }
        match &route.owner {
            Owner::Backends(pool) if route.spec.backend_proto.is_none() && pool.proxy.is_none() => {
                Routed::Direct(route.clone(), pool.clone())
            }
            _ => Routed::Elsewhere,
        }
    }

    /// Sends the request to a backend of `pool` (trying others as the engine
    /// does) and passes the response on.
    async fn forward(
        &mut self,
        route: &Route,
        pool: &BackendPool,
        head: &RequestHead,
        ex: &Exchange<'_>,
        rbuf: &mut Vec<u8>,
    ) -> Step {
        let settings = &self.client.shared.settings;
        let meta = || self.client.meta(head.host.clone(), head.target.clone(), route.key.to_string());
        let mut tried = Vec::new();
        pool.budget.deposit();
        for _ in 0..2 * forward::TRIES + 2 {
            let Some(i) = pool.pick(&tried) else { break };
            let backend = &pool.backends[i];
            let (mut stream, reused) = match pool::take_raw(backend) {
                Some(s) => (s, true),
                None => match targets::connect(backend, pool, &meta(), self.client).await {
                    Ok(fd) => match Stream::new(fd) {
                        Ok(s) => (s, false),
                        Err(e) => return self.answer(l7::reply(Reply::bad_gateway(&e.to_string())), ex.close).await,
                    },
                    Err(Unconnected::Local(e)) => return self.answer(targets::out_of_fds(&meta(), &e), ex.close).await,
                    Err(Unconnected::Backend(e)) => {
                        backend.mark_failed(settings.backend_cooldown);
                        tracing::warn!(route = %route.key, backend = %backend.spec.name, "backend failed to connect: {e}");
                        tried.push(i);
                        if tried.len() >= forward::TRIES || !pool.budget.withdraw() {
                            break;
                        }
                        continue;
                    }
                },
            };
            let _active = backend.connected();
            if self.client.shared.access.is_on() {
                self.backend = Some(backend.clone());
            }
            let name = || format!("backend {}", backend.spec.name);
            match self.exchange(&mut stream, ex, rbuf).await {
                Exchanged::Done { reusable, close } => {
                    if reusable {
                        pool::put_raw(backend, stream);
                    }
                    return if close || ex.close { Step::Close } else { Step::Next };
                }
                Exchanged::Unsent(_) if reused => continue,
                Exchanged::Stale(e) if reused && ex.again => {
                    tracing::debug!(route = %route.key, backend = %backend.spec.name, "a kept-alive connection closed under a request ({e}); sent again");
                    continue;
                }
                // The backend closed before any byte of an answer: an
                // idempotent bodyless request goes to another backend.
                Exchanged::Unsent(e) | Exchanged::Stale(e)
                    if ex.again && tried.len() + 1 < forward::TRIES && pool.budget.withdraw() =>
                {
                    backend.mark_failed(settings.backend_cooldown);
                    tracing::warn!(route = %route.key, backend = %backend.spec.name, "backend closed the connection before answering ({e}); trying another");
                    tried.push(i);
                }
                Exchanged::Unsent(e) | Exchanged::Stale(e) => {
                    return self.failed(&meta(), &name(), &e.to_string(), ex.close).await;
                }
                Exchanged::Failed(why) => return self.failed(&meta(), &name(), &why, ex.close).await,
                Exchanged::TimedOut => {
                    let answer = targets::timed_out(&meta(), &name(), settings.http.response_timeout);
                    return self.answer(answer, ex.close).await;
                }
                Exchanged::Broken => return Step::Close,
            }
        }
        tracing::warn!(route = %route.key, client = %self.client.peer, tried = tried.len(), "no backend reachable");
        self.backend = None;
        let text = format!("no backend of route {} accepted the connection ({} tried)", route.key, tried.len());
        self.answer(l7::reply(Reply::bad_gateway(&text)), ex.close).await
    }

    async fn failed(&mut self, meta: &portmux_wire::ConnMeta, target: &str, why: &str, close: bool) -> Step {
        self.client.shared.metrics.error(crate::telemetry::Side::Backend);
        tracing::warn!(route = %meta.route, target, client = %meta.peer, "target failed: {why}");
        self.answer(l7::reply(Reply::bad_gateway(&format!("{target} failed: {why}"))), close).await
    }

    /// Answers with one of the engine's own responses; the connection stays open unless `close`.
    async fn answer(&mut self, resp: Response<RespBody>, close: bool) -> Step {
        let status = resp.status();
        let body = match resp.into_body() {
            RespBody::Full(Some(b)) => b,
            _ => bytes::Bytes::new(),
        };
        self.out.clear();
        self.status = status.as_u16();
        h1::answer(&mut self.out, status.as_u16(), status.canonical_reason().unwrap_or(""), &body, close);
        match self.write(None).await {
            Ok(()) if !close => Step::Next,
            _ => Step::Close,
        }
    }

    /// One request and its response on `stream`.
    async fn exchange(&mut self, stream: &mut Stream, ex: &Exchange<'_>, rbuf: &mut Vec<u8>) -> Exchanged {
        let settings = &self.client.shared.settings;
        if let Err(e) = stream.write_all(ex.request).await {
            return Exchanged::Unsent(e);
        }
        let max_head = settings.peek_max.max(8192) * 2;
        self.timer.set(Instant::now() + settings.http.response_timeout);
        rbuf.clear();
        // Nothing at all came back yet (a kept-alive connection the backend had closed?).
        let mut nothing = true;
        let (rh, at) = loop {
            if !rbuf.is_empty() {
                let mut fields = [httparse::EMPTY_HEADER; http::MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut fields);
                match resp.parse(rbuf) {
                    Ok(httparse::Status::Partial) if rbuf.len() >= max_head => {
                        return Exchanged::Failed("the response head is too large".into());
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Exchanged::Failed(format!("invalid response head: {e}")),
                    Ok(httparse::Status::Complete(n)) => {
                        let code = resp.code.unwrap_or(0);
                        if code == 101 {
                            return Exchanged::Failed(
                                "the target switched protocols though the client did not ask".into(),
                            );
                        }
                        if (100..200).contains(&code) {
                            // Informational: hyper's client skips them too.
                            rbuf.drain(..n);
                            continue;
                        }
                        let rh = match h1::response_framing(&resp, ex.head) {
                            Ok(rh) => rh,
                            Err(why) => return Exchanged::Failed(why.into()),
                        };
                        self.out.clear();
                        self.status = code;
                        h1::response_head(&mut self.out, &resp, &rh, ex.close, settings.http.via);
                        break (rh, n);
                    }
                }
            }
            if rbuf.capacity() - rbuf.len() < READ / 2 {
                rbuf.reserve(READ);
            }
            let read = tokio::select! {
                biased;
                r = stream.read_buf(rbuf) => r,
                () = self.timer.expired() => return Exchanged::TimedOut,
            };
            match read {
                Ok(0) if nothing => return Exchanged::Stale(io::ErrorKind::UnexpectedEof.into()),
                Ok(0) => return Exchanged::Failed("the connection closed in the response head".into()),
                Err(e) if nothing => return Exchanged::Stale(e),
                Err(e) => return Exchanged::Failed(e.to_string()),
                Ok(_) => nothing = false,
            }
        };
        self.body(stream, rh, at, rbuf).await
    }

    /// Passes the response body on (its first bytes are `rbuf[at..]`), after the head in `self.out`.
    async fn body(&mut self, stream: &mut Stream, rh: ResponseHead, at: usize, rbuf: &mut Vec<u8>) -> Exchanged {
        let idle = self.client.shared.settings.idle_timeout;
        let mut chunks = Chunks::default();
        let mut left = match rh.body {
            BodyLen::Length(n) => n,
            _ => u64::MAX,
        };
        let mut from = at;
        // Bytes that came after the response: the connection is not reused.
        let mut extra = false;
        loop {
            let data = &rbuf[from..];
            let take = match rh.body {
                BodyLen::None => 0,
                BodyLen::Length(_) => (data.len() as u64).min(left) as usize,
                BodyLen::Chunked => match chunks.scan(data) {
                    Ok(Some(n)) => {
                        left = 0;
                        n
                    }
                    Ok(None) => data.len(),
                    Err(why) if self.out.is_empty() => return self.broken(why),
                    Err(why) => return Exchanged::Failed(why.into()),
                },
                BodyLen::Close => data.len(),
            };
            extra |= take < data.len();
            if let BodyLen::Length(_) = rh.body {
                left -= take as u64;
            }
            let done = match rh.body {
                BodyLen::None => true,
                BodyLen::Length(_) | BodyLen::Chunked => left == 0,
                BodyLen::Close => false,
            };
            let written = if self.out.is_empty() {
                self.write(Some(&data[..take])).await
            } else {
                self.out.extend_from_slice(&data[..take]);
                let w = self.write(None).await;
                self.out.clear();
                w
            };
            if let Err(e) = written {
                tracing::debug!(client = %self.client.peer, "client connection failed: {e}");
                return Exchanged::Broken;
            }
            if done {
                return Exchanged::Done { reusable: rh.reusable && !extra, close: false };
            }
            rbuf.clear();
            from = 0;
            if rbuf.capacity() < BULK {
                rbuf.reserve(BULK);
            }
            self.timer.set(Instant::now() + idle);
            let read = tokio::select! {
                biased;
                r = stream.read_buf(rbuf) => r,
                () = self.timer.expired() => return self.broken("no response data within the idle timeout"),
            };
            match read {
                Ok(0) if rh.body == BodyLen::Close => return Exchanged::Done { reusable: false, close: true },
                Ok(0) => return self.broken("the connection closed in the response body"),
                Ok(_) => {}
                Err(e) => return self.broken(&e.to_string()),
            }
        }
    }

    fn broken(&self, why: &str) -> Exchanged {
        tracing::debug!(client = %self.client.peer, "response cut short: {why}");
        Exchanged::Broken
    }
}

/// A request checked and written, ready to go.
struct Ready {
    route: Arc<Route>,
    pool: Arc<BackendPool>,
    again: bool,
    head_request: bool,
    close: bool,
    req_end: usize,
    head: RequestHead,
}

/// Where a request goes.
enum Routed {
    Direct(Arc<Route>, Arc<BackendPool>),
    /// portmux answers it itself (no route, a redirect, ACME): hyper, for this request.
    Answer,
    /// To a target hyper serves (a service, HTTP/2 or PROXY backends).
    Elsewhere,
}

/// One request as the backend gets it.
struct Exchange<'a> {
    request: &'a [u8],
    /// May be sent again on another connection (idempotent, no body).
    again: bool,
    /// A HEAD request: its response has no body.
    head: bool,
    /// The client asked to close after this exchange.
    close: bool,
}

/// The body length of a request the direct path serves: HTTP/1.1, an
/// origin-form target hyper would take, no upgrade, no `Expect`, no chunks.
fn plain(head: &RequestHead, req: &httparse::Request<'_, '_>) -> Option<u64> {
    let target = req.path?;
    if req.version != Some(1) || head.upgrade || !target.starts_with('/') {
        return None;
    }
    if target.parse::<hyper::http::uri::PathAndQuery>().is_err() {
        return None;
    }
    if req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("expect")) {
        return None;
    }
    match head.body {
        Framing::None => Some(0),
        Framing::Length(n) => Some(n),
        Framing::Chunked => None,
    }
}
