//! The committed include/portmux.h is exactly what cbindgen makes of the code.
//! Regenerate it with `PORTMUX_BLESS=1 cargo test -p portmux-ffi --test header`.

use std::path::Path;

#[test]
fn committed_header_matches_the_exports() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen understands proto/ffi/src");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).unwrap();
    let path = dir.join("include/portmux.h");
    if std::env::var_os("PORTMUX_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "proto/ffi/include/portmux.h is out of date with proto/ffi/src; regenerate it with \
         `PORTMUX_BLESS=1 cargo test -p portmux-ffi --test header` and commit it.\n--- generated:\n{generated}"
    );
    for name in [
        "portmux_listen",
        "portmux_accept",
        "portmux_accept_nonblocking",
        "portmux_listener_fd",
        "portmux_listener_free",
        "portmux_drain",
        "portmux_give_back",
        "portmux_close",
        "portmux_shutdown",
        "portmux_strerror",
        "portmux_last_error",
    ] {
        assert!(generated.contains(&format!("{name}(")), "{name} is not exported");
    }
}
