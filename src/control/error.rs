//! Why the control plane refused something, typed, with the side that failed;
//! the text (`Display`) is what services, the admin API and the log show, and
//! says what to do instead.

use portmux_wire::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SpecError};
use std::io;
use std::net::SocketAddr;

/// Which side a failure is to blame on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The request: malformed, or asking for what another holds.
    Requester,
    /// The host: the kernel refused (an address in use by another process,
    /// a privileged port).
    Host,
    /// portmux itself: busy with an upgrade, or stopping.
    Portmux,
}

/// Who holds a route that was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A service with live sessions.
    Service { service: String, pid: i32, uid: u32 },
    /// A service that left; the route waits for it until the reservation ends.
    Reserved { service: String, uid: u32, left_s: u64, release_in_s: u64 },
    /// A service that has no session at the moment (between imports).
    Away { service: String, uid: u32 },
    /// The admin API (backend addresses).
    Backends,
}

/// A refused registration or admin change, and why.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{source}")]
    Spec {
        route: String,
        #[source]
        source: SpecError,
    },
    #[error("Register needs at least one route")]
    NoRoutes,
    #[error("the session is closing")]
    SessionClosing,
    #[error("route {route}: {reason}")]
    Certificate { route: String, reason: String },
    #[error("the spec names service '{spec}' but this session said Hello as '{hello}'; use one name")]
    NameMismatch { route: String, spec: String, hello: String },
    #[error("lb= and proxy= apply to routes with backends (portmux route add), not to services")]
    BackendOptions { route: String },
    #[error("name= names a service; a route with backends has none")]
    ServiceName { route: String },
    #[error("{reason}")]
    BadOption { route: String, reason: String },
    #[error("{}", held(route, holder))]
    Held { route: String, holder: Holder },
    #[error("route {route}: {refusal}")]
    Policy { route: String, refusal: crate::config::policy::Refusal },
    #[error("{what}: more than the limit of {most} ({flag})", flag = limit.flag())]
    Limit { route: String, limit: crate::config::limits::Limit, what: String, most: usize },
    #[error(
        "route {route}: refused by the ownership rule: {what} is held by {}; another user may not claim a host, a \
         path under it, a port or a service name that someone else holds or reserves",
        who(holder)
    )]
    Owned { route: String, what: String, holder: Holder },
    #[error(
        "portmux already listens on {other}, which overlaps {addr}; routes on port {port} must use the same \
         listening address (drop or change bind=)", port = addr.port()
    )]
    Clash { route: String, addr: SocketAddr, other: SocketAddr },
    #[error("{}", bind_text(*addr, source))]
    Bind {
        route: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("an upgrade is in progress; try again in a moment")]
    Upgrading,
    #[error("portmux is stopping")]
    Stopping,
    #[error("no route {route}; portmux route list shows them")]
    NotFound { route: String },
    #[error("route {route} is held by service '{service}'; a service's route goes when the service leaves")]
    ServiceRoute { route: String, service: String },
    #[error("no route with backends is {route}")]
    NoBackendsAt { route: String },
    #[error("no route has backends; create one with portmux route add SPEC --backend ADDR")]
    NoBackendRoute,
    #[error("several routes have backends; name one with route=SPEC")]
    SeveralBackendRoutes,
}

impl ControlError {
    /// The route the refusal is about ("" when it is about no single route).
    pub fn route(&self) -> &str {
        match self {
            ControlError::Spec { route, .. }
            | ControlError::Certificate { route, .. }
            | ControlError::NameMismatch { route, .. }
            | ControlError::BackendOptions { route }
            | ControlError::ServiceName { route }
            | ControlError::BadOption { route, .. }
            | ControlError::Held { route, .. }
            | ControlError::Policy { route, .. }
            | ControlError::Owned { route, .. }
            | ControlError::Limit { route, .. }
            | ControlError::Clash { route, .. }
            | ControlError::Bind { route, .. }
            | ControlError::NotFound { route }
            | ControlError::ServiceRoute { route, .. }
            | ControlError::NoBackendsAt { route } => route,
            ControlError::NoRoutes
            | ControlError::SessionClosing
            | ControlError::Upgrading
            | ControlError::Stopping
            | ControlError::NoBackendRoute
            | ControlError::SeveralBackendRoutes => "",
        }
    }

    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            ControlError::Bind { source, .. } if source.raw_os_error() != Some(libc::EADDRNOTAVAIL) => Side::Host,
            ControlError::Upgrading | ControlError::Stopping | ControlError::SessionClosing => Side::Portmux,
            _ => Side::Requester,
        }
    }

    /// What kind of refusal this is, for the admin API's status code.
    pub fn kind(&self) -> Kind {
        match self {
            ControlError::Spec { .. }
            | ControlError::NoRoutes
            | ControlError::Certificate { .. }
            | ControlError::NameMismatch { .. }
            | ControlError::BackendOptions { .. }
            | ControlError::ServiceName { .. }
            | ControlError::BadOption { .. }
            | ControlError::Limit { .. }
            | ControlError::SeveralBackendRoutes => Kind::Invalid,
            ControlError::NotFound { .. } | ControlError::NoBackendsAt { .. } | ControlError::NoBackendRoute => {
                Kind::NotFound
            }
            ControlError::SessionClosing
            | ControlError::Held { .. }
            | ControlError::Policy { .. }
            | ControlError::Owned { .. }
            | ControlError::Clash { .. }
            | ControlError::Bind { .. }
            | ControlError::Upgrading
            | ControlError::Stopping
            | ControlError::ServiceRoute { .. } => Kind::Conflict,
        }
    }
}

/// The three kinds of refusal (the admin API answers 400, 404 and 409).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Invalid,
    NotFound,
    Conflict,
}

fn held(route: &str, holder: &Holder) -> String {
    match holder {
        Holder::Backends => format!(
            "route {route} forwards to backends set through the admin API; remove it first \
             (portmux route remove '{route}')"
        ),
        Holder::Service { service, pid, uid } => format!(
            "route {route} is held by service '{service}' (pid {pid}, uid {uid}); register under the name \
             '{service}' to join its pool, or choose another route"
        ),
        Holder::Reserved { service, left_s, release_in_s, .. } => format!(
            "route {route} is reserved for service '{service}', which left {left_s}s ago; it is released in \
             {release_in_s}s unless '{service}' registers again"
        ),
        Holder::Away { service, .. } => format!("route {route} is held by service '{service}'"),
    }
}

/// The holder, in a few words.
fn who(holder: &Holder) -> String {
    match holder {
        Holder::Backends => "the administrator (a route with backends)".into(),
        Holder::Service { service, pid, uid } => format!("service '{service}' (pid {pid}, uid {uid})"),
        Holder::Reserved { service, uid, release_in_s, .. } => {
            format!("service '{service}' (uid {uid}), reserved for it for {release_in_s}s more")
        }
        Holder::Away { service, uid } => format!("service '{service}' (uid {uid})"),
    }
}

fn bind_text(addr: SocketAddr, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => format!("cannot listen on {addr}: another process uses this address"),
        Some(libc::EACCES) => {
            format!("cannot listen on {addr}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)")
        }
        Some(libc::EADDRNOTAVAIL) => format!("cannot listen on {addr}: not an address of this host"),
        _ => format!("cannot listen on {addr}: {e}"),
    }
}

/// Why the state could not move to (or be taken from) another process.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("cannot duplicate {what} for the new process: {source}")]
    Dup {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the handover channel to the new process is closed")]
    ChannelClosed,
    #[error("{kind} arrived without its fd")]
    MissingFd { kind: &'static str },
    #[error("unexpected {kind} while receiving the state")]
    Unexpected { kind: &'static str },
    #[error("route {route}: {reason}")]
    Route { route: String, reason: String },
}

/// A session broke the control protocol; the text goes back to it as Error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("services must not send file descriptors to portmux")]
    FdsSent,
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    Oversized { len: usize, max: usize },
    #[error("{0}")]
    Malformed(String),
    #[error(
        "protocol version {version} is not supported: this portmux speaks versions {MIN_PROTOCOL_VERSION} to \
         {PROTOCOL_VERSION}; use a client library of the same release or older"
    )]
    Version { version: u32 },
    #[error("{0}")]
    BadName(String),
    #[error("the first message must be Hello, not {0}")]
    NotHello(&'static str),
    #[error("no Hello within {0} s; the first message must be Hello")]
    NoHello(u64),
    #[error("Hello was already sent; send it once, first")]
    HelloAgain,
    #[error("{0} is a message portmux sends, not one it accepts")]
    NotAccepted(&'static str),
    #[error("GiveBack must carry exactly one fd (the connection), not {0}")]
    GiveBackFds(usize),
    #[error("this session does not hold route {route}; give back only connections of your own routes")]
    NotYourRoute { route: String },
    #[error("the fd given back is not a client connection of this route: {reason}")]
    NotAClient { reason: String },
    #[error("{whose} {most} control sessions open, the limit ({flag}); close one first")]
    TooMany { whose: String, most: usize, flag: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_say_who_holds_what_and_what_to_do() {
        let e = ControlError::Held {
            route: "http://:80".into(),
            holder: Holder::Service { service: "web".into(), pid: 7, uid: 1000 },
        };
        assert_eq!(
            e.to_string(),
            "route http://:80 is held by service 'web' (pid 7, uid 1000); register under the name 'web' to join its \
             pool, or choose another route"
        );
        assert_eq!((e.route(), e.side(), e.kind()), ("http://:80", Side::Requester, Kind::Conflict));
        let addr: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let e =
            ControlError::Bind { route: "tcp://:80".into(), addr, source: io::Error::from_raw_os_error(libc::EACCES) };
        assert!(e.to_string().contains("permission denied (ports below 1024"), "{e}");
        assert_eq!(e.side(), Side::Host);
        assert!(std::error::Error::source(&e).is_some(), "the io::Error is kept");
        let e =
            ControlError::Certificate { route: "https://a:443".into(), reason: "cannot read /c.pem: denied".into() };
        assert_eq!(e.to_string(), "route https://a:443: cannot read /c.pem: denied");
        assert_eq!(e.side(), Side::Requester);
    }
}
