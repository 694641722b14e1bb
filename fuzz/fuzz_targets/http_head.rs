//! The HTTP/1 request-head classifier (Host, path; smuggling checks).
#![no_main]
use libfuzzer_sys::fuzz_target;
use portmux::classify::http;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = http::parse(data) {
        // What routing sees is normalised: a target, a lower-case host without a trailing dot.
        assert!(!head.target.is_empty());
        if let Some(host) = &head.host {
            assert!(host.to_ascii_lowercase() == *host && !host.ends_with('.'), "{host:?}");
        }
        // The head is complete: bytes after it (a body, the next request) change nothing.
        let mut more = data.to_vec();
        more.extend_from_slice(b"GET /x HTTP/1.1\r\n");
        assert_eq!(http::parse(&more).ok().map(|h| (h.host, h.target)), Some((head.host, head.target)));
    }
});
