//! Connections the control plane holds: routing them (as the workers would),
//! queueing them in arrival order while a route's service is away, delivering
//! one at a time per route (round robin over live sessions, avoiding one that
//! just rejected the connection), clients hanging up, and answering those that
//! waited too long.

use super::{
    BUSY_BACKOFF, Core, Effect, HangUp, Held, Mode, Place, REJECT_BACKOFF, RouteState, RouteTarget, Undelivered,
};
use crate::config::limits::Limit;
use crate::handoff::ConnDesc;
use crate::ids::{ConnId, SessionId};
use crate::reply::Reply;
use crate::route::{Matcher, RouteKey};
use portmux_wire::{ConnMeta, Proto};
use std::time::Instant;

/// The answer to a connection whose description does not fit a control message.
fn too_large(meta: &ConnMeta) -> Reply {
    match meta.proto {
        Proto::Http => Reply::too_large(),
        Proto::Tls => Reply::tls_alert(crate::reply::ALERT_DECODE_ERROR),
        Proto::Tcp => Reply::Close,
    }
}

/// The answer to a connection that will not be delivered: 503 for HTTP, a clean close otherwise.
pub(super) fn unavailable(meta: &ConnMeta, detail: &str) -> Reply {
    match meta.proto {
        Proto::Http => Reply::unavailable(detail),
        Proto::Tls | Proto::Tcp => Reply::Close,
    }
}

impl Core {
    /// A connection reached the control plane: from a worker (its route
    /// queues, or its sessions were busy), rejected by a service, or left
    /// unacked by a session that ended. It is queued, delivered, forwarded,
    /// answered, or (after an upgrade) handed on.
    pub fn arrived(&mut self, now: Instant, desc: ConnDesc) {
        self.route_conn(now, desc);
        self.settle();
    }

    pub(super) fn route_conn(&mut self, now: Instant, mut desc: ConnDesc) {
        let id = desc.id;
        if let Some(Held { place: Place::Delivering(key, ..), .. }) = self.conns.get(&id) {
            // Given back before its delivery was reported (the session ended or
            // rejected it at once): that delivery is over.
            let key = key.clone();
            self.conns.remove(&id);
            self.clear_delivering(&key, id);
        }
        match self.mode {
            Mode::Serving => {}
            Mode::Frozen => {
                self.conns.insert(id, Held { desc, place: Place::Buffered, half_closed: false });
                self.buffered.push_back(id);
                return;
            }
            Mode::HandedOver => {
                let listener = self.handed_over_address(&desc);
                return self.effects.push_back(Effect::HandOn { desc, listener });
            }
            Mode::Stopped => {
                let reply = unavailable(&desc.meta, "portmux is stopping");
                return self.effects.push_back(Effect::Answer { conn: id, reply });
            }
        }
        let Some(addr) = self.listeners.get(&desc.listener).map(|l| l.addr) else {
            return self.effects.push_back(Effect::Answer { conn: id, reply: Reply::Close });
        };
        if !self.matchers.contains_key(&addr) {
            let routes = self.routes.iter().filter(|(k, _)| k.0 == addr).map(|(k, r)| (r.spec.clone(), k.clone()));
            self.matchers.insert(addr, Matcher::new(routes));
        }
        let matcher = &self.matchers[&addr];
        let Some(key) = matcher.lookup(&desc.meta).cloned() else {
            // A connection a service gave back is closed instead: its client
            // retries on a new connection, which gets the answer.
            let reply = if desc.returned { Reply::Close } else { matcher.no_route(&desc.meta, addr.port()) };
            return self.effects.push_back(Effect::Answer { conn: id, reply });
        };
        let limit = self.config.park_limit;
        let Some(r) = self.routes.get_mut(&key) else {
            return self.effects.push_back(Effect::Answer { conn: id, reply: Reply::Close });
        };
        let s = match &mut r.target {
            RouteTarget::Backends(pool) => {
                // The route forwards (it may have become a forwarding one after a worker chose it).
                let pool = pool.clone();
                return self.effects.push_back(Effect::Forward { conn: id, meta: desc.meta, pool });
            }
            RouteTarget::Service(s) => s,
        };
        let shown = r.display.clone();
        let most = self.config.limits.parked;
        if self.conns.len() >= most {
            self.config.hits.hit(Limit::Parked);
            tracing::warn!(route = %shown, most, "refusing a connection: portmux holds as many queued as --max-parked");
            let detail = format!("portmux holds {most} queued connections, its limit (--max-parked)");
            let reply = if desc.returned { Reply::Close } else { unavailable(&desc.meta, &detail) };
            return self.effects.push_back(Effect::Answer { conn: id, reply });
        }
        if s.queue.len() >= limit {
            // A client that stopped sending gives its place up first.
            let conns = &self.conns;
            let victim = s.queue.iter().position(|q| conns.get(q).is_some_and(|h| h.half_closed));
            let detail = format!("the queue of route {shown} is full ({limit} connections)");
            match victim.and_then(|i| s.queue.remove(i)) {
                Some(victim) => {
                    tracing::info!(route = %shown, conn = %victim, "queue full; a half-closed client gave its place up");
                    if let Some(held) = self.conns.remove(&victim) {
                        let reply = unavailable(&held.desc.meta, &detail);
                        self.effects.push_back(Effect::Answer { conn: victim, reply });
                    }
                }
                None => {
                    tracing::warn!(route = %shown, service = %s.service, limit, "queue full; refusing a connection (raise --park-limit)");
                    let reply = if desc.returned { Reply::Close } else { unavailable(&desc.meta, &detail) };
                    return self.effects.push_back(Effect::Answer { conn: id, reply });
                }
            }
        }
        desc.meta.route = shown.to_string();
        tracing::debug!(route = %shown, conn = %id, depth = s.queue.len() + 1, "queued");
        if s.queue.is_empty() && s.delivering.is_none() {
            self.table_dirty = true; // Workers now queue too, behind this one.
        }
        s.queue.push_back(id);
        self.conns.insert(id, Held { desc, place: Place::Queued(key.clone()), half_closed: false });
        self.effects.push_back(Effect::Watch { conn: id });
        self.try_flush(now, &key);
    }

    /// The route's delivery slot is free again, if `conn` held it.
    fn clear_delivering(&mut self, key: &RouteKey, conn: ConnId) {
        if let Some(RouteState { target: RouteTarget::Service(s), .. }) = self.routes.get_mut(key)
            && s.delivering == Some(conn)
        {
            s.delivering = None;
        }
    }

    /// Delivers the head of `key`'s queue if nothing is being delivered, a
    /// live session is there, and no backoff holds it.
    pub(super) fn try_flush(&mut self, now: Instant, key: &RouteKey) {
        if self.mode != Mode::Serving {
            return;
        }
        let Some(RouteState { target: RouteTarget::Service(s), .. }) = self.routes.get_mut(key) else { return };
        if s.retry_at.is_some_and(|t| t <= now) {
            s.retry_at = None; // A backoff that ended is over, whatever happens next.
        }
        if s.delivering.is_some() || s.retry_at.is_some() {
            return;
        }
        let Some(RouteState { target: RouteTarget::Service(s), .. }) = self.routes.get(key) else { return };
        let Some(&front) = s.queue.front() else { return };
        let live = self.live(s);
        if live.is_empty() {
            return;
        }
        let avoid = self
            .conns
            .get(&front)
            .and_then(|h| h.desc.rejected_by)
            .filter(|(_, at)| now.saturating_duration_since(*at) < REJECT_BACKOFF);
        let candidates: Vec<SessionId> = live.into_iter().filter(|sid| avoid.is_none_or(|(a, _)| a != *sid)).collect();
        let Some(RouteState { target: RouteTarget::Service(s), .. }) = self.routes.get_mut(key) else { return };
        if candidates.is_empty() {
            s.retry_at = avoid.map(|(_, at)| at + REJECT_BACKOFF);
            return;
        }
        s.retry_at = None;
        let session = candidates[s.next % candidates.len()];
        s.next = s.next.wrapping_add(1);
        s.queue.pop_front();
        s.delivering = Some(front);
        let Some(held) = self.conns.get_mut(&front) else { return };
        self.next_attempt += 1;
        let attempt = self.next_attempt;
        held.place = Place::Delivering(key.clone(), session, attempt);
        let desc = held.desc.clone();
        self.effects.push_back(Effect::Deliver { session, desc, attempt });
    }

    /// The session took the connection (it is the service's until it acks or rejects it).
    ///
    /// A connection that came back meanwhile (the session ended, or rejected
    /// it, before this report) is queued again and stays so.
    pub fn delivered(&mut self, now: Instant, conn: ConnId, attempt: u64) {
        if let Some(Place::Delivering(key, _, a)) = self.conns.get(&conn).map(|h| h.place.clone())
            && a == attempt
        {
            self.conns.remove(&conn);
            self.clear_delivering(&key, conn);
            if let Some(RouteState { target: RouteTarget::Service(s), .. }) = self.routes.get(&key)
                && s.queue.is_empty()
            {
                self.table_dirty = true; // Workers deliver directly again.
            }
            self.try_flush(now, &key);
        }
        self.settle();
    }

    /// The hand-over failed; the connection goes back to the head of its
    /// queue. False if this attempt was not the connection's current one
    /// (then the core holds it no more, and the caller drops its copy).
    pub fn undelivered(&mut self, now: Instant, conn: ConnId, attempt: u64, why: Undelivered) -> bool {
        let Some(held) = self.conns.get_mut(&conn) else {
            self.settle();
            return false;
        };
        let Place::Delivering(key, session, a) = held.place.clone() else {
            self.settle();
            return false;
        };
        if a != attempt {
            self.settle();
            return false;
        }
        if why == Undelivered::Dead
            && let Some(s) = self.sessions.get_mut(&session)
        {
            s.usable = false;
            self.table_dirty = true;
        }
        if why == Undelivered::Unsendable {
            let reply = too_large(&held.desc.meta);
            tracing::warn!(conn = %conn, route = %held.desc.meta.route, "a connection too large to describe to a service is answered");
            self.conns.remove(&conn);
            self.clear_delivering(&key, conn);
            self.effects.push_back(Effect::Answer { conn, reply });
            self.try_flush(now, &key);
            self.settle();
            return true;
        }
        let in_route = matches!(self.routes.get(&key), Some(RouteState { target: RouteTarget::Service(_), .. }));
        self.clear_delivering(&key, conn);
        if why == Undelivered::Busy
            && let Some(RouteState { target: RouteTarget::Service(s), .. }) = self.routes.get_mut(&key)
        {
            s.retry_at = Some(now + BUSY_BACKOFF);
        }
        if matches!(self.mode, Mode::HandedOver | Mode::Stopped | Mode::Frozen) || !in_route {
            // Handed over or stopping: handed on or answered. Frozen: it waits
            // with what arrived since the freeze (handed on at the commit,
            // routed again at a thaw; the export did not include it). The
            // route went meanwhile: routed afresh.
            if let Some(held) = self.conns.remove(&conn) {
                self.route_conn(now, held.desc);
            }
            self.settle();
            return true;
        }
        let Some(held) = self.conns.get_mut(&conn) else { return true };
        held.place = Place::Queued(key.clone());
        if let Some(RouteState { target: RouteTarget::Service(s), .. }) = self.routes.get_mut(&key) {
            s.queue.push_front(conn);
        }
        self.effects.push_back(Effect::Watch { conn });
        self.try_flush(now, &key);
        self.settle();
        true
    }

    /// A waiting client hung up (see [`HangUp`]).
    pub fn hung_up(&mut self, conn: ConnId, how: HangUp) {
        let Some(held) = self.conns.get_mut(&conn) else { return };
        let Place::Queued(key) = held.place.clone() else { return };
        if how == HangUp::HalfClosed {
            held.half_closed = true;
            tracing::debug!(route = %held.desc.meta.route, conn = %conn, "queued client half-closed; it keeps its place");
            return;
        }
        self.conns.remove(&conn);
        if let Some(RouteState { display: shown, target: RouteTarget::Service(s), .. }) = self.routes.get_mut(&key) {
            s.queue.retain(|q| *q != conn);
            tracing::debug!(route = %shown, conn = %conn, "queued client hung up");
            if s.queue.is_empty() && s.delivering.is_none() {
                self.table_dirty = true;
            }
        }
        self.effects.push_back(Effect::Forget { conn });
        self.settle();
    }

    /// Answers connections that waited in a queue for the linger period.
    pub(super) fn expire_queued(&mut self, now: Instant) {
        let linger = self.config.linger;
        let mut answers = Vec::new();
        for r in self.routes.values_mut() {
            let RouteTarget::Service(s) = &mut r.target else { continue };
            while let Some(&front) = s.queue.front() {
                let Some(held) = self.conns.get(&front) else {
                    s.queue.pop_front();
                    continue;
                };
                if held.desc.arrived + linger > now {
                    break;
                }
                s.queue.pop_front();
                let detail = format!(
                    "service '{}' took no connection for route {} within {}",
                    s.service,
                    r.display,
                    humantime::format_duration(linger)
                );
                answers.push((front, unavailable(&held.desc.meta, &detail)));
                if s.queue.is_empty() && s.delivering.is_none() {
                    self.table_dirty = true;
                }
            }
        }
        for (conn, reply) in answers {
            self.conns.remove(&conn);
            self.effects.push_back(Effect::Answer { conn, reply });
        }
    }
}
