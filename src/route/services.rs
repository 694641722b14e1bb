//! SRP's internal API: `GET /services` on any HTTP listener answers, to
//! clients inside the configured subnets (`[api] subnets`, SRP's
//! `API.Subnet`), each host's backends that pass their health checks, as
//! SRP's JSON (`{HOST: {"HealthPath": …, "Backends": […]}}`); anyone else
//! gets 403. Without subnets, `/services` is an ordinary path.

use super::{Owner, Table};
use crate::reply::Reply;
use portmux_wire::spec::HostPattern;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Who may read `/services`.
#[derive(Debug, Default, Clone)]
pub struct ServicesApi {
    pub subnets: Vec<ipnet::IpNet>,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    #[serde(skip_serializing_if = "Option::is_none")]
    health_path: Option<String>,
    backends: Vec<String>,
}

impl ServicesApi {
    /// Whether a request for `target` is for the API.
    pub fn wants(&self, target: &str) -> bool {
        !self.subnets.is_empty() && target.split('?').next() == Some("/services")
    }
}

impl Table {
    /// The answer to `GET /services` from `client`, if `target` asks for it.
    pub fn services(&self, target: &str, client: IpAddr) -> Option<Reply> {
        if !self.services.wants(target) {
            return None;
        }
        let client = client.to_canonical();
        if !self.services.subnets.iter().any(|n| n.contains(&client)) {
            return Some(Reply::forbidden("/services answers only clients inside the API subnet"));
        }
        let mut hosts: BTreeMap<String, Entry> = BTreeMap::new();
        for port in self.ports.values() {
            for route in port.routes.all() {
                let (HostPattern::Exact(host), Owner::Backends(pool)) = (&route.spec.host, &route.owner) else {
                    continue;
                };
                let entry = hosts.entry(host.clone()).or_default();
                if route.spec.health.as_deref().is_some_and(|h| h.starts_with('/')) {
                    entry.health_path = route.spec.health.clone();
                }
                for b in pool.backends.iter().filter(|b| b.passes_checks()) {
                    if !entry.backends.contains(&b.spec.name) {
                        entry.backends.push(b.spec.name.clone());
                    }
                }
            }
        }
        let body = serde_json::to_string_pretty(&hosts).unwrap_or_default() + "\n";
        Some(Reply::Json { status: 200, body })
    }
}
