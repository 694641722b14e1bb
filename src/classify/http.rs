//! Pure, tri-state parser of an HTTP/1 request head: Host and path for routing,
//! with the framing checks that keep ambiguous requests away from services.

use super::ParseError;
use portmux_wire::spec::host_from_header;

/// What routing needs from a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Host (from an absolute-form target, else the Host header), normalised.
    pub host: Option<String>,
    /// The request target as sent, e.g. `/a/b?x=1` (`*` for `OPTIONS *`).
    pub target: String,
    /// How long the head is, its final empty line included.
    pub len: usize,
    /// How the body that follows is framed.
    pub body: Framing,
    /// The client asks to switch protocols (an HTTP/1.1 `Upgrade` header).
    pub upgrade: bool,
}

/// How a request's body is framed (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Neither Content-Length nor Transfer-Encoding: no body.
    None,
    /// `Content-Length: N`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// More headers than any legitimate client sends; nginx's default buffer holds fewer.
pub const MAX_HEADERS: usize = 128;

/// Parses the request head at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<RequestHead, ParseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    parse_into(buf, &mut headers).map(|(head, _)| head)
}

/// [`parse`], keeping httparse's view of the head (method, version, every
/// field) for a caller that writes the request on: `headers` holds the fields.
pub fn parse_into<'h, 'b>(
    buf: &'b [u8],
    headers: &'h mut [httparse::Header<'b>; MAX_HEADERS],
) -> Result<(RequestHead, httparse::Request<'h, 'b>), ParseError> {
    let mut req = httparse::Request::new(headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(ParseError::Incomplete),
        Err(httparse::Error::TooManyHeaders) => return Err(ParseError::Invalid("more than 128 header fields")),
        Err(httparse::Error::Version) if buf.starts_with(b"PRI * HTTP/2.0") => {
            return Err(ParseError::Invalid(
                "HTTP/2 prior-knowledge preface; use HTTP/2 over TLS (ALPN h2) or HTTP/1.1",
            ));
        }
        Err(e) => return Err(ParseError::Invalid(httparse_reason(e))),
    };
    // httparse takes a bare LF for a line end; a server behind may not.
    check_line_ends(&buf[..len])?;
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    let version = req.version.unwrap_or(1);

    let mut host_header: Option<&[u8]> = None;
    let mut content_length: Option<&[u8]> = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    let mut upgrade = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            if host_header.is_some() {
                return Err(ParseError::Invalid("more than one Host header"));
            }
            host_header = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = trim(h.value);
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err(ParseError::Invalid("invalid Content-Length"));
            }
            if content_length.is_some() {
                return Err(ParseError::Invalid("more than one Content-Length header"));
            }
            content_length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if transfer_encoding.is_some() {
                return Err(ParseError::Invalid("more than one Transfer-Encoding header"));
            }
            transfer_encoding = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = version == 1;
        } else if resembles_framing(h.name) {
            return Err(ParseError::Invalid(
                "a header name that looks like Content-Length or Transfer-Encoding but is not (a request-smuggling pattern)",
            ));
        }
    }
    if let Some(te) = transfer_encoding {
        if content_length.is_some() {
            return Err(ParseError::Invalid("both Transfer-Encoding and Content-Length (a request-smuggling pattern)"));
        }
        if version == 0 {
            return Err(ParseError::Invalid("Transfer-Encoding in an HTTP/1.0 request"));
        }
        // portmux decodes no other coding, so it cannot frame one: exactly `chunked`.
        if !trim(te).eq_ignore_ascii_case(b"chunked") {
            return Err(ParseError::Invalid("Transfer-Encoding other than exactly chunked"));
        }
    }
    let bodyless = matches!(method, "GET" | "HEAD");
    if bodyless && (transfer_encoding.is_some() || content_length.is_some_and(|n| n.iter().any(|&d| d != b'0'))) {
        return Err(ParseError::Invalid("a GET or HEAD request with a body (a request-smuggling pattern)"));
    }
    let body = match (transfer_encoding, content_length) {
        (Some(_), _) => Framing::Chunked,
        (None, Some(n)) => Framing::Length(
            std::str::from_utf8(n)
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or(ParseError::Invalid("Content-Length too large"))?,
        ),
        (None, None) => Framing::None,
    };

    let header_host = match host_header {
        Some(v) => {
            let text = std::str::from_utf8(v).map_err(|_| ParseError::Invalid("Host header is not ASCII"))?;
            Some(host_from_header(text.trim()).ok_or(ParseError::Invalid("invalid Host header"))?)
        }
        None if version == 1 => return Err(ParseError::Invalid("HTTP/1.1 request without a Host header")),
        None => None,
    };

    if method == "CONNECT" {
        return Err(ParseError::Invalid("CONNECT is not served: portmux is a reverse proxy, not a forward proxy"));
    }
    let host = if target.starts_with('/') || (target == "*" && method == "OPTIONS") {
        header_host
    } else if let Some(rest) = strip_scheme(target) {
        // Absolute form: the target's authority wins over Host (RFC 9112 §3.2.2).
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..end];
        if authority.contains('@') {
            return Err(ParseError::Invalid("userinfo in the request target"));
        }
        let authority = host_from_header(authority).ok_or(ParseError::Invalid("invalid host in the request target"))?;
        if header_host.as_ref().is_some_and(|h| *h != authority) {
            return Err(ParseError::Invalid("the request target names another host than the Host header"));
        }
        Some(authority)
    } else {
        return Err(ParseError::Invalid("request target is neither a path nor an absolute URL"));
    };
    let target = match strip_scheme(target) {
        Some(rest) => match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => rest[i..].to_string(),
            Some(i) => format!("/{}", &rest[i..]),
            None => "/".to_string(),
        },
        None => target.to_string(),
    };
    Ok((RequestHead { host, target, len, body, upgrade }, req))
}

/// A name other than Content-Length and Transfer-Encoding that a lenient
/// server might take for one of them (`Content_Length`, `Transfer--Encoding`).
fn resembles_framing(name: &str) -> bool {
    let folded: String =
        name.bytes().filter(|b| !matches!(b, b'-' | b'_')).map(|b| b.to_ascii_lowercase() as char).collect();
    matches!(folded.as_str(), "contentlength" | "transferencoding")
}

/// Every line of a head ends in CRLF: no bare CR, no bare LF.
fn check_line_ends(head: &[u8]) -> Result<(), ParseError> {
    for (i, &b) in head.iter().enumerate() {
        let bad = match b {
            b'\n' => i == 0 || head[i - 1] != b'\r',
            b'\r' => head.get(i + 1) != Some(&b'\n'),
            _ => false,
        };
        if bad {
            return Err(ParseError::Invalid("a line of the request head does not end in CRLF"));
        }
    }
    Ok(())
}

fn strip_scheme(target: &str) -> Option<&str> {
    let lower = target.get(..8).map(str::to_ascii_lowercase).unwrap_or_default();
    if lower.starts_with("http://") {
        Some(&target[7..])
    } else if lower.starts_with("https://") {
        Some(&target[8..])
    } else {
        None
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |i| i + 1);
    &v[start..end]
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header field name",
        httparse::Error::HeaderValue => "invalid header field value",
        httparse::Error::NewLine => "invalid line ending in the request head",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid request method or request target",
        httparse::Error::TooManyHeaders => "too many header fields",
        httparse::Error::Version => "not an HTTP/1.0 or HTTP/1.1 request",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURES: &[(&str, &[u8], Option<&str>, &str)] = &[
        ("curl", include_bytes!("fixtures/http-curl.txt"), Some("api.example.test"), "/a/b?x=1"),
        ("curl -0 (HTTP/1.0)", include_bytes!("fixtures/http-curl-http10.txt"), Some("127.0.0.1"), "/b"),
        ("curl via proxy", include_bytes!("fixtures/http-absolute-form.txt"), Some("www.example.test"), "/c/d"),
        ("wrk", include_bytes!("fixtures/http-wrk.txt"), Some("127.0.0.1"), "/"),
        ("Chromium", include_bytes!("fixtures/http-chromium.txt"), Some("www.example.test"), "/index.html"),
        ("Python urllib", include_bytes!("fixtures/http-python.txt"), Some("127.0.0.1"), "/p"),
    ];

    #[test]
    fn every_prefix_of_captured_heads_is_incomplete_and_the_whole_parses() {
        for (who, bytes, host, target) in CAPTURES {
            let head = parse(bytes).unwrap_or_else(|e| panic!("{who}: {e:?}"));
            assert_eq!(head.host.as_deref(), *host, "{who}");
            assert_eq!(head.target, *target, "{who}");
            for cut in 0..bytes.len() {
                assert_eq!(parse(&bytes[..cut]), Err(ParseError::Incomplete), "{who} cut at {cut}");
            }
        }
    }

    fn ok(raw: &str) -> RequestHead {
        parse(raw.as_bytes()).unwrap_or_else(|e| panic!("{raw:?}: {e:?}"))
    }

    fn invalid(raw: &str) -> &'static str {
        match parse(raw.as_bytes()) {
            Err(ParseError::Invalid(why)) => why,
            other => panic!("expected Invalid for {raw:?}, got {other:?}"),
        }
    }

    #[test]
    fn hosts_and_targets() {
        assert_eq!(ok("GET / HTTP/1.1\r\nHost: EXAMPLE.test.:8080\r\n\r\n").host.as_deref(), Some("example.test"));
        assert_eq!(ok("GET / HTTP/1.0\r\n\r\n").host, None);
        let h = ok("GET HTTP://Other.test:81?q HTTP/1.1\r\nHost: other.test:81\r\n\r\n");
        assert_eq!((h.host.as_deref(), h.target.as_str()), (Some("other.test"), "/?q"));
        assert_eq!(ok("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").target, "*");
        let h = ok("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!((h.len, h.body, h.upgrade), (48, Framing::Length(3), false));
        let h = ok("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n");
        assert_eq!(h.body, Framing::Chunked);
        let h = ok("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!((h.body, h.upgrade), (Framing::None, true));
        assert_eq!(ok("GET http://a/x HTTP/1.1\r\nHost: A:80\r\n\r\n").host.as_deref(), Some("a"));
        assert_eq!(ok("GET /x HTTP/1.1\r\nhost:  [::1]:8000 \r\n\r\n").host.as_deref(), Some("[::1]"));
    }

    #[test]
    fn ambiguous_or_malformed_heads_are_invalid() {
        assert!(invalid("GET / HTTP/1.1\r\n\r\n").contains("without a Host"));
        assert!(invalid("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").contains("more than one Host"));
        assert!(invalid("GET / HTTP/1.1\r\nHost: a b\r\n\r\n").contains("invalid Host"));
        assert!(
            invalid("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .contains("more than one Content-Length")
        );
        assert!(
            invalid("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
                .contains("more than one Content-Length")
        );
        assert!(
            invalid("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n")
                .contains("too large")
        );
        assert!(invalid("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").contains("exactly"));
        assert!(invalid("GET / HTTP/1.1\nHost: a\r\n\r\n").contains("CRLF"));
        assert!(invalid("GET / HTTP/1.1\r\nHost: a\n\n").contains("CRLF"));
        assert!(invalid("GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n").contains("another host"));
        assert!(invalid("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n").contains("invalid Content-Length"));
        assert!(
            invalid("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
                .contains("smuggling")
        );
        assert!(
            invalid("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n")
                .contains("exactly chunked")
        );
        assert!(invalid("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").contains("HTTP/1.0"));
        assert!(invalid("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n").contains("CONNECT"));
        assert!(invalid("GET a.test/x HTTP/1.1\r\nHost: a\r\n\r\n").contains("neither a path"));
        assert!(invalid("GET http://u@a.test/ HTTP/1.1\r\nHost: a\r\n\r\n").contains("userinfo"));
        assert!(invalid("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n").contains("header"));
        assert!(invalid("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").contains("HTTP/2"));
        assert!(invalid("\x16\x03\x01\x00\x05hello").contains("method"));
        let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
        assert!(invalid(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")).contains("128"));
    }

    #[test]
    fn mutated_captures_never_panic() {
        let mut x: u32 = 0xdead_beef;
        for (_, bytes, _, _) in CAPTURES {
            for _ in 0..3000 {
                let mut b = bytes.to_vec();
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % b.len();
                b[i] = (x >> 8) as u8;
                let _ = parse(&b[..(x >> 4) as usize % (b.len() + 1)]);
            }
        }
    }
}
