//! The handover decoder (the state an upgrade passes, and the fd store's route state).
#![no_main]
use libfuzzer_sys::fuzz_target;
use portmux_wire::{Handover, decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode::<Handover>(data) {
        let bytes = encode(&msg).expect("a decoded message encodes");
        assert_eq!(decode::<Handover>(&bytes).expect("and decodes again"), msg);
    }
});
