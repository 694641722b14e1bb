//! The per-request HTTP engine's mechanisms (hyper does the framing): the
//! framing checks of every HTTP/1 request ([`guard`]), the header rules of
//! a proxy ([`headers`]), the bodies that pass through ([`body`]), and the
//! per-worker pool of connections to backends ([`pool`]). Routing each
//! request is `accept/engine.rs`'s.

pub mod body;
pub mod guard;
pub mod h1;
pub mod headers;
pub mod pool;

pub use body::{ReqBody, RespBody};

use crate::reply::Reply;
use hyper::{Response, StatusCode, header};
use std::future::Future;
use std::rc::Rc;

thread_local! {
    /// This thread's engine connections (their controls), to pause them all.
    static CONNS: crate::forward::Pausable<guard::Control> = const { crate::forward::Pausable::new() };
}

/// Counts an engine connection among this thread's (no lock: each worker
/// keeps its own list, as it does for relays).
pub fn register(ctl: &Rc<guard::Control>) {
    CONNS.with(|c| c.register(ctl, guard::Control::pause));
}

/// Asks every engine connection of this thread (and every later one) to end
/// at its next boundary between requests: for an upgrade (they move) or a stop.
pub fn pause_all() {
    CONNS.with(|c| c.pause_all(guard::Control::pause));
}

/// A short plain-text answer portmux gives itself (one `reply.rs` has no words for).
pub fn answer(status: StatusCode, text: &str) -> Response<RespBody> {
    text_response(status, format!("portmux: {text}\n"))
}

/// One of `reply.rs`'s answers, said as a response on a connection that stays
/// open: the same words as when portmux answers a whole connection.
pub fn reply(r: Reply) -> Response<RespBody> {
    match r {
        Reply::Http { status, body } => {
            text_response(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body)
        }
        Reply::Redirect { location, status } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::PERMANENT_REDIRECT);
            let mut resp = text_response(status, format!("portmux: moved to {location}\n"));
            if let Ok(v) = header::HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        Reply::Json { status, body } => {
            let mut r = text_response(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body);
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            r
        }
        Reply::TlsAlert(_) | Reply::Close | Reply::Abort => answer(StatusCode::BAD_GATEWAY, "no answer"),
    }
}

fn text_response(status: StatusCode, body: String) -> Response<RespBody> {
    let mut r = Response::new(RespBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Runs hyper's background futures on the worker's own thread (they need not be `Send`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalExec;

impl<F: Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}
