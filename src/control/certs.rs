//! The certificates of `https://` routes, on the control plane: made when a
//! route is claimed (refused, with the file and the reason, when they cannot
//! be), reloaded when their files change, forgotten with their route, and
//! handed to the next process on an upgrade.

use super::core::{Core, OpId};
use super::error::ControlError;
use crate::route::{RouteKey, route_key};
use crate::shared::Shared;
use crate::tls::Terminator;
use crate::tls::certs::{CertError, CertSlot, FileCerts};
use portmux_wire::Handover;
use portmux_wire::spec::{HostPattern, RouteSpec, Scheme};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Weak};
use zeroize::Zeroizing;

/// The server sides of the `https://` routes; see the module documentation.
#[derive(Debug, Default)]
pub struct TlsRoutes {
    files: FileCerts,
    terminators: HashMap<RouteKey, Arc<Terminator>>,
    /// Made for claims not yet decided.
    pending: HashMap<OpId, Prepared>,
    /// The names whose certificates ACME issues, each slot shared by its routes.
    acme: HashMap<String, Weak<CertSlot>>,
    /// Wakes the ACME task when a name is added.
    pub acme_wake: Arc<tokio::sync::Notify>,
}

/// Terminators made for a claim, installed once the claim succeeds.
pub type Prepared = Vec<(RouteKey, Arc<Terminator>)>;

impl TlsRoutes {
    /// The server sides that `specs` (the `https://` ones) need; `service`:
    /// the certificate sent with the registration, for the routes that name
    /// none. The first that cannot be made refuses the claim.
    pub fn prepare<'a>(
        &mut self,
        specs: impl IntoIterator<Item = &'a RouteSpec>,
        service: Option<&Arc<CertSlot>>,
        default_bind: IpAddr,
        shared: &Shared,
    ) -> Result<Prepared, ControlError> {
        let mut out = Vec::new();
        for spec in specs.into_iter().filter(|s| s.scheme == Scheme::Https) {
            let refuse = |e: CertError| ControlError::Certificate { route: spec.key(), reason: hint(e, shared) };
            let cert = match (&spec.cert, &spec.key, service) {
                (Some(cert), Some(key), _) => self.files.get(Path::new(cert), Path::new(key)).map_err(refuse)?,
                (None, None, _) if spec.acme => self.acme_slot(spec, shared)?,
                (None, None, Some(slot)) => slot.clone(),
                _ => {
                    return Err(ControlError::Certificate {
                        route: spec.key(),
                        reason: "https:// needs a certificate: ?cert=CHAIN.pem&key=KEY.pem, one sent with the \
                                 registration (RegisterTls), or ?acme"
                            .into(),
                    });
                }
            };
            let client_ca = spec.client_ca.as_deref().map(Path::new);
            let h2 = !spec.connection_mode();
            let terminator = shared.tls.terminator(cert, client_ca, h2).map_err(refuse)?;
            out.push((route_key(spec, default_bind), Arc::new(terminator)));
        }
        Ok(out)
    }

    /// The slot ACME fills for the route's name.
    fn acme_slot(&mut self, spec: &RouteSpec, shared: &Shared) -> Result<Arc<CertSlot>, ControlError> {
        let refuse = |reason: &str| ControlError::Certificate { route: spec.key(), reason: reason.into() };
        if shared.settings.acme.email.is_none() {
            return Err(refuse(
                "?acme needs portmux started with --acme-email ADDR (and --acme-directory URL unless Let's \
                 Encrypt's is meant)",
            ));
        }
        let HostPattern::Exact(host) = &spec.host else {
            return Err(refuse(
                "?acme needs one host name: a wildcard is issued only through DNS-01, which portmux does not \
                 answer; use cert=/key= for *.suffix",
            ));
        };
        if let Some(slot) = self.acme.get(host).and_then(Weak::upgrade) {
            return Ok(slot);
        }
        let slot = CertSlot::acme(host);
        // The certificate kept from before (a restart, an upgrade) serves at once.
        super::acme::load(&crate::tls::acme::Store::new(&shared.settings.state_dir), host, &slot);
        self.acme.insert(host.clone(), Arc::downgrade(&slot));
        self.acme_wake.notify_one();
        Ok(slot)
    }

    /// The names ACME issues certificates for now, with their slots.
    pub fn acme_names(&mut self) -> Vec<(String, Arc<CertSlot>)> {
        self.acme.retain(|_, w| w.strong_count() > 0);
        self.acme.iter().filter_map(|(h, w)| Some((h.clone(), w.upgrade()?))).collect()
    }

    /// Serves these from now on (the newest claim's certificate wins).
    pub fn install(&mut self, prepared: Prepared) {
        self.terminators.extend(prepared);
    }

    /// Keeps `prepared` until operation `op` (a claim) is decided.
    pub fn pending(&mut self, op: OpId, prepared: Prepared) {
        if !prepared.is_empty() {
            self.pending.insert(op, prepared);
        }
    }

    /// Operation `op` was decided: its certificates are served if it succeeded.
    pub fn settle(&mut self, op: OpId, succeeded: bool) {
        if let Some(prepared) = self.pending.remove(&op)
            && succeeded
        {
            self.install(prepared);
        }
    }

    /// The server side of a route; made from its files if it has none yet
    /// (a route the previous process handed over).
    pub fn get(&mut self, key: &RouteKey, spec: &RouteSpec, shared: &Shared) -> Option<Arc<Terminator>> {
        if let Some(t) = self.terminators.get(key) {
            return Some(t.clone());
        }
        if spec.cert.is_none() && !spec.acme {
            return None; // A service's certificate comes with its registration (or its ServiceCert).
        }
        match self.prepare([spec], None, key.0.ip(), shared) {
            Ok(mut made) => {
                let (key, t) = made.pop()?;
                self.terminators.insert(key, t.clone());
                Some(t)
            }
            Err(e) => {
                tracing::warn!(route = %spec.key(), "cannot serve TLS: {e}");
                None
            }
        }
    }

    /// When each route's certificate in use expires (Unix time).
    pub fn expiries(&self) -> Vec<(RouteKey, i64)> {
        let expiry = |t: &Terminator| {
            let current = t.cert.current()?;
            let (_, not_after) = crate::tls::acme::validity_der(current.cert.first()?)?;
            i64::try_from(not_after.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs()).ok()
        };
        self.terminators.iter().filter_map(|(k, t)| Some((k.clone(), expiry(t)?))).collect()
    }

    /// Forgets the routes that are gone (a service's certificate goes with them).
    pub fn retain(&mut self, core: &Core) {
        self.terminators.retain(|key, _| core.routes().contains_key(key));
    }

    /// Reloads the certificate files that changed.
    pub fn refresh(&mut self) {
        self.files.refresh();
    }

    /// What the next process needs: the ticket keys, and the certificates
    /// that services sent (files it reads itself).
    pub fn handover_messages(&self, core: &Core, shared: &Shared) -> Vec<Handover> {
        let (keys, age) = shared.tls.tickets.export();
        let mut out = vec![Handover::TicketKeys {
            keys: keys.iter().map(|k| k.to_vec()).collect(),
            age_ms: age.as_millis() as u64,
        }];
        for (key, t) in &self.terminators {
            let (Some(route), Some((chain, pem))) = (core.routes().get(key), t.cert.service_pem()) else { continue };
            out.push(Handover::ServiceCert { route: route.display.to_string(), chain: chain.into(), key: pem.into() });
        }
        out
    }

    /// A certificate a service sent the previous process, for `route`.
    pub fn adopt_service_cert(
        &mut self,
        route: &str,
        chain: Zeroizing<String>,
        key: Zeroizing<String>,
        default_bind: IpAddr,
        shared: &Shared,
    ) -> Result<(), ControlError> {
        let spec = RouteSpec::parse(route).map_err(|source| ControlError::Spec { route: route.into(), source })?;
        let slot = CertSlot::from_service(chain, key)
            .map_err(|e| ControlError::Certificate { route: route.into(), reason: e.to_string() })?;
        let prepared = self.prepare([&spec], Some(&slot), default_bind, shared)?;
        self.install(prepared);
        Ok(())
    }
}

/// Reloads changed certificate files every second.
pub(super) async fn watch(control: std::rc::Rc<super::driver::Control>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        control.tls.borrow_mut().refresh();
    }
}

/// The reason, with what to do when the sandbox is what keeps a file out of reach.
fn hint(e: CertError, shared: &Shared) -> String {
    match &e {
        CertError::Read { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied && shared.settings.sandboxed.is_some() =>
        {
            format!(
                "{e}; portmux's sandbox reads certificates only under {} (add the directory with --cert-dir)",
                shared.settings.cert_dirs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        }
        _ => e.to_string(),
    }
}
