//! The portmux control protocol: messages, their codec, and the route-spec syntax.
//!
//! This crate does no I/O. The daemon, the Rust client and the C helper all
//! depend on it, so a route spec means the same thing everywhere and the
//! bytes on the control socket are defined in exactly one place.
#![forbid(unsafe_code)]

mod codec;
mod message;
pub mod spec;

pub use codec::{CodecError, MAX_MESSAGE, Wire, decode, encode};
pub use message::{
    Bound, ConnMeta, HANDOVER_VERSION, Handover, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, Proto, TlsInfo,
    UNKNOWN_OWNER,
};
pub use spec::{HostPattern, RouteSpec, Scheme, SpecError};

use std::path::{Path, PathBuf};

/// Environment variable that overrides the control socket path for the daemon and its clients.
pub const CONTROL_ENV: &str = "PORTMUX_CONTROL";

/// Where the control socket lives when neither `--control` nor `PORTMUX_CONTROL` says:
/// `/run/portmux/control.sock` for root, `$XDG_RUNTIME_DIR/portmux/control.sock` for
/// other users, and `/tmp/portmux-UID/control.sock` when `XDG_RUNTIME_DIR` is unset.
pub fn default_control_path(uid: u32, xdg_runtime_dir: Option<&Path>) -> PathBuf {
    if uid == 0 {
        return PathBuf::from("/run/portmux/control.sock");
    }
    match xdg_runtime_dir {
        Some(dir) if dir.is_absolute() => dir.join("portmux/control.sock"),
        _ => PathBuf::from(format!("/tmp/portmux-{uid}/control.sock")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_control_path_depends_on_user() {
        assert_eq!(default_control_path(0, None), Path::new("/run/portmux/control.sock"));
        assert_eq!(
            default_control_path(1000, Some(Path::new("/run/user/1000"))),
            Path::new("/run/user/1000/portmux/control.sock")
        );
        assert_eq!(default_control_path(1000, None), Path::new("/tmp/portmux-1000/control.sock"));
        // A relative XDG_RUNTIME_DIR is invalid per the XDG spec and ignored.
        assert_eq!(default_control_path(1000, Some(Path::new("run"))), Path::new("/tmp/portmux-1000/control.sock"));
    }
}
