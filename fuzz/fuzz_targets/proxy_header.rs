//! The PROXY protocol v1/v2 parser (headers from load balancers in front).
#![no_main]
use libfuzzer_sys::fuzz_target;
use portmux::forward::{backend::ProxyVersion, proxy};

fuzz_target!(|data: &[u8]| {
    if let Ok(received) = proxy::parse(data) {
        // It consumes only what it read, and no more than the header's limit.
        assert!(received.len <= data.len() && received.len <= 4096, "{}", received.len);
        // Re-encoding the addresses it found parses to the same addresses.
        if let Some((client, local)) = received.addresses {
            for v in [ProxyVersion::V1, ProxyVersion::V2] {
                if client.is_ipv4() != local.is_ipv4() {
                    continue;
                }
                let again = proxy::parse(&proxy::header(v, client, local)).expect("our header parses");
                assert_eq!(again.addresses, Some((client, local)));
            }
        }
    }
});
