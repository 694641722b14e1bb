//! A blocking client for the admin API, used by `portmux route …` and the
//! tests: one request, over the admin socket or TCP, and its answer.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the admin API is.
#[derive(Clone)]
pub enum AdminAddr {
    /// The Unix socket (the default, beside the control socket).
    Unix(PathBuf),
    /// A TCP address, with the bearer token for changes (zeroed when dropped, never printed).
    Tcp { addr: SocketAddr, token: Option<zeroize::Zeroizing<String>> },
}

impl std::fmt::Debug for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Unix(p) => f.debug_tuple("Unix").field(p).finish(),
            AdminAddr::Tcp { addr, token } => {
                f.debug_struct("Tcp").field("addr", addr).field("token", &token.as_ref().map(|_| "..")).finish()
            }
        }
    }
}

impl AdminAddr {
    /// `host:port` is TCP; anything else is a socket path.
    pub fn parse(text: &str, token: Option<zeroize::Zeroizing<String>>) -> AdminAddr {
        match text.parse() {
            Ok(addr) => AdminAddr::Tcp { addr, token },
            Err(_) => match resolve(text) {
                Some(addr) => AdminAddr::Tcp { addr, token },
                None => AdminAddr::Unix(PathBuf::from(text.strip_prefix("unix:").unwrap_or(text))),
            },
        }
    }
}

/// `HOST:PORT` with a host name (`localhost:9999`): its first address.
fn resolve(text: &str) -> Option<SocketAddr> {
    let (host, port) = text.rsplit_once(':')?;
    if host.is_empty() || text.contains('/') || text.starts_with("unix:") || port.parse::<u16>().is_err() {
        return None;
    }
    use std::net::ToSocketAddrs;
    let mut addrs: Vec<SocketAddr> = text.to_socket_addrs().ok()?.collect();
    // Where the admin API listens by default: IPv4 loopback first.
    addrs.sort_by_key(|a| !a.is_ipv4());
    addrs.into_iter().next()
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            AdminAddr::Tcp { addr, .. } => write!(f, "http://{addr}"),
        }
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// Sends one request and returns the status and body.
pub fn request(to: &AdminAddr, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String), String> {
    let timeout = Duration::from_secs(30);
    let unreachable = |e: std::io::Error| {
        format!("cannot reach the admin API at {to}: {e}; is portmux running? (--admin names its socket or address)")
    };
    let (mut s, host, token): (Box<dyn Stream>, String, Option<&str>) = match to {
        AdminAddr::Unix(path) => {
            let s = std::os::unix::net::UnixStream::connect(path).map_err(unreachable)?;
            s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            (Box::new(s), "localhost".into(), None)
        }
        AdminAddr::Tcp { addr, token } => {
            let s = std::net::TcpStream::connect_timeout(addr, timeout).map_err(unreachable)?;
            s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            (Box::new(s), addr.to_string(), token.as_ref().map(|t| t.as_str()))
        }
    };
    let body = body.unwrap_or("");
    let auth = zeroize::Zeroizing::new(token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default());
    let head = zeroize::Zeroizing::new(format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n",
        *auth,
        body.len()
    ));
    let mut request = zeroize::Zeroizing::new(head.as_bytes().to_vec());
    request.extend_from_slice(body.as_bytes());
    // An answer may come before the whole request is written (a refusal): it is read all the same.
    let sent = s.write_all(&request);
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    if raw.is_empty() {
        sent.map_err(|e| e.to_string())?;
        read.map_err(|e| format!("reading the admin API's answer: {e}"))?;
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed answer from the admin API")?;
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or("malformed status from the admin API")?;
    Ok((status, body.to_string()))
}

/// Percent-encodes a query value.
pub fn encode_query(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
