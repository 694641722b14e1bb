//! The driver's effects that move a socket: a loan to a session, a
//! delivery (and the wait for deliveries in flight), a connection
//! forwarded, one handed on to the next process.

use super::*;

impl Control {
    /// Sends a lent listening socket to a session; if it cannot, the port
    /// goes back to the workers (the effects that follow are carried out by
    /// the `apply` running this one, or by the task's own).
    pub(super) fn lend(
        self: &Rc<Self>,
        session: SessionId,
        listener: ListenerId,
        route: Arc<str>,
        addr: std::net::SocketAddr,
    ) {
        let target = self.sessions.borrow().get(&session).cloned();
        let socket = self.listeners.borrow().get(&listener).cloned();
        let (Some(target), Some(socket)) = (target, socket) else {
            return self.core.borrow_mut().loan_failed(listener, session);
        };
        // Borrowers poll it and take what waits, never blocking when another
        // took it first; portmux's own accepts (io_uring) are unaffected.
        if let Err(e) = net::set_nonblocking(socket.fd.as_fd(), true) {
            tracing::warn!(listen = %addr, "cannot lend the listening socket: {e}; portmux accepts for it");
            return self.core.borrow_mut().loan_failed(listener, session);
        }
        let me = self.clone();
        let patience = self.shared.settings.handoff_patience;
        tokio_uring::spawn(async move {
            match target.lend(&route, addr, socket.fd.as_fd(), patience).await {
                Ok(()) => {
                    tracing::info!(session = %session, service = %target.name, %route, listen = %addr, "lent the listening socket")
                }
                Err(e) => {
                    tracing::warn!(session = %session, service = %target.name, %route, "cannot lend the listening socket: {e}; portmux accepts for it");
                    me.core.borrow_mut().loan_failed(listener, session);
                    me.apply();
                }
            }
        });
    }

    pub(super) fn deliver(self: &Rc<Self>, session: SessionId, desc: ConnDesc, attempt: u64) {
        let (id, route, arrived) = (desc.id, desc.meta.route.clone(), desc.arrived);
        let Some(fd) = self.parking.take(id) else {
            tracing::warn!(conn = %id, "a connection to deliver has no socket here; dropped from the queue");
            self.core.borrow_mut().delivered(Instant::now(), id, attempt);
            return;
        };
        let conn = Conn { fd, desc };
        let Some(target) = self.sessions.borrow().get(&session).cloned() else {
            // The driver has no such session: to the core it is gone.
            if self.core.borrow_mut().undelivered(Instant::now(), id, attempt, Undelivered::Dead) {
                self.parking.hold(id, conn.fd);
            }
            return;
        };
        self.deliveries.set(self.deliveries.get() + 1);
        let me = self.clone();
        let patience = self.shared.settings.handoff_patience;
        tokio_uring::spawn(async move {
            let result = target.hand_over(conn, patience).await;
            let now = Instant::now();
            match result {
                Ok(()) => {
                    me.shared.metrics.delivered(&route, arrived);
                    me.core.borrow_mut().delivered(now, id, attempt)
                }
                Err(refusal) => {
                    let why = match &refusal {
                        Refusal::Dead(_) => Undelivered::Dead,
                        Refusal::Busy(_) => Undelivered::Busy,
                        Refusal::Closed(_) => Undelivered::Closed,
                        Refusal::Unsendable(_) => Undelivered::Unsendable,
                    };
                    // Held before the effects that follow (a watch, another
                    // delivery, an answer) are carried out by `apply`.
                    if me.core.borrow_mut().undelivered(now, id, attempt, why) {
                        me.parking.hold(id, refusal.into_conn().fd);
                    }
                }
            }
            me.apply();
            let left = me.deliveries.get() - 1;
            me.deliveries.set(left);
            if left == 0 {
                me.deliveries_idle.notify_waiters();
            }
        });
    }

    /// Waits until no delivery from the queues is in progress, at most `within`.
    pub(in crate::control) async fn deliveries_done(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let idle = self.deliveries_idle.notified();
            if self.deliveries.get() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return false;
            }
        }
    }

    pub(super) fn forward(self: &Rc<Self>, conn: ConnId, meta: portmux_wire::ConnMeta, pool: Arc<BackendPool>) {
        let Some(fd) = self.parking.take(conn) else { return };
        // The socket to own alone: the one parked (the usual case), or a duplicate.
        let fd = match Arc::try_unwrap(fd) {
            Ok(fd) => fd,
            Err(shared) => match shared.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!(conn = %conn, "cannot duplicate a connection's socket to forward it: {e}; answering it here");
                    self.answer(shared, Reply::unavailable("portmux is out of file descriptors; retry shortly"));
                    return;
                }
            },
        };
        let guard = TaskGuard::new(&self.shared);
        let shared = self.shared.clone();
        tokio_uring::spawn(async move {
            let route = meta.route.clone();
            let served = forward::serve(fd, meta, pool, &shared.settings).await;
            match served.paused {
                Some(paused) => drop(shared.to_control.send(ToControl::Relay(paused))),
                None => {
                    let reached = served.backend.is_some();
                    shared.metrics.forwarded(&route, reached, served.from_client, served.to_client)
                }
            }
            drop(guard);
        });
    }

    /// Gives a connection to the process that replaced this one; if that is
    /// not possible, says so and answers it here rather than dropping it.
    pub(super) fn hand_on(&self, desc: ConnDesc, listener: std::net::SocketAddr) {
        let id = desc.id;
        let Some(fd) = self.parking.take(id) else { return };
        let out = self.handover.borrow().clone();
        let unavailable = |fd: Arc<OwnedFd>, why: String| {
            tracing::warn!(conn = %id, peer = %desc.meta.peer, "cannot hand a connection to the new process: {why}; answering it here");
            let reply = match desc.meta.proto {
                portmux_wire::Proto::Http => {
                    Reply::unavailable("portmux is being replaced and cannot serve this request now; retry")
                }
                _ => Reply::Close,
            };
            self.answer(fd, reply);
        };
        let Some(out) = out else { return unavailable(fd, "no new process takes connections".into()) };
        let owned = match Arc::try_unwrap(fd) {
            Ok(owned) => owned,
            Err(shared) => match shared.try_clone() {
                Ok(dup) => dup,
                Err(e) => return unavailable(shared, format!("dup: {e}")),
            },
        };
        tracing::debug!(conn = %id, peer = %desc.meta.peer, "handing over a connection to deliver");
        let msg = crate::control::handover::deliver_message(&desc, listener);
        if let Err(mpsc::error::SendError((_, mut fds))) = out.send((msg, vec![owned]))
            && let Some(fd) = fds.pop()
        {
            unavailable(Arc::new(fd), "the handover channel is closed".into());
        }
    }
}
