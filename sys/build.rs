//! Builds the in-kernel relay's BPF object (`bpf/relay.bpf.c`) with clang when
//! the `bpf` feature is on. Without clang the build goes on with an empty
//! object: portmux then relays in user space and says why at start.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/relay.bpf.c");
    println!("cargo:rerun-if-env-changed=PORTMUX_CLANG");
    if std::env::var_os("CARGO_FEATURE_BPF").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("relay.bpf.o");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps in the multiarch directory.
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let candidates: Vec<String> = match std::env::var("PORTMUX_CLANG") {
        Ok(c) => vec![c],
        Err(_) => ["clang", "clang-14", "clang-15", "clang-16", "clang-17", "clang-18", "clang-19"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let mut why = String::from("clang was not found (install Debian's clang and rebuild)");
    for clang in &candidates {
        let run = Command::new(clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .args(["-c", "bpf/relay.bpf.c", "-o"])
            .arg(&out)
            .output();
        match run {
            Ok(o) if o.status.success() => {
                println!("cargo:rustc-env=PORTMUX_BPF_MISSING=");
                return;
            }
            Ok(o) => {
                why = format!("{clang} failed: {}", String::from_utf8_lossy(&o.stderr).trim());
                println!("cargo:warning=the in-kernel relay's BPF object did not build: {why}");
                break;
            }
            Err(_) => continue,
        }
    }
    std::fs::write(&out, b"").expect("OUT_DIR is writable");
    println!("cargo:rustc-env=PORTMUX_BPF_MISSING=built without the in-kernel relay: {why}");
}
