//! Gives libportmux.so its soname, so programs link against the ABI version.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libportmux.so.{}", env!("CARGO_PKG_VERSION_MAJOR"));
}
