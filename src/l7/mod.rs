//! The per-request HTTP engine's mechanisms (hyper does the framing): the
//! framing checks of every HTTP/1 request ([`guard`]), the header rules of
//! a proxy ([`headers`]), the bodies that pass through ([`body`]), and the
//! per-worker pool of connections to backends ([`pool`]). Routing each
//! request is `accept/engine.rs`'s.

pub mod body;
pub mod guard;
pub mod headers;
pub mod pool;

pub use body::{ReqBody, RespBody};

use hyper::{Response, StatusCode, header};
use std::future::Future;

/// A short plain-text answer portmux gives itself.
pub fn answer(status: StatusCode, text: &str) -> Response<RespBody> {
    let mut r = Response::new(RespBody::full(format!("portmux: {text}\n")));
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
