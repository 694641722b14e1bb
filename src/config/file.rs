//! The config file (`portmux run --config FILE`, or `/etc/portmux/portmux.toml`
//! when present). Nothing in it is required. Two formats, told apart by
//! content (a JSON object is SRP's):
//!
//! - TOML: `[run]` holds settings, named as `portmux run`'s flags without the
//!   dashes (flags given on the command line win); `[policy]` says who may
//!   claim what; `[api] subnets` who may read `/services`; each `[[route]]` is
//!   a route with backends or a redirect, with its health check.
//! - SRP's JSON (`{"Services": {HOST: {...}}, "API": {"Subnet": CIDR}}`), read
//!   as SRP read it: each host is served on `--http-port`, and on 443 with a
//!   certificate from ACME when ACME is configured (`--acme-email`).
//!
//! Every problem is reported with its line and column and what to write instead.

use super::BackendSpec;
use super::policy::{Policy, PolicySection};
use portmux_wire::spec::{RouteSpec, escape_query};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use toml::Spanned;

/// Where the config file is looked for when `--config` names none.
pub const DEFAULT_PATH: &str = "/etc/portmux/portmux.toml";

/// What the file's routes depend on outside it.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// portmux's own uid (trusted like root's by the policy).
    pub own_uid: u32,
    /// The port SRP's hosts are served on (`--http-port`).
    pub http_port: u16,
    /// ACME is configured: SRP's hosts are also served on 443 (SRP's autocert).
    pub acme: bool,
}

/// The file, checked.
#[derive(Debug)]
pub struct Config {
    pub format: Format,
    /// `[run]`: settings as flags for `portmux run`.
    pub settings: Vec<Setting>,
    pub policy: Policy,
    /// The `[policy]` as written (to tell whether a reload changes it).
    pub policy_text: String,
    /// Clients that may read `/services` (none: the API is off).
    pub api_subnets: Vec<ipnet::IpNet>,
    pub routes: Vec<FileRoute>,
}

impl Config {
    /// A file with nothing in it.
    pub fn empty(own_uid: u32) -> Config {
        Config {
            format: Format::Toml,
            settings: Vec::new(),
            policy: Policy::builtin(own_uid),
            policy_text: String::new(),
            api_subnets: Vec::new(),
            routes: Vec::new(),
        }
    }
}

/// The file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Srp,
}

/// One `[run]` setting: `--KEY VALUE…` (no value: a switch that is on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: String,
    pub values: Vec<String>,
    pub at: Pos,
}

/// A route the file declares.
#[derive(Debug, Clone)]
pub struct FileRoute {
    pub spec: RouteSpec,
    pub backends: Vec<BackendSpec>,
    pub at: Pos,
}

/// A place in the file (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    /// The place of byte `offset` (columns count characters).
    pub(super) fn of(text: &str, offset: usize) -> Pos {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Pos { line, column }
    }
}

/// One thing wrong with the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: Pos,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: {}", self.at.line, self.at.column, self.message)
    }
}

/// Why the config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}:{}", problems.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    Invalid { path: String, problems: Vec<Problem> },
}

/// Reads and checks `path` (the policy's user and group names are resolved now).
pub fn load(path: &Path, format: Option<Format>, cx: Context) -> Result<Config, FileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: shown.clone(), source })?;
    parse(&text, format, cx).map_err(|problems| FileError::Invalid { path: shown, problems })
}

/// Parses a config file's text, in `format` or the one its content shows.
pub fn parse(text: &str, format: Option<Format>, cx: Context) -> Result<Config, Vec<Problem>> {
    match format.unwrap_or_else(|| sniff(text)) {
        Format::Toml => parse_toml(text, cx),
        Format::Srp => super::srp::parse(text, cx),
    }
}

/// The `[run]` settings of a TOML file that has problems elsewhere (to report
/// theirs too); none if the TOML itself does not parse.
pub fn settings_only(text: &str) -> Vec<Setting> {
    #[derive(Deserialize)]
    struct RunOnly {
        #[serde(default)]
        run: BTreeMap<String, Spanned<toml::Value>>,
    }
    match toml::from_str::<RunOnly>(text) {
        Ok(f) => f
            .run
            .into_iter()
            .filter_map(|(key, v)| {
                Some(Setting { at: Pos::of(text, v.span().start), values: flag_values(v.get_ref()).ok()?, key })
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// SRP's files are JSON objects; a TOML file cannot start with `{`.
fn sniff(text: &str) -> Format {
    if text.trim_start().starts_with('{') { Format::Srp } else { Format::Toml }
}

/// The TOML file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    #[serde(default)]
    run: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    policy: PolicySection,
    #[serde(default)]
    api: ApiSection,
    #[serde(default)]
    route: Vec<RouteEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiSection {
    #[serde(default)]
    subnets: Vec<Spanned<String>>,
}

/// A `[[route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    spec: Spanned<String>,
    #[serde(default)]
    backends: Vec<Spanned<String>>,
    health: Option<Spanned<HealthEntry>>,
    redirect: Option<Spanned<RedirectEntry>>,
}

/// `health = { path = "/health", interval = "3s", … }` (or `tcp = true`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct HealthEntry {
    path: Option<String>,
    #[serde(default)]
    tcp: bool,
    interval: Option<String>,
    timeout: Option<String>,
    status: Option<u16>,
    rise: Option<u32>,
    fall: Option<u32>,
}

/// `redirect = { url = "https://…", discard-path = true, status = 301 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RedirectEntry {
    url: String,
    #[serde(default)]
    discard_path: bool,
    status: Option<u16>,
}

fn parse_toml(text: &str, cx: Context) -> Result<Config, Vec<Problem>> {
    let file: TomlFile = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or_else(Pos::default, |s| Pos::of(text, s.start));
        vec![Problem { at, message: e.message().trim_end().to_string() }]
    })?;
    let mut problems = Vec::new();
    let settings = file
        .run
        .into_iter()
        .filter_map(|(key, value)| {
            let at = Pos::of(text, value.span().start);
            match flag_values(value.get_ref()) {
                Ok(values) => Some(Setting { key, values, at }),
                Err(why) => {
                    problems.push(Problem { at, message: format!("setting `{key}`: {why}") });
                    None
                }
            }
        })
        .collect();
    let policy_text = format!("{:?}", file.policy);
    let policy = file.policy.build(cx.own_uid).unwrap_or_else(|e| {
        problems.push(Problem { at: Pos::of(text, text.find("[policy").unwrap_or(0)), message: e });
        Policy::builtin(cx.own_uid)
    });
    let mut api_subnets = Vec::new();
    for s in file.api.subnets {
        match parse_network(s.get_ref()) {
            Ok(n) => api_subnets.push(n),
            Err(message) => problems.push(Problem { at: Pos::of(text, s.span().start), message }),
        }
    }
    let mut routes = Vec::new();
    for entry in file.route {
        match route_entry(text, entry) {
            Ok(r) => routes.push(r),
            Err(p) => problems.push(p),
        }
    }
    if let Err(p) = check_unique(&routes) {
        problems.push(p);
    }
    if problems.is_empty() {
        Ok(Config { format: Format::Toml, settings, policy, policy_text, api_subnets, routes })
    } else {
        problems.sort_by_key(|p| (p.at.line, p.at.column));
        Err(problems)
    }
}

/// A TOML value as a flag's values.
fn flag_values(value: &toml::Value) -> Result<Vec<String>, String> {
    use toml::Value;
    let one = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        _ => Err("write a string, a number or a list of them".to_string()),
    };
    match value {
        Value::Boolean(true) => Ok(Vec::new()),
        Value::Array(items) => items.iter().map(one).collect(),
        v => one(v).map(|s| vec![s]),
    }
}

fn route_entry(text: &str, entry: RouteEntry) -> Result<FileRoute, Problem> {
    let at = Pos::of(text, entry.spec.span().start);
    let problem = |at: Pos, message: String| Problem { at, message };
    let mut spec = entry.spec.get_ref().clone();
    let mut add = |k: &str, v: &str| {
        spec.push(if spec.contains('?') { '&' } else { '?' });
        spec.push_str(&format!("{k}={}", escape_query(v)));
    };
    if let Some(h) = &entry.health {
        let hat = Pos::of(text, h.span().start);
        let h = h.get_ref();
        match (&h.path, h.tcp) {
            (Some(p), false) => add("health", p),
            (None, true) => add("health", "tcp"),
            _ => return Err(problem(hat, "a health check has a `path` (HTTP GET) or `tcp = true`, not both".into())),
        }
        for (k, v) in [("health_interval", &h.interval), ("health_timeout", &h.timeout)] {
            if let Some(v) = v {
                add(k, v);
            }
        }
        let numbers = [("health_status", h.status.map(u32::from)), ("health_rise", h.rise), ("health_fall", h.fall)];
        for (k, v) in numbers {
            if let Some(v) = v {
                add(k, &v.to_string());
            }
        }
    }
    if let Some(r) = &entry.redirect {
        let r = r.get_ref();
        add("redirect", &r.url);
        if r.discard_path {
            add("redirect_path", "discard");
        }
        if let Some(s) = r.status {
            add("redirect_code", &s.to_string());
        }
    }
    let spec = RouteSpec::parse(&spec).map_err(|e| problem(at, e.to_string()))?;
    let mut backends = Vec::new();
    for b in &entry.backends {
        let bat = Pos::of(text, b.span().start);
        backends.push(BackendSpec::parse(b.get_ref()).map_err(|e| problem(bat, e))?);
    }
    if spec.name.is_some() {
        return Err(problem(at, "a route in the config file has backends; name= is for services' routes".into()));
    }
    let answered = spec.redirect.is_some();
    if answered && !backends.is_empty() {
        return Err(problem(at, "a redirect answers every request itself: remove its backends".into()));
    }
    if !answered && backends.is_empty() {
        let msg = "give the route its backends (backends = [\"127.0.0.1:8080\"]) or a redirect (redirect = { url = \"https://…\" })";
        return Err(problem(at, msg.into()));
    }
    Ok(FileRoute { spec, backends, at })
}

/// Two entries for one route: the second is refused (the first would silently lose).
/// Routes that listen on the same address once the default `bind` is known
/// (one names it with `bind=`, the other leaves it out): the second one.
/// (`check_unique`, at load, catches those written alike.)
pub fn check_bound(routes: &[FileRoute], bind: std::net::IpAddr) -> Result<(), Problem> {
    let mut seen: BTreeMap<(std::net::SocketAddr, String), Pos> = BTreeMap::new();
    for r in routes {
        if let Some(first) = seen.insert((r.spec.listen_addr(bind), r.spec.identity()), r.at) {
            let message = format!(
                "{} is the route of line {} too (the default bind is {bind}); merge the two",
                r.spec.key(),
                first.line
            );
            return Err(Problem { at: r.at, message });
        }
    }
    Ok(())
}

/// Two routes written alike (the same `bind=`, or none, and identity): the second one.
fn check_unique(routes: &[FileRoute]) -> Result<(), Problem> {
    let mut seen: BTreeMap<String, Pos> = BTreeMap::new();
    for r in routes {
        let key = format!("{:?}|{}", r.spec.bind, r.spec.identity());
        if let Some(first) = seen.insert(key, r.at) {
            let message = format!("{} is declared twice (first at line {}); merge the two", r.spec.key(), first.line);
            return Err(Problem { at: r.at, message });
        }
    }
    Ok(())
}

/// A CIDR, or one address.
pub fn parse_network(n: &str) -> Result<ipnet::IpNet, String> {
    let n = n.trim();
    n.parse::<ipnet::IpNet>()
        .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("'{n}' is not a network; write a CIDR like 10.0.0.0/8 or fd00::/8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CX: Context = Context { own_uid: 0, http_port: 80, acme: false };

    fn problems(text: &str) -> Vec<String> {
        parse(text, None, CX).unwrap_err().iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let e = problems("[policy]\n[[policy.rule]]\nports = [8000, true]\n");
        assert!(e[0].starts_with("line 3, column"), "{e:?}");
        let e = problems("[polcy]\n");
        assert!(e[0].contains("unknown field `polcy`") && e[0].starts_with("line 1"), "{e:?}");
        assert!(parse("", None, CX).is_ok(), "an empty file is the defaults");
        let e = problems(
            "[run]\nlinger = { a = 1 }\n\n[[route]]\nspec = \"http://a.test\"\nbackends = [\"nohost\"]\n\n[[route]]\nspec = \"http://b.test?lb=fast\"\nbackends = [\"127.0.0.1:1\"]\n",
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("line 2, column 10: setting `linger`"), "{e:?}");
        assert!(e[1].starts_with("line 6, column 13:") && e[1].contains("write host:port"), "{e:?}");
        assert!(e[2].starts_with("line 9, column 8:") && e[2].contains("lb=round_robin"), "{e:?}");
    }

    #[test]
    fn routes_carry_their_health_checks_and_redirects_as_options() {
        let c = parse(
            "[run]\nvia = true\ncert-dir = [\"/a\", \"/b\"]\npeek-timeout = \"5s\"\n\n[api]\nsubnets = [\"10.0.0.0/8\"]\n\n\
             [[route]]\nspec = \"http://a.test:8080\"\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9002@3\"]\n\
             health = { path = \"/up\", interval = \"1s\", fall = 2 }\n\n\
             [[route]]\nspec = \"http://old.test:8080\"\nredirect = { url = \"https://new.test/x?y=1\", discard-path = true, status = 301 }\n",
            None,
            CX,
        )
        .unwrap();
        let keys: Vec<(&str, Vec<String>)> = c.settings.iter().map(|s| (s.key.as_str(), s.values.clone())).collect();
        assert_eq!(keys[0], ("cert-dir", vec!["/a".to_string(), "/b".to_string()]));
        assert_eq!(keys[2], ("via", vec![]));
        assert_eq!(c.api_subnets, vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]);
        let a = &c.routes[0].spec;
        assert_eq!(
            (a.health.as_deref(), a.health_interval.as_deref(), a.health_fall.as_deref()),
            (Some("/up"), Some("1s"), Some("2"))
        );
        assert_eq!(c.routes[0].backends[1].weight, 3);
        let r = &c.routes[1].spec;
        assert_eq!(r.redirect.as_deref(), Some("https://new.test/x?y=1"));
        assert_eq!((r.redirect_code.as_deref(), r.redirect_path.as_deref()), (Some("301"), Some("discard")));
        let e = problems(
            "[[route]]\nspec = \"http://a.test\"\n\n[[route]]\nspec = \"http://A.test:80/\"\nbackends = [\"127.0.0.1:1\"]\n",
        );
        assert!(e[0].contains("give the route its backends"), "{e:?}");
        let e = problems(
            "[[route]]\nspec = \"http://a.test\"\nbackends = [\"127.0.0.1:1\"]\n[[route]]\nspec = \"http://A.test:80/\"\nbackends = [\"127.0.0.1:1\"]\n",
        );
        assert!(e[0].starts_with("line 5") && e[0].contains("declared twice (first at line 2)"), "{e:?}");
    }
}
