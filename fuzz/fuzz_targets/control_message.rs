//! The control-message decoder (datagrams from services).
#![no_main]
use libfuzzer_sys::fuzz_target;
use portmux_wire::{Message, decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode::<Message>(data) {
        // What decodes encodes back to something that decodes the same.
        let bytes = encode(&msg).expect("a decoded message encodes");
        assert_eq!(decode::<Message>(&bytes).expect("and decodes again"), msg);
    }
});
