//! systemd integration, spoken directly (no libsystemd): readiness, reload and
//! status notifications on `$NOTIFY_SOCKET`; sockets passed by socket
//! activation or from the fd store (`LISTEN_FDS`, `LISTEN_FDNAMES`); storing
//! on-demand listeners, the control socket and the route state in the fd
//! store, so that after a crash and a restart nothing the kernel queued is lost.

use portmux_sys::net;
use portmux_wire::Handover;
use rustix::net::{SocketAddrUnix, SocketType};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

/// Name under which the route state is kept in the fd store.
pub const STATE_NAME: &str = "state";
/// Name under which portmux keeps a control socket it bound itself in the fd
/// store (one from a socket unit may have any name).
pub const STORED_CONTROL_NAME: &str = "control-stored";

/// Whether portmux runs under a service manager that listens for notifications.
pub fn managed() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn notify_addr() -> Option<Result<SocketAddrUnix, io::Error>> {
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    let bytes = path.as_encoded_bytes();
    Some(match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddrUnix::new_abstract_name(name).map_err(io::Error::from),
        None => SocketAddrUnix::new(std::path::Path::new(&path)).map_err(io::Error::from),
    })
}

/// Sends `lines` (and `fds`) to the service manager. False if none listens.
fn send(lines: &str, fds: &[BorrowedFd<'_>]) -> bool {
    let Some(Ok(addr)) = notify_addr() else { return false };
    let Ok(sock) = UnixDatagram::unbound() else { return false };
    portmux_sys::scm::send_to_with_fds(sock.as_fd(), &addr, lines.as_bytes(), fds).is_ok()
}

/// Sends `lines` to systemd, if portmux runs under it. Returns whether it was sent.
pub fn notify(lines: &[&str]) -> bool {
    send(&lines.join("\n"), &[])
}

/// Tells systemd a reload (upgrade) began, as `Type=notify-reload` expects.
pub fn reloading() {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
    notify(&["RELOADING=1", &format!("MONOTONIC_USEC={usec}"), "STATUS=upgrading"]);
}

/// Keeps `fd` in the fd store under `name` (FDNAME allows no colons).
pub fn store(fd: BorrowedFd<'_>, name: &str) -> bool {
    send(&format!("FDSTORE=1\nFDNAME={name}"), &[fd])
}

/// Removes the fds stored under `name`.
pub fn unstore(name: &str) -> bool {
    send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[])
}

/// The fd-store name of an on-demand listener.
pub fn listener_name(addr: SocketAddr) -> String {
    let ip = addr.ip().to_string().replace(':', "_");
    format!("tcp-{ip}-{}", addr.port())
}

/// Sockets and state handed to this process by systemd.
#[derive(Debug, Default)]
pub struct Inherited {
    pub control: Option<OwnedFd>,
    /// The control socket came back from the fd store (portmux bound it once):
    /// on a clean stop portmux removes its path; a socket unit's it leaves.
    pub control_stored: bool,
    /// Listening TCP sockets; `pinned` for socket-activated ones (systemd owns
    /// them: they never close when idle), not for those back from the fd store.
    pub listeners: Vec<(OwnedFd, SocketAddr, bool)>,
    /// The route state kept in the fd store (a memfd).
    pub state: Option<OwnedFd>,
    /// The admin API's Unix socket, from a socket unit (`FileDescriptorName=admin`).
    pub admin: Option<OwnedFd>,
}

/// The name a socket unit gives the admin API's Unix socket (a Unix stream
/// socket is taken as it whatever its name).
pub const ADMIN_NAME: &str = "admin";

/// Why the fds systemd passed cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("the fds systemd passed (LISTEN_FDS) cannot be taken: {0}")]
    ListenFds(#[source] io::Error),
    #[error("the socket systemd passed as '{name}' has no address: {source}")]
    Address {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Takes the fds systemd passed (`LISTEN_PID` must be this process).
pub fn inherited() -> Result<Inherited, SystemdError> {
    let mut out = Inherited::default();
    for passed in portmux_sys::inherit::listen_fds().map_err(SystemdError::ListenFds)? {
        let (fd, name) = (passed.fd, passed.name.as_str());
        if name == STATE_NAME {
            out.state = Some(fd);
            continue;
        }
        let unix_stream = rustix::net::sockopt::socket_type(&fd).is_ok_and(|t| t == SocketType::STREAM)
            && rustix::net::sockopt::socket_domain(&fd).is_ok_and(|d| d == rustix::net::AddressFamily::UNIX);
        if name == ADMIN_NAME || unix_stream {
            tracing::info!(name, "adopted the admin socket from systemd");
            out.admin = Some(fd);
            continue;
        }
        match rustix::net::sockopt::socket_type(&fd) {
            Ok(SocketType::SEQPACKET) => {
                out.control_stored = name == STORED_CONTROL_NAME;
                tracing::info!(name, "adopted the control socket from systemd");
                out.control = Some(fd);
            }
            Ok(SocketType::STREAM) => {
                let addr = net::local_addr(fd.as_fd())
                    .map_err(|source| SystemdError::Address { name: name.to_string(), source })?;
                let pinned = !name.starts_with("tcp-");
                tracing::info!(%addr, name, pinned, "adopted a listening socket from systemd");
                out.listeners.push((fd, addr, pinned));
            }
            _ => tracing::warn!(name, "ignoring a passed fd that is neither a control nor a TCP listening socket"),
        }
    }
    Ok(out)
}

/// The route state in a file that survives the process: written whole on
/// each change, read back after a restart.
#[derive(Debug)]
pub struct StateFile {
    fd: OwnedFd,
    last: Vec<u8>,
}

const STATE_MAGIC: &[u8] = b"portmux-state-1\n";

impl StateFile {
    /// A new in-memory file, stored in the fd store.
    pub fn create() -> io::Result<StateFile> {
        let fd = rustix::fs::memfd_create("portmux-state", rustix::fs::MemfdFlags::CLOEXEC)?;
        if !store(fd.as_fd(), STATE_NAME) {
            return Err(io::Error::other("the service manager did not take the state file"));
        }
        Ok(StateFile { fd, last: Vec::new() })
    }

    pub fn adopt(fd: OwnedFd) -> StateFile {
        StateFile { fd, last: Vec::new() }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Replaces the contents with `routes` (only if they changed).
    pub fn write(&mut self, routes: &[Handover]) -> io::Result<()> {
        let mut bytes = STATE_MAGIC.to_vec();
        for r in routes {
            let m = portmux_wire::encode(r).map_err(io::Error::other)?;
            bytes.extend_from_slice(&(m.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&m);
        }
        if bytes == self.last {
            return Ok(());
        }
        rustix::fs::ftruncate(&self.fd, 0)?;
        let mut off = 0;
        while off < bytes.len() {
            off += rustix::io::pwrite(&self.fd, &bytes[off..], off as u64)?;
        }
        self.last = bytes;
        Ok(())
    }

    /// The routes written last (by this process or one before it).
    pub fn read(&self) -> io::Result<Vec<Handover>> {
        let len = rustix::fs::fstat(&self.fd)?.st_size as usize;
        let mut bytes = vec![0u8; len];
        let mut off = 0;
        while off < len {
            let n = rustix::io::pread(&self.fd, &mut bytes[off..], off as u64)?;
            if n == 0 {
                break;
            }
            off += n;
        }
        let Some(mut rest) = bytes.strip_prefix(STATE_MAGIC) else {
            return Ok(Vec::new()); // Empty, or another format: start afresh.
        };
        let mut routes = Vec::new();
        while rest.len() >= 4 {
            let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(m) = rest.get(4..4 + n) else { break };
            routes.push(portmux_wire::decode(m).map_err(io::Error::other)?);
            rest = &rest[4 + n..];
        }
        Ok(routes)
    }
}

/// Updates the status line systemd shows for the service.
pub fn status(text: &str) {
    notify(&[&format!("STATUS={text}")]);
}
