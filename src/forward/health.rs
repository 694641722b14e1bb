//! Active health checks of a route's backends (`?health=/PATH` or
//! `?health=tcp`): an HTTP GET that must answer the expected status, or a TCP
//! connect, every `health_interval`, each within `health_timeout`.
//! `health_fall` failures in a row take a backend out of the rotation,
//! `health_rise` successes bring it back. Passive health (a failed connect)
//! works beside it.

use portmux_sys::net::Endpoint;
use portmux_wire::RouteSpec;
use portmux_wire::spec::parse_duration;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// SRP's defaults: GET every 3 s, 10 s timeout, 200 expected.
const INTERVAL: Duration = Duration::from_secs(3);
const TIMEOUT: Duration = Duration::from_secs(10);

/// What a route checks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Check {
    /// `Some(path)`: an HTTP GET; `None`: a TCP connect.
    pub path: Option<String>,
    pub status: u16,
    /// The Host header an HTTP check sends (the route's host, else the backend's address).
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// The route's `proxy=`: each check opens with a PROXY header naming the
    /// check's own addresses (a backend that requires one refuses without).
    pub proxy: Option<super::backend::ProxyVersion>,
}

impl Check {
    /// The route's check, if it asks for one (the spec parser checked the values).
    pub fn of(spec: &RouteSpec) -> Option<Check> {
        let what = spec.health.as_deref()?;
        let duration = |v: &Option<String>, d| v.as_deref().and_then(parse_duration).unwrap_or(d);
        let count = |v: &Option<String>| v.as_deref().and_then(|v| v.parse().ok()).unwrap_or(1);
        Some(Check {
            path: (what != "tcp").then(|| what.to_string()),
            status: spec.health_status.as_deref().and_then(|s| s.parse().ok()).unwrap_or(200),
            host: match &spec.host {
                portmux_wire::spec::HostPattern::Exact(h) => Some(h.clone()),
                _ => None,
            },
            interval: duration(&spec.health_interval, INTERVAL),
            timeout: duration(&spec.health_timeout, TIMEOUT),
            rise: count(&spec.health_rise),
            fall: count(&spec.health_fall),
            proxy: spec.proxy.as_deref().and_then(|p| super::backend::ProxyVersion::parse(p).ok().flatten()),
        })
    }

    /// One check of a backend: the first of its addresses that passes passes it.
    pub async fn probe(&self, name: &str, endpoints: &[Endpoint]) -> Result<(), String> {
        let mut last = String::from("no address");
        for e in endpoints {
            match tokio::time::timeout(self.timeout, self.probe_one(name, e)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("no answer within {}", humantime::format_duration(self.timeout)),
            }
        }
        Err(last)
    }

    async fn probe_one(&self, name: &str, endpoint: &Endpoint) -> Result<(), String> {
        match endpoint {
            Endpoint::Tcp(addr) => {
                let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
                if let (Some(version), Ok(local)) = (self.proxy, s.local_addr()) {
                    let header = super::proxy::header(version, local, *addr);
                    s.write_all(&header).await.map_err(|e| format!("send the PROXY header: {e}"))?;
                }
                self.exchange(name, s).await
            }
            Endpoint::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path).await.map_err(|e| format!("connect: {e}"))?;
                self.exchange(name, s).await
            }
        }
    }

    async fn exchange(&self, name: &str, mut s: impl AsyncRead + AsyncWrite + Unpin) -> Result<(), String> {
        let Some(request) = self.request(name) else { return Ok(()) };
        s.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
        self.answer(s).await
    }

    /// The GET an HTTP check sends (`None` for a TCP check), with the route's
    /// host, else `name`.
    pub fn request(&self, name: &str) -> Option<String> {
        let path = self.path.as_ref()?;
        let host = self.host.as_deref().unwrap_or(name);
        Some(format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: portmux-health-check\r\nConnection: close\r\n\r\n"
        ))
    }

    /// Reads the status line of the answer to [`Check::request`] and checks it.
    pub async fn answer(&self, mut s: impl AsyncRead + Unpin) -> Result<(), String> {
        let path = self.path.as_deref().unwrap_or("/");
        let mut buf = Vec::with_capacity(128);
        while !buf.contains(&b'\n') && buf.len() < 1024 {
            let mut chunk = [0u8; 256];
            let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before a status line".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        let status = line.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok());
        match status {
            Some(s) if line.starts_with("HTTP/1.") && s == self.status => Ok(()),
            Some(s) => Err(format!("GET {path} answered {s}, not {}", self.status)),
            None => Err(format!("GET {path}: not an HTTP response")),
        }
    }
}

/// Passes (positive) or failures (negative) in a row, and whether the
/// checked thing is out of the rotation: what one check's result makes of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    pub streak: i64,
    pub down: bool,
}

impl Verdict {
    /// Counts one result; `Some(in rotation)` when it changes the state
    /// (`rise` passes in a row bring it back, `fall` failures take it out).
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        self.streak = match (ok, self.streak) {
            (true, s) if s > 0 => s + 1,
            (true, _) => 1,
            (false, s) if s < 0 => s - 1,
            (false, _) => -1,
        };
        let flip = if self.down { self.streak >= i64::from(rise) } else { self.streak <= -i64::from(fall) };
        flip.then(|| {
            self.down = !self.down;
            !self.down
        })
    }
}
