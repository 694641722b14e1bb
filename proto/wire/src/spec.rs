//! The route-spec syntax, one for the CLI, the clients and the daemon, and the
//! host and path normalisation that requests are matched with.
//!
//! ```text
//! tcp://[ADDR]:PORT                        raw TCP, the whole port
//! http://HOST[:PORT][/PATH-PREFIX]         HTTP/1 by Host (exact, *.suffix or any) and path prefix
//! tls://HOST[:PORT]                        TLS passthrough by SNI (exact, *.suffix or any)
//! https://HOST[:PORT][/PATH]?cert=F&key=F  terminate TLS in portmux, then route as http://
//! ```
//!
//! Options go in the query string: `name=SERVICE`, `bind=ADDR` (the listening
//! address for http/tls/https; tcp names it before the port), for routes with
//! backends `lb=round_robin|least_conn` and `proxy=v1|v2` (the PROXY protocol
//! header sent to backends). `https://` takes its certificate from
//! `cert=FILE&key=FILE`, from the service that registers it (sent with the
//! registration), or from ACME (`acme`), and asks clients for a certificate
//! signed by `client_ca=FILE`. `redirect=https` makes an `http://` route
//! answer every request with a redirect to the same URL on https;
//! `redirect=URL` (escaped) to that URL, with the request's path and query
//! appended unless `redirect_path=discard`; `redirect_code=301|302|307|308`
//! (308 by default). Routes with backends may check them actively:
//! `health=/PATH` (HTTP GET) or `health=tcp`, with `health_interval=`,
//! `health_timeout=`, `health_status=`, `health_rise=` and `health_fall=`.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// How a route's connections are recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    Tcp,
    Http,
    Tls,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Http => "http",
            Scheme::Tls => "tls",
            Scheme::Https => "https",
        }
    }

    fn default_port(self) -> Option<u16> {
        match self {
            Scheme::Tcp => None,
            Scheme::Http => Some(80),
            Scheme::Tls | Scheme::Https => Some(443),
        }
    }
}

/// Which Host / SNI values a route accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// Any host, or none at all.
    Any,
    /// Exactly this (normalised) name.
    Exact(String),
    /// `*.SUFFIX`: any name ending in `.SUFFIX`, at any depth, but not SUFFIX itself.
    Suffix(String),
}

impl HostPattern {
    /// Whether a normalised host (see [`normalize_name`]) matches.
    pub fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (HostPattern::Any, _) => true,
            (HostPattern::Exact(want), Some(h)) => want == h,
            (HostPattern::Suffix(suffix), Some(h)) => {
                h.len() > suffix.len() + 1
                    && h.ends_with(suffix.as_str())
                    && h.as_bytes()[h.len() - suffix.len() - 1] == b'.'
            }
            (_, None) => false,
        }
    }

    /// Specificity: exact beats a longer suffix beats a shorter suffix beats any.
    pub fn rank(&self) -> (u8, usize) {
        match self {
            HostPattern::Any => (0, 0),
            HostPattern::Suffix(s) => (1, s.len()),
            HostPattern::Exact(s) => (2, s.len()),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => Ok(()),
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*.{s}"),
        }
    }
}

/// A parsed route spec. `Display` gives the canonical form, which is what
/// portmux reports and compares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteSpec {
    pub scheme: Scheme,
    pub host: HostPattern,
    /// Listening address; `None` means the daemon's default (`--bind`, `[::]` unless set).
    pub bind: Option<IpAddr>,
    pub port: u16,
    /// Normalised path prefix (no trailing slash); `None` matches every path.
    pub path: Option<String>,
    /// Service name (`?name=`); must agree with the session's name when given.
    pub name: Option<String>,
    /// Certificate and key files for `https://`.
    pub cert: Option<String>,
    pub key: Option<String>,
    /// `https://`: clients must present a certificate that this CA file's
    /// certificates sign.
    pub client_ca: Option<String>,
    /// `https://`: the certificate comes from ACME. `http://` (with no
    /// backends): portmux answers ACME's HTTP-01 challenges there.
    pub acme: bool,
    /// `http://`: every request is redirected: `https` (the same host and
    /// target over https), or an absolute `http(s)://` URL.
    pub redirect: Option<String>,
    /// The redirect's status: 301, 302, 307 or 308 (the default).
    pub redirect_code: Option<String>,
    /// `discard`: a redirect to a URL drops the request's path and query
    /// (`keep`, the default, appends them to the URL).
    pub redirect_path: Option<String>,
    /// Active health checks of the backends: `/PATH` (HTTP GET) or `tcp` (a connect).
    pub health: Option<String>,
    /// How often each backend is checked (`3s` by default), and how long a check may take (`10s`).
    pub health_interval: Option<String>,
    pub health_timeout: Option<String>,
    /// The status an HTTP check expects (200 by default).
    pub health_status: Option<String>,
    /// Checks in a row that bring a backend back (`rise`, 1 by default) or take it out (`fall`, 1).
    pub health_rise: Option<String>,
    pub health_fall: Option<String>,
    /// Load-balancing policy among backends: `round_robin` (default) or `least_conn`.
    pub lb: Option<String>,
    /// PROXY protocol header sent to backends: `v1` or `v2`.
    pub proxy: Option<String>,
    /// `http://`, `https://` with backends: `request` (default: every
    /// request is parsed and routed) or `connection` (the connection is
    /// relayed whole after its first request).
    pub mode: Option<String>,
    /// What portmux speaks to backends: `http1` (default) or `h2`.
    pub backend_proto: Option<String>,
    /// `off`: no X-Forwarded-*/Forwarded headers are added.
    pub forwarded: Option<String>,
    /// A service's catch-all route (`tcp://:P`, `http://:P`, `tls://:P`)
    /// that asks for the port's listening socket itself (`?lend`): its
    /// sessions accept from it directly, and portmux keeps the socket and
    /// its queue while none does. The route has the port to itself.
    pub lend: bool,
}

/// A route spec that could not be parsed; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid route spec '{spec}': {reason}")]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

impl RouteSpec {
    /// Parses a route spec; see the module documentation for the syntax.
    pub fn parse(spec: &str) -> Result<RouteSpec, SpecError> {
        let parsed = parse(spec).and_then(|s| {
            // The canonical form is what is kept and handed over (it escapes
            // what the input did not): it must parse too.
            let canonical = s.to_string().len();
            if canonical > MAX_SPEC {
                return Err(format!(
                    "its canonical form is {canonical} bytes long; a route spec is at most {MAX_SPEC}"
                ));
            }
            Ok(s)
        });
        parsed.map_err(|reason| SpecError { spec: spec.chars().take(200).collect(), reason })
    }

    /// The route as portmux names it: its canonical form without the service name.
    pub fn key(&self) -> String {
        let mut s = self.clone();
        s.name = None;
        s.to_string()
    }

    /// What the route matches, independent of its listening address and of the
    /// options that do not change matching (name, lb, proxy, certificates,
    /// redirects). Two routes with the same identity on one listener are the
    /// same route (a pool, a conflict, or a replacement).
    pub fn identity(&self) -> String {
        let mut s = self.without_health();
        (s.bind, s.name, s.lb, s.proxy) = (None, None, None, None);
        (s.mode, s.backend_proto, s.forwarded) = (None, None, None);
        (s.cert, s.key, s.client_ca, s.acme, s.redirect) = (None, None, None, false, None);
        (s.redirect_code, s.redirect_path) = (None, None);
        s.to_string()
    }

    /// The spec without its health check options.
    pub fn without_health(&self) -> RouteSpec {
        let mut s = self.clone();
        (s.health, s.health_interval, s.health_timeout, s.health_status) = (None, None, None, None);
        (s.health_rise, s.health_fall) = (None, None);
        s
    }

    /// The address to listen on, given the daemon's default address.
    pub fn listen_addr(&self, default: IpAddr) -> SocketAddr {
        SocketAddr::new(self.bind.unwrap_or(default), self.port)
    }

    /// Whether the route asks for `mode=connection`: its HTTP connections
    /// are relayed whole instead of routed request by request.
    pub fn connection_mode(&self) -> bool {
        self.mode.as_deref() == Some("connection")
    }

    /// Whether a normalised request path (see [`normalize_path`]) falls under this route's prefix.
    pub fn matches_path(&self, path: &str) -> bool {
        self.path.as_deref().is_none_or(|prefix| path_has_prefix(path, prefix))
    }
}

impl FromStr for RouteSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        RouteSpec::parse(s)
    }
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme.as_str())?;
        if self.scheme == Scheme::Tcp {
            match self.bind {
                Some(IpAddr::V6(a)) => write!(f, "[{a}]")?,
                Some(IpAddr::V4(a)) => write!(f, "{a}")?,
                None => {}
            }
        } else {
            write!(f, "{}", self.host)?;
        }
        write!(f, ":{}", self.port)?;
        if let Some(p) = &self.path {
            f.write_str(p)?;
        }
        let mut sep = '?';
        let mut opt = |f: &mut fmt::Formatter<'_>, k: &str, v: &str| {
            let r = write!(f, "{sep}{k}={}", escape_query(v));
            sep = '&';
            r
        };
        if self.scheme != Scheme::Tcp
            && let Some(b) = self.bind
        {
            opt(f, "bind", &b.to_string())?;
        }
        let options = [
            ("name", &self.name),
            ("lb", &self.lb),
            ("proxy", &self.proxy),
            ("cert", &self.cert),
            ("key", &self.key),
            ("client_ca", &self.client_ca),
            ("redirect", &self.redirect),
            ("redirect_code", &self.redirect_code),
            ("redirect_path", &self.redirect_path),
            ("health", &self.health),
            ("health_interval", &self.health_interval),
            ("health_timeout", &self.health_timeout),
            ("health_status", &self.health_status),
            ("health_rise", &self.health_rise),
            ("health_fall", &self.health_fall),
            ("mode", &self.mode),
            ("backend_proto", &self.backend_proto),
            ("forwarded", &self.forwarded),
        ];
        for (k, v) in options {
            if let Some(v) = v {
                opt(f, k, v)?;
            }
        }
        if self.acme {
            write!(f, "{sep}acme")?;
            sep = '&';
        }
        if self.lend {
            write!(f, "{sep}lend")?;
        }
        Ok(())
    }
}

/// Longest route spec, as given and in canonical form.
const MAX_SPEC: usize = 2048;

fn parse(spec: &str) -> Result<RouteSpec, String> {
    if spec.len() > MAX_SPEC {
        return Err(format!("it is {} bytes long; a route spec is at most {MAX_SPEC}", spec.len()));
    }
    if let Some(c) = spec.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("it contains {c:?}; route specs have no spaces or control characters"));
    }
    let Some((scheme, rest)) = spec.split_once("://") else {
        return Err("it has no scheme; write tcp://, http://, tls:// or https://, e.g. http://:8000/a".into());
    };
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "tcp" => Scheme::Tcp,
        "http" => Scheme::Http,
        "tls" => Scheme::Tls,
        "https" => Scheme::Https,
        other => return Err(format!("unknown scheme '{other}'; use tcp, http, tls or https")),
    };
    if rest.contains('#') {
        return Err("a route spec has no fragment ('#')".into());
    }
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };

    let (host_part, port) = split_port(authority)?;
    let port = match (port, scheme.default_port()) {
        (Some(p), _) => p,
        (None, Some(p)) => p,
        (None, None) => return Err("tcp:// needs a port, e.g. tcp://:5432 or tcp://127.0.0.1:5432".into()),
    };
    if port == 0 {
        return Err("port 0 is not a port portmux can share; name a fixed port".into());
    }

    let mut out = RouteSpec {
        scheme,
        host: HostPattern::Any,
        bind: None,
        port,
        path: None,
        name: None,
        cert: None,
        key: None,
        client_ca: None,
        acme: false,
        redirect: None,
        redirect_code: None,
        redirect_path: None,
        health: None,
        health_interval: None,
        health_timeout: None,
        health_status: None,
        health_rise: None,
        health_fall: None,
        lb: None,
        proxy: None,
        mode: None,
        backend_proto: None,
        forwarded: None,
        lend: false,
    };

    if scheme == Scheme::Tcp {
        if !host_part.is_empty() {
            let addr = host_part.trim_start_matches('[').trim_end_matches(']');
            out.bind = Some(addr.parse().map_err(|_| {
                format!("'{host_part}' is not an IP address; tcp:// takes the address to listen on (or none), not a host name")
            })?);
        }
    } else {
        out.host = parse_host_pattern(host_part)?;
    }

    match scheme {
        Scheme::Http | Scheme::Https if !path.is_empty() => {
            if path.contains('%') && decode_percent(path).is_none() {
                return Err(format!("path '{path}' has a malformed %-escape"));
            }
            let p = normalize_path(path);
            out.path = (p != "/").then_some(p);
        }
        Scheme::Tcp | Scheme::Tls if !path.is_empty() && path != "/" => {
            return Err(format!(
                "{}:// routes the whole connection and takes no path; a path prefix needs http:// (or https:// to terminate TLS)",
                scheme.as_str()
            ));
        }
        _ => {}
    }

    parse_query(query, &mut out)?;
    if out.lend {
        lend_problem(&out)?;
    }
    if out.redirect.is_none() && (out.redirect_code.is_some() || out.redirect_path.is_some()) {
        return Err("redirect_code= and redirect_path= go with redirect=".into());
    }
    if out.redirect.as_deref().is_some_and(|u| u.contains('?')) && out.redirect_path.as_deref() != Some("discard") {
        return Err(
            "a redirect URL with a query takes redirect_path=discard (the request's path cannot follow a query)".into(),
        );
    }
    if out.redirect.as_deref() == Some("https") && out.redirect_path.is_some() {
        return Err("redirect=https always keeps the path; redirect_path= goes with redirect=URL".into());
    }
    let health_options = [&out.health_interval, &out.health_timeout, &out.health_status, &out.health_rise];
    if out.health.is_none() && (health_options.iter().any(|o| o.is_some()) || out.health_fall.is_some()) {
        return Err("health_interval=, health_timeout=, health_status=, health_rise= and health_fall= go with health=/PATH or health=tcp".into());
    }
    if out.health.as_deref() == Some("tcp") && out.health_status.is_some() {
        return Err("health_status= is for HTTP checks (health=/PATH), not health=tcp".into());
    }

    let tls_options = out.cert.is_some() || out.key.is_some() || out.client_ca.is_some() || out.acme;
    let http_acme = scheme == Scheme::Http && out.acme && out.cert.is_none() && out.key.is_none();
    match scheme {
        Scheme::Https if out.cert.is_some() != out.key.is_some() => {
            Err("cert= and key= come together: ?cert=CHAIN.pem&key=KEY.pem".into())
        }
        Scheme::Https if out.acme && out.cert.is_some() => {
            Err("the certificate comes from cert=/key= or from acme, not both".into())
        }
        Scheme::Http if http_acme && out.client_ca.is_none() && out.redirect.is_none() => Ok(out),
        Scheme::Http | Scheme::Tls | Scheme::Tcp if tls_options => Err(format!(
            "cert=, key=, client_ca= and acme belong to https:// routes; {}:// does not terminate TLS{}",
            scheme.as_str(),
            if scheme == Scheme::Tls { " (tls:// passes it through to the service)" } else { "" }
        )),
        Scheme::Tls | Scheme::Tcp if out.mode.is_some() || out.backend_proto.is_some() || out.forwarded.is_some() => {
            Err(format!(
                "mode=, backend_proto= and forwarded= belong to http:// and https:// routes; {}:// relays whole connections",
                scheme.as_str()
            ))
        }
        Scheme::Http | Scheme::Https if out.redirect.is_some() && out.mode.is_some() => {
            Err("a redirect answers each request itself; mode= goes with routes that have backends".into())
        }
        Scheme::Https if out.redirect.as_deref() == Some("https") => {
            Err("redirect=https belongs to http:// routes (http://HOST:80?redirect=https); an https:// route redirects to a URL".into())
        }
        Scheme::Tls | Scheme::Tcp if out.redirect.is_some() => Err(format!(
            "redirects belong to http:// and https:// routes; {}:// does not read requests",
            scheme.as_str()
        )),
        _ => Ok(out),
    }
}

/// What keeps a `?lend` route from being lent: it must take every connection
/// of its port as it comes (no host, path or option portmux would apply).
fn lend_problem(s: &RouteSpec) -> Result<(), String> {
    if s.scheme == Scheme::Https {
        return Err("lend hands the listening socket to the service, so portmux terminates no TLS: use tls:// (the service terminates it) or drop lend".into());
    }
    if s.host != HostPattern::Any || s.path.is_some() {
        return Err(format!(
            "lend gives the service every connection of port {} as it comes, unread: the route names no host or path ({}://:{}?lend)",
            s.port,
            s.scheme.as_str(),
            s.port
        ));
    }
    let options = [&s.lb, &s.proxy, &s.redirect, &s.health, &s.mode, &s.backend_proto, &s.forwarded];
    if options.iter().any(|o| o.is_some()) || s.acme {
        return Err("lend goes with name= and bind= only: portmux does not see the connections of a lent port".into());
    }
    Ok(())
}

/// Splits `host[:port]` (with `[v6]` hosts) into host and port.
fn split_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']').ok_or("unclosed '[' in the address")?;
        let (h, rest) = authority.split_at(end + 1);
        match rest {
            "" => (h, None),
            _ => match rest.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return Err(format!("unexpected '{rest}' after '{h}'")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| format!("'{p}' is not a port number (1-65535)"))?),
    };
    Ok((host, port))
}

fn parse_host_pattern(raw: &str) -> Result<HostPattern, String> {
    if raw.is_empty() || raw == "*" {
        return Ok(HostPattern::Any);
    }
    if let Some(suffix) = raw.strip_prefix("*.") {
        let s = normalize_name(suffix).ok_or_else(|| bad_host(raw))?;
        return Ok(HostPattern::Suffix(s));
    }
    if raw.contains('*') {
        return Err(format!("'{raw}': a wildcard is only allowed as a leading '*.', e.g. *.example.com"));
    }
    normalize_name(raw).map(HostPattern::Exact).ok_or_else(|| bad_host(raw))
}

fn bad_host(raw: &str) -> String {
    if !raw.is_ascii() {
        format!("'{raw}' is not an ASCII host name; write internationalised names in punycode (xn--…)")
    } else {
        format!("'{raw}' is not a valid host name (letters, digits, '-', '_' and dots; labels of 1-63 characters)")
    }
}

fn parse_query(query: &str, out: &mut RouteSpec) -> Result<(), String> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode_percent(v).ok_or_else(|| format!("option '{k}' has a malformed %-escape"))?;
        if k == "acme" || k == "lend" {
            if pair != k && !matches!(v.as_str(), "1" | "true" | "on") {
                return Err(format!("{k} takes no value ({k}, or {k}=on); '{v}' is not one"));
            }
            let flag = if k == "acme" { &mut out.acme } else { &mut out.lend };
            if *flag {
                return Err(format!("option '{k}' is given twice"));
            }
            *flag = true;
            continue;
        }
        if v.is_empty() {
            return Err(format!("option '{k}' needs a value, e.g. {k}=…"));
        }
        let slot = match k {
            "name" => {
                validate_service_name(&v)?;
                &mut out.name
            }
            "cert" => &mut out.cert,
            "key" => &mut out.key,
            "client_ca" => &mut out.client_ca,
            "redirect" => {
                if v != "https" && !is_redirect_url(&v) {
                    return Err(format!(
                        "redirect='{v}' is neither https nor an absolute URL; write redirect=https or redirect=https://HOST/…"
                    ));
                }
                &mut out.redirect
            }
            "redirect_code" => {
                if !matches!(v.as_str(), "301" | "302" | "307" | "308") {
                    return Err(format!("redirect_code={v} is not a redirect; use 301, 302, 307 or 308"));
                }
                &mut out.redirect_code
            }
            "redirect_path" => {
                if !matches!(v.as_str(), "keep" | "discard") {
                    return Err(format!("redirect_path='{v}' is not keep or discard"));
                }
                &mut out.redirect_path
            }
            "health" => {
                if v != "tcp" && !(v.starts_with('/') && v.bytes().all(|b| b.is_ascii_graphic())) {
                    return Err(format!("health='{v}' is not a check; write health=/PATH (HTTP GET) or health=tcp"));
                }
                &mut out.health
            }
            "health_interval" | "health_timeout" => {
                if parse_duration(&v).is_none_or(|d| d.is_zero() || d.as_secs() > 86_400) {
                    return Err(format!("{k}='{v}' is not a duration; write e.g. 500ms, 3s or 1m (at most a day)"));
                }
                if k == "health_interval" { &mut out.health_interval } else { &mut out.health_timeout }
            }
            "health_status" => {
                if !v.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s)) {
                    return Err(format!("health_status={v} is not an HTTP status (100-599)"));
                }
                &mut out.health_status
            }
            "health_rise" | "health_fall" => {
                if !v.parse::<u32>().is_ok_and(|n| (1..=100).contains(&n)) {
                    return Err(format!("{k}={v} is not a count of checks (1-100)"));
                }
                if k == "health_rise" { &mut out.health_rise } else { &mut out.health_fall }
            }
            "lb" => {
                if !matches!(v.as_str(), "round_robin" | "least_conn") {
                    return Err(format!("lb='{v}' is not a policy; use lb=round_robin or lb=least_conn"));
                }
                &mut out.lb
            }
            "proxy" => {
                if !matches!(v.as_str(), "v1" | "v2") {
                    return Err(format!("proxy='{v}' is not a PROXY protocol version; use proxy=v1 or proxy=v2"));
                }
                &mut out.proxy
            }
            "mode" => {
                if !matches!(v.as_str(), "request" | "connection") {
                    return Err(format!(
                        "mode='{v}' is not a mode; use mode=request (every request routed) or mode=connection"
                    ));
                }
                &mut out.mode
            }
            "backend_proto" => {
                if !matches!(v.as_str(), "http1" | "h2") {
                    return Err(format!(
                        "backend_proto='{v}' is not a protocol; use backend_proto=http1 or backend_proto=h2"
                    ));
                }
                &mut out.backend_proto
            }
            "forwarded" => {
                if !matches!(v.as_str(), "on" | "off") {
                    return Err(format!("forwarded='{v}' is not on or off"));
                }
                &mut out.forwarded
            }
            "bind" => {
                if out.bind.is_some() {
                    return Err("the listening address is given twice (before the port and as bind=)".into());
                }
                let addr = v.trim_start_matches('[').trim_end_matches(']');
                out.bind = Some(addr.parse().map_err(|_| format!("bind='{v}' is not an IP address"))?);
                continue;
            }
            _ => {
                return Err(format!(
                    "unknown option '{k}'; known options are name, bind, lb, proxy, cert, key, client_ca, acme, lend, redirect, redirect_code, redirect_path, health, health_interval, health_timeout, health_status, health_rise, health_fall, mode, backend_proto and forwarded"
                ));
            }
        };
        if slot.is_some() {
            return Err(format!("option '{k}' is given twice"));
        }
        *slot = Some(v);
    }
    Ok(())
}

/// Checks a service name: 1-64 characters of letters, digits, '.', '_' and '-'.
pub fn validate_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "service name '{}' is invalid; use 1-64 letters, digits, '.', '_' or '-'",
            name.chars().take(80).collect::<String>()
        ))
    }
}

/// An absolute `http://` or `https://` URL with a host, as a redirect's target.
fn is_redirect_url(v: &str) -> bool {
    let rest = v.strip_prefix("https://").or_else(|| v.strip_prefix("http://"));
    rest.is_some_and(|r| {
        let host = r.split(['/', '?']).next().unwrap_or("");
        !host.is_empty() && v.bytes().all(|b| b.is_ascii_graphic())
    })
}

/// `N` followed by `ms`, `s`, `m` or `h` (the durations route options take).
pub fn parse_duration(v: &str) -> Option<std::time::Duration> {
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let n: u64 = v[..digits].parse().ok()?;
    let ms = match &v[digits..] {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(ms))
}

/// Escapes a route option's value (the inverse of the parser's %-decoding).
pub fn escape_query(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~' | b'/' | b':') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn decode_percent(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Normalises a host name as sent in SNI, a Host header (without its port) or a
/// route spec: ASCII lower case, one trailing dot removed, labels checked.
/// IPv6 literals keep their brackets (`[::1]`). `None` if it is not a valid name.
pub fn normalize_name(raw: &str) -> Option<String> {
    if let Some(inner) = raw.strip_prefix('[') {
        let v6: Ipv6Addr = inner.strip_suffix(']')?.parse().ok()?;
        return Some(format!("[{v6}]"));
    }
    let name = raw.strip_suffix('.').unwrap_or(raw);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return None;
        }
    }
    Some(name.to_ascii_lowercase())
}

/// Normalises a Host header value: strips the port, then [`normalize_name`].
pub fn host_from_header(value: &str) -> Option<String> {
    let (host, port) = split_port(value).ok()?;
    if port.is_none() && value.ends_with(':') {
        return None;
    }
    normalize_name(host)
}

/// Normalises a request path for matching (the request itself is never changed):
/// drops the query, decodes %-escapes of unreserved characters, merges repeated
/// slashes, resolves `.` and `..` segments, and drops a trailing slash.
/// `/a//b/./c/../d?x` → `/a/b/d`.
pub fn normalize_path(raw: &str) -> String {
    let raw = raw.split(['?', '#']).next().unwrap_or("");
    let decoded = decode_unreserved(raw);
    let mut segs: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop();
            }
            s => segs.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segs {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn decode_unreserved(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = b.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())
            && (v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~'))
        {
            out.push(v as char);
            i += 3;
            continue;
        }
        // Only ASCII bytes are pushed one at a time; a non-ASCII byte is kept as
        // its UTF-8 sequence by copying the char it starts.
        match s[i..].chars().next() {
            Some(c) => {
                out.push(c);
                i += c.len_utf8();
            }
            None => break,
        }
    }
    out
}

/// Whether normalised `path` lies under `prefix`, on a segment boundary:
/// `/api` covers `/api` and `/api/v1` but not `/apiv2`.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RouteSpec {
        RouteSpec::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(s: &str) -> String {
        RouteSpec::parse(s).expect_err(s).to_string()
    }

    #[test]
    fn canonical_forms() {
        let cases = [
            ("http://:8000/a", "http://:8000/a"),
            ("http://:8000/a/", "http://:8000/a"),
            ("http://:8000/", "http://:8000"),
            ("HTTP://API.Example.Test.:8000/a//b/../c", "http://api.example.test:8000/a/c"),
            ("http://api.example.test", "http://api.example.test:80"),
            ("http://*:8080", "http://:8080"),
            ("http://*.example.test:8000", "http://*.example.test:8000"),
            ("tls://a.example.test:8443", "tls://a.example.test:8443"),
            ("tls://a.example.test", "tls://a.example.test:443"),
            ("tcp://:9000", "tcp://:9000"),
            ("tcp://127.0.0.1:9000", "tcp://127.0.0.1:9000"),
            ("tcp://[::1]:9000", "tcp://[::1]:9000"),
            ("tcp://:9000?bind=127.0.0.2", "tcp://127.0.0.2:9000"),
            ("http://:8000/a?name=web&bind=::1", "http://:8000/a?bind=::1&name=web"),
            ("http://[::1]:8000/", "http://[::1]:8000"),
            (
                "https://x.test?cert=/etc/c.pem&key=/etc/k%20x.pem",
                "https://x.test:443?cert=/etc/c.pem&key=/etc/k%20x.pem",
            ),
            ("http://:8000/%61%2Fb", "http://:8000/a%2Fb"),
            ("tcp://:80?proxy=v2&lb=least_conn", "tcp://:80?lb=least_conn&proxy=v2"),
        ];
        for (input, canon) in cases {
            assert_eq!(p(input).to_string(), canon, "{input}");
            assert_eq!(p(canon).to_string(), canon, "canonical form of {input} must reparse to itself");
        }
    }

    #[test]
    fn lend_is_a_flag_of_catch_all_service_routes() {
        assert_eq!(p("http://:8000?lend").to_string(), "http://:8000?lend");
        assert_eq!(p("tcp://127.0.0.1:9000?name=db&lend=on").to_string(), "tcp://127.0.0.1:9000?name=db&lend");
        assert!(p("tls://:443?lend").lend && !p("tls://:443").lend);
        assert_ne!(p("http://:8000?lend").identity(), p("http://:8000").identity(), "a lent route is its own route");
        assert!(err("http://a.test:8000?lend").contains("names no host or path"));
        assert!(err("http://:8000/a?lend").contains("names no host or path"));
        assert!(err("https://:8443?lend&cert=/c&key=/k").contains("terminates no TLS"));
        assert!(err("http://:8000?lend&mode=connection").contains("name= and bind= only"));
        assert!(err("http://:8000?lend&lend").contains("given twice"));
        assert!(err("http://:8000?lend=maybe").contains("takes no value"));
    }

    #[test]
    fn parsed_fields() {
        let s = p("http://*.example.test:8000/api?name=web");
        assert_eq!(s.scheme, Scheme::Http);
        assert_eq!(s.host, HostPattern::Suffix("example.test".into()));
        assert_eq!(s.port, 8000);
        assert_eq!(s.path.as_deref(), Some("/api"));
        assert_eq!(s.name.as_deref(), Some("web"));
        assert_eq!(s.key(), "http://*.example.test:8000/api");
        let t = p("http://[::1]:8000/a?bind=::1&name=x&lb=least_conn&proxy=v1");
        assert_eq!(t.identity(), "http://[::1]:8000/a");
        assert_eq!(t.key(), "http://[::1]:8000/a?bind=::1&lb=least_conn&proxy=v1");
        assert_eq!(s.listen_addr("::".parse().unwrap()), "[::]:8000".parse().unwrap());
        let t = p("tcp://127.0.0.1:9000");
        assert_eq!(t.listen_addr("::".parse().unwrap()), "127.0.0.1:9000".parse().unwrap());
    }

    #[test]
    fn errors_say_what_to_do() {
        assert!(err("localhost:8000").contains("no scheme"));
        assert!(err("ftp://:21").contains("unknown scheme 'ftp'"));
        assert!(err("tcp://").contains("needs a port"));
        assert!(err("tcp://db.local:5432").contains("not an IP address"));
        assert!(err("tcp://:5432/x").contains("takes no path"));
        assert!(err("tls://a.test/x").contains("https://"));
        assert!(err("http://:0").contains("port 0"));
        assert!(err("http://:99999").contains("not a port number"));
        assert!(err("http://a*b.test").contains("leading '*.'"));
        assert!(
            err("http://bad_label_that_is_way_too_long_for_dns_because_it_exceeds_sixty_three.test")
                .contains("not a valid host")
        );
        assert!(err("http://bücher.test").contains("punycode"));
        assert!(err("http://:80?nme=x").contains("unknown option 'nme'"));
        assert!(err("http://:80?name=a&name=b").contains("twice"));
        assert!(err("http://:80?name=a/b").contains("service name"));
        assert!(err("http://:80?name=").contains("needs a value"));
        assert!(err("https://x.test?cert=/c").contains("come together"));
        assert!(err("https://x.test?cert=/c&key=/k&acme").contains("not both"));
        assert!(err("tls://x.test?cert=a&key=b").contains("belong to https://"));
        assert!(err("http://x.test?client_ca=/ca").contains("belong to https://"));
        assert!(p("http://:80/.well-known/acme-challenge?acme").acme, "where portmux answers HTTP-01");
        assert!(err("https://x.test?redirect=https").contains("belongs to http://"));
        assert!(err("http://x.test?redirect=ftp").contains("neither https nor an absolute URL"));
        assert!(err("https://x.test?acme=maybe").contains("takes no value"));
        assert!(err("https://x.test?acme&redirect=https").contains("an https:// route redirects to a URL"));
        assert!(err("tls://x.test?redirect=https://y.test").contains("tls:// does not read requests"));
        assert!(err("https://x.test?acme&redirect=https://y.test&mode=connection").contains("answers each request"));
        let r = RouteSpec::parse("https://x.test?acme&redirect=https://y.test/&redirect_path=discard").unwrap();
        assert_eq!(r.redirect.as_deref(), Some("https://y.test/"));
        assert!(err("https://x.test?acme=fooacme").contains("takes no value"));
        let acme = p("https://x.test?acme");
        assert!(acme.acme && acme.to_string() == "https://x.test:443?acme");
        assert_eq!(p("https://x.test?acme=on").to_string(), "https://x.test:443?acme");
        assert_eq!(p("https://x.test").to_string(), "https://x.test:443", "the certificate may come from the service");
        let ca = p("https://x.test/a?client_ca=/ca.pem&cert=/c&key=/k");
        assert_eq!(ca.to_string(), "https://x.test:443/a?cert=/c&key=/k&client_ca=/ca.pem");
        assert_eq!(ca.identity(), "https://x.test:443/a", "certificates do not change what a route matches");
        assert_eq!(p("http://x.test?redirect=https").to_string(), "http://x.test:80?redirect=https");
        assert_eq!(p("http://x.test?redirect=https").identity(), p("http://x.test").identity());
        assert!(err("tcp://127.0.0.1:80?bind=::1").contains("twice"));
        assert!(err("http://:80/a b").contains("no spaces"));
        assert!(err("http://[::1:80").contains("unclosed"));
        assert!(err("http://:80/a%zz").contains("%-escape"));
        assert!(err("tcp://:80?proxy=v3").contains("proxy=v1 or proxy=v2"));
        assert!(err("tcp://:80?lb=random").contains("lb=round_robin or lb=least_conn"));
    }

    #[test]
    fn host_patterns_match_most_specific_first() {
        let exact = HostPattern::Exact("api.example.test".into());
        let suffix = HostPattern::Suffix("example.test".into());
        assert!(exact.matches(Some("api.example.test")));
        assert!(!exact.matches(Some("www.example.test")));
        assert!(suffix.matches(Some("www.example.test")));
        assert!(suffix.matches(Some("a.b.example.test")));
        assert!(!suffix.matches(Some("example.test")));
        assert!(!suffix.matches(Some("badexample.test")));
        assert!(!suffix.matches(None));
        assert!(HostPattern::Any.matches(None));
        assert!(exact.rank() > suffix.rank());
        assert!(HostPattern::Suffix("b.example.test".into()).rank() > suffix.rank());
        assert!(suffix.rank() > HostPattern::Any.rank());
    }

    #[test]
    fn names_and_host_headers_normalise() {
        assert_eq!(normalize_name("WWW.Example.COM.").as_deref(), Some("www.example.com"));
        assert_eq!(normalize_name("[0:0::1]").as_deref(), Some("[::1]"));
        assert_eq!(normalize_name(""), None);
        assert_eq!(normalize_name("a..b"), None);
        assert_eq!(normalize_name("a b"), None);
        assert_eq!(host_from_header("Example.com:8080").as_deref(), Some("example.com"));
        assert_eq!(host_from_header("[::1]:8000").as_deref(), Some("[::1]"));
        assert_eq!(host_from_header("127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(host_from_header("example.com:"), None);
        assert_eq!(host_from_header("example.com:http"), None);
        assert_eq!(host_from_header("a@b"), None);
    }

    #[test]
    fn paths_normalise_and_match_on_segment_boundaries() {
        assert_eq!(normalize_path("/a//b/./c/../d?x=/e"), "/a/b/d");
        assert_eq!(normalize_path("/%61/%2e%2E/b"), "/b");
        assert_eq!(normalize_path("/../../etc"), "/etc");
        assert_eq!(normalize_path("/a/%2F"), "/a/%2F");
        assert_eq!(normalize_path("/é/x"), "/é/x");
        assert_eq!(normalize_path(""), "/");
        assert!(path_has_prefix("/api", "/api"));
        assert!(path_has_prefix("/api/v1", "/api"));
        assert!(!path_has_prefix("/apiv2", "/api"));
        assert!(!path_has_prefix("/", "/api"));
        let r = p("http://:8000/a");
        assert!(r.matches_path("/a") && r.matches_path("/a/x") && !r.matches_path("/ab"));
        assert!(p("http://:8000").matches_path("/anything"));
    }

    #[test]
    fn a_spec_whose_canonical_form_is_too_long_is_refused() {
        // Found by the route_spec fuzz target: 2-byte characters of an option
        // become 6-byte escapes, and a route kept in canonical form must parse again.
        let spec = format!("https://a.test/?key=/k&cert=/{}", "\u{e9}".repeat(700));
        assert!(spec.len() <= MAX_SPEC);
        let e = RouteSpec::parse(&spec).unwrap_err();
        assert!(e.reason.contains("its canonical form is") && e.reason.contains("at most 2048"), "{e}");
        let fits = format!("https://a.test/?key=/k&cert=/{}", "\u{e9}".repeat(300));
        let parsed = RouteSpec::parse(&fits).unwrap();
        assert_eq!(RouteSpec::parse(&parsed.to_string()).unwrap(), parsed);
    }

    #[test]
    fn redirects_and_health_checks_are_options_that_round_trip() {
        let r =
            p("http://old.test?redirect=https%3A%2F%2Fnew.test%2Fbase%3Fa%3D1&redirect_code=301&redirect_path=discard");
        assert_eq!(r.redirect.as_deref(), Some("https://new.test/base?a=1"));
        assert_eq!(RouteSpec::parse(&r.to_string()).unwrap(), r);
        assert_eq!(r.identity(), p("http://old.test").identity(), "options do not change what a route matches");
        let h =
            p("http://a.test?health=/healthz&health_interval=500ms&health_timeout=2s&health_status=204&health_fall=3");
        assert_eq!(h.health.as_deref(), Some("/healthz"));
        assert_eq!(RouteSpec::parse(&h.to_string()).unwrap(), h);
        assert_eq!(parse_duration("500ms"), Some(std::time::Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Some(std::time::Duration::from_secs(120)));
        for (bad, says) in [
            ("http://a.test?redirect=ftp://x", "neither https nor an absolute URL"),
            ("http://a.test?redirect=https&redirect_code=303", "not a redirect; use 301"),
            ("http://a.test?redirect_code=301", "go with redirect="),
            ("http://a.test?redirect=https&redirect_path=discard", "always keeps the path"),
            ("tcp://:9?health=tcp&health_status=200", "for HTTP checks"),
            ("tcp://:9?health=ping", "not a check"),
            ("tcp://:9?health=tcp&health_interval=3", "not a duration"),
            ("tcp://:9?health_fall=2", "go with health="),
            ("tcp://:9?health=tcp&health_rise=0", "not a count"),
            ("http://a.test?redirect=https%3A%2F%2Fb.test%2F%3Fx%3D1", "takes redirect_path=discard"),
        ] {
            let e = RouteSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
