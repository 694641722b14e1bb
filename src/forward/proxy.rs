//! PROXY protocol (v1 text, v2 binary): the header portmux sends to a backend,
//! and the one it accepts from a load balancer in front of it (`--accept-proxy`).
//! Encoding and decoding come from the `ppp` crate.

use super::backend::ProxyVersion;
use crate::classify::ParseError;
use ppp::v2::{Command, Protocol, Version};
use std::net::SocketAddr;

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// A v1 header is at most 107 bytes; v2 carries its own length.
const V1_MAX: usize = 107;

/// The header telling a backend who the client is (`client`) and which
/// address it connected to (`local`).
pub fn header(version: ProxyVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::from((client, local)).to_string().into_bytes(),
        ProxyVersion::V2 => {
            ppp::v2::Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (client, local))
                .build()
                .unwrap_or_default()
        }
    }
}

/// A received PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The original client and destination, unless the sender said LOCAL/UNKNOWN
    /// (its own health check): then the socket's own addresses stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// Length of the header, to consume before anything else is read.
    pub len: usize,
}

/// Parses a PROXY header at the start of `buf` (tri-state).
pub fn parse(buf: &[u8]) -> Result<Received, ParseError> {
    let starts = |sig: &[u8]| buf[..buf.len().min(sig.len())] == sig[..buf.len().min(sig.len())];
    let v2 = starts(V2_SIGNATURE);
    if !v2 && !starts(V1_PREFIX) {
        return Err(ParseError::Invalid("no PROXY protocol header (the listener expects one: --accept-proxy)"));
    }
    if buf.len() < 16 {
        return Err(ParseError::Incomplete);
    }
    if v2 {
        return match ppp::v2::Header::try_from(buf) {
            Ok(h) => {
                let addresses = match (h.command, h.addresses) {
                    (Command::Proxy, ppp::v2::Addresses::IPv4(a)) => Some((
                        SocketAddr::new(a.source_address.into(), a.source_port),
                        SocketAddr::new(a.destination_address.into(), a.destination_port),
                    )),
                    (Command::Proxy, ppp::v2::Addresses::IPv6(a)) => Some((
                        SocketAddr::new(a.source_address.into(), a.source_port),
                        SocketAddr::new(a.destination_address.into(), a.destination_port),
                    )),
                    _ => None,
                };
                Ok(Received { addresses, len: h.len() })
            }
            Err(ppp::v2::ParseError::Incomplete(_) | ppp::v2::ParseError::Partial(..)) => Err(ParseError::Incomplete),
            Err(_) => Err(ParseError::Invalid("malformed PROXY protocol v2 header")),
        };
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Err(if buf.len() >= V1_MAX {
            ParseError::Invalid("PROXY protocol v1 header longer than 107 bytes")
        } else {
            ParseError::Incomplete
        });
    };
    match ppp::v1::Header::try_from(&buf[..end + 2]) {
        Ok(h) => {
            let addresses = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                )),
                ppp::v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::new(a.source_address.into(), a.source_port),
                    SocketAddr::new(a.destination_address.into(), a.destination_port),
                )),
                ppp::v1::Addresses::Unknown => None,
            };
            Ok(Received { addresses, len: end + 2 })
        }
        Err(_) => Err(ParseError::Invalid("malformed PROXY protocol v1 header")),
    }
}

/// Most bytes a received PROXY header may take (v2 TLVs included).
const MAX_RECEIVED: usize = 4096;

/// Reads (consumes) the PROXY header a load balancer in front sent, before
/// `deadline`. Returns the original (client, destination), or `None` for a
/// LOCAL/UNKNOWN header; an error says why the connection must be closed.
pub async fn receive(
    fd: std::os::fd::BorrowedFd<'_>,
    deadline: tokio::time::Instant,
) -> Result<Option<(SocketAddr, SocketAddr)>, String> {
    use crate::classify::{PeekEnd, peek_with};
    let (end, _, _) = peek_with(fd, deadline, MAX_RECEIVED, parse).await;
    let received = match end {
        PeekEnd::Parsed(r) => r,
        PeekEnd::Invalid(reason) => return Err(reason.into()),
        PeekEnd::TooLarge => return Err(format!("PROXY header longer than {MAX_RECEIVED} bytes")),
        PeekEnd::TimedOut => return Err("no PROXY header before the peek deadline".into()),
        PeekEnd::HungUp => return Err("the client hung up before its PROXY header was complete".into()),
        PeekEnd::Failed(e) => return Err(e.to_string()),
    };
    // The header is all there (it was peeked): consume exactly it.
    let mut left = received.len;
    let mut scratch = [0u8; 512];
    while left > 0 {
        let n = left.min(scratch.len());
        match portmux_sys::net::recv(fd, &mut scratch[..n]) {
            Ok(0) => return Err("the client hung up".into()),
            Ok(got) => left -= got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    Ok(received.addresses.map(|(c, d)| (canonical(c), canonical(d))))
}

/// Whether a client not trusted to send a PROXY header sent one anyway
/// (it would claim another client's address). Waits only for as many bytes as
/// it takes to tell; a client that sends nothing is left to the peek deadline.
pub async fn sent_unasked(fd: std::os::fd::BorrowedFd<'_>, deadline: tokio::time::Instant) -> bool {
    use crate::classify::{ParseError, PeekEnd, peek_with};
    let decide = |buf: &[u8]| {
        let mut maybe = false;
        for sig in [V1_PREFIX, V2_SIGNATURE] {
            let n = buf.len().min(sig.len());
            if buf[..n] == sig[..n] {
                if n == sig.len() {
                    return Ok(true);
                }
                maybe = true;
            }
        }
        if maybe { Err(ParseError::Incomplete) } else { Ok(false) }
    };
    matches!(peek_with(fd, deadline, V2_SIGNATURE.len(), decide).await.0, PeekEnd::Parsed(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_every_prefix_is_incomplete() {
        let cases = [("203.0.113.7:51000", "192.0.2.1:443"), ("[2001:db8::7]:51000", "[2001:db8::1]:443")];
        for (client, local) in cases {
            let (client, local): (SocketAddr, SocketAddr) = (client.parse().unwrap(), local.parse().unwrap());
            for v in [ProxyVersion::V1, ProxyVersion::V2] {
                let mut bytes = header(v, client, local);
                let len = bytes.len();
                bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
                assert_eq!(parse(&bytes), Ok(Received { addresses: Some((client, local)), len }), "{v:?}");
                for cut in 0..len {
                    assert_eq!(parse(&bytes[..cut]), Err(ParseError::Incomplete), "{v:?} cut at {cut}");
                }
            }
        }
        let v1 = header(ProxyVersion::V1, "1.2.3.4:5".parse().unwrap(), "6.7.8.9:10".parse().unwrap());
        assert_eq!(v1, b"PROXY TCP4 1.2.3.4 6.7.8.9 5 10\r\n");
    }

    #[test]
    fn unknown_and_local_keep_the_socket_addresses() {
        assert_eq!(parse(b"PROXY UNKNOWN\r\nGET"), Ok(Received { addresses: None, len: 15 }));
        let local = [V2_SIGNATURE, &[0x20, 0x00, 0x00, 0x00]].concat();
        assert_eq!(parse(&local), Ok(Received { addresses: None, len: 16 }));
    }

    #[test]
    fn anything_else_is_invalid() {
        for bad in [&b"GET / HTTP/1.1\r\n"[..], b"\x16\x03\x01", b"PROXY TCP4 nonsense\r\n", b"PROXY TCP9 1 2 3 4\r\n"]
        {
            assert!(matches!(parse(bad), Err(ParseError::Invalid(_))), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Err(ParseError::Invalid(_))));
    }
}
