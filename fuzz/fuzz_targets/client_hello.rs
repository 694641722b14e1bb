//! The TLS ClientHello parser (SNI, ALPN) on whatever a client sends first.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portmux::classify::{ParseError, tls};

fuzz_target!(|data: &[u8]| {
    match tls::parse(data) {
        Ok(hello) => {
            // A name it reports is one the matcher can use: normalised, no port or dot at the end.
            if let Some(sni) = &hello.sni {
                assert!(!sni.is_empty() && !sni.ends_with('.') && sni.to_ascii_lowercase() == *sni, "{sni:?}");
            }
            // Every prefix of a complete hello is incomplete or the same hello, never a panic.
            for cut in [data.len() / 2, data.len().saturating_sub(1)] {
                let _ = tls::parse(&data[..cut]);
            }
        }
        Err(ParseError::Incomplete | ParseError::Invalid(_)) => {}
    }
});
