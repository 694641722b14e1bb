//! The exported C functions: pointer checks, panic fences, and the hand-over
//! of ownership (listeners as boxes, connections as raw fds).
//!
//! Thread safety: `portmux_accept` and `portmux_accept_nonblocking` may be
//! called from several threads at once on one listener (each connection goes to
//! exactly one caller); `portmux_listener_free` must not overlap any other call
//! on the same listener. Error details are per thread.

use crate::error::{
    self, Failure, PORTMUX_ERR_BUFFER, PORTMUX_ERR_INTERNAL, PORTMUX_ERR_NOT_FOUND, PORTMUX_ERR_SPEC,
    PORTMUX_ERR_TIMEOUT, PORTMUX_ERR_UNKNOWN_FD, PORTMUX_ERR_WOULD_BLOCK, PORTMUX_OK,
};
use crate::info::{portmux_conn_info, portmux_tls_info};
use portmux_client::{ConnInfo, Stream};
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A claimed route: a session with portmux that receives the connections
/// portmux hands over, and re-registers by itself after portmux restarts.
/// Opaque; made by portmux_listen, released by portmux_listener_free.
#[derive(Debug)]
pub struct portmux_listener {
    inner: portmux_client::Listener,
    /// The connections handed out and not yet given back or closed through
    /// the listener (portmux_shutdown waits for them), with their info.
    handed: Mutex<HashMap<c_int, ConnInfo>>,
    returned: Condvar,
}

impl portmux_listener {
    fn handed(&self) -> MutexGuard<'_, HashMap<c_int, ConnInfo>> {
        self.handed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The info of `fd`, a connection this listener handed out.
    fn info(&self, fd: c_int) -> Result<ConnInfo, Failure> {
        self.handed().get(&fd).cloned().ok_or_else(|| {
            Failure::new(PORTMUX_ERR_UNKNOWN_FD, format!("fd {fd} is not a connection this listener handed out"))
        })
    }

    /// `fd` is done (given back, or to be closed): closes it and forgets it,
    /// so that portmux_shutdown stops waiting for it. Called only after a
    /// give-back was sent, so that the session's Bye cannot overtake it. The
    /// close happens under the lock: another thread's accept may reuse the
    /// number as soon as it is closed, and its entry must not be the one
    /// removed here.
    fn done(&self, fd: OwnedFd) {
        let mut handed = self.handed();
        handed.remove(&fd.as_raw_fd());
        drop(fd);
        drop(handed);
        self.returned.notify_all();
    }
}

/// Runs `f`, turning a failure into its code (with its detail kept for
/// portmux_last_error) and a panic into PORTMUX_ERR_INTERNAL.
fn fenced(f: impl FnOnce() -> Result<c_int, Failure>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(result)) => result,
        Ok(Err(failure)) if failure.code == PORTMUX_ERR_WOULD_BLOCK => failure.code,
        Ok(Err(failure)) => error::record(failure),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            error::record(Failure::new(PORTMUX_ERR_INTERNAL, format!("libportmux panicked: {what}")))
        }
    }
}

/// Gives the caller the connection: fills `info` when it is not NULL and
/// returns the fd, whose ownership passes to the caller (the listener
/// remembers it for portmux_give_back, portmux_close and portmux_shutdown).
fn deliver(l: &portmux_listener, stream: Stream, conn: ConnInfo, info: *mut portmux_conn_info) -> c_int {
    if !info.is_null() {
        // SAFETY: `info` is non-null and, per the callers' contracts, valid for
        // writing one portmux_conn_info; `write` does not read the old contents.
        unsafe { info.write(portmux_conn_info::from_info(&conn)) };
    }
    let fd = stream.into_inner().into_raw_fd();
    l.handed().insert(fd, conn);
    fd
}

/// Connects to portmux's control socket ($PORTMUX_CONTROL, else portmux's
/// default path) and claims `route_spec`, in the syntax of every portmux route
/// ("http://:8000/a", "tls://api.example.com:443", "tcp://:5432"). Options go in
/// its query string: "?name=web" names the service (instances with one name
/// share the route and take over each other's queued connections; default
/// $PORTMUX_SERVICE, else the executable's name).
///
/// On success stores a new listener in `*out` and returns PORTMUX_OK; the
/// caller owns it and releases it with portmux_listener_free. On failure
/// stores NULL in `*out` (when `out` is not NULL) and returns
/// PORTMUX_ERR_NULL, PORTMUX_ERR_SPEC, PORTMUX_ERR_NOT_RUNNING,
/// PORTMUX_ERR_REFUSED, PORTMUX_ERR_UNTRUSTED (the socket is another user's),
/// PORTMUX_ERR_PROTOCOL or PORTMUX_ERR_IO;
/// portmux_last_error() then says what was wrong and what to do.
///
/// # Safety
/// `route_spec` is NULL or a NUL-terminated string; `out` is NULL or valid for
/// writing one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_listen(route_spec: *const c_char, out: *mut *mut portmux_listener) -> c_int {
    // SAFETY: the same contract, with no certificate.
    unsafe { listen(route_spec, None, out) }
}

/// Like portmux_listen, and the `https://` routes among them that name no
/// certificate of their own (no `cert=`) are served with this one: portmux
/// terminates TLS and hands over the plaintext (portmux_conn_tls says what the
/// handshake settled). `chain_pem` is the PEM chain, leaf first; `key_pem` its
/// PEM private key. Both are copied (the caller may free them at once); they
/// are sent only over the control socket, again whenever the library
/// reconnects. Returns as portmux_listen does; a certificate portmux cannot
/// use is PORTMUX_ERR_REFUSED with the reason in portmux_last_error().
///
/// # Safety
/// As for portmux_listen; `chain_pem` and `key_pem` are NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_listen_tls(
    route_spec: *const c_char,
    chain_pem: *const c_char,
    key_pem: *const c_char,
    out: *mut *mut portmux_listener,
) -> c_int {
    // SAFETY: the caller's contract is listen's.
    unsafe { listen(route_spec, Some((chain_pem, key_pem)), out) }
}

/// portmux_listen and portmux_listen_tls: `cert`, the PEM chain and key.
///
/// # Safety
/// `route_spec` and the `cert` pointers are NULL or NUL-terminated strings;
/// `out` is NULL or valid for writing one pointer.
unsafe fn listen(
    route_spec: *const c_char,
    cert: Option<(*const c_char, *const c_char)>,
    out: *mut *mut portmux_listener,
) -> c_int {
    fenced(|| {
        if out.is_null() {
            return Err(Failure::null("out (where to store the listener)"));
        }
        // SAFETY: `out` is non-null and valid for writing a pointer (contract).
        unsafe { out.write(std::ptr::null_mut()) };
        let text = |p: *const c_char, what: &'static str| -> Result<String, Failure> {
            if p.is_null() {
                return Err(Failure::null(what));
            }
            // SAFETY: non-null and NUL-terminated (contract); copied before returning.
            let s = unsafe { CStr::from_ptr(p) };
            s.to_str()
                .map(str::to_string)
                .map_err(|_| Failure::new(PORTMUX_ERR_SPEC, format!("{what} is not valid UTF-8")))
        };
        let mut builder = portmux_client::Builder::new().route(text(route_spec, "route_spec")?);
        if let Some((chain, key)) = cert {
            builder = builder.certificate(text(chain, "chain_pem")?, text(key, "key_pem")?);
        }
        let inner = builder.bind()?;
        let handed = Mutex::new(HashMap::new());
        let listener = Box::into_raw(Box::new(portmux_listener { inner, handed, returned: Condvar::new() }));
        // SAFETY: as above.
        unsafe { out.write(listener) };
        Ok(PORTMUX_OK)
    })
}

/// Waits for the next connection portmux hands over and returns its fd
/// (>= 0): a connected TCP socket (on an https:// route, where portmux
/// terminated TLS, one end of a Unix socketpair carrying the plaintext; see
/// portmux_conn_tls) in blocking mode, close-on-exec, owned by the
/// caller (close it when done), whose first bytes (those portmux looked at)
/// are still unread. When `info` is not NULL it receives what portmux saw.
///
/// While portmux restarts, the call keeps waiting: the library reconnects and
/// registers again by itself. Signals do not end the wait (it resumes after
/// EINTR); a program that must stop on a signal polls portmux_listener_fd()
/// with its signal fd or self-pipe instead. Returns a negative code on failure:
/// PORTMUX_ERR_NULL, PORTMUX_ERR_FD_LIMIT (this process is out of fds; the
/// connection is delivered again, call again after freeing some),
/// PORTMUX_ERR_REFUSED (after a restart another service now holds the route),
/// PORTMUX_ERR_PROTOCOL or PORTMUX_ERR_IO.
///
/// # Safety
/// `listener` is NULL or a live listener from portmux_listen; `info` is NULL
/// or valid for writing one portmux_conn_info.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_accept(listener: *mut portmux_listener, info: *mut portmux_conn_info) -> c_int {
    fenced(|| {
        // SAFETY: NULL or a live listener (contract); only shared access is taken,
        // and the client's Listener is Sync.
        let l = unsafe { listener.as_ref() }.ok_or_else(|| Failure::null("listener"))?;
        let (stream, conn) = l.inner.accept()?;
        Ok(deliver(l, stream, conn, info))
    })
}

/// Like portmux_accept, but never waits for a connection: returns
/// PORTMUX_ERR_WOULD_BLOCK when none is there yet. Call it when
/// portmux_listener_fd() is readable, until it returns PORTMUX_ERR_WOULD_BLOCK.
/// While portmux is away each call makes one reconnection attempt (a local
/// connect and registration, normally well under a millisecond) and the
/// listener fd becomes readable again when the next attempt is due. Receivers
/// take turns: while another thread is inside a blocking portmux_accept on the
/// same listener, this call waits for it, so pick one style per listener.
///
/// # Safety
/// As for portmux_accept.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_accept_nonblocking(
    listener: *mut portmux_listener,
    info: *mut portmux_conn_info,
) -> c_int {
    fenced(|| {
        // SAFETY: as in portmux_accept.
        let l = unsafe { listener.as_ref() }.ok_or_else(|| Failure::null("listener"))?;
        match l.inner.try_accept()? {
            Some((stream, conn)) => Ok(deliver(l, stream, conn, info)),
            None => Err(Failure::new(PORTMUX_ERR_WOULD_BLOCK, "")),
        }
    })
}

/// An fd that becomes readable when portmux_accept_nonblocking has something
/// to do, for poll/epoll/libuv/asyncio. It is the same fd for the listener's
/// whole life (also across portmux restarts), is owned by the listener (do not
/// close it) and is closed by portmux_listener_free. Returns the fd, or
/// PORTMUX_ERR_NULL or PORTMUX_ERR_IO.
///
/// # Safety
/// `listener` is NULL or a live listener from portmux_listen.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_listener_fd(listener: *const portmux_listener) -> c_int {
    fenced(|| {
        // SAFETY: NULL or a live listener (contract); shared access only.
        let l = unsafe { listener.as_ref() }.ok_or_else(|| Failure::null("listener"))?;
        Ok(l.inner.poll_fd()?.as_raw_fd())
    })
}

/// The TLS facts of connection `fd` (one this listener handed out): returns 1
/// and fills `*out` when portmux terminated its TLS (an `https://` route),
/// 0 when it did not (`*out` untouched), or PORTMUX_ERR_NULL or
/// PORTMUX_ERR_UNKNOWN_FD.
///
/// # Safety
/// `listener` is NULL or a live listener from portmux_listen; `out` is NULL
/// or valid for writing one portmux_tls_info.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_conn_tls(
    listener: *const portmux_listener,
    fd: c_int,
    out: *mut portmux_tls_info,
) -> c_int {
    fenced(|| {
        // SAFETY: NULL or a live listener (contract); shared access only.
        let l = unsafe { listener.as_ref() }.ok_or_else(|| Failure::null("listener"))?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let Some(tls) = l.info(fd)?.tls else { return Ok(0) };
        // SAFETY: non-null and, per the contract, valid for writing one portmux_tls_info.
        unsafe { out.write(portmux_tls_info::from_tls(&tls)) };
        Ok(1)
    })
}

/// Certificate `index` (0: the client's own, then its chain) that the client
/// of connection `fd` presented, DER-encoded: its length is stored in `*len`,
/// and when `buf` is not NULL and `cap` is at least that length, the bytes
/// are copied there. Returns PORTMUX_OK; PORTMUX_ERR_BUFFER when `buf` is
/// NULL or `cap` too small (call again with `*len` bytes); PORTMUX_ERR_NULL,
/// PORTMUX_ERR_UNKNOWN_FD, or PORTMUX_ERR_NOT_FOUND when there is no such
/// certificate (see portmux_conn_tls's client_certs).
///
/// # Safety
/// `listener` is NULL or a live listener; `buf` is NULL or valid for writing
/// `cap` bytes; `len` is NULL or valid for writing one size_t.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_conn_client_cert(
    listener: *const portmux_listener,
    fd: c_int,
    index: c_uint,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> c_int {
    fenced(|| {
        // SAFETY: NULL or a live listener (contract); shared access only.
        let l = unsafe { listener.as_ref() }.ok_or_else(|| Failure::null("listener"))?;
        if len.is_null() {
            return Err(Failure::null("len"));
        }
        let info = l.info(fd)?;
        let der = info.tls.as_ref().and_then(|t| t.client_certs.get(index as usize)).ok_or_else(|| {
            Failure::new(PORTMUX_ERR_NOT_FOUND, format!("connection {fd} has no client certificate {index}"))
        })?;
        // SAFETY: non-null and valid for writing one size_t (contract).
        unsafe { len.write(der.len()) };
        if buf.is_null() || cap < der.len() {
            return Err(Failure::new(PORTMUX_ERR_BUFFER, format!("the certificate takes {} bytes", der.len())));
        }
        // SAFETY: `buf` is valid for writing `cap` >= der.len() bytes (contract),
        // and cannot overlap `der`, which this library owns.
        unsafe { std::ptr::copy_nonoverlapping(der.as_ptr(), buf, der.len()) };
        Ok(PORTMUX_OK)
    })
}

/// Ends the session (portmux keeps the route's new connections for the
/// service's next instance during its linger period) and frees the listener.
/// Connections already accepted are untouched. NULL is accepted and ignored.
///
/// # Safety
/// `listener` is NULL or a listener from portmux_listen not yet freed, with no
/// other call on it in progress or to come.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_listener_free(listener: *mut portmux_listener) {
    if listener.is_null() {
        return;
    }
    fenced(|| {
        // SAFETY: made by Box::into_raw in portmux_listen and, per the
        // contract, freed only once and used by nobody else now.
        drop(unsafe { Box::from_raw(listener) });
        Ok(PORTMUX_OK)
    });
}

/// Asks portmux to send no new connections to this listener (the route's
/// other instances, or its next one, get them). Returns PORTMUX_OK,
/// PORTMUX_ERR_NULL or PORTMUX_ERR_IO.
///
/// # Safety
/// `listener` is NULL or a live listener from portmux_listen.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_drain(listener: *mut portmux_listener) -> c_int {
    fenced(|| {
        // SAFETY: NULL or a live listener (contract); shared access only.
        let l = unsafe { listener.as_ref() }.ok_or_else(|| Failure::null("listener"))?;
        l.inner.drain()?;
        Ok(PORTMUX_OK)
    })
}

/// Gives connection `fd` back to portmux instead of closing it: portmux holds
/// it until its next request and routes that like a new connection's, to the
/// instance that then serves the route (the client never notices a restart).
/// `fd` must be a connection this listener handed out that sits between
/// requests: every request read was answered in full and nothing of the next
/// one was read (or nothing was read at all), and neither side asked to close.
/// Only plain HTTP/1 connections can go back once used; an untouched one of
/// any kind can. Ownership of `fd` passes to the library, which closes it (on
/// failure too, except PORTMUX_ERR_UNKNOWN_FD: then `fd` is untouched).
/// Returns PORTMUX_OK, PORTMUX_ERR_NULL, PORTMUX_ERR_UNKNOWN_FD or PORTMUX_ERR_IO.
///
/// # Safety
/// `listener` is NULL or a live listener from portmux_listen; `fd`, if this
/// listener handed it out, is still open and the caller's (not closed with
/// close(2)), and is not used by the caller after this call (unless it
/// returned PORTMUX_ERR_UNKNOWN_FD).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_give_back(listener: *mut portmux_listener, fd: c_int) -> c_int {
    fenced(|| {
        // SAFETY: NULL or a live listener (contract); shared access only.
        let l = unsafe { listener.as_ref() }.ok_or_else(|| Failure::null("listener"))?;
        let info = l.info(fd)?;
        // SAFETY: `fd` is in the handed-out set, so this listener handed it
        // out; the contract says it is still open and the caller's, and that
        // the caller gives up its ownership here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let sent = l.inner.give_back_fd(owned.as_fd(), &info);
        l.done(owned);
        sent?;
        Ok(PORTMUX_OK)
    })
}

/// Closes connection `fd`, which this listener handed out, and forgets it
/// (portmux_shutdown no longer waits for it). Closing it with close(2)
/// instead leaves the listener counting it: portmux_shutdown then waits out
/// its grace period, and that fd number must not be passed to
/// portmux_give_back or portmux_close afterwards. Returns PORTMUX_OK,
/// PORTMUX_ERR_NULL or PORTMUX_ERR_UNKNOWN_FD (then `fd` is untouched).
///
/// # Safety
/// As for portmux_give_back: `listener` is NULL or a live listener; `fd`, if
/// this listener handed it out, is still open and the caller's, and is not
/// used by the caller after this call (unless it returned
/// PORTMUX_ERR_UNKNOWN_FD).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_close(listener: *mut portmux_listener, fd: c_int) -> c_int {
    fenced(|| {
        // SAFETY: NULL or a live listener (contract); shared access only.
        let l = unsafe { listener.as_ref() }.ok_or_else(|| Failure::null("listener"))?;
        l.info(fd)?;
        // SAFETY: as in portmux_give_back: in the handed-out set, and by the
        // contract still open and the caller's until now.
        l.done(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(PORTMUX_OK)
    })
}

/// Shuts down gracefully: portmux sends no new connections here (they wait
/// for the next instance, or go to the route's other instances); accepts stop
/// (blocked ones return PORTMUX_ERR_SHUTDOWN); connections that arrived
/// meanwhile go back to portmux unread. Then it waits, at most `grace_ms`,
/// until every connection handed out was given back (portmux_give_back: do
/// it for each connection as soon as it sits between requests) or closed
/// (portmux_close), and ends the session. Returns PORTMUX_OK, or
/// PORTMUX_ERR_TIMEOUT if some were still open (they stay the caller's),
/// PORTMUX_ERR_NULL or PORTMUX_ERR_IO. Free the listener afterwards.
///
/// # Safety
/// `listener` is NULL or a live listener from portmux_listen.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn portmux_shutdown(listener: *mut portmux_listener, grace_ms: c_uint) -> c_int {
    fenced(|| {
        // SAFETY: NULL or a live listener (contract); shared access only.
        let l = unsafe { listener.as_ref() }.ok_or_else(|| Failure::null("listener"))?;
        let deadline = Instant::now() + Duration::from_millis(grace_ms.into());
        l.inner.begin_shutdown()?;
        let mut handed = l.handed();
        while !handed.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // In slices: connections that raced with the Drain are refused
            // meanwhile, so that they reach the next instance at once.
            let slice = left.min(Duration::from_millis(50));
            handed = l.returned.wait_timeout(handed, slice).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
            drop(handed);
            l.inner.refuse_pending();
            handed = l.handed();
        }
        let open = handed.len();
        drop(handed);
        l.inner.close();
        if open > 0 {
            return Err(Failure::new(PORTMUX_ERR_TIMEOUT, format!("{open} connections were still open")));
        }
        Ok(PORTMUX_OK)
    })
}

/// The fixed English text of a result code ("unknown portmux result code" for
/// a number that is none). The string is static: do not free it.
#[unsafe(no_mangle)]
pub extern "C" fn portmux_strerror(code: c_int) -> *const c_char {
    error::describe(code).as_ptr()
}

/// What the last failing call on this thread said: what was wrong and what
/// to do ("portmux refused http://:8000/a: held by service 'web'"). Empty if
/// none failed yet. Owned by the library; valid until the next libportmux call
/// on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn portmux_last_error() -> *const c_char {
    error::last()
}
