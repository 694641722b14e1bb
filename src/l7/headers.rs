//! Header rules of a proxy (RFC 9110 §7.6): hop-by-hop fields removed both
//! ways, `X-Forwarded-For`/`-Proto`/`-Host` and `Forwarded` added to
//! requests (an incoming chain kept only from a trusted proxy), `Via` if asked.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// What a request's forwarding headers say about its client.
#[derive(Debug, Clone)]
pub struct Forwarding {
    pub client: IpAddr,
    /// `http` or `https`: how the client reached portmux.
    pub proto: &'static str,
    /// The Host the client asked for.
    pub host: Option<String>,
    /// The client is a proxy whose forwarding headers are believed.
    pub trusted: bool,
    /// Add forwarding headers at all (`?forwarded=off` turns them off).
    pub add: bool,
    /// Add `Via: 1.1 portmux`.
    pub via: bool,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub const VIA: &str = "1.1 portmux";

/// The hop-by-hop fields removed whatever `Connection` names (RFC 9110 §7.6.1).
pub const HOP_BY_HOP: [&str; 6] =
    ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade"];
/// The forwarding fields: dropped from an untrusted client, extended otherwise.
pub const FORWARDING: [&str; 4] = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"];

/// Whether a `TE` value says the client accepts trailers (kept: gRPC asks for it).
pub fn asks_trailers(te: &str) -> bool {
    te.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// The values a client's forwarding fields get (the same for each of its requests to one Host).
#[derive(Debug, Clone)]
pub struct ForwardText {
    /// For `X-Forwarded-For`.
    pub client: String,
    /// This hop's `Forwarded` element.
    pub element: String,
}

impl Forwarding {
    pub fn text(&self) -> ForwardText {
        ForwardText { client: self.client_text(), element: self.element() }
    }

    /// The client's address as `X-Forwarded-For` gives it.
    pub fn client_text(&self) -> String {
        self.client.to_canonical().to_string()
    }

    /// This hop's `Forwarded` element (RFC 7239): `for=...;proto=...;host="..."`.
    pub fn element(&self) -> String {
        let node = match self.client.to_canonical() {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("\"[{a}]\""),
        };
        let mut forwarded = format!("for={node};proto={}", self.proto);
        if let Some(host) = self.host.as_deref().filter(|h| h.bytes().all(|b| b.is_ascii_graphic() && b != b'"')) {
            forwarded.push_str(&format!(";host=\"{host}\""));
        }
        forwarded
    }
}

/// Removes the hop-by-hop fields: those `Connection` names, and the
/// standard ones. An upgrade keeps `Upgrade` and says `Connection: upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    // `TE: trailers` says the client accepts trailers (gRPC needs it said); other codings are this hop's.
    let trailers = headers.get_all(header::TE).iter().filter_map(|v| v.to_str().ok()).any(asks_trailers);
    for name in [header::CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, header::TE, header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade && headers.contains_key(header::UPGRADE) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// A request on its way to its target.
pub fn request(headers: &mut HeaderMap, f: &Forwarding, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    if f.via {
        append(headers, header::VIA, VIA);
    }
    if !f.add {
        return;
    }
    if !f.trusted {
        for name in [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST, header::FORWARDED] {
            headers.remove(name);
        }
    }
    append(headers, X_FORWARDED_FOR, &f.client_text());
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(f.proto));
    }
    let host = f.host.as_deref().and_then(|h| HeaderValue::from_str(h).ok());
    if let Some(host) = &host
        && !headers.contains_key(X_FORWARDED_HOST)
    {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    append(headers, header::FORWARDED, &f.element());
}

/// A response on its way back to the client.
pub fn response(headers: &mut HeaderMap, upgrade: bool, via: bool) {
    strip_hop_by_hop(headers, upgrade);
    if via {
        append(headers, header::VIA, VIA);
    }
}

/// Appends `value` to the field's last line, comma-separated (one line, as
/// forwarding chains are usually read).
fn append(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if !headers.contains_key(&name) {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
        return;
    }
    let joined = {
        let old: Vec<&str> = headers.get_all(&name).iter().filter_map(|v| v.to_str().ok()).collect();
        if old.is_empty() { value.to_string() } else { format!("{}, {value}", old.join(", ")) }
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn fwd(trusted: bool) -> Forwarding {
        let client = "192.0.2.7".parse().unwrap();
        Forwarding { client, proto: "https", host: Some("a.test".into()), trusted, add: true, via: true }
    }

    #[test]
    fn hop_by_hop_fields_go_and_forwarding_is_added() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("x-forwarded-for", "10.9.9.9"),
            ("forwarded", "for=10.9.9.9"),
            ("accept", "*/*"),
        ]);
        request(&mut h, &fwd(false), false);
        for gone in ["connection", "x-secret", "keep-alive", "te", "upgrade"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        assert_eq!(h["x-forwarded-for"], "192.0.2.7", "an untrusted chain is dropped");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.test");
        assert_eq!(h["forwarded"], "for=192.0.2.7;proto=https;host=\"a.test\"");
        assert_eq!(h["via"], "1.1 portmux");
        assert_eq!(h["accept"], "*/*");

        let mut h = map(&[("x-forwarded-for", "10.9.9.9"), ("x-forwarded-proto", "http")]);
        request(&mut h, &fwd(true), false);
        assert_eq!(h["x-forwarded-for"], "10.9.9.9, 192.0.2.7", "a trusted chain is kept");
        assert_eq!(h["x-forwarded-proto"], "http");

        let mut h = map(&[("te", "gzip, trailers")]);
        request(&mut h, &fwd(false), false);
        assert_eq!(h["te"], "trailers", "trailers may still be sent (gRPC asks)");

        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        request(&mut h, &fwd(false), true);
        assert_eq!(
            (h["connection"].as_bytes(), h["upgrade"].as_bytes()),
            (b"upgrade".as_slice(), b"websocket".as_slice())
        );

        let mut h = map(&[("x-forwarded-for", "10.9.9.9")]);
        request(&mut h, &Forwarding { add: false, via: false, ..fwd(false) }, false);
        assert_eq!(h["x-forwarded-for"], "10.9.9.9");
        assert!(!h.contains_key("forwarded"));
    }
}
