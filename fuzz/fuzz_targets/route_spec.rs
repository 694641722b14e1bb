//! The route-spec parser (CLI, admin API, services' Register).
#![no_main]
use libfuzzer_sys::fuzz_target;
use portmux_wire::RouteSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(spec) = RouteSpec::parse(text) {
        // The canonical form parses to the same route.
        let again = RouteSpec::parse(&spec.to_string()).expect("the canonical form parses");
        assert_eq!(again, spec, "{text:?} -> {spec}");
        assert_eq!(again.key(), spec.key());
    }
});
