//! Pure, tri-state parser of a TLS ClientHello: SNI and ALPN, across any number
//! of records and any split into TCP segments.

use super::ParseError;
use portmux_wire::spec::normalize_name;

/// What routing needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// server_name (host_name), normalised; `None` if the client sent none.
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order.
    pub alpn: Vec<String>,
    /// The client offers TLS 1.2 or later (its version field, or its
    /// supported_versions extension); portmux terminates nothing older.
    pub tls12: bool,
    /// The first AEAD suite the client lists is ChaCha20-Poly1305 (it has no
    /// AES hardware): a terminating server then follows the client's order.
    pub chacha_first: bool,
}

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const MAX_RECORD: usize = (1 << 14) + 256;
/// Larger ClientHellos exist only as attacks; post-quantum key shares are ~1.2 KiB.
pub const MAX_HELLO: usize = 64 * 1024;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const TLS12: u16 = 0x0303;

/// Parses the records at the start of `buf`. `Incomplete` means a longer
/// prefix of the same stream could still parse; `Invalid` means none can.
pub fn parse(buf: &[u8]) -> Result<ClientHello, ParseError> {
    // Reassemble the handshake message from consecutive handshake records.
    let mut hs: Vec<u8> = Vec::new();
    let mut rest = buf;
    let mut need: Option<usize> = None;
    loop {
        if let Some(n) = need
            && hs.len() >= n
        {
            break;
        }
        if rest.is_empty() {
            return Err(ParseError::Incomplete);
        }
        if rest[0] != CONTENT_HANDSHAKE {
            return Err(if hs.is_empty() && rest[0] & 0x80 != 0 {
                ParseError::Invalid("SSLv2-style ClientHello; only TLS 1.0 and later are supported")
            } else {
                ParseError::Invalid("not a TLS handshake record")
            });
        }
        if rest.len() >= 2 && rest[1] != 3 {
            return Err(ParseError::Invalid("TLS record with an unknown protocol version"));
        }
        if rest.len() < 5 {
            return Err(ParseError::Incomplete);
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 {
            return Err(ParseError::Invalid("empty TLS handshake record"));
        }
        if len > MAX_RECORD {
            return Err(ParseError::Invalid("TLS record longer than 2^14 bytes"));
        }
        let avail = &rest[5..];
        let take = len.min(avail.len());
        hs.extend_from_slice(&avail[..take]);
        if need.is_none() && hs.len() >= 4 {
            if hs[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(ParseError::Invalid("first TLS handshake message is not a ClientHello"));
            }
            let n = 4 + (u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize);
            if n > MAX_HELLO {
                return Err(ParseError::Invalid("ClientHello declares more than 64 KiB"));
            }
            need = Some(n);
        }
        if take < len {
            // The record itself is cut short: wait for more unless it already
            // holds the whole ClientHello.
            if need.is_some_and(|n| hs.len() >= n) {
                break;
            }
            return Err(ParseError::Incomplete);
        }
        rest = &avail[len..];
    }
    let n = need.unwrap_or(0);
    parse_body(&hs[4..n])
}

/// A bounds-checked reader over a complete ClientHello body; running out of
/// bytes here is malformation, not incompleteness.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ParseError> {
        if self.0.len() < n {
            return Err(ParseError::Invalid(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ParseError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ParseError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], ParseError> {
        let n = self.u8(what)? as usize;
        self.take(n, what)
    }
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], ParseError> {
        let n = self.u16(what)? as usize;
        self.take(n, what)
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, ParseError> {
    let mut r = Reader(body);
    let version = r.u16("ClientHello too short for its version")?;
    if version >> 8 != 3 {
        return Err(ParseError::Invalid("ClientHello with an unknown protocol version"));
    }
    r.take(32, "ClientHello too short for its random")?;
    let sid = r.vec8("truncated session id")?;
    if sid.len() > 32 {
        return Err(ParseError::Invalid("session id longer than 32 bytes"));
    }
    let suites = r.vec16("truncated cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(ParseError::Invalid("malformed cipher suite list"));
    }
    let chacha_first = suites
        .chunks_exact(2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .find(|s| matches!(s, 0x1301..=0x1303 | 0xc02b | 0xc02c | 0xc02f | 0xc030 | 0xcca8 | 0xcca9))
        .is_some_and(|s| matches!(s, 0x1303 | 0xcca8 | 0xcca9));
    if r.vec8("truncated compression methods")?.is_empty() {
        return Err(ParseError::Invalid("empty compression method list"));
    }
    let mut hello = ClientHello { sni: None, alpn: Vec::new(), tls12: version >= TLS12, chacha_first };
    if r.0.is_empty() {
        return Ok(hello); // No extensions at all (old clients).
    }
    let mut exts = Reader(r.vec16("truncated extensions")?);
    if !r.0.is_empty() {
        return Err(ParseError::Invalid("bytes after the ClientHello extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    while !exts.0.is_empty() {
        let ty = exts.u16("truncated extension")?;
        let data = exts.vec16("truncated extension")?;
        if seen.contains(&ty) {
            return Err(ParseError::Invalid("the same extension appears twice"));
        }
        seen.push(ty);
        match ty {
            EXT_SERVER_NAME => hello.sni = parse_sni(data)?,
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            EXT_SUPPORTED_VERSIONS => {
                let list = Reader(data).vec8("truncated supported_versions")?;
                hello.tls12 |= list.chunks_exact(2).any(|v| u16::from_be_bytes([v[0], v[1]]) >= TLS12);
            }
            _ => {}
        }
    }
    Ok(hello)
}

fn parse_sni(data: &[u8]) -> Result<Option<String>, ParseError> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16("truncated server_name list")?);
    if !r.0.is_empty() {
        return Err(ParseError::Invalid("bytes after the server_name list"));
    }
    let mut name = None;
    while !list.0.is_empty() {
        let kind = list.u8("truncated server name")?;
        let value = list.vec16("truncated server name")?;
        if kind != 0 {
            continue; // Unknown name types are skipped (RFC 6066 §3).
        }
        if name.is_some() {
            return Err(ParseError::Invalid("more than one host_name in server_name"));
        }
        let text = std::str::from_utf8(value).map_err(|_| ParseError::Invalid("SNI is not ASCII"))?;
        name = Some(normalize_name(text).ok_or(ParseError::Invalid("SNI is not a valid host name"))?);
    }
    Ok(name)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<String>, ParseError> {
    let mut r = Reader(data);
    let mut list = Reader(r.vec16("truncated ALPN list")?);
    if !r.0.is_empty() {
        return Err(ParseError::Invalid("bytes after the ALPN list"));
    }
    let mut out = Vec::new();
    while !list.0.is_empty() {
        let proto = list.vec8("truncated ALPN protocol")?;
        if proto.is_empty() {
            return Err(ParseError::Invalid("empty ALPN protocol name"));
        }
        out.push(String::from_utf8_lossy(proto).into_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A captured ClientHello: who sent it, its bytes, and what it says.
    type Capture = (&'static str, &'static [u8], Option<&'static str>, &'static [&'static str]);

    /// ClientHellos captured from real clients on this machine.
    const CAPTURES: &[Capture] = &[
        (
            "curl 7.88 / OpenSSL 3.0, TLS 1.3",
            include_bytes!("fixtures/curl-openssl3.bin"),
            Some("a.example.test"),
            &["h2", "http/1.1"],
        ),
        (
            "openssl s_client -tls1_2, no ALPN",
            include_bytes!("fixtures/openssl-tls12.bin"),
            Some("b.example.test"),
            &[],
        ),
        ("Python 3.11 ssl, no SNI", include_bytes!("fixtures/python-nosni.bin"), None, &["http/1.1"]),
        ("rustls 0.23 (ring)", include_bytes!("fixtures/rustls.bin"), Some("c.example.test"), &["http/1.1"]),
        (
            "Chromium 156 (GREASE, ECH GREASE, X25519MLKEM768)",
            include_bytes!("fixtures/chromium.bin"),
            Some("d.example.test"),
            &["h2", "http/1.1"],
        ),
    ];

    #[test]
    fn every_prefix_of_captured_hellos_is_incomplete_and_the_whole_parses() {
        for (who, bytes, sni, alpn) in CAPTURES {
            let hello = parse(bytes).unwrap_or_else(|e| panic!("{who}: {e:?}"));
            assert_eq!(hello.sni.as_deref(), *sni, "{who}");
            assert_eq!(hello.alpn, alpn.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{who}");
            for cut in 0..bytes.len() {
                assert_eq!(parse(&bytes[..cut]), Err(ParseError::Incomplete), "{who} cut at {cut}");
            }
        }
    }

    /// Splits the one handshake record of `bytes` into records of `size` bytes.
    fn refragment(bytes: &[u8], size: usize) -> Vec<u8> {
        let len = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
        let hs = &bytes[5..5 + len];
        let mut out = Vec::new();
        for chunk in hs.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn hellos_split_across_records_parse_and_every_prefix_is_incomplete() {
        for (who, bytes, sni, _) in CAPTURES {
            for size in [1, 2, 3, 7, 100] {
                let split = refragment(bytes, size);
                let hello = parse(&split).unwrap_or_else(|e| panic!("{who} in {size}-byte records: {e:?}"));
                assert_eq!(hello.sni.as_deref(), *sni);
                for cut in 0..split.len() {
                    assert_eq!(parse(&split[..cut]), Err(ParseError::Incomplete), "{who}/{size} cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let (_, bytes, sni, _) = CAPTURES[0];
        let mut more = bytes.to_vec();
        more.extend_from_slice(&[20, 3, 3, 0, 1, 1]); // a ChangeCipherSpec record
        assert_eq!(parse(&more).unwrap().sni.as_deref(), sni);
    }

    fn record(hs: &[u8]) -> Vec<u8> {
        let mut v = vec![22, 3, 1];
        v.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        v.extend_from_slice(hs);
        v
    }

    fn hello_with(exts: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        record(&hs)
    }

    fn sni_ext(names: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for n in names {
            list.push(0);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    #[test]
    fn malformed_hellos_are_invalid_with_a_reason() {
        let invalid = |b: &[u8]| match parse(b) {
            Err(ParseError::Invalid(why)) => why,
            other => panic!("expected Invalid for {b:?}, got {other:?}"),
        };
        assert!(invalid(b"GET / HTTP/1.1\r\n").contains("not a TLS handshake"));
        assert!(invalid(&[0x80, 0x2e, 0x01]).contains("SSLv2"));
        assert!(invalid(&[22, 9, 1, 0, 5]).contains("protocol version"));
        assert!(invalid(&[22, 3, 1, 0, 0]).contains("empty"));
        assert!(invalid(&[22, 3, 1, 0x50, 0]).contains("2^14"));
        assert!(invalid(&record(&[2, 0, 0, 1, 0])).contains("not a ClientHello"));
        assert!(invalid(&record(&[1, 0xff, 0, 0])).contains("64 KiB"));
        assert!(invalid(&[22, 3, 1, 0, 4, 1, 0, 0, 9, 21, 3, 3, 0, 2]).contains("not a TLS handshake"));
        assert!(invalid(&hello_with(&sni_ext(&[b"a.test", b"b.test"]))).contains("more than one host_name"));
        assert!(invalid(&hello_with(&sni_ext(&[b"bad name"]))).contains("not a valid host name"));
        let mut dup = sni_ext(&[b"a.test"]);
        dup.extend(sni_ext(&[b"a.test"]));
        assert!(invalid(&hello_with(&dup)).contains("twice"));
        assert!(invalid(&hello_with(&[0, 16, 0, 3, 0, 1, 0])).contains("empty ALPN"));
        assert!(invalid(&hello_with(&[0, 16, 0, 9])).contains("truncated"));
        // A well-formed synthetic hello with one name parses.
        assert_eq!(parse(&hello_with(&sni_ext(&[b"A.Test."]))).unwrap().sni.as_deref(), Some("a.test"));
    }

    #[test]
    fn the_versions_offered_are_read_from_the_version_and_supported_versions() {
        assert!(parse(&hello_with(&[])).unwrap().tls12, "version 3.3");
        let mut ssl3 = hello_with(&[]);
        ssl3[9..11].copy_from_slice(&[3, 0]);
        assert!(!parse(&ssl3).unwrap().tls12, "version 3.0 and no supported_versions");
        let mut tls13 = hello_with(&[0, 43, 0, 3, 2, 3, 4]);
        tls13[9..11].copy_from_slice(&[3, 1]);
        assert!(parse(&tls13).unwrap().tls12, "supported_versions offers TLS 1.3");
        let mut old = hello_with(&[0, 43, 0, 3, 2, 3, 1]);
        old[9..11].copy_from_slice(&[3, 1]);
        assert!(!parse(&old).unwrap().tls12, "supported_versions offers TLS 1.0 only");
        assert!(!parse(&hello_with(&[])).unwrap().chacha_first, "TLS_AES_128_GCM_SHA256 first");
        let mut chacha = hello_with(&[]);
        chacha[46..48].copy_from_slice(&[0x13, 0x03]);
        assert!(parse(&chacha).unwrap().chacha_first, "TLS_CHACHA20_POLY1305_SHA256 first");
    }

    #[test]
    fn mutated_captures_never_panic() {
        let mut x: u32 = 0x1234_5678;
        for (_, bytes, _, _) in CAPTURES {
            for _ in 0..3000 {
                let mut b = bytes.to_vec();
                for _ in 0..4 {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    let i = x as usize % b.len();
                    b[i] = (x >> 8) as u8;
                }
                let cut = (x >> 3) as usize % (b.len() + 1);
                let _ = parse(&b[..cut]);
            }
        }
    }
}
