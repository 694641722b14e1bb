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
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::{Rc, Weak};

thread_local! {
    /// This thread's engine connections (their controls), to pause them all.
    static CONNS: RefCell<Vec<Weak<guard::Control>>> = const { RefCell::new(Vec::new()) };
    /// Set once this thread was asked to pause: new connections pause at once.
    static PAUSING: Cell<bool> = const { Cell::new(false) };
}

/// Counts an engine connection among this thread's (no lock: each worker
/// keeps its own list, as it does for relays).
pub fn register(ctl: &Rc<guard::Control>) {
    if PAUSING.with(Cell::get) {
        ctl.pause();
    }
    CONNS.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= 64 && c.len().is_power_of_two() {
            c.retain(|w| w.strong_count() > 0);
        }
        c.push(Rc::downgrade(ctl));
    });
}

/// Asks every engine connection of this thread (and every later one) to end
/// at its next boundary between requests: for an upgrade (they move) or a stop.
pub fn pause_all() {
    PAUSING.with(|p| p.set(true));
    CONNS.with(|c| c.borrow_mut().retain(|w| w.upgrade().map(|ctl| ctl.pause()).is_some()));
}

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
