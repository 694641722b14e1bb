//! Connections services give back between requests: checked against the
//! giving session's routes and the socket's own addresses, then held by a
//! worker until their next request; moved to the new process when an upgrade
//! commits while they wait.

use super::driver::Control;
use super::error::SessionError;
use crate::ids::SessionId;
use crate::reply::{self, Reply};
use crate::route::RouteKey;
use crate::shared::{Idle, Job, TaskGuard};
use portmux_sys::net;
use portmux_wire::spec::RouteSpec;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

impl Control {
    /// A given-back connection still waiting for its request, when an upgrade
    /// committed: the new process holds it from here.
    pub(super) fn idle_moving(&self, idle: Idle) {
        let out = self.handover.borrow().clone();
        match out {
            Some(out) => {
                let listener = self.core.borrow().listener_address(idle.listener).unwrap_or(idle.local);
                let idle_ms = idle.since.elapsed().as_millis() as u64;
                let msg = portmux_wire::Handover::Idle { listener, peer: idle.peer, local: idle.local, idle_ms };
                if out.send((msg, vec![idle.fd])).is_err() {
                    tracing::warn!(client = %idle.peer, "cannot hand an idle connection to the new process: the handover channel is closed; it is closed");
                }
            }
            // The handover is over and this process is about to exit.
            None if *self.shared.pause_relays.borrow() => {
                tracing::warn!(client = %idle.peer, "an idle connection came too late for the new process; it is closed");
                let guard = TaskGuard::new(&self.shared);
                tokio_uring::spawn(async move {
                    reply::send(idle.fd, Reply::Close).await;
                    drop(guard);
                });
            }
            // Not upgrading (a pause nobody asked for): hold it on here.
            None => self.shared.to_worker(Job::Idle(idle)),
        }
    }

    /// The routes session `session` holds now.
    pub(super) fn routes_of(&self, session: SessionId) -> Vec<RouteKey> {
        self.core.borrow().sessions().get(&session).map(|s| s.routes.clone()).unwrap_or_default()
    }

    /// A service gives back a connection between requests: if it is one of
    /// `holds` (the session's routes; after its Bye, those it held at its
    /// end), a worker holds it until its next request.
    pub(super) fn given_back(
        &self,
        session: SessionId,
        holds: &[RouteKey],
        route: &str,
        claimed: (std::net::SocketAddr, std::net::SocketAddr),
        fd: OwnedFd,
    ) -> Result<(), SessionError> {
        let core = self.core.borrow();
        let not_ours = || SessionError::NotYourRoute { route: route.to_string() };
        let spec = RouteSpec::parse(route).map_err(|_| not_ours())?;
        let key = crate::route::route_key(&spec, core.config().default_bind);
        if !holds.contains(&key) {
            return Err(not_ours());
        }
        let id = crate::shared::socket_id(fd.as_fd());
        if id.is_some_and(|id| self.shared.engine_ends.lock().unwrap_or_else(|p| p.into_inner()).contains(&id)) {
            // A stream of the per-request engine: closing it is all there is
            // to do (the engine opens a new one for the next request).
            tracing::debug!(session = %session, %route, "a per-request stream was given back; closed");
            return Ok(());
        }
        if let Some(t) = self.shared.terminated(fd.as_fd()) {
            // A connection whose TLS portmux terminates: its addresses are the ones portmux gave.
            tracing::debug!(session = %session, %route, client = %t.peer, "a terminated connection was given back; held until its next request");
            let (listener, peer, local, tls) = (t.listener, t.peer, t.local, Some(Box::new(t.tls)));
            self.shared.to_worker(Job::Idle(Idle { fd, listener, peer, local, since: Instant::now(), tls }));
            return Ok(());
        }
        if rustix::net::getsockname(&fd).is_ok_and(|a| a.address_family() == rustix::net::AddressFamily::UNIX) {
            // The plaintext end of a terminated connection whose TLS another
            // process relays (it was handed over by an upgrade): it cannot be
            // routed again here; closed, so its client reconnects.
            tracing::debug!(session = %session, %route, "a terminated connection this process does not relay was given back; closed");
            return Ok(());
        }
        let (peer, local) =
            net::tcp_addrs(fd.as_fd()).map_err(|e| SessionError::NotAClient { reason: e.to_string() })?;
        let on_route = local.port() == key.0.port() && (key.0.ip().is_unspecified() || key.0.ip() == local.ip());
        let listener = core.listener_for(local).filter(|_| on_route).ok_or_else(|| SessionError::NotAClient {
            reason: format!("its local address {local} is not route {route}'s listening address {}", key.0),
        })?;
        // Behind a load balancer the socket's addresses are the balancer's;
        // the service gives back the ones portmux told it.
        let (peer, local) = if self.shared.settings.proxy_trusted(peer.ip()) { claimed } else { (peer, local) };
        tracing::debug!(session = %session, %route, client = %peer, "a connection was given back; held until its next request");
        self.shared.to_worker(Job::Idle(Idle { fd, listener, peer, local, since: Instant::now(), tls: None }));
        Ok(())
    }
}
