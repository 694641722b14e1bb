//! Forwarding a connection to a backend address: choose (load balancing and
//! passive health), connect (up to three tries), send the PROXY header if the
//! route asks, then relay until both sides are done.

pub mod backend;
pub mod proxy;
pub mod relay;

use crate::config::Settings;
use crate::reply::{self, Reply};
use crate::sys::{net, reactor, uring};
use backend::{Backend, BackendPool};
use portmux_wire::{ConnMeta, Proto};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use tokio::time::Instant;

/// At most this many backends are tried per connection (SRP's rule).
pub const TRIES: usize = 3;

/// Forwards the client on `fd` (its first bytes only peeked) to a backend of `pool`.
pub async fn serve(client: OwnedFd, meta: ConnMeta, pool: Arc<BackendPool>, settings: &Settings) {
    let mut tried = Vec::new();
    let mut connected = None;
    while tried.len() < TRIES {
        let Some(i) = pool.pick(&tried) else { break };
        tried.push(i);
        let backend = &pool.backends[i];
        match connect(backend, settings).await {
            Ok(fd) => {
                connected = Some((backend.clone(), fd));
                break;
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
        return reply::send(client, answer).await;
    };
    let _active = backend.connected();
    if let Some(version) = pool.proxy {
        let header = proxy::header(version, meta.peer, meta.local);
        let deadline = Instant::now() + settings.connect_timeout;
        if !reply::write_all(server.as_fd(), &header, deadline).await {
            tracing::warn!(route = %meta.route, backend = %backend.spec.name, "could not send the PROXY header");
            return;
        }
    }
    if let Err(e) = net::set_nonblocking(client.as_fd(), true).and_then(|()| net::set_nodelay(client.as_fd())) {
        tracing::debug!(client = %meta.peer, "client socket unusable: {e}");
        return;
    }
    let interest = tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE;
    let (client, server) = match (reactor::register(client, interest), reactor::register(server, interest)) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(client = %meta.peer, "cannot watch the relay's sockets: {e}");
            return;
        }
    };
    let outcome = relay::relay(&client, &server, settings.idle_timeout, settings.relay_mode).await;
    match &outcome.failure {
        None => {}
        Some(f @ relay::Failure::Io { side: relay::Side::Backend, .. }) => {
            tracing::warn!(route = %meta.route, backend = %backend.spec.name, client = %meta.peer, "relay ended: {f}");
        }
        Some(f) => {
            tracing::debug!(route = %meta.route, backend = %backend.spec.name, client = %meta.peer, "relay ended: {f}");
        }
    }
}

/// Connects to one of the backend's addresses, each within the connect timeout.
async fn connect(backend: &Backend, settings: &Settings) -> io::Result<OwnedFd> {
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
