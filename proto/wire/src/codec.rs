//! Bytes ⇄ messages ([`Message`] on the control socket, [`Handover`] between an
//! old and a new portmux): the only file that knows the encoding (bincode 2,
//! standard config).

use crate::{Handover, Message};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A message type carried one per datagram.
pub trait Wire: Serialize + DeserializeOwned {
    /// The variant's name, for error messages.
    fn kind(&self) -> &'static str;
}

impl Wire for Message {
    fn kind(&self) -> &'static str {
        Message::kind(self)
    }
}

impl Wire for Handover {
    fn kind(&self) -> &'static str {
        Handover::kind(self)
    }
}

/// Hard cap on one encoded message, checked before decoding. Route lists and
/// connection metadata are far smaller; anything bigger is an error, not a message.
pub const MAX_MESSAGE: usize = 64 * 1024;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_MESSAGE>,
>;

const CONFIG: Config = bincode::config::standard().with_limit::<MAX_MESSAGE>();

/// Why bytes could not become a message, or a message could not become bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("empty message")]
    Empty,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("malformed message: {extra} unexpected bytes after a complete {kind}")]
    Trailing { kind: &'static str, extra: usize },
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Encodes `msg` into one datagram's payload.
pub fn encode<T: Wire>(msg: &T) -> Result<Vec<u8>, CodecError> {
    // Room for a connection's message at once (one is about 50 bytes):
    // growing from empty cost a handoff four allocations.
    let mut bytes = Vec::with_capacity(256);
    bincode::serde::encode_into_std_write(msg, &mut bytes, CONFIG).map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE {
        return Err(CodecError::TooLarge { len: bytes.len(), max: MAX_MESSAGE });
    }
    Ok(bytes)
}

/// Decodes one datagram's payload; the whole buffer must be exactly one message.
pub fn decode<T: Wire>(buf: &[u8]) -> Result<T, CodecError> {
    if buf.len() > MAX_MESSAGE {
        return Err(CodecError::TooLarge { len: buf.len(), max: MAX_MESSAGE });
    }
    if buf.is_empty() {
        return Err(CodecError::Empty);
    }
    let (msg, used): (T, usize) =
        bincode::serde::decode_from_slice(buf, CONFIG).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != buf.len() {
        return Err(CodecError::Trailing { kind: msg.kind(), extra: buf.len() - used });
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Bound, ConnMeta, Handover, Proto};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn meta() -> ConnMeta {
        ConnMeta {
            route: "http://:8000/a".into(),
            proto: Proto::Http,
            peer: "127.0.0.1:40000".parse().unwrap(),
            local: "[::1]:8000".parse().unwrap(),
            sni: None,
            alpn: vec!["h2".into()],
            host: Some("a.test".into()),
            path: Some("/a/".into()),
            peeked: 300,
        }
    }

    /// Every variant, with the bytes it must encode to. Changing any of these
    /// breaks deployed services: append variants (and bump PROTOCOL_VERSION)
    /// instead of editing them.
    fn tls() -> crate::TlsInfo {
        crate::TlsInfo {
            sni: Some("a.test".into()),
            alpn: Some("http/1.1".into()),
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            client_certs: vec![vec![0x30, 0x01]],
        }
    }

    fn golden() -> Vec<(Message, &'static str)> {
        vec![
            (Message::Hello { version: 1, service: "web".into() }, "000103776562"),
            (Message::Hello { version: 2, service: "web".into() }, "000203776562"),
            (Message::Register { routes: vec!["tcp://:9000".into()] }, "01010b7463703a2f2f3a39303030"),
            (
                Message::Registered {
                    routes: vec![Bound { route: "tcp://:9000".into(), listen: "127.0.0.1:9000".parse().unwrap() }],
                },
                "02010b7463703a2f2f3a39303030007f000001fb2823",
            ),
            (Message::Refused { route: "x".into(), reason: "no".into() }, "030178026e6f"),
            (
                Message::Connection { id: 7, meta: meta() },
                "04070e687474703a2f2f3a383030302f6101007f000001fb409c\
                 0100000000000000000000000000000001fb401f0001026832010661\
                 2e7465737401032f612ffb2c01",
            ),
            (Message::Ack { id: 251 }, "05fbfb00"),
            (Message::Reject { id: 1, reason: "busy".into() }, "06010462757379"),
            (Message::Drain, "07"),
            (Message::Bye, "08"),
            (Message::Error { reason: "bad".into() }, "0903626164"),
            (Message::Upgrade { binary: Some("/x".into()) }, "0a01022f78"),
            (Message::Upgraded { pid: 300 }, "0bfb2c01"),
            (
                Message::GiveBack {
                    route: "http://:80".into(),
                    peer: "127.0.0.1:5000".parse().unwrap(),
                    local: "127.0.0.1:80".parse().unwrap(),
                },
                "0c0a687474703a2f2f3a3830007f000001fb8813007f00000150",
            ),
            (
                Message::TlsConnection { id: 7, meta: meta(), tls: tls() },
                "0d070e687474703a2f2f3a383030302f6101007f000001fb409c0100000000000000000000000000000001fb401f00010268320106612e7465737401032f612ffb2c010106612e746573740108687474702f312e3107544c5376312e3318544c5331335f4145535f3132385f47434d5f53484132353601023001",
            ),
            (
                Message::RegisterTls { routes: vec!["https://a".into()], chain: "C".into(), key: "K".into() },
                "0e010968747470733a2f2f610143014b",
            ),
            (Message::Acks { ids: vec![1, 300] }, "0f0201fb2c01"),
            (
                Message::Lend { route: "tcp://:9000?lend".into(), listen: "127.0.0.1:9000".parse().unwrap() },
                "10107463703a2f2f3a393030303f6c656e64007f000001fb2823",
            ),
        ]
    }

    fn handover_golden() -> Vec<(Handover, &'static str)> {
        vec![
            (Handover::Start { version: 1, pid: 7 }, "000107"),
            (Handover::Listener { id: 2, addr: "127.0.0.1:80".parse().unwrap() }, "0102007f00000150"),
            (Handover::ControlSocket { owned: true }, "0201"),
            (Handover::AdminSocket, "03"),
            (
                Handover::BackendRoute { route: "tcp://:1".into(), backends: vec!["a:1".into()] },
                "04087463703a2f2f3a310103613a31",
            ),
            (
                Handover::ServiceRoute { route: "tcp://:1".into(), service: "s".into(), reserved_ms: Some(5) },
                "05087463703a2f2f3a3101730105",
            ),
            (
                Handover::Session { id: 1, name: "s".into(), pid: 2, uid: 3, draining: false, routes: vec![] },
                "0601017304030000",
            ),
            (Handover::StateEnd { next_conn_id: 9 }, "0a09"),
            (Handover::Ready, "0b"),
            (Handover::Failed { reason: "no".into() }, "0c026e6f"),
            (Handover::Done, "0d"),
            (Handover::StateFile, "0e"),
            (Handover::PinnedListener { id: 2, addr: "127.0.0.1:80".parse().unwrap() }, "0f02007f00000150"),
            (Handover::Commit, "10"),
            (
                Handover::Idle {
                    listener: "127.0.0.1:80".parse().unwrap(),
                    peer: "127.0.0.1:5000".parse().unwrap(),
                    local: "127.0.0.1:80".parse().unwrap(),
                    idle_ms: 3,
                },
                "11007f00000150007f000001fb8813007f0000015003",
            ),
            (Handover::AdminUnixSocket { owned: true }, "1201"),
            (
                Handover::OwnedServiceRoute {
                    route: "tcp://:1".into(),
                    service: "s".into(),
                    uid: 7,
                    reserved_ms: Some(5),
                },
                "13087463703a2f2f3a310173070105",
            ),
            (
                Handover::UnackedTls {
                    session: 1,
                    id: 2,
                    listener: "127.0.0.1:80".parse().unwrap(),
                    meta: meta(),
                    tls: tls(),
                },
                "140102007f000001500e687474703a2f2f3a383030302f6101007f000001fb409c0100000000000000000000000000000001fb401f00010268320106612e7465737401032f612ffb2c010106612e746573740108687474702f312e3107544c5376312e3318544c5331335f4145535f3132385f47434d5f53484132353601023001",
            ),
            (
                Handover::DeliverTls {
                    id: 2,
                    listener: "127.0.0.1:80".parse().unwrap(),
                    meta: meta(),
                    tls: tls(),
                    waited_ms: 3,
                },
                "1502007f000001500e687474703a2f2f3a383030302f6101007f000001fb409c0100000000000000000000000000000001fb401f00010268320106612e7465737401032f612ffb2c010106612e746573740108687474702f312e3107544c5376312e3318544c5331335f4145535f3132385f47434d5f5348413235360102300103",
            ),
            (Handover::TicketKeys { keys: vec![vec![1, 2]], age_ms: 4 }, "160102010204"),
            (Handover::ServiceCert { route: "r".into(), chain: "C".into(), key: "K".into() }, "1701720143014b"),
            (Handover::FileRoutes { routes: vec!["r".into()] }, "18010172"),
            (Handover::Upgrades { count: 3 }, "1903"),
            (Handover::RelayMaps { layout: 1 }, "1a01"),
            (
                Handover::RelayInKernel {
                    route: "r".into(),
                    backend: "b".into(),
                    meta: meta(),
                    client_closed: true,
                    backend_closed: false,
                    slots: 4,
                    base: (1, 300),
                },
                "1b017201620e687474703a2f2f3a383030302f6101007f000001fb409c0100000000000000000000000000000001fb401f00010268320106612e7465737401032f612ffb2c0101000401fb2c01",
            ),
        ]
    }

    #[test]
    fn handover_golden_bytes_pin_the_format() {
        for (msg, want) in handover_golden() {
            let bytes = encode(&msg).unwrap();
            assert_eq!(hex(&bytes), want, "encoding of {msg:?} changed");
            assert_eq!(decode::<Handover>(&bytes).unwrap(), msg);
        }
    }

    #[test]
    fn golden_bytes_pin_the_format() {
        for (msg, want) in golden() {
            let bytes = encode(&msg).unwrap();
            assert_eq!(hex(&bytes), want, "encoding of {msg:?} changed");
            assert_eq!(decode::<Message>(&bytes).unwrap(), msg);
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for (msg, _) in golden() {
            let bytes = encode(&msg).unwrap();
            for cut in 0..bytes.len() {
                assert!(decode::<Message>(&bytes[..cut]).is_err(), "{} cut at {cut} decoded", msg.kind());
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&Message::Bye).unwrap();
        bytes.push(0);
        assert_eq!(decode::<Message>(&bytes), Err(CodecError::Trailing { kind: "Bye", extra: 1 }));
    }

    #[test]
    fn unknown_variant_and_garbage_are_malformed() {
        assert!(matches!(decode::<Message>(&[0x7f]), Err(CodecError::Malformed(_))));
        assert!(matches!(decode::<Message>(b"GET / HTTP/1.1\r\n\r\n"), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let big = vec![0u8; MAX_MESSAGE + 1];
        assert_eq!(decode::<Message>(&big), Err(CodecError::TooLarge { len: MAX_MESSAGE + 1, max: MAX_MESSAGE }));
        let msg = Message::Register { routes: vec!["x".repeat(MAX_MESSAGE)] };
        assert!(matches!(encode(&msg), Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn a_length_prefix_claiming_more_than_the_limit_fails_cleanly() {
        // Register with a route count of 2^32: must not try to allocate.
        let bytes = [0x01, 0xfc, 0xff, 0xff, 0xff, 0xff];
        assert!(decode::<Message>(&bytes).is_err());
        // A string whose length prefix exceeds the limit.
        let bytes = [0x09, 0xfc, 0x00, 0x00, 0x10, 0x00];
        assert!(decode::<Message>(&bytes).is_err());
    }

    #[test]
    fn pseudo_random_bytes_never_panic() {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for len in 0..2000usize {
            let buf: Vec<u8> = (0..len % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode::<Message>(&buf);
            let _ = decode::<Handover>(&buf);
        }
    }
}
