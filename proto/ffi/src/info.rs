//! What the C caller learns about a handed-over connection: a plain struct of
//! fixed-size, NUL-terminated strings, so it needs no freeing.

use portmux_client::{ConnInfo, Proto};
use std::ffi::{c_char, c_int};

/// Raw TCP: not inspected (a `tcp://` route), or not recognised.
pub const PORTMUX_PROTO_TCP: c_int = 0;
/// An HTTP/1 request head was seen (host and path are set).
pub const PORTMUX_PROTO_HTTP: c_int = 1;
/// A TLS ClientHello was seen (sni and alpn are set when the client sent them).
pub const PORTMUX_PROTO_TLS: c_int = 2;

/// A handed-over connection, as portmux saw it. Strings are NUL-terminated
/// UTF-8, empty when absent; one longer than its field is cut at a character
/// boundary and `truncated` is set. The caller owns the struct (on the stack is
/// fine); nothing in it needs freeing.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct portmux_conn_info {
    /// portmux's id for this connection.
    pub id: u64,
    /// PORTMUX_PROTO_TCP, PORTMUX_PROTO_HTTP or PORTMUX_PROTO_TLS.
    pub proto: c_int,
    /// Bytes portmux looked at; all of them are still unread on the fd.
    pub peeked: u32,
    /// Nonzero when a string below was cut to fit.
    pub truncated: c_int,
    /// The client's address, "203.0.113.7:51234" or "[2001:db8::7]:51234"
    /// (the real client's, also behind a PROXY-protocol load balancer).
    pub peer: [c_char; 64],
    /// The address the client connected to, in the same form.
    pub local: [c_char; 64],
    /// TLS server name (lower case).
    pub sni: [c_char; 256],
    /// ALPN protocols the client offered, comma-separated ("h2,http/1.1").
    pub alpn: [c_char; 256],
    /// HTTP Host of the first request (lower case, without port).
    pub host: [c_char; 256],
    /// HTTP request target of the first request ("/a/b?c").
    pub path: [c_char; 4096],
    /// The route the connection matched, as portmux writes it.
    pub route: [c_char; 512],
}

impl portmux_conn_info {
    /// The C struct for `info`.
    pub(crate) fn from_info(info: &ConnInfo) -> portmux_conn_info {
        let mut out = portmux_conn_info {
            id: info.id,
            proto: match info.proto {
                Proto::Tcp => PORTMUX_PROTO_TCP,
                Proto::Http => PORTMUX_PROTO_HTTP,
                Proto::Tls => PORTMUX_PROTO_TLS,
            },
            peeked: info.peeked,
            truncated: 0,
            peer: [0; 64],
            local: [0; 64],
            sni: [0; 256],
            alpn: [0; 256],
            host: [0; 256],
            path: [0; 4096],
            route: [0; 512],
        };
        let mut cut = false;
        cut |= copy(&mut out.peer, &info.peer.to_string());
        cut |= copy(&mut out.local, &info.local.to_string());
        cut |= copy(&mut out.sni, info.sni.as_deref().unwrap_or(""));
        cut |= copy(&mut out.alpn, &info.alpn.join(","));
        cut |= copy(&mut out.host, info.host.as_deref().unwrap_or(""));
        cut |= copy(&mut out.path, info.path.as_deref().unwrap_or(""));
        cut |= copy(&mut out.route, &info.route);
        out.truncated = c_int::from(cut);
        out
    }
}

/// What portmux's TLS handshake settled for a connection of an `https://`
/// route (portmux terminated TLS; the fd carries the plaintext). Strings as in
/// portmux_conn_info. The caller owns the struct; nothing in it needs freeing.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct portmux_tls_info {
    /// "TLSv1.3" or "TLSv1.2".
    pub version: [c_char; 16],
    /// The cipher suite's IANA name, "TLS13_AES_128_GCM_SHA256".
    pub cipher: [c_char; 64],
    /// The server name the client asked for (lower case), empty if none.
    pub sni: [c_char; 256],
    /// The protocol ALPN negotiated ("http/1.1"), empty if none.
    pub alpn: [c_char; 64],
    /// How many certificates the client presented (the route asked with
    /// client_ca=); portmux_conn_client_cert() gives each (DER).
    pub client_certs: u32,
    /// Nonzero when a string above was cut to fit.
    pub truncated: c_int,
}

impl portmux_tls_info {
    pub(crate) fn from_tls(tls: &portmux_client::TlsInfo) -> portmux_tls_info {
        let mut out = portmux_tls_info {
            version: [0; 16],
            cipher: [0; 64],
            sni: [0; 256],
            alpn: [0; 64],
            client_certs: 0,
            truncated: 0,
        };
        let mut cut = copy(&mut out.version, &tls.version);
        cut |= copy(&mut out.cipher, &tls.cipher);
        cut |= copy(&mut out.sni, tls.sni.as_deref().unwrap_or(""));
        cut |= copy(&mut out.alpn, tls.alpn.as_deref().unwrap_or(""));
        out.client_certs = u32::try_from(tls.client_certs.len()).unwrap_or(u32::MAX);
        out.truncated = c_int::from(cut);
        out
    }
}

/// Copies `text` into `field` with a terminating NUL (NULs inside become
/// spaces), cut at a character boundary if it does not fit; true if cut.
fn copy(field: &mut [c_char], text: &str) -> bool {
    let room = field.len() - 1;
    let mut end = text.len().min(room);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    for (slot, &b) in field.iter_mut().zip(&text.as_bytes()[..end]) {
        *slot = if b == 0 { b' ' } else { b } as c_char;
    }
    field[end] = 0;
    end < text.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(field: &[c_char]) -> String {
        let bytes: Vec<u8> = field.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn fields_are_filled_and_cut_at_character_boundaries() {
        let meta = portmux_client::ConnMeta {
            route: "http://a.example.test:8000/x".into(),
            proto: Proto::Http,
            peer: "[::1]:5000".parse().unwrap(),
            local: "127.0.0.1:8000".parse().unwrap(),
            sni: None,
            alpn: vec!["h2".into(), "http/1.1".into()],
            host: Some("a.example.test".into()),
            path: Some(format!("/{}", "é".repeat(3000))),
            peeked: 77,
        };
        let info = ConnInfo { id: 42, meta, tls: None };
        let c = portmux_conn_info::from_info(&info);
        assert_eq!((c.id, c.proto, c.peeked), (42, PORTMUX_PROTO_HTTP, 77));
        assert_eq!(text(&c.peer), "[::1]:5000");
        assert_eq!(text(&c.local), "127.0.0.1:8000");
        assert_eq!(text(&c.sni), "");
        assert_eq!(text(&c.alpn), "h2,http/1.1");
        assert_eq!(text(&c.host), "a.example.test");
        assert_eq!(text(&c.route), "http://a.example.test:8000/x");
        let path = text(&c.path);
        assert!(path.len() <= 4095 && path.starts_with("/é") && path.ends_with('é'), "{}", path.len());
        assert_eq!(c.truncated, 1);
        let mut short = info;
        short.meta.path = Some("/a".into());
        assert_eq!(portmux_conn_info::from_info(&short).truncated, 0);
    }
}
