//! Runs the active health checks routes ask for: one task per (route,
//! backend or session, check) on the control thread, started and stopped as
//! the routes change (after each publish). A backend kept across a change of
//! backends keeps its task, its streak and its state.
//!
//! A service's route (`health=/PATH`, claimed by the service itself) is
//! checked through the service's own intake: portmux writes the GET into one
//! end of a socketpair and hands the other end to each session as a
//! connection (from 127.0.0.1 port 0, described as plain HTTP). A session
//! that fails `fall` checks in a row leaves the route's rotation until it
//! passes `rise`; if every session fails, all of them keep serving.

use super::core::RouteTarget;
use super::driver::Control;
use crate::forward::backend::Backend;
use crate::forward::health::{Check, Verdict};
use crate::handoff::{Conn, ConnDesc, Session};
use crate::ids::{ConnId, ListenerId, SessionId};
use crate::route::RouteKey;
use portmux_wire::{ConnMeta, Proto};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Instant;

/// What one task checks: a route's backend (by its `Arc`'s address) or one
/// of its sessions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Subject {
    Backend(usize),
    Session(SessionId),
}

type Checked = (RouteKey, Subject, Check);

/// What a wanted check needs to run.
enum Want {
    Backend(Arc<Backend>, String),
    Session(ListenerId, String, SessionId),
}

/// The checks running, by what they check, with the backend they follow;
/// and the connections handed to sessions as checks, not yet over.
#[derive(Debug, Default)]
pub struct Checks {
    running: HashMap<Checked, (tokio::task::JoinHandle<()>, Option<Arc<Backend>>)>,
    probes: HashSet<ConnId>,
}

impl Drop for Checks {
    fn drop(&mut self) {
        for (_, (task, _)) in self.running.drain() {
            task.abort();
        }
    }
}

impl Checks {
    /// Whether `conn` is a check's connection (a session gave it back or
    /// rejected it): it is dropped, never routed to a client's service.
    pub(super) fn is_probe(&self, conn: ConnId) -> bool {
        self.probes.contains(&conn)
    }
}

impl Control {
    /// Starts the checks the routes now ask for and stops the others.
    pub(super) fn sync_health(self: &Rc<Self>) {
        let mut wanted: HashMap<Checked, Want> = HashMap::new();
        {
            let core = self.core.borrow();
            for (key, r) in core.routes() {
                let Some(check) = Check::of(&r.spec) else { continue };
                match &r.target {
                    RouteTarget::Backends(pool) => {
                        for b in &pool.backends {
                            let subject = Subject::Backend(Arc::as_ptr(b) as usize);
                            wanted
                                .insert((key.clone(), subject, check.clone()), Want::Backend(b.clone(), r.spec.key()));
                        }
                    }
                    RouteTarget::Service(s) => {
                        let Some(listener) = core.listener_for(key.0) else { continue };
                        // A draining session gets no new connections, checks included.
                        let serving =
                            |sid: &&SessionId| core.sessions().get(sid).is_some_and(|e| !e.draining && e.usable);
                        for sid in s.sessions.iter().filter(serving) {
                            let want = Want::Session(listener, r.display.to_string(), *sid);
                            wanted.insert((key.clone(), Subject::Session(*sid), check.clone()), want);
                        }
                    }
                }
            }
        }
        let mut checks = self.health.borrow_mut();
        let mut unchecked = Vec::new();
        checks.running.retain(|k, (task, backend)| {
            let keep = wanted.contains_key(k);
            if !keep {
                task.abort();
                unchecked.extend(backend.clone());
            }
            keep
        });
        // A backend no check follows any more is back in the rotation (a
        // changed check starts afresh below). A session leaves its route's
        // down set with the route.
        for b in unchecked {
            if !checks.running.values().any(|(_, other)| other.as_ref().is_some_and(|o| Arc::ptr_eq(o, &b))) {
                b.unchecked();
            }
        }
        for (k, want) in wanted {
            if checks.running.contains_key(&k) {
                continue;
            }
            let (key, _, check) = k.clone();
            let (task, backend) = match want {
                Want::Backend(backend, route) => {
                    (tokio_uring::spawn(run(check, backend.clone(), route)), Some(backend))
                }
                Want::Session(listener, route, sid) => {
                    let probe = Probe { control: Rc::downgrade(self), key, session: sid, listener, route, check };
                    (tokio_uring::spawn(probe.run()), None)
                }
            };
            checks.running.insert(k, (task, backend));
        }
    }
}

/// Checks one backend until aborted.
async fn run(check: Check, backend: Arc<Backend>, route: String) {
    let name = backend.spec.name.clone();
    loop {
        let result = check.probe(&name, &backend.endpoints).await;
        match (backend.checked(result.is_ok(), check.rise, check.fall), &result) {
            (Some(true), _) => {
                tracing::info!(%route, backend = %name, "health check passes again: back in the rotation")
            }
            (Some(false), Err(e)) => {
                tracing::warn!(%route, backend = %name, "health check failed ({e}): out of the rotation")
            }
            (None, Err(e)) => tracing::debug!(%route, backend = %name, "health check failed: {e}"),
            _ => {}
        }
        tokio::time::sleep(check.interval).await;
    }
}

/// The check of one session on one route.
struct Probe {
    control: Weak<Control>,
    key: RouteKey,
    session: SessionId,
    listener: ListenerId,
    route: String,
    check: Check,
}

impl Probe {
    /// Checks the session until aborted (it left the route, or the route went).
    async fn run(self) {
        let mut verdict = Verdict::default();
        loop {
            let Some(control) = self.control.upgrade() else { return };
            let Some(session) = control.sessions.borrow().get(&self.session).cloned() else { return };
            if control.mode() != super::core::Mode::Serving {
                // Frozen for an upgrade: sessions take nothing now, and that says nothing of them.
                drop((control, session));
                tokio::time::sleep(self.check.interval).await;
                continue;
            }
            let result = self.once(&control, &session).await;
            let (sid, route) = (self.session, &self.route);
            match (verdict.record(result.is_ok(), self.check.rise, self.check.fall), &result) {
                (Some(up), _) => {
                    match &result {
                        Ok(()) => {
                            tracing::info!(%route, session = %sid, pid = session.pid, "health check passes again: back in the rotation")
                        }
                        Err(e) => {
                            tracing::warn!(%route, session = %sid, pid = session.pid, "health check failed ({e}): out of the rotation")
                        }
                    }
                    control.core.borrow_mut().session_checked(Instant::now(), &self.key, sid, up);
                    control.apply();
                }
                (None, Err(e)) => tracing::debug!(%route, session = %sid, "health check failed: {e}"),
                (None, Ok(())) => {}
            }
            drop((control, session));
            tokio::time::sleep(self.check.interval).await;
        }
    }

    /// One check: the GET handed to the session, its status line read back.
    async fn once(&self, control: &Rc<Control>, session: &Arc<Session>) -> Result<(), String> {
        let host = self.key.0.to_string();
        let request = self.check.request(&host).unwrap_or_default();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        // A few hundred bytes into an empty socket: the write does not block.
        std::io::Write::write_all(&mut &ours, request.as_bytes()).map_err(|e| format!("send: {e}"))?;
        ours.set_nonblocking(true).map_err(|e| format!("socketpair: {e}"))?;
        let ours = tokio::net::UnixStream::from_std(ours).map_err(|e| format!("socketpair: {e}"))?;
        let id = control.shared.conn_id();
        let meta = ConnMeta {
            route: self.route.clone(),
            proto: Proto::Http,
            peer: SocketAddr::from(([127, 0, 0, 1], 0)),
            local: self.key.0,
            sni: None,
            alpn: Vec::new(),
            host: self.check.host.clone(),
            path: self.check.path.clone(),
            peeked: request.len() as u32,
        };
        let desc = ConnDesc {
            id,
            listener: self.listener,
            meta,
            arrived: Instant::now(),
            rejected_by: None,
            returned: false,
            tls: None,
        };
        let conn = Conn { fd: Arc::new(theirs.into()), desc };
        control.health.borrow_mut().probes.insert(id);
        let _over = ProbeOver { control, session, id };
        // The hand-over has its own deadline; only the answer is timed here.
        let patience = control.shared.settings.handoff_patience.min(self.check.timeout);
        session.hand_over(conn, patience).await.map_err(|r| match r {
            crate::handoff::Refusal::Busy(_) => "the session's socket stayed full".to_string(),
            _ => "the session takes no connections".to_string(),
        })?;
        match tokio::time::timeout(self.check.timeout, self.check.answer(ours)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}", humantime::format_duration(self.check.timeout))),
        }
    }
}

/// When a check ends (or its task is aborted): portmux's copy of its
/// connection goes if the session never acked it, and its id is forgotten.
struct ProbeOver<'a> {
    control: &'a Control,
    session: &'a Session,
    id: ConnId,
}

impl Drop for ProbeOver<'_> {
    fn drop(&mut self) {
        drop(self.session.take(self.id));
        self.control.health.borrow_mut().probes.remove(&self.id);
    }
}
