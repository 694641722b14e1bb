//! What the workers are told: the table of listeners and routes the core
//! plans (published by the driver with its sockets and sessions), and the
//! ports lent to the services that claimed them with `?lend`.

use super::{Core, Effect, Mode, RouteTarget};
use crate::config::policy::Peer;
use crate::forward::backend::BackendPool;
use crate::ids::{ListenerId, SessionId};
use crate::route::RouteKey;
use portmux_wire::spec::RouteSpec;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The table for the workers, by listener.
#[derive(Debug)]
pub struct Plan {
    pub ports: Vec<PortPlan>,
}

#[derive(Debug)]
pub struct PortPlan {
    pub listener: ListenerId,
    pub routes: Vec<RoutePlan>,
    /// Lent to its route's sessions: the workers do not accept on it.
    pub lent: bool,
}

#[derive(Debug)]
pub struct RoutePlan {
    pub key: RouteKey,
    pub display: Arc<str>,
    pub spec: RouteSpec,
    pub target: PlanTarget,
    pub owner: crate::route::Owner,
}

#[derive(Debug)]
pub enum PlanTarget {
    /// Straight to these sessions.
    Sessions(Vec<SessionId>),
    /// Through the control plane.
    Queue,
    Forward(Arc<BackendPool>),
}

impl Core {
    /// The table the workers should have now.
    pub fn plan(&self) -> Plan {
        let ports = self
            .listeners
            .iter()
            .filter(|(_, l)| l.bound)
            .map(|(id, l)| {
                let routes = self
                    .routes
                    .iter()
                    .filter(|(k, _)| k.0 == l.addr)
                    .map(|(key, r)| {
                        let target = match &r.target {
                            _ if self.mode != Mode::Serving => PlanTarget::Queue,
                            RouteTarget::Backends(pool) => PlanTarget::Forward(pool.clone()),
                            RouteTarget::Service(s) => {
                                let live = self.live(s);
                                if s.queue.is_empty() && s.delivering.is_none() && !live.is_empty() {
                                    PlanTarget::Sessions(live)
                                } else {
                                    PlanTarget::Queue
                                }
                            }
                        };
                        let owner = match &r.target {
                            RouteTarget::Backends(pool) => crate::route::Owner::Backends(pool.clone()),
                            RouteTarget::Service(s) => crate::route::Owner::Service(s.service.as_str().into()),
                        };
                        let (display, spec) = (r.display.clone(), r.spec.clone());
                        RoutePlan { key: key.clone(), display, spec, target, owner }
                    })
                    .collect();
                PortPlan { listener: *id, routes, lent: self.loans.contains_key(id) }
            })
            .collect();
        Plan { ports }
    }

    /// Brings the loans up to date: a bound listener whose one route is a
    /// service's `?lend` route is lent to each of the route's sessions that
    /// takes new connections (neither draining nor dead); a session that
    /// gets it now is sent it ([`Effect::Lend`]). When no session holds it,
    /// the workers accept on it again, so the connections queued in the
    /// kernel meanwhile wait in the route's queue as any others. Frozen, the
    /// loans stay as they are (the services keep accepting). After an
    /// import each session is sent its loan again (the libraries replace
    /// the copy they hold): the previous process may not have reached it.
    pub(super) fn update_loans(&mut self) {
        if self.mode != Mode::Serving || self.importing {
            return;
        }
        // Every input settles: most ports are never lent, so this is one look.
        if self.loans.is_empty() && !self.routes.values().any(|r| r.spec.lend) {
            return;
        }
        let sessions = &self.sessions;
        self.loan_refused.retain(|(_, s)| sessions.contains_key(s));
        let mut wanted: BTreeMap<ListenerId, BTreeSet<SessionId>> = BTreeMap::new();
        let mut lends = Vec::new();
        for (id, l) in self.listeners.iter().filter(|(_, l)| l.bound) {
            let mut on_port = self.routes.iter().filter(|(k, _)| k.0 == l.addr);
            let (Some((_, r)), None) = (on_port.next(), on_port.next()) else { continue };
            let RouteTarget::Service(s) = &r.target else { continue };
            if !r.spec.lend {
                continue;
            }
            let takers = s.sessions.iter().copied().filter(|sid| {
                self.sessions.get(sid).is_some_and(|e| !e.draining && e.usable)
                    && !self.loan_refused.contains(&(*id, *sid))
            });
            let takers: BTreeSet<SessionId> = takers.collect();
            for sid in &takers {
                if !self.loans.get(id).is_some_and(|had| had.contains(sid)) {
                    lends.push(Effect::Lend { session: *sid, listener: *id, route: r.display.clone(), addr: l.addr });
                }
            }
            if !takers.is_empty() {
                wanted.insert(*id, takers);
            }
        }
        for id in wanted.keys() {
            if let Some(l) = self.listeners.get_mut(id) {
                l.lent_once = true;
            }
        }
        for effect in lends {
            self.emit(effect);
        }
        if wanted.keys().ne(self.loans.keys()) {
            self.table_dirty = true;
        }
        self.loans = wanted;
    }

    /// The loan of `listener` could not reach `session` (its socket is
    /// gone or full): the port goes back to the workers for it, and it is
    /// not offered again.
    pub fn loan_failed(&mut self, listener: ListenerId, session: SessionId) {
        self.loan_refused.insert((listener, session));
        if let Some(holders) = self.loans.get_mut(&listener) {
            holders.remove(&session);
            if holders.is_empty() {
                self.loans.remove(&listener);
                self.table_dirty = true;
            }
        }
        self.settle();
    }

    /// The sessions holding the loan of `listener`, if it is lent.
    pub fn borrowers(&self, listener: ListenerId) -> Option<&BTreeSet<SessionId>> {
        self.loans.get(&listener)
    }

    /// A `?lend` route has its port to itself: refuses `spec` if it is one
    /// and the port has another route (existing or `planned` in the same
    /// registration), or if the port has one and `spec` is another.
    /// And a socket systemd passed (socket activation) is lent only to root
    /// or portmux's own uid: portmux cannot take it back from a borrower
    /// that keeps a copy (it never closes it).
    pub(super) fn check_lend(
        &self,
        peer: Option<&Peer>,
        key: &RouteKey,
        spec: &RouteSpec,
        planned: &[(RouteKey, RouteSpec)],
    ) -> Result<(), super::ControlError> {
        let pinned = self.listeners.values().any(|l| l.addr == key.0 && l.pinned);
        if let Some(peer) = peer.filter(|p| spec.lend && pinned && !self.config.policy.privileged(p)) {
            return Err(super::ControlError::BadOption {
                route: spec.key(),
                reason: format!(
                    "port {} is a socket systemd passed to portmux, which portmux could not take back from uid {}: \
                     lend it to root or portmux's own user, or claim without lend",
                    key.0.port(),
                    peer.uid
                ),
            });
        }
        let existing = self.routes.iter().map(|(k, r)| (k, &r.spec));
        let others = existing.chain(planned.iter().map(|(k, s)| (k, s))).filter(|(k, _)| k.0 == key.0 && *k != key);
        let clash = others.map(|(_, s)| s).find(|s| spec.lend || s.lend);
        let Some(other) = clash else { return Ok(()) };
        let (lent, second) = if spec.lend { (spec, other) } else { (other, spec) };
        Err(super::ControlError::BadOption {
            route: spec.key(),
            reason: format!(
                "{} lends port {} to its service, which accepts every connection itself: no other route ({}) can share the port; \
                 use another port, or claim without lend",
                lent.key(),
                key.0.port(),
                second.key()
            ),
        })
    }
}
