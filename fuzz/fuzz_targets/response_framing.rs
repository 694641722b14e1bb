//! The direct path's handling of backend responses (`l7::h1`): a response
//! head it rewrites always parses again, to the same status and framing;
//! a chunked body ends at the same byte whatever pieces it comes in.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portmux::l7::h1::{self, BodyLen, Chunks};

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else { return };
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut fields);
    let mut body = input;
    if let Ok(httparse::Status::Complete(n)) = resp.parse(input) {
        body = &input[n..];
        if let Ok(head) = h1::response_framing(&resp, first & 1 != 0) {
            let mut out = Vec::new();
            h1::response_head(&mut out, &resp, &head, first & 2 != 0, first & 4 != 0);
            let mut again = [httparse::EMPTY_HEADER; 80];
            let mut parsed = httparse::Response::new(&mut again);
            assert_eq!(
                parsed.parse(&out),
                Ok(httparse::Status::Complete(out.len())),
                "{:?}",
                String::from_utf8_lossy(&out)
            );
            let re = h1::response_framing(&parsed, first & 1 != 0).expect("a rewritten head is unambiguous");
            assert_eq!(re.status, head.status);
            if head.body != BodyLen::None {
                assert_eq!(re.body, head.body, "{:?}", String::from_utf8_lossy(&out));
            }
        }
    }
    // Chunks: whole or in pieces of `step`, the same end (or the same refusal).
    let whole = Chunks::default().scan(body);
    let step = usize::from(first >> 3) + 1;
    let mut chunks = Chunks::default();
    let mut pieces = Ok(None);
    for (i, piece) in body.chunks(step).enumerate() {
        match chunks.scan(piece) {
            Ok(Some(n)) => {
                pieces = Ok(Some(i * step + n));
                break;
            }
            Ok(None) => {}
            Err(e) => {
                pieces = Err(e);
                break;
            }
        }
    }
    assert_eq!(whole.is_err(), pieces.is_err());
    if let (Ok(a), Ok(b)) = (whole, pieces) {
        assert_eq!(a, b);
    }
});
