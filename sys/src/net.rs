//! Socket system calls: TCP listeners, non-blocking peek/send/recv, SO_RCVLOWAT,
//! addresses, and the control socket (`SOCK_SEQPACKET`, SO_PEERCRED). Fds
//! travelling in datagrams are in [`crate::scm`].

use rustix::net::{self, AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType, sockopt};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// Backlog of every public listener; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 4096;

/// Creates a listening TCP socket. An unspecified IPv6 address listens dual-stack.
pub fn tcp_listener(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let fd = net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    if addr.is_ipv6() {
        sockopt::set_ipv6_v6only(&fd, false)?;
    }
    net::bind(&fd, &addr)?;
    net::listen(&fd, BACKLOG)?;
    Ok(fd)
}

/// Whether this host can open IPv6 sockets (for the default `[::]` listening address).
pub fn ipv6_available() -> bool {
    net::socket_with(AddressFamily::INET6, SocketType::STREAM, SocketFlags::CLOEXEC, None).is_ok()
}

/// `recv(MSG_PEEK | MSG_DONTWAIT)`: the bytes stay in the socket.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    Ok(net::recv(fd, buf, RecvFlags::PEEK | RecvFlags::DONTWAIT)?.1)
}

/// Non-blocking `recv`.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    Ok(net::recv(fd, buf, RecvFlags::DONTWAIT)?.1)
}

/// Non-blocking `send` that never raises SIGPIPE.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    Ok(net::send(fd, buf, SendFlags::DONTWAIT | SendFlags::NOSIGNAL)?)
}

/// Shuts down our sending side (FIN), keeping the receiving side to drain.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(net::shutdown(fd, net::Shutdown::Write)?)
}

/// Shuts down both directions; used on sockets only this process owns.
pub fn shutdown_both(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(net::shutdown(fd, net::Shutdown::Both)?)
}

/// Sets `SO_RCVLOWAT`: readiness (poll) fires only once this many bytes are queued.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, value)
}

/// Sets `TCP_DEFER_ACCEPT` on a listening socket: the kernel completes an
/// accept only once the client has sent data, or after about `seconds` (then
/// the connection is accepted anyway). 0 turns it off.
pub fn set_defer_accept(fd: BorrowedFd<'_>, seconds: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(seconds).unwrap_or(libc::c_int::MAX);
    set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, value)
}

/// `setsockopt` for an int-valued option.
fn set_int_option(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is a valid open socket for the borrow's lifetime; the option
    // value points to a live c_int whose size we pass exactly.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn std_addr(addr: net::SocketAddrAny) -> io::Result<SocketAddr> {
    let a = SocketAddr::try_from(addr).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not an IP socket"))?;
    // Dual-stack listeners see IPv4 clients as ::ffff:a.b.c.d; report them as IPv4.
    Ok(SocketAddr::new(a.ip().to_canonical(), a.port()))
}

/// The peer's and our own address of a connected TCP socket.
pub fn tcp_addrs(fd: BorrowedFd<'_>) -> io::Result<(SocketAddr, SocketAddr)> {
    let peer = net::getpeername(fd)?.ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
    Ok((std_addr(peer)?, std_addr(net::getsockname(fd)?)?))
}

/// Whether a connected socket's peer is on this host's loopback (or the
/// socket is a Unix one): no NIC between the two ends.
pub fn peer_is_local(fd: BorrowedFd<'_>) -> bool {
    match net::getpeername(fd) {
        Ok(Some(addr)) => match std_addr(addr) {
            Ok(SocketAddr::V4(a)) => a.ip().is_loopback(),
            Ok(SocketAddr::V6(a)) => a.ip().is_loopback() || a.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
            Err(_) => true, // not an IP address: a Unix socket
        },
        _ => false,
    }
}

/// Takes one connection from a non-blocking listening socket, if one
/// waits, with its peer's address: `None` when none does (another acceptor
/// took it, or its client reset it first). The new socket is close-on-exec,
/// and non-blocking if asked.
pub fn accept_waiting(listener: BorrowedFd<'_>, nonblocking: bool) -> io::Result<Option<(OwnedFd, SocketAddr)>> {
    let flags = if nonblocking { SocketFlags::CLOEXEC | SocketFlags::NONBLOCK } else { SocketFlags::CLOEXEC };
    match net::acceptfrom_with(listener, flags) {
        Ok((fd, Some(peer))) => Ok(Some((fd, std_addr(peer)?))),
        Ok((fd, None)) => {
            let peer = net::getpeername(&fd)?.ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
            Ok(Some((fd, std_addr(peer)?)))
        }
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The address a listening socket is bound to.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    std_addr(net::getsockname(fd)?)
}

/// Binds the control socket (`SOCK_SEQPACKET`, non-blocking) at `path` with mode 0660.
pub fn seqpacket_listener(path: &Path) -> io::Result<OwnedFd> {
    unix_listener(path, SocketType::SEQPACKET)
}

/// A listening Unix stream socket at `path` (mode 0660, like the control
/// socket), non-blocking and close-on-exec: the admin API's socket.
pub fn stream_listener(path: &Path) -> io::Result<OwnedFd> {
    unix_listener(path, SocketType::STREAM)
}

/// A listening Unix socket of `kind` at `path`, mode 0660, non-blocking, close-on-exec.
fn unix_listener(path: &Path, kind: SocketType) -> io::Result<OwnedFd> {
    let fd = net::socket_with(AddressFamily::UNIX, kind, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK, None)?;
    let addr = SocketAddrUnix::new(path)?;
    // The mode of a socket file comes from the umask at bind time. This runs at
    // start-up, before any other thread exists, so changing the umask is safe.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o117));
    let bound = net::bind(&fd, &addr);
    rustix::process::umask(old);
    bound?;
    net::listen(&fd, 128)?;
    Ok(fd)
}

/// Accepts a control connection (non-blocking, close-on-exec) and reads the
/// peer's credentials. `Ok(None)` when none is pending.
pub fn seqpacket_accept(listener: BorrowedFd<'_>) -> io::Result<Option<(OwnedFd, net::UCred)>> {
    match net::accept_with(listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
        Ok(fd) => {
            let cred = sockopt::socket_peercred(&fd)?;
            Ok(Some((fd, cred)))
        }
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Connects a `SOCK_SEQPACKET` socket (close-on-exec; non-blocking if asked)
/// to the control socket at `path`.
pub fn seqpacket_connect(path: &Path, nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = SocketFlags::CLOEXEC;
    if nonblocking {
        flags |= SocketFlags::NONBLOCK;
    }
    let fd = net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None)?;
    net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(fd)
}

/// Whether something accepts connections at a Unix socket path (a live portmux).
pub fn seqpacket_alive(path: &Path) -> bool {
    let Ok(fd) = net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None) else {
        return false;
    };
    SocketAddrUnix::new(path).is_ok_and(|a| net::connect(&fd, &a).is_ok())
}

/// Sets or clears `O_NONBLOCK` (on the open file: shared with every holder of the fd).
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    Ok(rustix::io::ioctl_fionbio(fd, on)?)
}

/// Disables Nagle's algorithm: relayed bytes go out as soon as they arrive.
pub fn set_nodelay(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(sockopt::set_tcp_nodelay(fd, true)?)
}

/// Where a backend listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Starts a non-blocking connect. Returns the socket and whether it is already
/// connected; if not, wait for POLLOUT and then check [`take_socket_error`].
pub fn connect_start(to: &Endpoint) -> io::Result<(OwnedFd, bool)> {
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let (fd, result) = match to {
        Endpoint::Tcp(addr) => {
            let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
            let fd = net::socket_with(family, SocketType::STREAM, flags, None)?;
            sockopt::set_tcp_nodelay(&fd, true)?;
            let r = net::connect(&fd, addr);
            (fd, r)
        }
        Endpoint::Unix(path) => {
            let fd = net::socket_with(AddressFamily::UNIX, SocketType::STREAM, flags, None)?;
            let r = net::connect(&fd, &SocketAddrUnix::new(path.as_path())?);
            (fd, r)
        }
    };
    match result {
        Ok(()) => Ok((fd, true)),
        Err(rustix::io::Errno::INPROGRESS) => Ok((fd, false)),
        Err(e) => Err(e.into()),
    }
}

/// The outcome of a non-blocking connect, once the socket is writable.
pub fn take_socket_error(fd: BorrowedFd<'_>) -> io::Result<()> {
    match sockopt::socket_error(fd)? {
        Ok(()) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Moves up to `len` bytes between a socket and a pipe inside the kernel, without blocking.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    use rustix::pipe::SpliceFlags;
    Ok(rustix::pipe::splice(from, None, to, None, len, SpliceFlags::MOVE | SpliceFlags::NONBLOCK)?)
}

/// A non-blocking pipe, asked to hold `size` bytes; returns (read end, write end, capacity).
pub fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd, usize)> {
    use rustix::pipe::PipeFlags;
    let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    // Past the per-user pipe-page limit the kernel refuses bigger pipes; the
    // default size still works.
    let capacity = rustix::pipe::fcntl_setpipe_size(&w, size).or_else(|_| rustix::pipe::fcntl_getpipe_size(&w))?;
    Ok((r, w, capacity))
}

/// A connected pair of `SOCK_SEQPACKET` sockets (close-on-exec, non-blocking).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK, None)?)
}

/// Sets or clears close-on-exec on `fd` (cleared only to pass it to a child).
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = if on { rustix::io::FdFlags::CLOEXEC } else { rustix::io::FdFlags::empty() };
    Ok(rustix::io::fcntl_setfd(fd, flags)?)
}

/// The supplementary groups of a Unix socket's peer, as the kernel recorded
/// them when it connected (`SO_PEERGROUPS`): no `/proc` read, no pid race.
pub fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `fd` is a valid open socket for the borrow's lifetime; the
        // buffer is `len` bytes of live, writable gid_t storage, and the kernel
        // writes at most `len` bytes and stores the size it needs in `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &raw mut len,
            )
        };
        let needed = len as usize / size_of::<libc::gid_t>();
        match rc {
            0 => {
                groups.truncate(needed);
                return Ok(groups);
            }
            _ if io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE) && needed > groups.len() => {
                groups.resize(needed, 0);
            }
            _ => return Err(io::Error::last_os_error()),
        }
    }
}

/// A pidfd for a Unix socket's peer process (`SO_PEERPIDFD`, Linux 6.5):
/// while it shows the process alive, the peer's pid names that process.
pub fn peer_pidfd(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut pidfd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a valid open socket for the borrow's lifetime; the value
    // points to a live c_int whose size we pass exactly.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERPIDFD, (&raw mut pidfd).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the kernel installed a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd) })
}

/// Whether the process of a pidfd is still running (its pidfd becomes
/// readable when it exits).
pub fn pidfd_alive(pidfd: BorrowedFd<'_>) -> bool {
    let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::IN)];
    matches!(rustix::event::poll(&mut fds, Some(&rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(0))
}

/// The kernel's unique id of a socket (`SO_COOKIE`); the in-kernel relay's key.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a valid open socket for the borrow's lifetime; the
    // kernel writes at most `len` bytes into the live u64.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut cookie).cast(), &raw mut len)
    };
    if rc == 0 { Ok(cookie) } else { Err(io::Error::last_os_error()) }
}

/// What a TCP socket has received and sent, from `TCP_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpProgress {
    /// The kernel's TCP state (`TCP_ESTABLISHED` is 1).
    pub state: u8,
    /// Bytes received in order, the peer's FIN counting as one.
    pub received: u64,
    /// Bytes the peer acknowledged.
    pub acked: u64,
}

impl TcpProgress {
    /// Whether the peer's FIN arrived (CLOSE_WAIT, LAST_ACK, CLOSING, TIME_WAIT, CLOSE).
    pub fn peer_closed(&self) -> bool {
        matches!(self.state, 6 | 7 | 8 | 9 | 11)
    }
}

/// `TCP_INFO`'s state and byte counts.
pub fn tcp_progress(fd: BorrowedFd<'_>) -> io::Result<TcpProgress> {
    // SAFETY: tcp_info is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is a valid open socket for the borrow's lifetime; the
    // kernel writes at most `len` bytes into the live struct.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &raw mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpProgress { state: info.tcpi_state, received: info.tcpi_bytes_received, acked: info.tcpi_bytes_acked })
}

fn ioctl_int(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is a valid open socket for the borrow's lifetime; SIOCINQ
    // and SIOCOUTQ write one int into the live `n`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &raw mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Bytes written to a TCP socket since it was made (sent or still queued):
/// acknowledged plus in the send queue, read until both agree (an ACK may
/// land between the two reads).
pub fn tcp_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    loop {
        let before = tcp_progress(fd)?.acked;
        let queued = ioctl_int(fd, libc::TIOCOUTQ)?;
        let after = tcp_progress(fd)?.acked;
        if before == after {
            return Ok(after + queued);
        }
    }
}

/// Bytes received and not yet read (or handed to a BPF verdict).
pub fn tcp_unread(fd: BorrowedFd<'_>) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}
