//! Reloading the config file (SIGHUP, `portmux reload`, `POST /reload`): the
//! file is read and checked again, and the difference applied to the routes
//! it made: new and changed routes set (a backend kept across the change
//! keeps its counters, health and pooled connections), removed ones removed.
//! Connections in flight finish on the route they started on: relays hold
//! their backends, and each request of a per-request connection takes the
//! table current when it arrives. Routes services claimed, and routes made
//! through the admin API, are never touched. A file with a problem is refused
//! as a whole, with its line and reason, and the running configuration stays.
//! Settings (`[run]`) and the `[policy]` take effect at the next start or
//! `portmux upgrade` (which re-reads the file); a reload says when they changed.

use super::core::RouteTarget;
use super::driver::Control;
use crate::config::file::{self, Config, Context};
use crate::forward::backend::Resolved;
use crate::route::{RouteKey, route_key};
use portmux_wire::RouteSpec;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// What a reload did.
#[derive(Debug, Default, serde::Serialize)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: usize,
    /// Settings and sections that changed but apply only at the next start or upgrade.
    pub pending: Vec<String>,
    pub summary: String,
}

impl Control {
    /// Remembers which routes the config file made, at start. Routes the
    /// previous process's file made (handed over in an upgrade, or kept in
    /// systemd's fd store) that this file no longer declares are removed: an
    /// upgrade re-reads the file as a reload would.
    pub fn mark_file_routes(self: &Rc<Self>) {
        let bind = self.shared.settings.bind;
        let keys: BTreeSet<RouteKey> =
            self.shared.settings.file_routes.iter().map(|r| route_key(&r.spec, bind)).collect();
        let inherited = std::mem::replace(&mut *self.file_routes.borrow_mut(), keys.clone());
        for key in inherited.difference(&keys) {
            let text = self.core.borrow().routes().get(key).and_then(|r| match r.target {
                RouteTarget::Backends(_) => Some(r.spec.to_string()),
                RouteTarget::Service(_) => None,
            });
            let Some(text) = text else { continue };
            match self.remove_route(&text) {
                Ok(removed) => {
                    tracing::info!(route = %removed, "the config file no longer declares this route; removed")
                }
                Err(e) => {
                    tracing::warn!(route = %text, "cannot remove a route the config file no longer declares: {e}")
                }
            }
        }
    }

    /// After an upgrade's commit: sets the config file's routes; one that
    /// cannot be set (a service holds it now, say) is reported and skipped.
    pub fn apply_file_routes(self: &Rc<Self>, routes: Vec<(RouteSpec, Resolved)>) {
        for (spec, backends) in routes {
            let text = spec.key();
            if let Err(e) = self.set_backends(spec, backends) {
                tracing::warn!(route = %text, "the config file's route is not applied: {e}");
            }
        }
    }

    /// The previous process's config file made these routes.
    pub(super) fn inherit_file_routes(&self, routes: &[String]) {
        let bind = self.shared.settings.bind;
        let mut ours = self.file_routes.borrow_mut();
        for r in routes {
            match RouteSpec::parse(r) {
                Ok(spec) => drop(ours.insert(route_key(&spec, bind))),
                Err(e) => tracing::warn!(route = %r, "a route the previous config file made does not parse here: {e}"),
            }
        }
    }

    /// The routes the config file made, for the next process.
    pub(super) fn file_routes_message(&self, core: &super::core::Core) -> Option<portmux_wire::Handover> {
        let ours = self.file_routes.borrow();
        let routes: Vec<String> =
            ours.iter().filter_map(|k| core.routes().get(k)).map(|r| r.spec.to_string()).collect();
        (!routes.is_empty()).then_some(portmux_wire::Handover::FileRoutes { routes })
    }

    /// Re-reads the config file and applies what changed.
    pub async fn reload(self: &Rc<Self>) -> Result<Reloaded, String> {
        let s = &self.shared.settings;
        let Some(path) = s.config_file.clone() else {
            return Err("portmux runs without a config file (start it with --config FILE); nothing to reload".into());
        };
        let cx = Context { own_uid: s.policy.own_uid(), http_port: s.http_port, acme: s.acme.email.is_some() };
        let (format, bind) = (s.config_format, s.bind);
        // Reading and resolving may block (DNS): off the control thread.
        let loaded = tokio::task::spawn_blocking(move || -> Result<(Config, Vec<(RouteSpec, Resolved)>), String> {
            let config = file::load(&path, format, cx).map_err(|e| format!("{e}; the running configuration stays"))?;
            file::check_bound(&config.routes, bind)
                .map_err(|p| format!("config file {}:\n  {p}; the running configuration stays", path.display()))?;
            let mut resolved = Vec::new();
            for r in &config.routes {
                let backends = r.backends.iter().map(|b| b.resolve().map(|e| (b.clone(), e)));
                let backends = backends.collect::<Result<Vec<_>, _>>().map_err(|e| {
                    format!(
                        "config file {}:\n  line {}, column {}: {e}; the running configuration stays",
                        path.display(),
                        r.at.line,
                        r.at.column
                    )
                })?;
                resolved.push((r.spec.clone(), backends));
            }
            Ok((config, resolved))
        })
        .await
        .map_err(|e| format!("the reload failed: {e}"))??;
        self.apply_file(loaded.0, loaded.1)
    }

    fn apply_file(self: &Rc<Self>, config: Config, routes: Vec<(RouteSpec, Resolved)>) -> Result<Reloaded, String> {
        let bind = self.shared.settings.bind;
        let wanted: BTreeMap<RouteKey, (RouteSpec, Resolved)> =
            routes.into_iter().map(|(spec, b)| (route_key(&spec, bind), (spec, b))).collect();
        let ours = self.file_routes.borrow().clone();
        // First everything that would refuse, so a refused reload changes nothing.
        {
            let core = self.core.borrow();
            for (key, (spec, _)) in &wanted {
                match core.routes().get(key).map(|r| &r.target) {
                    Some(RouteTarget::Service(s)) => {
                        return Err(format!(
                            "{} is held by service '{}'; the config file cannot take it (the running configuration stays)",
                            spec.key(),
                            s.service
                        ));
                    }
                    Some(RouteTarget::Backends(_)) if !ours.contains(key) => {
                        tracing::info!(route = %spec.key(), "the config file now declares a route made at run time; the file's version replaces it");
                    }
                    _ => {}
                }
            }
        }
        let mut done = Reloaded::default();
        // Removals first (a route the file replaces may hold its port), each
        // key counted as the file's before its route is set, so that nothing
        // of the file is ever saved as a run-time route, even if a later
        // route fails.
        for key in ours.iter().filter(|k| !wanted.contains_key(*k)) {
            let text = self.core.borrow().routes().get(key).map(|r| r.spec.to_string());
            if let Some(text) = text
                && let Ok(removed) = self.remove_route(&text)
            {
                done.removed.push(removed);
            }
            self.file_routes.borrow_mut().remove(key);
        }
        for (key, (spec, backends)) in wanted.iter() {
            let same = self.core.borrow().routes().get(key).is_some_and(|r| match &r.target {
                RouteTarget::Backends(pool) => {
                    r.spec == *spec
                        && pool.backends.len() == backends.len()
                        && pool.backends.iter().zip(backends).all(|(b, (s, e))| b.spec == *s && b.endpoints == *e)
                }
                RouteTarget::Service(_) => false,
            });
            if same {
                done.unchanged += 1;
                continue;
            }
            let existed = self.core.borrow().routes().contains_key(key);
            self.file_routes.borrow_mut().insert(key.clone());
            self.set_backends(spec.clone(), backends.clone())
                .map_err(|e| format!("{}: {e} (routes before it in the file are applied)", spec.key()))?;
            if existed { &mut done.changed } else { &mut done.added }.push(spec.key());
        }
        *self.file_routes.borrow_mut() = wanted.keys().cloned().collect::<BTreeSet<_>>();
        if *self.api_subnets.borrow() != config.api_subnets {
            *self.api_subnets.borrow_mut() = config.api_subnets;
            self.publish();
        }
        let s = &self.shared.settings;
        let before: BTreeSet<(&str, &[String])> =
            s.file_settings.iter().map(|x| (x.key.as_str(), &x.values[..])).collect();
        let now: BTreeSet<(&str, &[String])> =
            config.settings.iter().map(|x| (x.key.as_str(), &x.values[..])).collect();
        let changed: BTreeSet<&str> = before.symmetric_difference(&now).map(|(k, _)| *k).collect();
        done.pending.extend(changed.into_iter().map(|k| format!("[run] {k}")));
        if config.policy_text != s.file_policy {
            done.pending.push("[policy]".into());
        }
        done.summary = format!(
            "reloaded: {} added, {} changed, {} removed, {} unchanged{}",
            done.added.len(),
            done.changed.len(),
            done.removed.len(),
            done.unchanged,
            if done.pending.is_empty() {
                String::new()
            } else {
                format!("; {} take effect at the next start or `portmux upgrade`", done.pending.join(", "))
            }
        );
        tracing::info!("{}", done.summary);
        self.save_routes();
        Ok(done)
    }
}
