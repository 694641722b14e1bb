//! The protocol steps both flavours share: the handshake, receiving one
//! message with its fd, and what each message means to a service.

use crate::{ConnInfo, Error};
use portmux_sys::scm::{self, Wait};
use portmux_wire::{Bound, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION};
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

/// A resolved configuration: what to claim, as whom, where.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub routes: Vec<String>,
    pub name: String,
    pub control: PathBuf,
    /// How long to keep trying to reconnect after portmux goes away; `None`: forever.
    pub reconnect: Option<Duration>,
    /// The certificate (PEM chain, PEM key) for `https://` routes that name none.
    pub cert: Option<std::sync::Arc<(String, String)>>,
}

impl Config {
    /// The two messages that open a session speaking protocol `version`: Hello, then Register.
    pub fn opening(&self, version: u32) -> Result<[Vec<u8>; 2], Error> {
        let hello = Message::Hello { version, service: self.name.clone() };
        let routes = self.routes.clone();
        let register = match &self.cert {
            None => Message::Register { routes },
            Some(cert) => Message::RegisterTls { routes, chain: cert.0.clone(), key: cert.1.clone() },
        };
        let enc = |m: &Message| portmux_wire::encode(m).map_err(|e| Error::Protocol(e.to_string()));
        Ok([enc(&hello)?, enc(&register)?])
    }
}

/// What one datagram from portmux means to the service.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A connection; the caller acks it with `id` right away.
    Conn(u64, TcpStream, Box<ConnInfo>),
    /// A connection that arrived without its fd (the fd table is full:
    /// MSG_CTRUNC); the caller rejects it so portmux gives it to someone else.
    Lost(u64, String),
    Registered(Vec<Bound>),
    Refused {
        route: String,
        reason: String,
    },
    /// portmux ended the session; the text says why.
    Ended(String),
    /// portmux closed the session (it stopped, or is restarting).
    Closed,
    /// A listening socket lent to this session (a `?lend` route).
    Lent(Box<crate::lent::Loan>),
    /// A loan whose fd the kernel dropped (out of fds): the caller drains
    /// the session, so that portmux takes the port back, and reconnects.
    LendLost(String),
    /// Nothing for the caller (an unexpected but harmless message).
    Nothing,
}

/// Receives and interprets one datagram. Fds arrive close-on-exec; a
/// truncated control message (MSG_CTRUNC) is an error, never a silent loss.
/// `buf` is a reusable buffer of [`portmux_wire::MAX_MESSAGE`] bytes.
pub(crate) fn receive(sock: impl AsFd, buf: &mut [u8], wait: Wait) -> io::Result<Incoming> {
    let sock = sock.as_fd();
    let mut dg = match scm::recv_with_fds(sock, buf, wait) {
        // portmux closed the session with messages of ours unread (it refused
        // the session before reading them): the kernel says so once, before
        // what portmux sent last (its Error, saying why), which is still there.
        // Without one, the reset stands (portmux went away: try again later).
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => match scm::recv_with_fds(sock, buf, wait) {
            Ok(dg) if dg.len > 0 => dg,
            _ => return Err(e),
        },
        other => other?,
    };
    let ctrunc = dg.fds_truncated;
    if dg.len == 0 && dg.fds.is_empty() {
        return Ok(Incoming::Closed);
    }
    if dg.truncated {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "portmux sent an oversized message"));
    }
    let fds = &mut dg.fds;
    let decoded = portmux_wire::decode(&buf[..dg.len])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("portmux sent a bad message: {e}")))?;
    Ok(match decoded {
        Message::Connection { id, .. } | Message::TlsConnection { id, .. } if ctrunc || fds.len() != 1 => {
            let why = if ctrunc {
                "the connection's fd was dropped by the kernel (MSG_CTRUNC): this process is out of file \
                 descriptors (raise its RLIMIT_NOFILE); portmux gives the connection to another instance"
            } else {
                "a connection message arrived without exactly one fd"
            };
            return Ok(Incoming::Lost(id, why.into()));
        }
        Message::TlsConnection { id, meta, tls } => {
            // The plaintext end of a socketpair: reads and writes as a TCP stream does.
            let stream = TcpStream::from(fds.remove(0));
            Incoming::Conn(id, stream, Box::new(ConnInfo { id, meta, tls: Some(tls) }))
        }
        Message::Connection { id, meta } => {
            let stream = TcpStream::from(fds.remove(0));
            Incoming::Conn(id, stream, Box::new(ConnInfo { id, meta, tls: None }))
        }
        Message::Lend { .. } if ctrunc || fds.len() != 1 => Incoming::LendLost(
            "a lent listening socket arrived without its fd (MSG_CTRUNC: this process is out of file \
             descriptors; raise its RLIMIT_NOFILE)"
                .into(),
        ),
        Message::Lend { route, listen } => {
            Incoming::Lent(Box::new(crate::lent::Loan::new(fds.remove(0), route, listen)))
        }
        Message::Registered { routes } => Incoming::Registered(routes),
        Message::Refused { route, reason } => Incoming::Refused { route, reason },
        Message::Error { reason } => Incoming::Ended(reason),
        Message::Bye => Incoming::Closed,
        _ => Incoming::Nothing,
    })
}

/// After Bye: reads (and drops: portmux still holds them and routes them
/// again) whatever portmux sent, until it ends the session or `within`
/// passes. Closing with messages unread would make portmux see a reset
/// before the messages this side sent last.
pub(crate) fn read_to_end(sock: impl AsFd, buf: &mut [u8], within: Duration) {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let deadline = std::time::Instant::now() + within;
    loop {
        match scm::recv_with_fds(sock.as_fd(), buf, Wait::DontWait) {
            Ok(dg) if dg.is_eof() => return,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        let mut fds = [PollFd::new(&sock, PollFlags::IN)];
        let _ = poll(&mut fds, Some(&Timespec { tv_sec: left.as_secs() as _, tv_nsec: left.subsec_nanos() as _ }));
    }
}

/// Encodes an Ack.
pub(crate) fn ack(id: u64) -> Vec<u8> {
    portmux_wire::encode(&Message::Ack { id }).unwrap_or_default()
}

/// The most connections taken from the session socket at one wake (and acked
/// in one message).
pub(crate) const BATCH: usize = 64;

/// A connection as received: its id, the stream, what portmux said of it.
pub(crate) type Received = (u64, TcpStream, Box<ConnInfo>);

/// After a connection, takes the connections waiting behind it in the
/// session socket (up to [`BATCH`] in all) into `conns`, without blocking.
/// Returns the first other message met (for the caller to handle next: it
/// was taken from the socket), and whether the socket was left empty.
pub(crate) fn take_more(sock: impl AsFd, buf: &mut [u8], conns: &mut Vec<Received>) -> (Option<Incoming>, bool) {
    while conns.len() < BATCH {
        match receive(sock.as_fd(), buf, Wait::DontWait) {
            Ok(Incoming::Conn(id, stream, info)) => conns.push((id, stream, info)),
            Ok(other) => return (Some(other), false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (None, true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The next receive meets the same error and reports it.
            Err(_) => return (None, false),
        }
    }
    (None, false)
}

/// The acks for `conns`, received together: one Acks message where the
/// session speaks protocol version 2, else one Ack each.
pub(crate) fn acks(version: u32, conns: &[Received]) -> Vec<Vec<u8>> {
    if version >= 2 && conns.len() > 1 {
        let ids = conns.iter().map(|c| c.0).collect();
        return vec![portmux_wire::encode(&Message::Acks { ids }).unwrap_or_default()];
    }
    conns.iter().map(|c| ack(c.0)).collect()
}

/// A newly opened session: its socket, the routes as served, and the
/// connections that arrived during the handshake (already acked).
pub(crate) struct Opened<S> {
    pub sock: S,
    pub bound: Vec<Bound>,
    pub early: Vec<(TcpStream, ConnInfo)>,
    /// Listening sockets lent before the registration's answer.
    pub lent: Vec<crate::lent::Loan>,
    /// The protocol version the session speaks.
    pub version: u32,
}

/// Opens a session with `open` in protocol version [`PROTOCOL_VERSION`]
/// or, while an older portmux refuses it, in the version below, down to
/// [`MIN_PROTOCOL_VERSION`].
pub(crate) fn in_newest_version<T>(mut open: impl FnMut(u32) -> Result<T, Error>) -> Result<T, Error> {
    let mut version = PROTOCOL_VERSION;
    loop {
        match open(version) {
            Err(e) if version > MIN_PROTOCOL_VERSION && refused_version(&e, version) => version -= 1,
            opened => return opened,
        }
    }
}

/// Whether `err`, the answer to a Hello of `version`, is an older portmux
/// refusing that version: the session is opened again in the one below.
pub(crate) fn refused_version(err: &Error, version: u32) -> bool {
    let refusal = format!("protocol version {version} is not supported");
    matches!(err, Error::Ended(reason) if reason.starts_with(&refusal))
}

/// Encodes a Drain.
pub(crate) fn drain() -> Vec<u8> {
    portmux_wire::encode(&Message::Drain).unwrap_or_default()
}

/// Refuses (Reject) every connection waiting in the session socket, unread,
/// so that portmux routes them again; stops at the first other end.
pub(crate) fn reject_waiting(sock: impl AsFd, buf: &mut [u8]) {
    let sock = sock.as_fd();
    loop {
        match receive(sock, buf, Wait::DontWait) {
            Ok(Incoming::Conn(id, _, _)) | Ok(Incoming::Lost(id, _)) => {
                let _ = send(sock, &reject(id, "the service is shutting down"), Wait::Block);
            }
            Ok(Incoming::Closed | Incoming::Ended(_)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Encodes a Reject.
pub(crate) fn reject(id: u64, reason: &str) -> Vec<u8> {
    portmux_wire::encode(&Message::Reject { id, reason: reason.into() }).unwrap_or_default()
}

/// Sends one datagram; blocking or not depending on `wait`.
pub(crate) fn send(sock: impl AsFd, bytes: &[u8], wait: Wait) -> io::Result<()> {
    scm::send_datagram(sock.as_fd(), bytes, wait)
}

/// Opens a `SOCK_SEQPACKET` connection to the control socket.
/// The daemon's identity is checked from the kernel's peer credentials: it
/// must be root, this process's uid, or the uid `PORTMUX_DAEMON_UID` names.
pub(crate) fn connect(cfg: &Config, nonblocking: bool) -> Result<OwnedFd, Error> {
    let fd = portmux_sys::net::seqpacket_connect(&cfg.control, nonblocking)
        .map_err(|source| Error::Connect { path: cfg.control.clone(), source })?;
    let uid = rustix::net::sockopt::socket_peercred(&fd).map_err(io::Error::from)?.uid.as_raw();
    let ours = rustix::process::getuid().as_raw();
    let named = std::env::var(crate::DAEMON_UID_ENV).ok().and_then(|v| v.trim().parse::<u32>().ok());
    if uid != 0 && uid != ours && named != Some(uid) {
        return Err(Error::Untrusted { path: cfg.control.clone(), uid, ours });
    }
    Ok(fd)
}
