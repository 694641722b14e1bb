//! SRP's config file, read as SRP read it:
//!
//! ```json
//! {"Services": {"www.example.com": {"HealthPath": "/health", "Backends": ["10.0.0.1:3000"]},
//!               "example.com": {"Redirect": {"URL": "https://www.example.com", "DiscardPath": true, "Permanent": true}}},
//!  "API": {"Subnet": "10.0.0.0/24"}}
//! ```
//!
//! Each host becomes `http://HOST:{--http-port}` (and `https://HOST:443?acme`
//! when ACME is configured, as SRP's autocert did, redirects too; not for
//! `*.internal` names, which no public CA certifies), with SRP's health check (GET
//! `HealthPath` every 3 s, 10 s timeout, 200 expected). A redirect is 301 when
//! `Permanent`, else 302, with the request's path appended unless `DiscardPath`.

use super::BackendSpec;
use super::file::{Config, Context, FileRoute, Format, Pos, Problem};
use super::policy::Policy;
use portmux_wire::spec::{RouteSpec, escape_query};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SrpFile {
    #[serde(default)]
    services: BTreeMap<String, Service>,
    #[serde(default, rename = "API")]
    api: Api,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Service {
    health_path: Option<String>,
    #[serde(default)]
    backends: Vec<String>,
    redirect: Option<Redirect>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Redirect {
    #[serde(rename = "URL")]
    url: String,
    #[serde(default)]
    discard_path: bool,
    #[serde(default)]
    permanent: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Api {
    #[serde(default)]
    subnet: String,
}

pub fn parse(text: &str, cx: Context) -> Result<Config, Vec<Problem>> {
    let file: SrpFile = serde_json::from_str(text).map_err(|e| {
        let at = Pos { line: e.line(), column: e.column() };
        vec![Problem {
            at,
            message: format!("{e} (an SRP config file: {{\"Services\": {{HOST: …}}, \"API\": {{\"Subnet\": CIDR}}}})"),
        }]
    })?;
    // serde_json gives no positions for values: a problem points at its host's key.
    let at = |needle: &str| Pos::of(text, text.find(&format!("\"{needle}\"")).unwrap_or(0));
    let mut problems = Vec::new();
    let mut routes = Vec::new();
    for (host, service) in file.services {
        match srp_routes(&host, service, cx) {
            Ok(r) => routes.extend(r.into_iter().map(|(spec, backends)| FileRoute { spec, backends, at: at(&host) })),
            Err(message) => problems.push(Problem { at: at(&host), message: format!("service \"{host}\": {message}") }),
        }
    }
    let mut api_subnets = Vec::new();
    if !file.api.subnet.is_empty() {
        match super::file::parse_network(&file.api.subnet) {
            Ok(n) => api_subnets.push(n),
            Err(e) => problems.push(Problem { at: at("Subnet"), message: format!("API.Subnet: {e}") }),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Config {
        format: Format::Srp,
        settings: Vec::new(),
        policy: Policy::builtin(cx.own_uid),
        policy_text: String::new(),
        api_subnets,
        routes,
    })
}

fn srp_routes(host: &str, s: Service, cx: Context) -> Result<Vec<(RouteSpec, Vec<BackendSpec>)>, String> {
    let mut options = String::new();
    let backends = match (&s.redirect, s.backends.is_empty()) {
        (Some(_), false) => return Err("has both Redirect and Backends; keep one".into()),
        (None, true) => return Err("has no Backends (and no Redirect)".into()),
        (Some(r), true) => {
            let code = if r.permanent { 301 } else { 302 };
            options.push_str(&format!("?redirect={}&redirect_code={code}", escape_query(&r.url)));
            if r.discard_path {
                options.push_str("&redirect_path=discard");
            }
            Vec::new()
        }
        (None, false) => {
            if let Some(path) = s.health_path.as_deref().filter(|p| !p.is_empty()) {
                options.push_str(&format!("?health={}&health_interval=3s&health_timeout=10s", escape_query(path)));
            }
            s.backends.iter().map(|b| BackendSpec::parse(b)).collect::<Result<Vec<_>, _>>()?
        }
    };
    let spec = |scheme: &str, port: u16, extra: &str| {
        let sep = if options.is_empty() { "?" } else { "&" };
        let extra = if extra.is_empty() { String::new() } else { format!("{sep}{extra}") };
        RouteSpec::parse(&format!("{scheme}://{host}:{port}{options}{extra}")).map_err(|e| e.to_string())
    };
    let mut out = vec![(spec("http", cx.http_port, "")?, backends.clone())];
    let internal = host.ends_with(".internal") || host == "internal";
    // As SRP's autocert: every public host on 443 too, redirects included.
    if cx.acme && !internal {
        out.push((spec("https", 443, "acme")?, backends));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SRP's README example, as written there.
    const README: &str = r#"{
	"Services": {
		"www.example.com": {
			"HealthPath": "/health",
			"Backends": [
				"127.0.0.1:3000",
				"127.0.0.1:3001"
			]
		},
		"example.com": {
			"Redirect": {
				"URL": "https://www.example.com",
				"DiscardPath": true,
				"Permanent": true
			}
		}
	},
	"API": {
		"Subnet": "10.128.0.0/24"
	}
}"#;

    #[test]
    fn srp_readme_example_reads_as_srp_meant_it() {
        let cx = Context { own_uid: 0, http_port: 8080, acme: true };
        let c = super::super::file::parse(README, None, cx).unwrap();
        assert_eq!(c.format, Format::Srp);
        let specs: Vec<String> = c.routes.iter().map(|r| r.spec.to_string()).collect();
        assert_eq!(
            specs,
            [
                "http://example.com:8080?redirect=https://www.example.com&redirect_code=301&redirect_path=discard",
                "https://example.com:443?redirect=https://www.example.com&redirect_code=301&redirect_path=discard&acme",
                "http://www.example.com:8080?health=/health&health_interval=3s&health_timeout=10s",
                "https://www.example.com:443?health=/health&health_interval=3s&health_timeout=10s&acme",
            ]
        );
        assert_eq!(c.api_subnets, vec!["10.128.0.0/24".parse::<ipnet::IpNet>().unwrap()]);
        let e = super::super::file::parse("{\"Services\": {\"a.test\": {}}}", None, cx).unwrap_err();
        assert!(e[0].to_string().starts_with("line 1, column 15: service \"a.test\": has no Backends"), "{e:?}");
        let e = super::super::file::parse("{\"Services\": {\"a.test\": {\"Backends\": [1]}}}", None, cx).unwrap_err();
        assert!(e[0].to_string().starts_with("line 1, column"), "{e:?}");
    }
}
