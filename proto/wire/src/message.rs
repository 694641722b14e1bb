//! The messages exchanged on the control socket, one per `SOCK_SEQPACKET` datagram.
//!
//! Variants are only ever appended: bincode encodes a variant by its index, so
//! reordering them would change the format the golden tests pin.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Version of the control protocol; sent in [`Message::Hello`]. Bump it on any
/// change that an older peer could misread. Version 2 added [`Message::Acks`],
/// version 3 [`Message::Lend`] (portmux lends only to version 3 sessions).
pub const PROTOCOL_VERSION: u32 = 3;

/// The oldest control protocol version portmux still serves: a version-1
/// service acks one connection per message.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Version of the upgrade handover ([`Handover`]) between two portmux
/// processes; independent of the control protocol's.
pub const HANDOVER_VERSION: u32 = 1;

/// One control-socket message.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Service → portmux, first message of a session. `service` names the
    /// service: sessions with the same name form a pool and may take over
    /// each other's routes after a restart.
    Hello { version: u32, service: String },
    /// Service → portmux: claim these routes (route-spec strings). All or nothing.
    Register { routes: Vec<String> },
    /// portmux → service: every route of the last `Register` is now served.
    Registered { routes: Vec<Bound> },
    /// portmux → service: the last `Register` was refused as a whole because of `route`.
    Refused { route: String, reason: String },
    /// portmux → service: a client connection; its fd travels in the same datagram
    /// (SCM_RIGHTS). The peeked bytes are still unread in the socket.
    Connection { id: u64, meta: ConnMeta },
    /// Service → portmux: connection `id` and its fd were received; portmux closes its copy.
    Ack { id: u64 },
    /// Service → portmux: connection `id` is declined; portmux gives it to another
    /// instance or parks it. The service must not have read from it.
    Reject { id: u64, reason: String },
    /// Service → portmux: send no new connections to this session (it is shutting down);
    /// others in the pool, or a successor, take them.
    Drain,
    /// Either way: the session ends normally. The service's routes stay reserved for the
    /// linger period so that a restarted instance gets the connections queued meanwhile.
    Bye,
    /// portmux → service: the session is being closed because of a protocol error.
    /// Also portmux → `portmux upgrade`: the upgrade failed, and why.
    Error { reason: String },
    /// `portmux upgrade` → portmux, as the first message instead of Hello:
    /// replace yourself with `binary` (default: the binary you were started from).
    Upgrade { binary: Option<String> },
    /// portmux → `portmux upgrade`: the new process (`pid`) is serving.
    Upgraded { pid: u32 },
    /// Service → portmux, with the connection's fd: a connection of `route`
    /// (as its `ConnMeta::route` named it) that sits between requests: nothing
    /// was read beyond its last request, so its next one, if any, is unread in
    /// the socket. portmux holds it until that request arrives and routes it
    /// like a new connection's (to the next instance, after a restart). `peer`
    /// and `local` are the addresses portmux gave (they matter behind a load
    /// balancer, with `--accept-proxy`). Only plain HTTP and raw TCP
    /// connections can move; a TLS session's state stays with its service.
    GiveBack { route: String, peer: SocketAddr, local: SocketAddr },
    /// portmux → service: a client connection of an `https://` route, whose
    /// TLS portmux terminated. The fd (in the same datagram) is one end of a
    /// Unix socketpair carrying the plaintext; the first request
    /// (`meta.peeked` bytes) comes first on it, as the client sent it.
    TlsConnection { id: u64, meta: ConnMeta, tls: TlsInfo },
    /// Service → portmux: like [`Message::Register`], and the `https://`
    /// routes among `routes` that name no certificate of their own are
    /// served with this one: `chain` (PEM, leaf first) and `key` (PEM). Only
    /// over the Unix control socket; portmux never logs it and forgets it
    /// when the service's routes are gone.
    RegisterTls { routes: Vec<String>, chain: String, key: String },
    /// Service → portmux (protocol version 2 on): like one [`Message::Ack`]
    /// per id, for the connections a service took from its session socket at
    /// once; in the order received.
    Acks { ids: Vec<u64> },
    /// portmux → service (protocol version 3 on), with a listening socket's
    /// fd: the port of `route` (a `?lend` route, listening on `listen`) is
    /// lent to this session: accept from the fd directly, alongside the
    /// connections that still come as [`Message::Connection`] (accepted
    /// before the loan). portmux keeps its own copy and takes the port back
    /// when no session holds the loan: close the fd before [`Message::Drain`]
    /// or [`Message::Bye`], and when the session ends.
    Lend { route: String, listen: SocketAddr },
}

/// What portmux learned from a TLS handshake it terminated.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// The server name the client asked for (lower case), if it sent one.
    pub sni: Option<String>,
    /// The application protocol negotiated by ALPN (`http/1.1`), if any.
    pub alpn: Option<String>,
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// The cipher suite's IANA name, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: String,
    /// The client's certificate chain (DER, leaf first), verified against
    /// the route's `client_ca`; empty when the route asks for none.
    pub client_certs: Vec<Vec<u8>>,
}

impl ConnMeta {
    /// What is known of a connection before anything of it is read: its
    /// route, the route's protocol and the two addresses.
    #[inline]
    pub fn unpeeked(route: String, proto: Proto, peer: SocketAddr, local: SocketAddr) -> ConnMeta {
        ConnMeta { route, proto, peer, local, sni: None, alpn: Vec::new(), host: None, path: None, peeked: 0 }
    }
}

impl Message {
    /// The variant's name, for error messages ("expected Hello, got Register").
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Register { .. } => "Register",
            Message::Registered { .. } => "Registered",
            Message::Refused { .. } => "Refused",
            Message::Connection { .. } => "Connection",
            Message::Ack { .. } => "Ack",
            Message::Reject { .. } => "Reject",
            Message::Drain => "Drain",
            Message::Bye => "Bye",
            Message::Error { .. } => "Error",
            Message::Upgrade { .. } => "Upgrade",
            Message::Upgraded { .. } => "Upgraded",
            Message::GiveBack { .. } => "GiveBack",
            Message::TlsConnection { .. } => "TlsConnection",
            Message::RegisterTls { .. } => "RegisterTls",
            Message::Acks { .. } => "Acks",
            Message::Lend { .. } => "Lend",
        }
    }
}

/// A route as portmux now serves it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    /// The route in canonical form (see [`crate::RouteSpec`]'s `Display`).
    pub route: String,
    /// The address of the listening socket serving it.
    pub listen: SocketAddr,
}

/// The protocol portmux recognised on a connection before handing it over.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Not inspected (a `tcp://` route), or not recognised.
    Tcp,
    /// An HTTP/1 request head.
    Http,
    /// A TLS ClientHello.
    Tls,
}

/// What portmux learned about a connection; travels with its fd.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConnMeta {
    /// The route (canonical spec) the connection matched.
    pub route: String,
    pub proto: Proto,
    /// The client's address (IPv4-mapped IPv6 addresses are given as IPv4).
    pub peer: SocketAddr,
    /// The local address the client connected to.
    pub local: SocketAddr,
    /// TLS server name, lower case, without a trailing dot.
    pub sni: Option<String>,
    /// ALPN protocols the client offered, in its order.
    pub alpn: Vec<String>,
    /// HTTP Host, lower case, without port or trailing dot.
    pub host: Option<String>,
    /// HTTP request path of the first request, as sent (query included).
    pub path: Option<String>,
    /// How many bytes portmux looked at; they are still unread in the socket.
    pub peeked: u32,
}

/// Messages between a running portmux (old) and the process replacing it (new)
/// on an upgrade, over a `SOCK_SEQPACKET` socketpair; fds travel with the
/// messages that describe them. Order: new sends Start; old sends the
/// listeners, control and admin sockets, routes, sessions, unacked and queued
/// connections, relays, then StateEnd; new answers Ready (or Failed); old
/// says Commit, and only then does new serve. Until Done, old may still send
/// Deliver and Relay messages as its last work ends.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// new → old: started; this is my handover version ([`HANDOVER_VERSION`]) and pid.
    Start { version: u32, pid: u32 },
    /// A public listening socket (+ its fd).
    Listener { id: u64, addr: SocketAddr },
    /// The control socket's listening fd; `owned`: portmux created its file
    /// (and removes it on a clean stop), rather than a socket unit.
    ControlSocket { owned: bool },
    /// The admin API's listening fd (TCP).
    AdminSocket,
    /// A route forwarding to backends.
    BackendRoute { route: String, backends: Vec<String> },
    /// A service's route (as releases before 0.2 sent it: its owner is unknown);
    /// `reserved_ms` left if no session holds it now.
    ServiceRoute { route: String, service: String, reserved_ms: Option<u64> },
    /// A service session (+ its socket).
    Session { id: u64, name: String, pid: i32, uid: u32, draining: bool, routes: Vec<String> },
    /// A connection sent to session `session` and not yet acked (+ its fd).
    Unacked { session: u64, id: u64, listener: SocketAddr, meta: ConnMeta },
    /// A classified connection to deliver (+ its fd), queued `waited_ms` already.
    Deliver { id: u64, listener: SocketAddr, meta: ConnMeta, waited_ms: u64 },
    /// A forwarded connection to keep relaying (+ client fd, + backend fd).
    /// `*_closed`: that side's end-of-file was already passed on.
    Relay { route: String, backend: String, meta: ConnMeta, client_closed: bool, backend_closed: bool },
    /// old → new: the state is complete; connection ids continue from here.
    StateEnd { next_conn_id: u64 },
    /// new → old: serving.
    Ready,
    /// new → old: cannot start; why.
    Failed { reason: String },
    /// old → new: nothing more will come.
    Done,
    /// The route-state file kept in systemd's fd store (+ its fd).
    StateFile,
    /// A public listening socket that systemd passed by socket activation (+
    /// its fd): it stays open when no route uses it.
    PinnedListener { id: u64, addr: SocketAddr },
    /// old → new, after Ready: the upgrade is committed; serve. Until then the
    /// new process holds the state without serving it (the old may still thaw).
    Commit,
    /// A connection a service gave back, waiting for its next request (+ its
    /// fd), idle for `idle_ms` already; `peer` and `local` as it was given back.
    Idle { listener: SocketAddr, peer: SocketAddr, local: SocketAddr, idle_ms: u64 },
    /// The admin API's listening Unix socket (+ its fd); `owned`: portmux
    /// bound its file (and removes it on a clean stop), rather than a socket unit.
    AdminUnixSocket { owned: bool },
    /// A service's route, owned by `uid` (who claimed it: while the route
    /// exists, no other unprivileged uid takes it or its service's name);
    /// `reserved_ms` left if no session holds it now.
    OwnedServiceRoute { route: String, service: String, uid: u32, reserved_ms: Option<u64> },
    /// Like `Unacked`, for a connection whose TLS the old process terminated
    /// (+ the plaintext socketpair end; the old process relays the TLS side
    /// until it ends).
    UnackedTls { session: u64, id: u64, listener: SocketAddr, meta: ConnMeta, tls: TlsInfo },
    /// Like `Deliver`, for a connection whose TLS the old process terminated.
    DeliverTls { id: u64, listener: SocketAddr, meta: ConnMeta, tls: TlsInfo, waited_ms: u64 },
    /// The session-ticket keys, newest first (each a 16-byte name and a
    /// 32-byte key), the newest made `age_ms` ago: tickets issued by the old
    /// process resume in the new one.
    TicketKeys { keys: Vec<Vec<u8>>, age_ms: u64 },
    /// The certificate a service sent for `route` with its registration.
    ServiceCert { route: String, chain: String, key: String },
    /// The routes (as in `BackendRoute`, sent before) that the config file
    /// made: the next process removes those its file no longer declares.
    FileRoutes { routes: Vec<String> },
    /// How many upgrades in a row led to the old process (for its metrics).
    Upgrades { count: u64 },
    /// The in-kernel relay's maps, of map layout `layout` (+ their fds:
    /// socks, links, stats, ctl, claims; the program is attached to socks).
    /// Sent before StateEnd; without it the new process relays in user space.
    RelayMaps { layout: u32 },
    /// Like `Relay`, for a flow the kernel relays (+ client fd, + backend
    /// fd): it stays in the maps meanwhile. `slots`: the first of its pair of
    /// slots; `base`: what the client and the backend socket had been sent
    /// when they went in.
    RelayInKernel {
        route: String,
        backend: String,
        meta: ConnMeta,
        client_closed: bool,
        backend_closed: bool,
        slots: u32,
        base: (u64, u64),
    },
}

/// The owner of a route whose owner was not handed over (older releases):
/// nobody's uid, so only root and portmux's own uid may take it.
pub const UNKNOWN_OWNER: u32 = u32::MAX;

impl Handover {
    pub fn kind(&self) -> &'static str {
        match self {
            Handover::Start { .. } => "Start",
            Handover::Listener { .. } => "Listener",
            Handover::ControlSocket { .. } => "ControlSocket",
            Handover::AdminSocket => "AdminSocket",
            Handover::BackendRoute { .. } => "BackendRoute",
            Handover::ServiceRoute { .. } => "ServiceRoute",
            Handover::Session { .. } => "Session",
            Handover::Unacked { .. } => "Unacked",
            Handover::Deliver { .. } => "Deliver",
            Handover::Relay { .. } => "Relay",
            Handover::StateEnd { .. } => "StateEnd",
            Handover::Ready => "Ready",
            Handover::Failed { .. } => "Failed",
            Handover::Done => "Done",
            Handover::StateFile => "StateFile",
            Handover::PinnedListener { .. } => "PinnedListener",
            Handover::Commit => "Commit",
            Handover::Idle { .. } => "Idle",
            Handover::AdminUnixSocket { .. } => "AdminUnixSocket",
            Handover::OwnedServiceRoute { .. } => "OwnedServiceRoute",
            Handover::UnackedTls { .. } => "UnackedTls",
            Handover::DeliverTls { .. } => "DeliverTls",
            Handover::TicketKeys { .. } => "TicketKeys",
            Handover::ServiceCert { .. } => "ServiceCert",
            Handover::FileRoutes { .. } => "FileRoutes",
            Handover::Upgrades { .. } => "Upgrades",
            Handover::RelayMaps { .. } => "RelayMaps",
            Handover::RelayInKernel { .. } => "RelayInKernel",
        }
    }
}
