//! The numbered results of the C API, their texts, and the per-thread detail
//! of the last failure.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int};
use std::io;

/// Success.
pub const PORTMUX_OK: c_int = 0;
/// A pointer argument that must not be NULL was NULL.
pub const PORTMUX_ERR_NULL: c_int = -1;
/// The route spec is malformed or not UTF-8, or its service name is invalid.
pub const PORTMUX_ERR_SPEC: c_int = -2;
/// portmux's control socket cannot be reached: portmux is not running, or it
/// uses another control socket (set PORTMUX_CONTROL to its path).
pub const PORTMUX_ERR_NOT_RUNNING: c_int = -3;
/// portmux refused the route: another service holds it.
pub const PORTMUX_ERR_REFUSED: c_int = -4;
/// Non-blocking accept: no connection is waiting now; poll
/// portmux_listener_fd() for readability and call again.
pub const PORTMUX_ERR_WOULD_BLOCK: c_int = -5;
/// A connection arrived but this process had no free file descriptor for it
/// (the kernel dropped it: MSG_CTRUNC). It is not lost: portmux delivers it
/// again, to another instance or to this one shortly. Free fds or raise
/// RLIMIT_NOFILE.
pub const PORTMUX_ERR_FD_LIMIT: c_int = -6;
/// portmux ended the session or sent something this library cannot read
/// (a version mismatch: update libportmux).
pub const PORTMUX_ERR_PROTOCOL: c_int = -7;
/// A system call failed; portmux_last_error() says which and why.
pub const PORTMUX_ERR_IO: c_int = -8;
/// A bug inside libportmux (it was caught, nothing crossed into the caller);
/// portmux_last_error() has the detail. Please report it.
pub const PORTMUX_ERR_INTERNAL: c_int = -9;
/// The listener is shutting down (portmux_shutdown): it accepts no more connections.
pub const PORTMUX_ERR_SHUTDOWN: c_int = -10;
/// The fd is not a connection this listener handed out (or it was already
/// given back or closed through it); it was left untouched.
pub const PORTMUX_ERR_UNKNOWN_FD: c_int = -11;
/// portmux_shutdown's grace period ended with connections still open;
/// portmux_last_error() says how many. The session was ended anyway.
pub const PORTMUX_ERR_TIMEOUT: c_int = -12;
/// The control socket is served by a process of another user (neither root
/// nor this process's uid, nor the uid PORTMUX_DAEMON_UID names): not trusted.
pub const PORTMUX_ERR_UNTRUSTED: c_int = -13;
/// The buffer given is too small; the length stored says how large it must be.
pub const PORTMUX_ERR_BUFFER: c_int = -14;
/// There is no such item (a client certificate index past the last one).
pub const PORTMUX_ERR_NOT_FOUND: c_int = -15;

/// The fixed text of a result code.
pub(crate) fn describe(code: c_int) -> &'static CStr {
    match code {
        PORTMUX_OK => c"success",
        PORTMUX_ERR_NULL => c"a required pointer argument was NULL",
        PORTMUX_ERR_SPEC => c"malformed route spec (see portmux_last_error() for what is wrong in it)",
        PORTMUX_ERR_NOT_RUNNING => {
            c"cannot reach portmux's control socket: start portmux (`portmux run`), or set PORTMUX_CONTROL to the socket it uses"
        }
        PORTMUX_ERR_REFUSED => c"portmux refused the route: another service holds it (portmux_last_error() names it)",
        PORTMUX_ERR_WOULD_BLOCK => c"no connection is waiting; poll portmux_listener_fd() and try again",
        PORTMUX_ERR_FD_LIMIT => {
            c"a connection arrived but this process is out of file descriptors; portmux delivers it again (raise RLIMIT_NOFILE or close fds)"
        }
        PORTMUX_ERR_PROTOCOL => c"portmux ended the session or sent a message this library cannot read (update libportmux)",
        PORTMUX_ERR_IO => c"a system call failed (see portmux_last_error())",
        PORTMUX_ERR_INTERNAL => c"internal error in libportmux (a bug; please report it with portmux_last_error())",
        PORTMUX_ERR_SHUTDOWN => c"the listener is shutting down and accepts no more connections",
        PORTMUX_ERR_UNKNOWN_FD => {
            c"the fd is not a connection this listener handed out (or it was already given back or closed); it is untouched"
        }
        PORTMUX_ERR_TIMEOUT => {
            c"the grace period ended with connections still open (portmux_last_error() says how many); the session ended anyway"
        }
        PORTMUX_ERR_UNTRUSTED => {
            c"the control socket is served by another user's process (set PORTMUX_DAEMON_UID to trust that uid)"
        }
        PORTMUX_ERR_BUFFER => c"the buffer is too small; call again with the length stored",
        PORTMUX_ERR_NOT_FOUND => c"there is no such item (portmux_last_error() says which)",
        _ => c"unknown portmux result code",
    }
}

/// A failure: its code and the detail for `portmux_last_error()`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub code: c_int,
    pub detail: String,
}

impl Failure {
    pub fn new(code: c_int, detail: impl Into<String>) -> Failure {
        Failure { code, detail: detail.into() }
    }

    pub fn null(what: &str) -> Failure {
        Failure::new(PORTMUX_ERR_NULL, format!("{what} is NULL"))
    }
}

impl From<portmux_client::Error> for Failure {
    fn from(e: portmux_client::Error) -> Failure {
        use portmux_client::Error as E;
        let code = match &e {
            E::Spec(_) | E::NoRoute | E::Name(_) => PORTMUX_ERR_SPEC,
            E::Connect { .. } => PORTMUX_ERR_NOT_RUNNING,
            E::Refused { .. } => PORTMUX_ERR_REFUSED,
            E::Untrusted { .. } => PORTMUX_ERR_UNTRUSTED,
            E::Ended(_) | E::Protocol(_) => PORTMUX_ERR_PROTOCOL,
            E::Io(_) => PORTMUX_ERR_IO,
        };
        Failure::new(code, e.to_string())
    }
}

impl From<io::Error> for Failure {
    /// Errors from accepting: the client crate reports a refusal or an
    /// unreachable portmux (after a restart) as io::Errors of these kinds.
    fn from(e: io::Error) -> Failure {
        let code = if e.get_ref().is_some_and(|inner| inner.is::<portmux_client::FdNotReceived>()) {
            PORTMUX_ERR_FD_LIMIT
        } else if e.get_ref().is_some_and(|inner| inner.is::<portmux_client::ShuttingDown>()) {
            PORTMUX_ERR_SHUTDOWN
        } else {
            match e.kind() {
                io::ErrorKind::WouldBlock => PORTMUX_ERR_WOULD_BLOCK,
                io::ErrorKind::AddrInUse => PORTMUX_ERR_REFUSED,
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => PORTMUX_ERR_NOT_RUNNING,
                io::ErrorKind::InvalidData => PORTMUX_ERR_PROTOCOL,
                _ => PORTMUX_ERR_IO,
            }
        };
        Failure::new(code, e.to_string())
    }
}

thread_local! {
    static LAST: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `f` as this thread's last failure and returns its code.
pub(crate) fn record(f: Failure) -> c_int {
    let text = CString::new(f.detail.replace('\0', " ")).unwrap_or_default();
    LAST.with(|l| *l.borrow_mut() = text);
    f.code
}

/// This thread's last failure text; valid until the next call into
/// libportmux on this thread.
pub(crate) fn last() -> *const c_char {
    LAST.with(|l| l.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_own_text() {
        let codes = [
            PORTMUX_OK,
            PORTMUX_ERR_NULL,
            PORTMUX_ERR_SPEC,
            PORTMUX_ERR_NOT_RUNNING,
            PORTMUX_ERR_REFUSED,
            PORTMUX_ERR_WOULD_BLOCK,
            PORTMUX_ERR_FD_LIMIT,
            PORTMUX_ERR_PROTOCOL,
            PORTMUX_ERR_IO,
            PORTMUX_ERR_INTERNAL,
            PORTMUX_ERR_SHUTDOWN,
            PORTMUX_ERR_UNKNOWN_FD,
            PORTMUX_ERR_TIMEOUT,
            PORTMUX_ERR_UNTRUSTED,
        ];
        let texts: std::collections::HashSet<_> = codes.iter().map(|&c| describe(c)).collect();
        assert_eq!(texts.len(), codes.len());
        assert!(!texts.contains(describe(12345)));
    }

    #[test]
    fn errors_map_to_their_codes() {
        let lost = io::Error::other(portmux_client::FdNotReceived { id: 7, reason: "out of fds".into() });
        assert_eq!(Failure::from(lost).code, PORTMUX_ERR_FD_LIMIT);
        assert_eq!(Failure::from(io::Error::from(io::ErrorKind::WouldBlock)).code, PORTMUX_ERR_WOULD_BLOCK);
        assert_eq!(Failure::from(io::Error::other("x")).code, PORTMUX_ERR_IO);
        assert_eq!(Failure::from(io::Error::other(portmux_client::ShuttingDown)).code, PORTMUX_ERR_SHUTDOWN);
        let refused = portmux_client::Error::Refused { route: "tcp://:1".into(), reason: "held by 'a'".into() };
        let f = Failure::from(refused);
        assert_eq!(f.code, PORTMUX_ERR_REFUSED);
        assert!(f.detail.contains("held by 'a'"), "{}", f.detail);
        assert_eq!(record(Failure::new(PORTMUX_ERR_IO, "with\0nul")), PORTMUX_ERR_IO);
        LAST.with(|l| assert_eq!(l.borrow().to_str().unwrap(), "with nul"));
    }
}
