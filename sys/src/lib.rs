//! The only `unsafe` code of portmux, shared by the daemon, the client
//! library, libportmux and the tests: socket calls the safe wrappers lack,
//! SCM_RIGHTS in both directions, adopting inherited fds, custom io_uring ops.
//!
//! Every `unsafe` block carries a `// SAFETY:` comment; a function whose
//! safety depends on its caller is an `unsafe fn` with a `# Safety` section.
#![allow(unsafe_code)]

pub mod inherit;
pub mod net;
#[cfg(feature = "tokio")]
pub mod reactor;
pub mod scm;
#[cfg(feature = "bpf")]
pub mod sockmap;
#[cfg(feature = "uring")]
pub mod uring;

/// Returns to the system at once what this thread freed (and mimalloc's
/// wholly free memory), which mimalloc would otherwise keep until the thread
/// allocates again: for start-up, once its large parsing is done (its main
/// thread hardly allocates after). Only meaningful where mimalloc is the
/// global allocator.
#[cfg(feature = "mimalloc")]
pub fn release_freed_memory() {
    // SAFETY: mi_collect takes no pointer and only returns memory mimalloc
    // holds free (it does nothing if mimalloc was never used).
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Raises the soft limit on open files to the hard limit, as a proxy that
/// holds two fds per relayed connection must (systemd starts services with a
/// soft limit of 1024 and a hard limit of 524288). Returns (before, after).
pub fn raise_nofile_limit() -> std::io::Result<(u64, u64)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let before = limit.current.unwrap_or(u64::MAX);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok((before, limit.current.unwrap_or(u64::MAX)))
}
