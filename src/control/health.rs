//! Runs the active health checks routes ask for: one task per (route,
//! backend, check) on the control thread, started and stopped as the routes
//! change (after each publish). A backend kept across a change of backends
//! keeps its task, its streak and its state.

use super::core::RouteTarget;
use super::driver::Control;
use crate::forward::backend::Backend;
use crate::forward::health::Check;
use crate::route::RouteKey;
use std::collections::HashMap;
use std::sync::Arc;

/// What one task checks: a route's backend (by its `Arc`'s address), with the route's check.
type Checked = (RouteKey, usize, Check);

/// The checks running, by what they check, with the backend they follow.
#[derive(Debug, Default)]
pub struct Checks {
    running: HashMap<Checked, (tokio::task::JoinHandle<()>, Arc<Backend>)>,
}

impl Drop for Checks {
    fn drop(&mut self) {
        for (_, (task, _)) in self.running.drain() {
            task.abort();
        }
    }
}

impl Control {
    /// Starts the checks the routes now ask for and stops the others.
    pub(super) fn sync_health(&self) {
        let mut wanted: HashMap<Checked, (Arc<Backend>, String)> = HashMap::new();
        for (key, r) in self.core.borrow().routes() {
            let (RouteTarget::Backends(pool), Some(check)) = (&r.target, Check::of(&r.spec)) else { continue };
            for b in &pool.backends {
                let id = Arc::as_ptr(b) as usize;
                wanted.insert((key.clone(), id, check.clone()), (b.clone(), r.spec.key()));
            }
        }
        let mut checks = self.health.borrow_mut();
        let mut unchecked = Vec::new();
        checks.running.retain(|k, (task, backend)| {
            let keep = wanted.contains_key(k);
            if !keep {
                task.abort();
                unchecked.push(backend.clone());
            }
            keep
        });
        // A backend no check follows any more is back in the rotation (a
        // changed check starts afresh below).
        for b in unchecked {
            if !checks.running.values().any(|(_, other)| Arc::ptr_eq(other, &b)) {
                b.unchecked();
            }
        }
        for (k, (backend, route)) in wanted {
            if checks.running.contains_key(&k) {
                continue;
            }
            let check = k.2.clone();
            let task = tokio_uring::spawn(run(check, backend.clone(), route));
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
