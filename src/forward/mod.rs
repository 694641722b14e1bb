//! Forwarding a connection to a backend address: choose (load balancing and
//! passive health), connect (up to three tries), send the PROXY header if the
//! route asks, then relay until both sides are done.

pub mod backend;
pub mod health;
pub mod kernel;
pub mod proxy;
pub mod relay;
pub mod stream;

use crate::config::Settings;
use crate::reply::{self, Reply};
use backend::{Backend, BackendPool};
use portmux_sys::{net, reactor, uring};
use portmux_wire::{ConnMeta, Proto};
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use tokio::time::Instant;

/// At most this many backends are tried per connection (SRP's rule).
pub const TRIES: usize = 3;

/// A relay paused at a safe point for an upgrade: everything needed to resume it.
#[derive(Debug)]
pub struct Paused {
    pub client: OwnedFd,
    pub backend: OwnedFd,
    /// The client's metadata; `meta.route` names the route.
    pub meta: ConnMeta,
    /// The backend's name in the route's pool.
    pub backend_name: String,
    pub closed: relay::Closed,
    /// The flow is in the kernel relay's maps (and stays there while it moves).
    pub in_map: Option<kernel::InMap>,
}

impl Paused {
    /// Whether this is the connection of a request that switched protocols
    /// (WebSocket) in the per-request engine, which counted it (`engine`)
    /// where it came in: only the engine relays an HTTP connection of a
    /// route without `mode=connection`.
    pub fn switched(&self) -> bool {
        self.meta.proto == Proto::Http
            && portmux_wire::RouteSpec::parse(&self.meta.route).is_ok_and(|s| !s.connection_mode())
    }
}

/// A paused relay to resume on a worker, with its route's pool.
#[derive(Debug)]
pub struct Resume {
    pub paused: Paused,
    pub pool: Arc<BackendPool>,
}

/// What one worker thread must be able to pause at once (its relays, its
/// engine connections), without a lock or a shared wake-up: weak handles,
/// and whether a pause was asked already (then newcomers pause at once).
#[derive(Debug)]
pub struct Pausable<T> {
    live: RefCell<Vec<Weak<T>>>,
    pausing: Cell<bool>,
}

impl<T> Pausable<T> {
    pub const fn new() -> Pausable<T> {
        Pausable { live: RefCell::new(Vec::new()), pausing: Cell::new(false) }
    }

    /// Keeps `handle`; `pause` is called on it at once if a pause was asked.
    pub fn register(&self, handle: &Rc<T>, pause: impl Fn(&T)) {
        if self.pausing.get() {
            pause(handle);
        }
        let mut live = self.live.borrow_mut();
        if live.len() >= 64 && live.len().is_power_of_two() {
            live.retain(|w| w.strong_count() > 0);
        }
        live.push(Rc::downgrade(handle));
    }

    /// Calls `pause` on every handle still alive, and on every later one.
    pub fn pause_all(&self, pause: impl Fn(&T)) {
        self.pausing.set(true);
        self.live.borrow_mut().retain(|w| w.upgrade().map(|h| pause(&h)).is_some());
    }
}

impl<T> Default for Pausable<T> {
    fn default() -> Self {
        Pausable::new()
    }
}

thread_local! {
    /// The pause handles of this thread's relays.
    static RELAYS: Pausable<relay::Pause> = const { Pausable::new() };
}

/// Asks every relay on this thread (and every later one) to pause for an upgrade.
pub fn pause_all() {
    RELAYS.with(|r| r.pause_all(relay::Pause::request));
}

/// A pause handle for a new relay, registered on this thread.
fn pause_handle() -> Rc<relay::Pause> {
    let pause = Rc::new(relay::Pause::default());
    RELAYS.with(|r| r.register(&pause, relay::Pause::request));
    pause
}

/// Forwards the client on `fd` (its first bytes only peeked) to a backend of
/// `pool`, until the relay ends, or pauses for an upgrade: then its sockets
/// come back, to move to the new process.
pub async fn serve(client: OwnedFd, meta: ConnMeta, pool: Arc<BackendPool>, settings: &Settings) -> Served {
    let (backend, server) = match Box::pin(open(&meta, &pool, settings)).await {
        Ok(opened) => opened,
        Err(answer) => {
            let status = answer.status();
            Box::pin(reply::send(client, answer)).await;
            return Served { backend: None, status, ..Served::default() };
        }
    };
    let active = backend.connected();
    if let Err(e) = net::set_nonblocking(client.as_fd(), true) {
        tracing::debug!(client = %meta.peer, "client socket unusable: {e}");
        return Served { backend: Some(backend), ..Served::default() };
    }
    // Not on the plaintext end of a terminated connection (a Unix socket).
    let _ = net::set_nodelay(client.as_fd());
    relay_to(client, server, meta, &backend, active, Carried::default(), settings).await
}

/// The kernel relay a new flow goes to, if any: the one in force (maps
/// adopted in an upgrade serve new flows too), unless this process was told
/// `--relay user`.
pub fn kernel_for_new_flows(settings: &Settings) -> Option<&'static kernel::InKernel> {
    kernel::in_force().filter(|_| settings.relay != crate::config::Relay::User)
}

/// Relays an established flow to `backend` (a connection of the per-request
/// engine that switched protocols: nothing of either side is left to parse),
/// as a forwarded connection's: in the kernel where it is in force.
pub async fn relay_established(
    client: OwnedFd,
    server: OwnedFd,
    meta: ConnMeta,
    backend: &Arc<Backend>,
    settings: &Settings,
) -> Served {
    let active = backend.connected();
    relay_to(client, server, meta, backend, active, Carried::default(), settings).await
}

/// How a forwarded connection went, for the metrics and the access log.
#[derive(Debug, Default)]
pub struct Served {
    /// It paused for an upgrade: the relay goes on in the next process.
    pub paused: Option<Paused>,
    /// The backend it was relayed to; `None`: none could be reached.
    pub backend: Option<Arc<Backend>>,
    /// The answer portmux gave when no backend could be reached.
    pub status: Option<u16>,
    pub from_client: u64,
    pub to_client: u64,
}

/// Connects to a backend of `pool` for the client `meta` describes (up to
/// [`TRIES`] backends), and sends the PROXY header if the route asks: the
/// backend and its socket, or the answer for the client.
pub async fn open(meta: &ConnMeta, pool: &BackendPool, settings: &Settings) -> Result<(Arc<Backend>, OwnedFd), Reply> {
    let mut tried = Vec::new();
    let mut connected = None;
    while tried.len() < TRIES {
        let Some(i) = pool.pick(&tried) else { break };
        tried.push(i);
        let backend = &pool.backends[i];
        // Boxed: a task's state is as large as its largest phase, and a relay
        // may live for hours after the connect.
        match Box::pin(connect(backend, settings)).await {
            Ok(fd) => {
                connected = Some((backend.clone(), fd));
                break;
            }
            // Out of fds or memory here: no backend is to blame, and trying
            // another would fail the same way.
            Err(e) if is_local_exhaustion(&e) => {
                tracing::warn!(
                    route = %meta.route,
                    client = %meta.peer,
                    "portmux is out of resources for a backend connection: {e} (raise LimitNOFILE / ulimit -n)"
                );
                let answer = match meta.proto {
                    Proto::Http => Reply::unavailable("portmux is out of file descriptors; retry shortly"),
                    Proto::Tls | Proto::Tcp => Reply::Close,
                };
                return Err(answer);
            }
            Err(e) => {
                backend.mark_failed(settings.backend_cooldown);
                tracing::warn!(
                    route = %meta.route,
                    backend = %backend.spec.name,
                    client = %meta.peer,
                    "backend failed to connect: {e}; it is skipped for {}",
                    humantime::format_duration(settings.backend_cooldown)
                );
            }
        }
    }
    let Some((backend, server)) = connected else {
        tracing::warn!(route = %meta.route, client = %meta.peer, tried = tried.len(), "no backend reachable");
        let answer = match meta.proto {
            Proto::Http => Reply::bad_gateway(&format!(
                "no backend of route {} accepted the connection ({} tried)",
                meta.route,
                tried.len()
            )),
            Proto::Tls | Proto::Tcp => Reply::Close,
        };
        return Err(answer);
    };
    if let Some(version) = pool.proxy {
        let header = proxy::header(version, meta.peer, meta.local);
        let deadline = Instant::now() + settings.connect_timeout;
        if !Box::pin(reply::write_all(server.as_fd(), &header, deadline)).await {
            tracing::warn!(route = %meta.route, backend = %backend.spec.name, "could not send the PROXY header");
            return Err(match meta.proto {
                Proto::Http => Reply::bad_gateway("the backend did not take the PROXY header"),
                Proto::Tls | Proto::Tcp => Reply::Close,
            });
        }
    }
    Ok((backend, server))
}

/// Resumes a relay that a previous portmux paused for an upgrade.
pub async fn resume(job: Resume, settings: &Settings) -> Served {
    let Resume { paused, pool } = job;
    let carried = Carried { closed: paused.closed, in_map: paused.in_map };
    let (client, server, meta) = (paused.client, paused.backend, paused.meta);
    match pool.backends.iter().find(|b| b.spec.name == paused.backend_name) {
        Some(backend) => {
            let active = backend.connected();
            relay_to(client, server, meta, backend, active, carried, settings).await
        }
        None => {
            // The backend left the route meanwhile; its connection carries on.
            let orphan = Arc::new(Backend::new(backend::BackendSpec { name: paused.backend_name, weight: 1 }, vec![]));
            let active = orphan.connected();
            relay_to(client, server, meta, &orphan, active, carried, settings).await
        }
    }
}

/// What a relay resumed after an upgrade carries over.
#[derive(Debug, Default)]
struct Carried {
    closed: relay::Closed,
    in_map: Option<kernel::InMap>,
}

/// Relays until done, or until paused: then returns the sockets, for the
/// control plane to pass to the new process.
async fn relay_to(
    client: OwnedFd,
    server: OwnedFd,
    meta: ConnMeta,
    backend: &Arc<Backend>,
    active: backend::ActiveGuard,
    carried: Carried,
    settings: &Settings,
) -> Served {
    let Carried { closed, in_map } = carried;
    let mut served = Served { backend: Some(backend.clone()), ..Served::default() };
    let in_kernel = kernel::in_force();
    let in_map = match (in_map, in_kernel) {
        (Some(at), _) => Some(at),
        (None, Some(k)) if closed == relay::Closed::default() && kernel_for_new_flows(settings).is_some() => {
            match kernel::start(k, client.as_fd(), server.as_fd()) {
                Ok(at) => Some(at),
                Err(refused) => {
                    tracing::debug!(client = %meta.peer, "relayed in user space: {}", refused.why);
                    let deadline = Instant::now() + settings.connect_timeout;
                    if !refused.pending.is_empty()
                        && !Box::pin(reply::write_all(server.as_fd(), &refused.pending, deadline)).await
                    {
                        return served;
                    }
                    None
                }
            }
        }
        _ => None,
    };
    // A flow in the kernel is watched for its ends only: readiness to write
    // would wake the worker at every ACK (it waits for room otherwise).
    let interest = match in_map {
        Some(_) => tokio::io::Interest::READABLE,
        None => tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
    };
    let (client, server) = match (reactor::register(client, interest), reactor::register(server, interest)) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(client = %meta.peer, "cannot watch the relay's sockets: {e}");
            return served;
        }
    };
    let pause = pause_handle();
    kernel::count(in_map.is_some());
    let (outcome, in_map) = match (in_map, in_kernel) {
        (Some(at), Some(k)) => {
            let (outcome, at) =
                Box::pin(kernel::watch(k, at, [&client, &server], settings.idle_timeout, &pause, closed)).await;
            (outcome, Some(at))
        }
        (Some(_), None) => {
            tracing::warn!(client = %meta.peer, "a flow of the kernel relay came without its maps; it is closed");
            return served;
        }
        (None, _) => {
            let mode = settings.relay_mode;
            (relay::relay(&client, &server, settings.idle_timeout, mode, &pause, closed).await, None)
        }
    };
    drop(active);
    (served.from_client, served.to_client) = (outcome.to_backend, outcome.to_client);
    if outcome.paused {
        let paused = Paused {
            client: client.into_inner(),
            backend: server.into_inner(),
            meta,
            backend_name: backend.spec.name.clone(),
            closed: outcome.closed,
            in_map,
        };
        served.paused = Some(paused);
        return served;
    }
    match &outcome.failure {
        None => {}
        Some(f @ relay::Failure::Io { side: relay::Side::Backend, .. }) => {
            tracing::warn!(route = %meta.route, backend = %backend.spec.name, client = %meta.peer, "relay ended: {f}");
        }
        Some(f) => {
            tracing::debug!(route = %meta.route, backend = %backend.spec.name, client = %meta.peer, "relay ended: {f}");
        }
    }
    served
}

/// Whether a connect failed for lack of local resources (not the backend's fault).
pub fn is_local_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Connects to one of the backend's addresses, each within the connect timeout.
pub async fn connect(backend: &Backend, settings: &Settings) -> io::Result<OwnedFd> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for endpoint in &backend.endpoints {
        let deadline = Instant::now() + settings.connect_timeout;
        match connect_one(endpoint, deadline).await {
            Ok(fd) => return Ok(fd),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn connect_one(endpoint: &net::Endpoint, deadline: Instant) -> io::Result<OwnedFd> {
    let (fd, done) = net::connect_start(endpoint)?;
    if !done {
        let sock = fd.as_fd();
        match uring::race(sock, uring::poll(sock, libc::POLLOUT as u32), tokio::time::sleep_until(deadline)).await {
            uring::Raced::Done(Ok(_)) => net::take_socket_error(sock)?,
            uring::Raced::Done(Err(e)) => return Err(e),
            uring::Raced::Stopped(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }
    Ok(fd)
}
