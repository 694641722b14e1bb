//! HTTP/1.1 heads written as bytes, for the engine's direct path
//! (`accept/direct.rs`): a request head checked by `classify::http` goes to
//! its backend with the header rules of [`super::headers`], and the
//! backend's response head (parsed by httparse, as hyper does) comes back
//! rewritten the same way. Every line written is made here (CRLF-ended):
//! nothing of a head is passed on unparsed. A response body is framed by its
//! Content-Length, by its chunks (each size line, CRLF and trailer checked as
//! it passes, [`Chunks`]), or by the end of the connection.

use super::headers::{self, ForwardText, Forwarding};

/// How a response's body is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    /// No body: a response to HEAD, 204, 304.
    None,
    Length(u64),
    Chunked,
    /// Up to the end of the backend's connection.
    Close,
}

/// What the engine needs to know of a backend's response head.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead {
    pub status: u16,
    pub body: BodyLen,
    /// The backend may send another response on this connection.
    pub reusable: bool,
}

fn is(name: &str, of: &str) -> bool {
    name.eq_ignore_ascii_case(of)
}

/// The field names a `Connection` value lists (`close` and `keep-alive` are options, not names).
fn listed<'a>(headers: &'a [httparse::Header<'_>]) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(|h| is(h.name, "connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(trim)
        .filter(|t| !t.is_empty())
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t')).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t')).map_or(start, |i| i + 1);
    &v[start..end]
}

fn names(name: &str, token: &[u8]) -> bool {
    name.as_bytes().eq_ignore_ascii_case(token)
}

/// Whether a request's `Connection` asks to close after this exchange, and
/// whether it names a field that frames or routes the request (Host,
/// Content-Length): such a request is left to hyper.
pub fn connection_options(headers: &[httparse::Header<'_>]) -> (bool, bool) {
    let (mut close, mut odd) = (false, false);
    for token in listed(headers) {
        close |= token.eq_ignore_ascii_case(b"close");
        odd |= token.eq_ignore_ascii_case(b"host") || token.eq_ignore_ascii_case(b"content-length");
    }
    (close, odd)
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Values joined as one line, with `last` after them (a forwarding chain).
fn joined(out: &mut Vec<u8>, name: &[u8], values: &[&[u8]], last: &str) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for v in values {
        out.extend_from_slice(trim(v));
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(last.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes the request head for the backend: origin-form `target`, the
/// client's fields but the hop-by-hop ones, Host as the client wrote it
/// (`host`), and the forwarding fields of `f` with the values of `text` (as
/// `headers::request` does for hyper).
pub fn request_head(
    out: &mut Vec<u8>,
    req: &httparse::Request<'_, '_>,
    target: &str,
    f: &Forwarding,
    text: &ForwardText,
    host: &str,
) {
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut trailers = false;
    let (mut via, mut xff, mut fwd) = (Vec::new(), Vec::new(), Vec::new());
    let (mut proto, mut forwarded_host) = (false, false);
    for h in req.headers.iter() {
        let name = h.name;
        if is(name, "host") {
            line(out, b"Host", trim(h.value));
            continue;
        }
        if headers::HOP_BY_HOP.iter().any(|n| is(name, n)) {
            trailers |= is(name, "te") && std::str::from_utf8(h.value).is_ok_and(headers::asks_trailers);
            continue;
        }
        if listed(req.headers).any(|t| names(name, t)) {
            continue;
        }
        if f.via && is(name, "via") {
            via.push(h.value);
            continue;
        }
        if f.add {
            if !f.trusted && headers::FORWARDING.iter().any(|n| is(name, n)) {
                continue;
            }
            if is(name, "x-forwarded-for") {
                xff.push(h.value);
                continue;
            }
            if is(name, "forwarded") {
                fwd.push(h.value);
                continue;
            }
            proto |= is(name, "x-forwarded-proto");
            forwarded_host |= is(name, "x-forwarded-host");
        }
        line(out, name.as_bytes(), h.value);
    }
    if trailers {
        line(out, b"TE", b"trailers");
    }
    if f.via {
        joined(out, b"Via", &via, headers::VIA);
    }
    if f.add {
        joined(out, b"X-Forwarded-For", &xff, &text.client);
        if !proto {
            line(out, b"X-Forwarded-Proto", f.proto.as_bytes());
        }
        if !forwarded_host && !host.is_empty() {
            line(out, b"X-Forwarded-Host", host.as_bytes());
        }
        joined(out, b"Forwarded", &fwd, &text.element);
    }
    out.extend_from_slice(b"\r\n");
}

/// The framing and reuse of a backend's final response (`head_request`:
/// the request was HEAD). Ambiguous framing is an error (the engine answers
/// 502): a coding other than exactly `chunked`, Transfer-Encoding with
/// Content-Length, Content-Lengths that disagree or are not numbers.
pub fn response_framing(resp: &httparse::Response<'_, '_>, head_request: bool) -> Result<ResponseHead, &'static str> {
    let status = resp.code.unwrap_or(0);
    if !(100..600).contains(&status) {
        return Err("the backend sent a status that is not one of HTTP's");
    }
    let (mut length, mut chunked, mut te, mut close, mut keep) = (None, false, false, false, false);
    for h in resp.headers.iter() {
        if is(h.name, "content-length") {
            let v = trim(h.value);
            let n = std::str::from_utf8(v)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or("the backend sent an invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("the backend sent Content-Lengths that disagree");
            }
            length = Some(n);
        } else if is(h.name, "transfer-encoding") {
            if te {
                return Err("the backend sent Transfer-Encoding twice");
            }
            te = true;
            chunked = trim(h.value).eq_ignore_ascii_case(b"chunked");
        }
    }
    for token in listed(resp.headers) {
        close |= token.eq_ignore_ascii_case(b"close");
        keep |= token.eq_ignore_ascii_case(b"keep-alive");
    }
    if te && !chunked {
        return Err("the backend sent a Transfer-Encoding other than chunked");
    }
    if te && length.is_some() {
        return Err("the backend sent both Transfer-Encoding and Content-Length");
    }
    let body = if head_request || status == 204 || status == 304 {
        BodyLen::None
    } else if chunked {
        BodyLen::Chunked
    } else if let Some(n) = length {
        BodyLen::Length(n)
    } else {
        BodyLen::Close
    };
    let persistent = if resp.version == Some(1) { !close } else { keep };
    Ok(ResponseHead { status, body, reusable: persistent && body != BodyLen::Close })
}

/// Writes the response head for the client: the backend's status and
/// fields without the hop-by-hop ones, the framing of `head.body`, `Via`
/// if asked, and `Connection: close` when the client's connection ends.
pub fn response_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    head: &ResponseHead,
    close: bool,
    via: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_number(out, u64::from(head.status));
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut vias = Vec::new();
    for h in resp.headers.iter() {
        let name = h.name;
        if headers::HOP_BY_HOP.iter().any(|n| is(name, n)) || listed(resp.headers).any(|t| names(name, t)) {
            continue;
        }
        if is(name, "content-length") {
            continue; // Written once below, from the framing.
        }
        if via && is(name, "via") {
            vias.push(h.value);
            continue;
        }
        line(out, name.as_bytes(), h.value);
    }
    match head.body {
        BodyLen::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            push_number(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyLen::Chunked => line(out, b"Transfer-Encoding", b"chunked"),
        BodyLen::None if head.status != 204 => {
            // HEAD and 304 keep the length the full answer would have.
            if let Some(h) = resp.headers.iter().find(|h| is(h.name, "content-length")) {
                line(out, b"Content-Length", trim(h.value));
            }
        }
        BodyLen::None | BodyLen::Close => {}
    }
    if via {
        joined(out, b"Via", &vias, headers::VIA);
    }
    if close || head.body == BodyLen::Close {
        line(out, b"Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `n` in decimal (without the formatting machinery: twice per response).
fn push_number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A short answer of portmux's own on a connection that stays open.
pub fn answer(out: &mut Vec<u8>, status: u16, reason: &str, body: &[u8], close: bool) {
    out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    line(out, b"Content-Type", b"text/plain; charset=utf-8");
    line(out, b"Content-Length", body.len().to_string().as_bytes());
    if close {
        line(out, b"Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Follows a chunked body as it passes (RFC 9112 §7.1): where it ends, and
/// whether every size line, chunk end and trailer line is well formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Chunks {
    state: Chunk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Chunk {
    #[default]
    SizeStart,
    Size {
        left: u64,
        digits: u8,
    },
    /// Whitespace after the size: an extension (`;`) or the line's end may follow.
    SizeSpace {
        left: u64,
    },
    Extension {
        left: u64,
    },
    SizeLf {
        left: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

impl Chunks {
    /// Reads `data` (the body's next bytes): `Some(n)` when the body ends
    /// after its first `n` bytes, `None` when all of it belongs to the body.
    pub fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, &'static str> {
        let mut i = 0;
        while i < data.len() {
            if let Chunk::Data(left) = self.state {
                let take = (left as usize).min(data.len() - i);
                i += take;
                self.state = if take as u64 == left { Chunk::DataCr } else { Chunk::Data(left - take as u64) };
                continue;
            }
            let b = data[i];
            i += 1;
            self.state = match (self.state, b) {
                (Chunk::SizeStart, b) if b.is_ascii_hexdigit() => Chunk::Size { left: hex(b), digits: 1 },
                (Chunk::Size { digits: 15.., .. }, b) if b.is_ascii_hexdigit() => {
                    return Err("a chunk size is too large");
                }
                (Chunk::Size { left, digits }, b) if b.is_ascii_hexdigit() => {
                    Chunk::Size { left: left << 4 | hex(b), digits: digits + 1 }
                }
                (Chunk::Size { left, .. } | Chunk::SizeSpace { left }, b' ' | b'\t') => Chunk::SizeSpace { left },
                (Chunk::Size { left, .. } | Chunk::SizeSpace { left }, b';') => Chunk::Extension { left },
                (Chunk::Size { left, .. } | Chunk::SizeSpace { left } | Chunk::Extension { left }, b'\r') => {
                    Chunk::SizeLf { left }
                }
                (Chunk::Extension { left }, b) if b == b'\t' || (b' '..=b'~').contains(&b) => Chunk::Extension { left },
                (Chunk::SizeLf { left: 0 }, b'\n') => Chunk::TrailerStart,
                (Chunk::SizeLf { left }, b'\n') => Chunk::Data(left),
                (Chunk::DataCr, b'\r') => Chunk::DataLf,
                (Chunk::DataLf, b'\n') => Chunk::SizeStart,
                (Chunk::TrailerStart, b'\r') => Chunk::EndLf,
                (Chunk::EndLf, b'\n') => {
                    self.state = Chunk::SizeStart;
                    return Ok(Some(i));
                }
                (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
                (Chunk::TrailerStart | Chunk::Trailer, b) if b == b'\t' || (b >= b' ' && b != 0x7f) => Chunk::Trailer,
                (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
                (Chunk::SizeStart | Chunk::Size { .. }, _) => return Err("a chunk size is not a hexadecimal number"),
                (Chunk::SizeSpace { .. }, _) => {
                    return Err("a chunk size is followed by something other than an extension");
                }
                _ => return Err("a line of the chunked body does not end in CRLF"),
            };
        }
        Ok(None)
    }
}

fn hex(b: u8) -> u64 {
    u64::from((b as char).to_digit(16).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn fwd(trusted: bool) -> Forwarding {
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        Forwarding { client, proto: "http", host: Some("a.test:8000".into()), trusted, add: true, via: true }
    }

    fn rewrite(raw: &str, f: &Forwarding) -> String {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(raw.as_bytes()).unwrap();
        let mut out = Vec::new();
        request_head(&mut out, &req, "/x", f, &f.text(), "a.test:8000");
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn request_heads_follow_the_header_rules() {
        let raw = "GET http://a.test:8000/x HTTP/1.1\r\nHost:  a.test:8000 \r\nConnection: keep-alive, X-Secret\r\n\
                   X-Secret: 1\r\nKeep-Alive: 5\r\nTE: gzip, trailers\r\nVia: 1.0 edge\r\n\
                   X-Forwarded-For: 10.9.9.9\r\nForwarded: for=10.9.9.9\r\nAccept: */*\r\n\r\n";
        let head = rewrite(raw, &fwd(false));
        assert_eq!(
            head,
            "GET /x HTTP/1.1\r\nHost: a.test:8000\r\nAccept: */*\r\nTE: trailers\r\nVia: 1.0 edge, 1.1 portmux\r\n\
             X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a.test:8000\r\n\
             Forwarded: for=192.0.2.7;proto=http;host=\"a.test:8000\"\r\n\r\n"
        );
        let head = rewrite(raw, &fwd(true));
        assert!(head.contains("X-Forwarded-For: 10.9.9.9, 192.0.2.7\r\n"), "{head}");
        assert!(head.contains("Forwarded: for=10.9.9.9, for=192.0.2.7;"), "{head}");
        let off = Forwarding { add: false, via: false, ..fwd(false) };
        let head = rewrite(raw, &off);
        assert!(head.contains("X-Forwarded-For: 10.9.9.9\r\n") && !head.contains("portmux"), "{head}");
    }

    fn framing(raw: &str, head_request: bool) -> Result<ResponseHead, &'static str> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(raw.as_bytes()).unwrap();
        response_framing(&resp, head_request)
    }

    #[test]
    fn response_framing_is_unambiguous() {
        let ok = |raw: &str| framing(raw, false).unwrap();
        assert_eq!(ok("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n").body, BodyLen::Length(5));
        assert_eq!(ok("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").body, BodyLen::Length(5));
        assert_eq!(ok("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n").body, BodyLen::Chunked);
        let close = ok("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((close.body, close.reusable), (BodyLen::Close, false));
        assert_eq!(ok("HTTP/1.1 204 No Content\r\n\r\n").body, BodyLen::None);
        assert_eq!(framing("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).unwrap().body, BodyLen::None);
        assert!(!ok("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n").reusable);
        assert!(!ok("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").reusable);
        assert!(ok("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n").reusable);
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n",
            "HTTP/1.1 000 OK\r\nContent-Length: 1\r\n\r\n",
        ] {
            assert!(framing(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn response_heads_drop_hop_by_hop_fields() {
        let raw = "HTTP/1.1 200 Fine\r\nConnection: x-a, keep-alive\r\nX-A: 1\r\nKeep-Alive: 5\r\n\
                   Content-Length: 2\r\nServer: s\r\n\r\nok";
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(raw.as_bytes()).unwrap();
        let head = response_framing(&resp, false).unwrap();
        let mut out = Vec::new();
        response_head(&mut out, &resp, &head, true, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 Fine\r\nServer: s\r\nContent-Length: 2\r\nVia: 1.1 portmux\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn chunked_bodies_end_where_they_end_in_any_pieces() {
        let body = b"3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\nNEXT";
        let end = body.len() - 4;
        for step in [1, 2, 5, body.len()] {
            let mut c = Chunks::default();
            let mut at = None;
            for (k, piece) in body.chunks(step).enumerate() {
                if let Some(n) = c.scan(piece).unwrap() {
                    at = Some(k * step + n);
                    break;
                }
            }
            assert_eq!(at, Some(end), "step {step}");
        }
        for bad in [&b"z\r\n"[..], b"3\nabc", b"3\r\nabcX", b"0\r\nT\x01\r\n", b"1234567890abcdef0\r\n", b"3 x\r\r"] {
            assert!(Chunks::default().scan(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
