//! Who may use the admin API, request by request. Over the Unix socket the
//! kernel names the peer and the policy decides who may change routes. Over
//! TCP nobody is known, and a browser on the host can send requests to
//! loopback (an `<img>` tag, a form, DNS rebinding), so: the `Host` must be a
//! loopback name or address, requests a web page sends (`Origin`,
//! `Sec-Fetch-Site: cross-site`) are refused, and changes need POST, PUT or
//! DELETE with a JSON body type (which a page cannot send without CORS) and a
//! bearer token. seamless mode keeps seamless's GET verbs, behind the same
//! Host and Origin rules.

use crate::config::Secret;
use crate::config::policy::{Peer, Policy};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, ORIGIN};
use hyper::{HeaderMap, Method, StatusCode};
use std::net::IpAddr;
use std::sync::Arc;

/// How a request reached the admin API.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The Unix socket, from this peer.
    Unix(Peer),
    /// TCP (nobody is known).
    Tcp,
}

/// What the admin API lets through.
#[derive(Debug)]
pub struct Guard {
    pub policy: Arc<Policy>,
    /// The bearer token for changes over TCP (none: no changes over TCP).
    pub token: Option<Arc<Secret>>,
    /// seamless mode: its GET verbs change the backends without a token.
    pub seamless: bool,
    /// The TCP address is not on loopback (`--admin-public`): the Host may
    /// also be an IP address (DNS rebinding needs a name).
    pub public: bool,
}

/// A refused request: the status and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub status: StatusCode,
    pub message: String,
}

fn denied(status: StatusCode, message: impl Into<String>) -> Denied {
    Denied { status, message: message.into() }
}

/// Whether a request to `path` with `method` changes anything.
pub fn mutates(method: &Method, path: &str) -> bool {
    !matches!(*method, Method::GET | Method::HEAD) || matches!(path, "/set" | "/add" | "/remove")
}

/// The host of a `Host` header value, without port or brackets.
fn host_of(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    match value.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => value,
    }
}

impl Guard {
    /// Lets the request through, or says why not.
    pub fn check(&self, via: &Transport, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Denied> {
        let changes = mutates(method, path);
        match via {
            Transport::Unix(peer) => {
                if changes && let Err(refusal) = self.policy.may_administer(peer) {
                    return Err(denied(StatusCode::FORBIDDEN, refusal.to_string()));
                }
                Ok(())
            }
            Transport::Tcp => self.check_tcp(changes, method, path, headers),
        }
    }

    fn check_tcp(&self, changes: bool, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), Denied> {
        let text = |name| headers.get(name).and_then(|v: &hyper::header::HeaderValue| v.to_str().ok());
        let host = text(HOST).ok_or_else(|| {
            denied(StatusCode::BAD_REQUEST, "the admin API needs a Host header (localhost, 127.0.0.1 or [::1])")
        })?;
        let name = host_of(host.trim()).trim_end_matches('.').to_ascii_lowercase();
        let ip = name.parse::<IpAddr>().ok();
        let loopback = name == "localhost" || name.ends_with(".localhost") || ip.is_some_and(|a| a.is_loopback());
        if !(loopback || self.public && ip.is_some()) {
            return Err(denied(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "Host '{}' is not a loopback name or address; the admin API answers to localhost, 127.0.0.1 \
                     and [::1] only (this refuses DNS rebinding)",
                    host.chars().take(100).collect::<String>()
                ),
            ));
        }
        if let Some(origin) = text(ORIGIN) {
            return Err(denied(
                StatusCode::FORBIDDEN,
                format!(
                    "requests from web pages (Origin: {}) are refused; use portmux or curl",
                    origin.chars().take(100).collect::<String>()
                ),
            ));
        }
        // A browser says where a request comes from: only one typed into the
        // address bar (Sec-Fetch-Site: none) is a person's; a page's (an
        // <img>, a form, a script), from any site (ports do not count), is not.
        if let Some(site) = text(hyper::header::HeaderName::from_static("sec-fetch-site"))
            && !site.eq_ignore_ascii_case("none")
        {
            return Err(denied(
                StatusCode::FORBIDDEN,
                format!(
                    "requests made by web pages (Sec-Fetch-Site: {}) are refused",
                    site.chars().take(20).collect::<String>()
                ),
            ));
        }
        // Browsers without Sec-Fetch-* still name the page that made a request.
        if changes && text(hyper::header::REFERER).is_some() {
            return Err(denied(StatusCode::FORBIDDEN, "changes requested from a web page (Referer) are refused"));
        }
        if !changes || (self.seamless && matches!(path, "/set" | "/add" | "/remove")) {
            return Ok(());
        }
        if !matches!(*method, Method::POST | Method::PUT | Method::DELETE) {
            return Err(denied(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} {path} would change routes; state changes need POST, PUT or DELETE"),
            ));
        }
        let json = text(CONTENT_TYPE)
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(denied(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "state changes need Content-Type: application/json",
            ));
        }
        let Some(token) = &self.token else {
            return Err(denied(
                StatusCode::FORBIDDEN,
                "state changes over TCP need a token: start portmux with --admin-token-file FILE and send \
                 Authorization: Bearer TOKEN (or use the admin socket, which needs none)",
            ));
        };
        let given = text(AUTHORIZATION)
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match given {
            Some(g) if token.matches(g.as_bytes()) => Ok(()),
            Some(_) => Err(denied(StatusCode::UNAUTHORIZED, "wrong bearer token")),
            None => Err(denied(
                StatusCode::UNAUTHORIZED,
                "state changes over TCP need Authorization: Bearer TOKEN (the token in --admin-token-file)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(token: Option<&str>, seamless: bool) -> Guard {
        Guard {
            policy: Arc::new(Policy::builtin(999)),
            token: token.map(|t| Arc::new(Secret::new(t.as_bytes().to_vec()))),
            seamless,
            public: false,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const TOKEN: &str = "0123456789abcdef0123";

    #[test]
    fn tcp_changes_need_post_json_and_the_token() {
        let g = guard(Some(TOKEN), false);
        let ok = headers(&[
            ("host", "127.0.0.1:9999"),
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {TOKEN}")),
        ]);
        assert_eq!(g.check(&Transport::Tcp, &Method::POST, "/routes", &ok), Ok(()));
        assert_eq!(g.check(&Transport::Tcp, &Method::GET, "/set", &ok).unwrap_err().status, 405);
        let plain = headers(&[("host", "localhost"), ("authorization", &format!("Bearer {TOKEN}"))]);
        assert_eq!(g.check(&Transport::Tcp, &Method::DELETE, "/routes", &plain).unwrap_err().status, 415);
        let wrong =
            headers(&[("host", "[::1]:1"), ("content-type", "application/json"), ("authorization", "Bearer x")]);
        assert_eq!(g.check(&Transport::Tcp, &Method::POST, "/routes", &wrong).unwrap_err().status, 401);
        let none = headers(&[("host", "[::1]"), ("content-type", "application/json")]);
        assert_eq!(g.check(&Transport::Tcp, &Method::POST, "/routes", &none).unwrap_err().status, 401);
        assert_eq!(guard(None, false).check(&Transport::Tcp, &Method::POST, "/routes", &ok).unwrap_err().status, 403);
        // Reads need nothing more than a loopback Host.
        assert_eq!(g.check(&Transport::Tcp, &Method::GET, "/status", &headers(&[("host", "localhost")])), Ok(()));
    }

    #[test]
    fn tcp_refuses_foreign_hosts_and_web_pages() {
        let g = guard(Some(TOKEN), true);
        for host in ["evil.example", "evil.example:9999", "10.0.0.1", "localhost.evil.example"] {
            let e = g.check(&Transport::Tcp, &Method::GET, "/status", &headers(&[("host", host)])).unwrap_err();
            assert_eq!(e.status, 421, "{host}");
        }
        let page = headers(&[("host", "127.0.0.1"), ("origin", "http://evil.example")]);
        assert_eq!(g.check(&Transport::Tcp, &Method::GET, "/get", &page).unwrap_err().status, 403);
        let cross = headers(&[("host", "127.0.0.1"), ("sec-fetch-site", "cross-site")]);
        assert_eq!(g.check(&Transport::Tcp, &Method::GET, "/set", &cross).unwrap_err().status, 403);
        // An <img> on a page of another port of this host is "same-site"; an old browser sends a Referer.
        let img =
            headers(&[("host", "127.0.0.1:6777"), ("sec-fetch-site", "same-site"), ("sec-fetch-mode", "no-cors")]);
        assert_eq!(g.check(&Transport::Tcp, &Method::GET, "/set", &img).unwrap_err().status, 403);
        let old = headers(&[("host", "127.0.0.1:6777"), ("referer", "http://127.0.0.1:8080/")]);
        assert_eq!(g.check(&Transport::Tcp, &Method::GET, "/set", &old).unwrap_err().status, 403);
        assert_eq!(g.check(&Transport::Tcp, &Method::GET, "/get", &old), Ok(()), "reading is harmless");
        let typed = headers(&[("host", "localhost:6777"), ("sec-fetch-site", "none")]);
        assert_eq!(g.check(&Transport::Tcp, &Method::GET, "/set", &typed), Ok(()), "a person at the address bar");
        // seamless's verbs stay GET, without a token.
        assert_eq!(g.check(&Transport::Tcp, &Method::GET, "/set", &headers(&[("host", "127.0.0.1:6777")])), Ok(()));
        let public = Guard { public: true, ..guard(None, false) };
        assert_eq!(public.check(&Transport::Tcp, &Method::GET, "/status", &headers(&[("host", "10.0.0.1")])), Ok(()));
        assert!(public.check(&Transport::Tcp, &Method::GET, "/status", &headers(&[("host", "a.example")])).is_err());
    }

    #[test]
    fn the_socket_lets_the_policy_decide_who_changes_routes() {
        let g = guard(None, false);
        let nobody = Transport::Unix(Peer::known(1, 65534));
        assert_eq!(g.check(&nobody, &Method::GET, "/routes", &HeaderMap::new()), Ok(()));
        let e = g.check(&nobody, &Method::POST, "/routes", &HeaderMap::new()).unwrap_err();
        assert!(e.status == 403 && e.message.contains("may not change routes"), "{e:?}");
        assert_eq!(g.check(&Transport::Unix(Peer::known(1, 0)), &Method::DELETE, "/routes", &HeaderMap::new()), Ok(()));
    }
}
