//! What portmux says itself to a client it does not deliver: HTTP errors, TLS
//! alerts, or a close, ended with a lingering close so the answer is read.
//!
//! The client's bytes were only peeked, so they are still unread; closing a
//! socket with unread bytes sends RST, which can destroy the answer in flight.
//! So: send the answer, shut down our side (FIN), read and discard what the
//! client sends until it closes or a short deadline passes, then close.

use portmux_sys::{net, uring};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;
use tokio::time::Instant;

/// TLS alert: no route for this server name (RFC 6066).
pub const ALERT_UNRECOGNIZED_NAME: u8 = 112;
/// TLS alert: the ClientHello could not be parsed.
pub const ALERT_DECODE_ERROR: u8 = 50;
/// TLS alert: the client offers no protocol version portmux terminates (TLS 1.2, 1.3).
pub const ALERT_PROTOCOL_VERSION: u8 = 70;
/// TLS alert: portmux cannot serve this route now (its certificate is missing).
pub const ALERT_INTERNAL_ERROR: u8 = 80;

/// How long a refused client may take to read the answer and close.
const LINGER: Duration = Duration::from_secs(2);
/// How much a refused client may still send before portmux stops reading.
const DRAIN_LIMIT: usize = 256 * 1024;

/// An answer portmux gives itself.
#[derive(Debug)]
pub enum Reply {
    /// A complete HTTP/1.1 response with `Connection: close`.
    Http { status: u16, body: String },
    /// A JSON document (`application/json`), with `Connection: close`.
    Json { status: u16, body: String },
    /// A redirect (`status`: 301, 302, 307, 308) to `location`, with `Connection: close`.
    Redirect { location: String, status: u16 },
    /// A fatal TLS alert record.
    TlsAlert(u8),
    /// Nothing to say: FIN after draining.
    Close,
    /// Close at once (a client that timed out, or a failed socket).
    Abort,
}

fn printable(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(200).collect()
}

impl Reply {
    /// The HTTP status it answers with, if it is an HTTP answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Reply::Http { status, .. } | Reply::Json { status, .. } | Reply::Redirect { status, .. } => Some(*status),
            Reply::TlsAlert(_) | Reply::Close | Reply::Abort => None,
        }
    }

    pub fn not_found(host: Option<&str>, path: Option<&str>, port: u16) -> Reply {
        let host = host.map_or_else(|| "(none)".to_string(), |h| format!("\"{}\"", printable(h)));
        let path = printable(path.unwrap_or("/"));
        Reply::Http {
            status: 404,
            body: format!("portmux: no route on port {port} for Host {host} and path \"{path}\"\n"),
        }
    }

    pub fn bad_request(reason: &str) -> Reply {
        Reply::Http { status: 400, body: format!("portmux: bad request: {reason}\n") }
    }

    pub fn too_large() -> Reply {
        Reply::Http {
            status: 431,
            body: "portmux: the request head is larger than the peek limit (--peek-max)\n".into(),
        }
    }

    pub fn unavailable(detail: &str) -> Reply {
        Reply::Http { status: 503, body: format!("portmux: service unavailable: {detail}\n") }
    }

    /// A client over the per-address connection limit.
    pub fn too_many(limit: usize) -> Reply {
        Reply::Http {
            status: 429,
            body: format!("portmux: too many connections from your address (the limit is {limit}); close some first\n"),
        }
    }

    pub fn bad_gateway(detail: &str) -> Reply {
        Reply::Http { status: 502, body: format!("portmux: bad gateway: {detail}\n") }
    }

    /// The request's Host is not the server name its TLS connection asked for.
    /// `made_for`: what the connection was made for (`server name "a.test"`).
    pub fn misdirected(host: &str, made_for: &str) -> Reply {
        Reply::Http {
            status: 421,
            body: format!(
                "portmux: misdirected request: Host \"{}\" is not what this connection was made for ({}); open a new connection with it as the TLS server name\n",
                printable(host),
                printable(made_for)
            ),
        }
    }

    pub fn forbidden(detail: &str) -> Reply {
        Reply::Http { status: 403, body: format!("portmux: forbidden: {detail}\n") }
    }

    /// `https://` on the default port, same host and target.
    pub fn to_https(host: &str, target: &str) -> Reply {
        let target = if target.starts_with('/') { target } else { "/" };
        Reply::Redirect { location: format!("https://{host}{target}"), status: 308 }
    }

    /// What a redirect route (`?redirect=`) answers to a request for `target`
    /// on `host`: https on the same host and target, or its URL (with the
    /// target appended unless `redirect_path=discard`), with its status.
    pub fn redirect(spec: &portmux_wire::RouteSpec, host: Option<&str>, target: &str) -> Reply {
        let status = spec.redirect_code.as_deref().and_then(|c| c.parse().ok()).unwrap_or(308);
        let target = if target.starts_with('/') { target } else { "/" };
        match spec.redirect.as_deref() {
            Some("https") | None => match host {
                Some(host) => Reply::Redirect { location: format!("https://{host}{target}"), status },
                None => Reply::bad_request("a redirect to https needs the Host header"),
            },
            Some(url) if spec.redirect_path.as_deref() == Some("discard") => {
                Reply::Redirect { location: url.to_string(), status }
            }
            Some(url) => Reply::Redirect { location: format!("{}{target}", url.trim_end_matches('/')), status },
        }
    }

    pub fn tls_alert(description: u8) -> Reply {
        Reply::TlsAlert(description)
    }

    /// The bytes on the wire, if any.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        match self {
            Reply::Http { status, body } => {
                let reason = match status {
                    200 => "OK",
                    400 => "Bad Request",
                    403 => "Forbidden",
                    404 => "Not Found",
                    421 => "Misdirected Request",
                    429 => "Too Many Requests",
                    431 => "Request Header Fields Too Large",
                    502 => "Bad Gateway",
                    _ => "Service Unavailable",
                };
                let retry = if matches!(*status, 429 | 503) { "Retry-After: 1\r\n" } else { "" };
                Some(
                    format!(
                        "HTTP/1.1 {status} {reason}\r\nServer: portmux\r\nContent-Type: text/plain; charset=utf-8\r\n\
                         X-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n{retry}\r\n{body}",
                        body.len()
                    )
                    .into_bytes(),
                )
            }
            Reply::Json { status, body } => Some(
                format!(
                    "HTTP/1.1 {status} OK\r\nServer: portmux\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            ),
            Reply::Redirect { location, status } => {
                let body = format!("portmux: moved to {location}\n");
                let reason = match status {
                    301 => "Moved Permanently",
                    302 => "Found",
                    307 => "Temporary Redirect",
                    _ => "Permanent Redirect",
                };
                Some(
                    format!(
                        "HTTP/1.1 {status} {reason}\r\nServer: portmux\r\nLocation: {location}\r\n\
                         Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes(),
                )
            }
            // level fatal(2), TLS 1.2 record version as TLS 1.3 requires.
            Reply::TlsAlert(desc) => Some(vec![21, 3, 3, 0, 2, 2, *desc]),
            Reply::Close | Reply::Abort => None,
        }
    }
}

/// Gives `reply` to the client on `fd` and closes it (by dropping `fd`).
pub async fn send<F: AsFd>(fd: F, reply: Reply) {
    send_within(fd, reply, LINGER).await;
}

/// Like [`send`], lingering at most `linger` (refusals during a flood hold
/// their fds only briefly).
pub async fn send_within<F: AsFd>(fd: F, reply: Reply, linger: Duration) {
    if matches!(reply, Reply::Abort) {
        return;
    }
    let deadline = Instant::now() + linger;
    let sock = fd.as_fd();
    if let Some(bytes) = reply.bytes()
        && !write_all(sock, &bytes, deadline).await
    {
        return;
    }
    if net::shutdown_write(sock).is_err() {
        return;
    }
    drain(sock, deadline).await;
}

/// Waits for `mask` on `fd` until `deadline`; false if the deadline came first.
async fn wait(fd: BorrowedFd<'_>, mask: i16, deadline: Instant) -> bool {
    match uring::race(fd, uring::poll(fd, mask as u32), tokio::time::sleep_until(deadline)).await {
        uring::Raced::Done(r) => r.is_ok(),
        uring::Raced::Stopped(_) => false,
    }
}

/// Writes all of `bytes` to a socket (blocking or not) before `deadline`.
pub(crate) async fn write_all(fd: BorrowedFd<'_>, mut bytes: &[u8], deadline: Instant) -> bool {
    while !bytes.is_empty() {
        match net::send(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !wait(fd, libc::POLLOUT, deadline).await {
                    return false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

async fn drain(fd: BorrowedFd<'_>, deadline: Instant) {
    // On the heap: a buffer here would be part of every connection task's
    // state (the task of a long relay too), not only of those that drain.
    let mut buf = vec![0u8; 4096];
    let mut total = 0;
    while total < DRAIN_LIMIT {
        match net::recv(fd, &mut buf) {
            Ok(0) => return,
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !wait(fd, libc::POLLIN | libc::POLLRDHUP, deadline).await {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_replies_are_complete_responses() {
        let bytes = Reply::not_found(Some("a.test\r\nX: y"), Some("/p"), 8000).bytes().unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(head.contains("Connection: close"));
        assert!(body.contains("\"a.testX: y\""), "control characters are stripped: {body}");
        let unavailable = String::from_utf8(Reply::unavailable("x").bytes().unwrap()).unwrap();
        assert!(unavailable.starts_with("HTTP/1.1 503 ") && unavailable.contains("Retry-After: 1"));
        assert_eq!(Reply::tls_alert(ALERT_UNRECOGNIZED_NAME).bytes().unwrap(), [21, 3, 3, 0, 2, 2, 112]);
        assert!(Reply::Close.bytes().is_none());
    }
}
