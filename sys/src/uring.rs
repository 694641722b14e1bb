//! The io_uring operations tokio-uring 0.5 lacks (accept to a bare fd, PollAdd,
//! cancel-by-fd), built as raw SQEs and submitted through its `UnsubmittedOneshot`.
//!
//! An op that is dropped in flight stays in the kernel holding its file (a
//! dropped accept even loses the connection it later accepts). So nothing here
//! is ever dropped in flight: [`race`] cancels by fd and then awaits the op.

use io_uring_06::{cqueue, opcode, squeue, types};
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use tokio_uring::{OneshotOutputTransform, UnsubmittedOneshot};

/// Turns a CQE into `io::Result<u32>` and hands the op's owned data back.
struct Completion<D>(PhantomData<D>);

impl<D> OneshotOutputTransform for Completion<D> {
    type Output = (io::Result<u32>, D);
    type StoredData = D;

    fn transform_oneshot_output(self, data: D, cqe: cqueue::Entry) -> Self::Output {
        let res = cqe.result();
        let out = if res >= 0 { Ok(res as u32) } else { Err(io::Error::from_raw_os_error(-res)) };
        (out, data)
    }
}

/// Submits `sqe` on the current tokio-uring runtime. `data` must own every
/// buffer the kernel touches; it is returned only after the CQE.
async fn submit<D: Unpin + 'static>(data: D, sqe: squeue::Entry) -> (io::Result<u32>, D) {
    UnsubmittedOneshot::new(data, Completion(PhantomData), sqe).submit().await
}

/// Where the kernel writes an accepted connection's peer address.
struct PeerBuf {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

/// Accepts one connection (close-on-exec, blocking mode, as `accept4` gives
/// it), with its peer's address (IPv4-mapped addresses as IPv4): no
/// `getpeername` afterwards.
pub async fn accept(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, Option<std::net::SocketAddr>)> {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // Boxed: the kernel writes there until the CQE, and `submit` keeps the box
    // alive (and unmoved on the heap) until then.
    let mut buf = Box::new(PeerBuf { addr: storage, len });
    let (addr, addr_len) = (&raw mut buf.addr, &raw mut buf.len);
    let sqe =
        opcode::Accept::new(types::Fd(listener.as_raw_fd()), addr.cast(), addr_len).flags(libc::SOCK_CLOEXEC).build();
    let (res, buf) = submit(buf, sqe).await;
    let fd = res? as i32;
    // SAFETY: a successful accept CQE carries a new file descriptor that nothing
    // else owns; we take ownership exactly once, here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok((fd, peer_addr(&buf)))
}

fn peer_addr(buf: &PeerBuf) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let len = buf.len as usize;
    match i32::from(buf.addr.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and the
            // kernel wrote at least that many bytes; sockaddr_storage is
            // aligned for every sockaddr type.
            let a = unsafe { &*(&raw const buf.addr).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(&raw const buf.addr).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::new(ip.to_canonical(), u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}

/// Waits until `fd` reports any of `mask` (POLLIN, POLLOUT, POLLRDHUP…; POLLHUP
/// and POLLERR always count) and returns the events that fired.
pub async fn poll(fd: BorrowedFd<'_>, mask: u32) -> io::Result<u32> {
    let sqe = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), mask).build();
    submit((), sqe).await.0
}

/// Cancels every op of this ring on `fd`; they complete with ECANCELED (or
/// with their result, if they had already finished).
pub async fn cancel_fd(fd: BorrowedFd<'_>) {
    let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd.as_raw_fd())).all()).build();
    // ENOENT (nothing to cancel) and EALREADY are both fine: the op completes by itself.
    let _ = submit((), sqe).await;
}

/// The outcome of [`race`].
#[derive(Debug)]
pub enum Raced<T> {
    /// The op finished before `stop`.
    Done(T),
    /// `stop` fired; the op was cancelled and this is what it returned anyway
    /// (ECANCELED, or a result that raced the cancel and must still be handled).
    Stopped(T),
}

/// Runs `op` (an io_uring op on `fd`) until `stop` resolves, then cancels it
/// and waits for its completion, so the op is never abandoned in the kernel.
pub async fn race<T>(fd: BorrowedFd<'_>, op: impl Future<Output = T>, stop: impl Future<Output = ()>) -> Raced<T> {
    let mut op = std::pin::pin!(op);
    tokio::select! {
        biased;
        out = &mut op => Raced::Done(out),
        () = stop => {
            cancel_fd(fd).await;
            Raced::Stopped(op.await)
        }
    }
}

/// io_uring cannot be used here: why, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("io_uring is unavailable: {why}")]
pub struct Unavailable {
    /// The cause and the fix, in words.
    pub why: String,
    /// What `io_uring_setup` returned.
    #[source]
    pub source: io::Error,
}

/// Whether io_uring can be used here; on failure the error explains why and what to do.
pub fn probe() -> Result<(), Unavailable> {
    let e = match io_uring_06::IoUring::new(4) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").ok();
    let why = match (e.raw_os_error(), disabled.as_deref().map(str::trim)) {
        (_, Some("2")) => "the sysctl kernel.io_uring_disabled is 2 (io_uring is off for everyone); set it to 0, e.g. \
                           `sysctl -w kernel.io_uring_disabled=0`"
            .to_string(),
        (_, Some("1")) => "the sysctl kernel.io_uring_disabled is 1 (only members of kernel.io_uring_group may use \
                           it); run portmux in that group or set the sysctl to 0"
            .to_string(),
        (Some(libc::EPERM), _) => "io_uring_setup was denied (EPERM), usually by a seccomp profile (Docker's default \
                                   blocks io_uring); allow io_uring_setup, io_uring_enter and io_uring_register in \
                                   the container's seccomp profile"
            .to_string(),
        (Some(libc::ENOSYS), _) => "this kernel has no io_uring (ENOSYS); portmux needs Linux 5.19 or newer built \
                                    with CONFIG_IO_URING"
            .to_string(),
        (Some(libc::ENOMEM), _) => "io_uring_setup ran out of locked memory (ENOMEM); raise RLIMIT_MEMLOCK \
                                    (LimitMEMLOCK= in the unit)"
            .to_string(),
        _ => format!("io_uring_setup failed: {e}"),
    };
    Err(Unavailable { why, source: e })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Duration;

    #[test]
    fn accept_poll_and_cancel_on_a_real_socket() {
        tokio_uring::start(async {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let client = std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                tx.send(s.local_addr().unwrap()).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                s.write_all(b"hi").unwrap();
                let mut b = [0u8; 2];
                s.read_exact(&mut b).unwrap();
                b
            });
            let (conn, peer) = accept(l.as_fd()).await.unwrap();
            assert_eq!(peer, Some(rx.recv().unwrap()), "accept reports the client's address");
            let ev = poll(conn.as_fd(), libc::POLLIN as u32).await.unwrap();
            assert_ne!(ev & libc::POLLIN as u32, 0);
            rustix::net::send(&conn, b"ok", rustix::net::SendFlags::empty()).unwrap();
            assert_eq!(&client.join().unwrap(), b"ok");

            // An accept with nobody connecting is cancelled, not abandoned.
            let stop = tokio::time::sleep(Duration::from_millis(20));
            match race(l.as_fd(), accept(l.as_fd()), stop).await {
                Raced::Stopped(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::ECANCELED)),
                other => panic!("expected a cancelled accept, got {other:?}"),
            }
        });
    }
}
