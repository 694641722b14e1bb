//! Claim portmux routes and accept the client connections portmux hands over.
//!
//! A service connects to portmux's control socket, registers route specs
//! (`http://:8000/a`, `tls://api.example.com:443`, `tcp://:5432`…), and then
//! accepts connections as if it had listened itself: each is a real
//! `TcpStream` whose first bytes are still unread, with the real peer address.
//!
//! ```no_run
//! let listener = portmux_client::Listener::bind("http://:8000/a")?;
//! loop {
//!     let (stream, info) = listener.accept()?;
//!     println!("{} for {:?}", info.peer, info.path);
//!     # drop(stream);
//! }
//! # Ok::<(), portmux_client::Error>(())
//! ```
//!
//! If portmux restarts, the listener reconnects and registers again by itself;
//! connections already accepted are untouched. With feature `tokio` there is an
//! async [`tokio::Listener`]; with feature `axum`, `axum::serve(listener, router)` works.
#![forbid(unsafe_code)]

mod exchange;
mod handle;
mod lent;
mod poller;
mod proto;
mod stream;
#[cfg(feature = "tokio")]
pub mod tokio;

pub use stream::Stream;

pub use portmux_wire::{Bound, ConnMeta, Proto, TlsInfo};

use poller::Poller;
use portmux_sys::scm::Wait;
use proto::{Config, Incoming, Opened};
use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Environment variable naming the service when the builder does not.
pub const SERVICE_ENV: &str = "PORTMUX_SERVICE";

/// Names a uid (besides root and the process's own) whose portmux the client
/// library trusts, e.g. a portmux running as its own system user.
pub const DAEMON_UID_ENV: &str = "PORTMUX_DAEMON_UID";

/// How long the opening handshake may take before portmux counts as unresponsive.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After Bye, how long to wait for portmux to end the session.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What portmux knows about a handed-over connection: its id, and the
/// [`ConnMeta`] that came with it (route, protocol, peer and local address,
/// SNI, ALPN, Host, path, bytes peeked), whose fields read through it:
/// `info.peer`, `info.sni`, `info.path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// portmux's id for this connection.
    pub id: u64,
    pub meta: ConnMeta,
    /// On an `https://` route, portmux terminated TLS: the stream carries the
    /// plaintext, and this is what the handshake settled.
    pub tls: Option<TlsInfo>,
}

impl std::ops::Deref for ConnInfo {
    type Target = ConnMeta;

    fn deref(&self) -> &ConnMeta {
        &self.meta
    }
}

/// Why a listener could not be set up or keep going.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] portmux_wire::SpecError),
    #[error("no route to claim: give at least one route spec")]
    NoRoute,
    #[error("{0}")]
    Name(String),
    #[error(
        "cannot reach portmux at {}: {source}; is it running (`portmux run`)? If it uses another control \
         socket, set PORTMUX_CONTROL to its path", path.display()
    )]
    Connect { path: PathBuf, source: io::Error },
    #[error(
        "the control socket {} is served by uid {uid}, neither root nor this process's uid {ours}: refusing \
         to trust it (another user may have put it there); if uid {uid} is the portmux you mean, set \
         {DAEMON_UID_ENV}={uid}", path.display()
    )]
    Untrusted { path: PathBuf, uid: u32, ours: u32 },
    #[error("portmux refused {route}: {reason}")]
    Refused { route: String, reason: String },
    #[error("portmux ended the session: {0}")]
    Ended(String),
    #[error("control protocol: {0}")]
    Protocol(String),
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io(e) => e,
            Error::Connect { ref source, .. } => io::Error::new(source.kind(), e.to_string()),
            Error::Refused { .. } => io::Error::new(io::ErrorKind::AddrInUse, e.to_string()),
            other => io::Error::other(other.to_string()),
        }
    }
}

impl Error {
    /// Whether trying again later may succeed (portmux not running yet).
    fn is_transient(&self) -> bool {
        matches!(self, Error::Connect { .. } | Error::Io(_))
    }
}

/// A connection portmux sent arrived without its fd: this process is out of
/// file descriptors (the kernel dropped the fd: `MSG_CTRUNC`). It is not lost:
/// the listener rejected it, so portmux gives it to another instance of the
/// service, or to this one again shortly. Returned inside an [`io::Error`]
/// (`err.get_ref()` downcasts to it).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct FdNotReceived {
    /// portmux's id of the connection.
    pub id: u64,
    pub reason: String,
}

/// Configures a [`Listener`]: the routes, the service name, the control socket.
#[derive(Debug, Clone, Default)]
pub struct Builder {
    routes: Vec<String>,
    name: Option<String>,
    control: Option<PathBuf>,
    reconnect: Option<Option<Duration>>,
    cert: Option<Arc<(String, String)>>,
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }

    /// A route spec to claim; call once per route.
    pub fn route(mut self, spec: impl Into<String>) -> Builder {
        self.routes.push(spec.into());
        self
    }

    /// The service name. Instances with the same name share routes (round
    /// robin) and take over each other's queued connections after a restart.
    /// Default: a `name=` in a spec, else `$PORTMUX_SERVICE`, else the executable's name.
    pub fn name(mut self, name: impl Into<String>) -> Builder {
        self.name = Some(name.into());
        self
    }

    /// The control socket. Default: `$PORTMUX_CONTROL`, else portmux's default path.
    pub fn control(mut self, path: impl Into<PathBuf>) -> Builder {
        self.control = Some(path.into());
        self
    }

    /// The certificate for this service's `https://` routes that name none
    /// (`cert=`): a PEM chain (leaf first) and its PEM private key. portmux
    /// terminates TLS with it and hands over the plaintext; it is sent again
    /// when the session reconnects.
    pub fn certificate(mut self, chain_pem: impl Into<String>, key_pem: impl Into<String>) -> Builder {
        self.cert = Some(Arc::new((chain_pem.into(), key_pem.into())));
        self
    }

    /// How long to keep reconnecting when portmux goes away (`None`: forever, the default).
    pub fn reconnect_timeout(mut self, limit: Option<Duration>) -> Builder {
        self.reconnect = Some(limit);
        self
    }

    /// Connects, registers, and returns a blocking listener.
    pub fn bind(self) -> Result<Listener, Error> {
        Listener::open(self.resolve()?)
    }

    /// Connects, registers, and returns an async listener.
    #[cfg(feature = "tokio")]
    pub async fn bind_async(self) -> Result<tokio::Listener, Error> {
        tokio::Listener::open(self.resolve()?).await
    }

    fn resolve(self) -> Result<Config, Error> {
        if self.routes.is_empty() {
            return Err(Error::NoRoute);
        }
        let mut spec_name = None;
        for r in &self.routes {
            let spec = portmux_wire::RouteSpec::parse(r)?;
            if spec.name.is_some() {
                spec_name = spec.name;
            }
        }
        let name = self
            .name
            .or(spec_name)
            .or_else(|| std::env::var(SERVICE_ENV).ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(executable_name);
        portmux_wire::spec::validate_service_name(&name).map_err(Error::Name)?;
        let control = self.control.unwrap_or_else(default_control);
        Ok(Config { routes: self.routes, name, control, reconnect: self.reconnect.unwrap_or(None), cert: self.cert })
    }
}

/// `$PORTMUX_CONTROL`, else portmux's default control path for this user.
pub fn default_control() -> PathBuf {
    if let Some(p) = std::env::var_os(portmux_wire::CONTROL_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    portmux_wire::default_control_path(rustix::process::getuid().as_raw(), xdg.as_deref())
}

/// This executable's file name, made into a valid service name.
fn executable_name() -> String {
    let raw = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let clean: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .take(64)
        .collect();
    if clean.is_empty() { "service".into() } else { clean }
}

/// A blocking listener for handed-over connections, like `std::net::TcpListener`.
///
/// `accept` may be called from several threads; each connection goes to one
/// caller. Event loops use [`Listener::poll_fd`] with [`Listener::try_accept`].
#[derive(Debug)]
pub struct Listener {
    cfg: Config,
    /// The current session socket (replaced on reconnect), shared with the
    /// connections handed out (they give themselves back on it).
    handle: Arc<handle::Handle>,
    bound: Mutex<Vec<Bound>>,
    /// Serialises receivers.
    receiving: Mutex<Receiving>,
    /// What `poll_fd` returns; made on its first call.
    poller: OnceLock<Poller>,
    /// Listening sockets portmux lent this session (`?lend` routes).
    loans: Mutex<Vec<Arc<lent::Loan>>>,
    /// Drain was sent: a loan that crossed it is not taken.
    drained: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Receiving {
    backlog: VecDeque<(Stream, ConnInfo)>,
    /// A message taken from the socket behind a batch of connections: next.
    pending: Option<Incoming>,
    /// The protocol version the session speaks.
    version: u32,
    buf: Vec<u8>,
    /// Set while the session is gone and `try_accept` reconnects step by step.
    lost: Option<Backoff>,
    /// Connections taken from lent sockets since the session was last read.
    streak: u32,
}

/// Reconnection attempts without blocking: when the session went, and the
/// delay before the next attempt.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    since: Instant,
    delay: Duration,
}

const FIRST_RETRY: Duration = Duration::from_millis(10);
const MAX_RETRY: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Listener {
    /// Claims one route with the defaults of [`Builder`].
    pub fn bind(spec: &str) -> Result<Listener, Error> {
        Builder::new().route(spec).bind()
    }

    fn open(cfg: Config) -> Result<Listener, Error> {
        let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
        let opened = handshake(&cfg, &mut buf)?;
        let (handle, version) = (handle::Handle::new(Arc::new(opened.sock))?, opened.version);
        let early = opened.early.into_iter().map(|(s, info)| track(&handle, s, info)).collect();
        let loans = opened.lent.into_iter().map(Arc::new).collect();
        Ok(Listener {
            cfg,
            handle,
            bound: Mutex::new(opened.bound),
            receiving: Mutex::new(Receiving { backlog: early, pending: None, version, buf, lost: None, streak: 0 }),
            poller: OnceLock::new(),
            loans: Mutex::new(loans),
            drained: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A connection waiting on a lent listening socket, if one is. An error
    /// (out of fds, say) comes back as `accept`'s, and the session is read
    /// next, so that it is not starved meanwhile.
    fn accept_lent(&self, rx: &mut Receiving) -> io::Result<Option<(Stream, ConnInfo)>> {
        let loans = lock(&self.loans).clone();
        for loan in loans {
            match loan.try_accept(false) {
                Ok(Some((stream, info))) => return Ok(Some(track(&self.handle, stream, info))),
                Ok(None) => {}
                Err(e) if lent::revoked(&e) => self.drop_loan(|l| Arc::ptr_eq(l, &loan)),
                Err(e) => {
                    rx.streak = lent::STREAK;
                    return Err(e);
                }
            }
        }
        Ok(None)
    }

    /// Takes loans (one for a route already lent replaces it), unless Drain was sent.
    fn add_loans(&self, loans: impl IntoIterator<Item = lent::Loan>) {
        for loan in loans {
            if self.drained.load(std::sync::atomic::Ordering::Acquire) {
                continue; // Closed: portmux no longer counts this session.
            }
            self.drop_loan(|l| l.route() == loan.route());
            if let Some(p) = self.poller.get() {
                let _ = p.watch_loan(&loan);
            }
            lock(&self.loans).push(Arc::new(loan));
        }
    }

    /// Closes the loans `which` picks.
    fn drop_loan(&self, which: impl Fn(&Arc<lent::Loan>) -> bool) {
        let mut loans = lock(&self.loans);
        if let Some(p) = self.poller.get() {
            loans.iter().filter(|l| which(l)).for_each(|l| p.forget(&**l));
        }
        loans.retain(|l| !which(l));
    }

    /// Closes the lent listening sockets: portmux accepts for their routes
    /// again (before a Drain or a Bye, and when the session is lost).
    fn return_loans(&self) {
        let loans = std::mem::take(&mut *lock(&self.loans));
        if let Some(p) = self.poller.get() {
            for loan in &loans {
                p.forget(&**loan);
            }
        }
    }

    /// The routes as portmux serves them, with their listening addresses.
    pub fn routes(&self) -> Vec<Bound> {
        lock(&self.bound).clone()
    }

    /// The listening address of the first route.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        lock(&self.bound).first().map(|b| b.listen).ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// The service name this listener registered as.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    fn current(&self) -> io::Result<Arc<OwnedFd>> {
        self.handle.socket().ok_or_else(shut_down)
    }

    /// Waits for the next connection. The stream is in blocking mode and its
    /// first bytes (those portmux looked at) are still unread. Once a graceful
    /// [`Listener::shutdown`] began, it fails with [`ShuttingDown`].
    pub fn accept(&self) -> io::Result<(Stream, ConnInfo)> {
        let mut rx = lock(&self.receiving);
        loop {
            if self.handle.is_closing() || self.handle.is_ended() {
                return Err(shut_down());
            }
            if let Some(next) = rx.backlog.pop_front() {
                return Ok(next);
            }
            if let Some(lost) = rx.lost {
                self.reconnect(&mut rx, lost.since)?;
                continue;
            }
            if rx.streak < lent::STREAK
                && let Some(next) = self.accept_lent(&mut rx)?
            {
                rx.streak += 1;
                return Ok(next);
            }
            rx.streak = 0;
            // Wait for a message, a lent socket's connection or a shutdown, then take the message.
            if rx.pending.is_none() && !self.wait_for_message()? {
                continue;
            }
            match self.receive_one(&mut rx, Wait::DontWait) {
                Ok(Some(next)) => return Ok(next),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the session socket is readable (`true`), or a lent
    /// socket is, or a shutdown began (`false`).
    fn wait_for_message(&self) -> io::Result<bool> {
        use rustix::event::{PollFd, PollFlags, poll};
        let sock = self.current()?;
        let loans = lock(&self.loans).clone();
        loop {
            let wake = self.handle.wake_fd();
            let mut fds = vec![PollFd::new(&*sock, PollFlags::IN), PollFd::new(&wake, PollFlags::IN)];
            fds.extend(loans.iter().map(|l| PollFd::new(&**l, PollFlags::IN)));
            match poll(&mut fds, None) {
                Ok(_) if !fds[1].revents().is_empty() => return Ok(false),
                // The session before the lent sockets: what portmux queued is
                // not starved by a busy port.
                Ok(_) => return Ok(!fds[0].revents().is_empty()),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Takes the next connection if one is there, without blocking: `Ok(None)`
    /// when there is none yet. Call it until it returns `Ok(None)`, then wait
    /// for [`Listener::poll_fd`] to be readable. While portmux is away
    /// (restarting), each call makes one reconnection attempt and the poll fd
    /// wakes the loop for the next. Receivers take turns: while another thread
    /// is inside a blocking [`Listener::accept`], this call waits for it.
    pub fn try_accept(&self) -> io::Result<Option<(Stream, ConnInfo)>> {
        let mut rx = lock(&self.receiving);
        if self.handle.is_closing() || self.handle.is_ended() {
            return Err(shut_down());
        }
        let poller = self.poller.get();
        if let Some(p) = poller {
            p.clear(); // This call does what the timer woke the loop for.
        }
        loop {
            if let Some(next) = rx.backlog.pop_front() {
                // Connections that came with a (re)registration wait here, not
                // in the socket: keep the poll fd readable while any is left.
                if let (Some(p), false) = (poller, rx.backlog.is_empty()) {
                    p.wake_after(Some(Duration::from_nanos(1)));
                }
                return Ok(Some(next));
            }
            if let Some(lost) = rx.lost {
                if let Some(p) = poller {
                    p.wake_after(None);
                }
                match handshake(&self.cfg, &mut rx.buf) {
                    Ok(opened) => {
                        self.install(&mut rx, opened)?;
                        continue;
                    }
                    Err(e)
                        if e.is_transient() && self.cfg.reconnect.is_none_or(|limit| lost.since.elapsed() < limit) =>
                    {
                        rx.lost = Some(Backoff { since: lost.since, delay: (lost.delay * 2).min(MAX_RETRY) });
                        if let Some(p) = poller {
                            p.wake_after(Some(lost.delay));
                        }
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if rx.streak < lent::STREAK
                && let Some(next) = self.accept_lent(&mut rx)?
            {
                rx.streak += 1;
                return Ok(Some(next));
            }
            rx.streak = 0;
            match self.receive_one(&mut rx, Wait::DontWait) {
                Ok(Some(next)) => {
                    // What came with it waits here, not in the socket: as above.
                    if let (Some(p), false) = (poller, rx.backlog.is_empty() && rx.pending.is_none()) {
                        p.wake_after(Some(Duration::from_nanos(1)));
                    }
                    return Ok(Some(next));
                }
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// An fd that is readable when [`Listener::try_accept`] has something to
    /// do, for `poll`/`epoll`/libuv/asyncio. It stays the same fd across
    /// reconnections and lives as long as the listener; do not close it.
    pub fn poll_fd(&self) -> io::Result<BorrowedFd<'_>> {
        if let Some(p) = self.poller.get() {
            return Ok(p.epoll.as_fd());
        }
        let rx = lock(&self.receiving);
        if self.poller.get().is_none() {
            let p = Poller::new()?;
            if rx.lost.is_none() {
                p.watch(&*self.current()?)?;
            }
            if rx.lost.is_some() || !rx.backlog.is_empty() {
                p.wake_after(Some(Duration::from_nanos(1)));
            }
            for loan in lock(&self.loans).iter() {
                p.watch_loan(&**loan)?;
            }
            let _ = self.poller.set(p);
        }
        drop(rx);
        self.poller.get().map(|p| p.epoll.as_fd()).ok_or_else(|| io::Error::other("poller vanished"))
    }

    /// Receives one message (and the connections behind a connection); `Ok(None)`
    /// when it was not a connection (the session may have ended: `rx.lost` is set).
    fn receive_one(&self, rx: &mut Receiving, wait: Wait) -> io::Result<Option<(Stream, ConnInfo)>> {
        let sock = self.current()?;
        let incoming = match rx.pending.take().map_or_else(|| proto::receive(&*sock, &mut rx.buf, wait), Ok) {
            Ok(i) => i,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Incoming::Closed,
            Err(e) => return Err(e),
        };
        match incoming {
            Incoming::Conn(id, stream, info) => {
                let mut conns = vec![(id, stream, info)];
                rx.pending = proto::take_more(&*sock, &mut rx.buf, &mut conns).0;
                // Tell portmux it can close its copies; if portmux is gone,
                // the connections are ours all the same.
                for ack in proto::acks(rx.version, &conns) {
                    let _ = proto::send(&*sock, &ack, Wait::Block);
                }
                // Blocking mode, whatever mode the last holder left the file in
                // (one an async service gave back is non-blocking); this fails
                // only for a bad fd.
                for (_, stream, info) in conns {
                    let _ = stream.set_nonblocking(false);
                    rx.backlog.push_back(track(&self.handle, stream, *info));
                }
                Ok(rx.backlog.pop_front())
            }
            Incoming::Lost(id, reason) => {
                let _ = proto::send(&*sock, &proto::reject(id, &reason), Wait::Block);
                Err(io::Error::other(FdNotReceived { id, reason }))
            }
            Incoming::Lent(loan) => {
                self.add_loans([*loan]);
                Ok(None)
            }
            lost @ (Incoming::LendLost(_) | Incoming::Closed | Incoming::Ended(_)) => {
                if let Incoming::LendLost(_) = lost {
                    // Drained, the session holds no loan: portmux accepts for
                    // the port while this listener reconnects (and is lent again).
                    let _ = proto::send(&*sock, &proto::drain(), Wait::Block);
                }
                self.return_loans();
                if let Some(p) = self.poller.get() {
                    p.forget(&*sock);
                }
                rx.lost = Some(Backoff { since: Instant::now(), delay: FIRST_RETRY });
                Ok(None)
            }
            Incoming::Registered(_) | Incoming::Refused { .. } | Incoming::Nothing => Ok(None),
        }
    }

    /// Makes a new session the current one.
    fn install(&self, rx: &mut Receiving, opened: Opened<OwnedFd>) -> io::Result<()> {
        if let Some(p) = self.poller.get() {
            p.watch(&opened.sock)?;
        }
        self.handle.set_socket(Arc::new(opened.sock));
        self.add_loans(opened.lent);
        *lock(&self.bound) = opened.bound;
        (rx.version, rx.pending) = (opened.version, None);
        rx.backlog.extend(opened.early.into_iter().map(|(s, info)| track(&self.handle, s, info)));
        rx.lost = None;
        Ok(())
    }

    /// Reconnects and registers again, with backoff, until it works, a
    /// permanent error (such as a refusal), or the reconnect timeout.
    fn reconnect(&self, rx: &mut Receiving, since: Instant) -> io::Result<()> {
        let mut delay = FIRST_RETRY;
        loop {
            match handshake(&self.cfg, &mut rx.buf) {
                Ok(opened) => return self.install(rx, opened),
                Err(e) if e.is_transient() && self.cfg.reconnect.is_none_or(|limit| since.elapsed() < limit) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(MAX_RETRY);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Asks portmux to send no new connections to this instance (before a
    /// graceful shutdown); others with the same name, or a successor, get them.
    pub fn drain(&self) -> io::Result<()> {
        self.drained.store(true, std::sync::atomic::Ordering::Release);
        self.return_loans();
        self.handle.send(&portmux_wire::Message::Drain, None)
    }

    /// Gives a connection back to portmux instead of closing it: it must sit
    /// between requests ([`Stream::between_requests`]). portmux holds
    /// it until its next request and routes that like a new connection's, to
    /// whichever instance then serves the route. Once used, only HTTP/1
    /// connections in the clear can move (not TLS, not raw TCP); an untouched
    /// one of any kind can.
    pub fn give_back(&self, stream: Stream) -> io::Result<()> {
        let t = stream.tracked();
        if !t.can_go_back() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, t.why_not()));
        }
        if t.give_back(stream.as_fd()) {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::NotConnected, "the connection could not go back to portmux"))
        }
    }

    /// Gives back a connection the caller took out of its [`Stream`] (a raw
    /// fd, as libportmux hands out), with the info it came with. The caller
    /// answers for it sitting between requests (or being untouched), and
    /// closes its copy afterwards, whether or not this succeeded.
    pub fn give_back_fd(&self, fd: BorrowedFd<'_>, info: &ConnInfo) -> io::Result<()> {
        self.handle.give_back(fd, &info.meta)
    }

    /// Connections handed out by this listener and not yet closed or given back.
    pub fn open_connections(&self) -> usize {
        self.handle.open()
    }

    /// Shuts down gracefully: portmux sends no more connections here (Drain;
    /// it queues them for the next instance, or gives them to other instances
    /// of the service), accepting stops ([`Listener::accept`] fails with
    /// [`ShuttingDown`]), connections that arrived meanwhile go back to portmux
    /// unread, and connections handed out end between requests: a read
    /// waiting for a next request returns end-of-file, and the [`Stream`],
    /// dropped, goes back to portmux for the next instance. Requests in
    /// progress finish. Returns once every connection handed out is closed or
    /// given back, or at `grace`, with how many were still open; then says Bye
    /// and closes the session.
    pub fn shutdown(&self, grace: Duration) -> io::Result<usize> {
        let deadline = Instant::now() + grace;
        self.begin_shutdown()?;
        let open = self.handle.wait_all_closed(deadline);
        self.close();
        Ok(open)
    }

    /// The first half of [`Listener::shutdown`], for callers that track their
    /// connections themselves (libportmux): Drain, no more accepts,
    /// connections that arrived meanwhile back to portmux unread, handed-out
    /// [`Stream`]s end between requests. Give-backs keep working until
    /// [`Listener::close`].
    pub fn begin_shutdown(&self) -> io::Result<()> {
        self.drained.store(true, std::sync::atomic::Ordering::Release);
        self.return_loans();
        self.handle.send(&portmux_wire::Message::Drain, None)?;
        self.handle.begin_closing();
        // Acceptors wake (the shutdown is readable to them) and let go.
        self.let_go(&mut lock(&self.receiving));
        Ok(())
    }

    /// Ends the session for good (Bye): nothing more is accepted or given
    /// back. Connections still held stay the caller's; those not yet accepted
    /// go back to portmux, which routes them again. The session is read to
    /// its end, so that everything this side sent is read too.
    pub fn close(&self) {
        self.return_loans();
        let Some(sock) = self.handle.socket() else { return };
        if let Some(p) = self.poller.get() {
            p.forget(&sock);
        }
        // Bye first: an accept waiting (it holds the receiving side) wakes
        // when portmux ends the session, and fails instead of reconnecting.
        // Give-backs after the Bye are still honoured.
        self.handle.mark_ended();
        let _ = self.handle.send(&portmux_wire::Message::Bye, None);
        let mut rx = lock(&self.receiving);
        self.let_go(&mut rx);
        proto::read_to_end(&*sock, &mut rx.buf, CLOSE_WAIT);
        self.handle.clear_socket();
    }

    /// During a shutdown begun with [`Listener::begin_shutdown`], refuses the
    /// connections portmux sent since (they raced with the Drain), so that
    /// they go to the next instance at once. Callers that wait for their
    /// connections themselves (libportmux) call it now and then;
    /// [`Listener::shutdown`] does.
    pub fn refuse_pending(&self) {
        self.reject_pending(&mut lock(&self.receiving));
    }

    /// Lets go of the connections not accepted: those already taken from the
    /// session go back untouched (GiveBack), those still in it are refused
    /// unread (Reject); portmux routes both again.
    fn let_go(&self, rx: &mut Receiving) {
        for (stream, _) in rx.backlog.drain(..) {
            stream.tracked().give_back(stream.as_fd());
        }
        self.reject_pending(rx);
    }

    /// Gives every connection still in the session socket back unread (Reject).
    fn reject_pending(&self, rx: &mut Receiving) {
        if let Some(sock) = self.handle.socket() {
            proto::reject_waiting(&*sock, &mut rx.buf);
        }
    }
}

/// The error of a listener that was shut down.
fn shut_down() -> io::Error {
    io::Error::other(ShuttingDown)
}

/// The listener is shutting down (or was shut down) gracefully: it accepts no
/// more connections. Returned inside an [`io::Error`].
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the listener is shutting down; it accepts no more connections")]
pub struct ShuttingDown;

/// A received connection, counted by the listener's handle.
fn track(handle: &Arc<handle::Handle>, stream: TcpStream, info: ConnInfo) -> (Stream, ConnInfo) {
    let tracked = handle::Tracked::new(handle.clone(), info.meta.clone());
    (Stream::new(stream, tracked), info)
}

impl Drop for Listener {
    /// Gives back what was not accepted and says Bye; during a graceful
    /// shutdown with connections still open, the last of them says it.
    fn drop(&mut self) {
        self.return_loans();
        if self.handle.socket().is_none() {
            return;
        }
        self.let_go(&mut lock(&self.receiving));
        if !self.handle.bye_when_all_closed() {
            self.handle.say_bye();
        }
    }
}

/// Opens a session (in the newest protocol version portmux speaks).
fn handshake(cfg: &Config, buf: &mut [u8]) -> Result<Opened<OwnedFd>, Error> {
    proto::in_newest_version(|version| handshake_as(cfg, buf, version))
}

/// Opens a session: Hello, Register, and waits for the answer. Connections
/// that arrive before it (queued ones, delivered at once) are acked and returned.
fn handshake_as(cfg: &Config, buf: &mut [u8], version: u32) -> Result<Opened<OwnedFd>, Error> {
    let sock = proto::connect(cfg, false)?;
    rustix::net::sockopt::set_socket_timeout(&sock, rustix::net::sockopt::Timeout::Recv, Some(HANDSHAKE_TIMEOUT))
        .map_err(io::Error::from)?;
    for msg in cfg.opening(version)? {
        proto::send(&sock, &msg, Wait::Block)?;
    }
    let (mut early, mut lent) = (Vec::new(), Vec::new());
    loop {
        match proto::receive(&sock, buf, Wait::Block) {
            Ok(Incoming::Registered(bound)) => {
                rustix::net::sockopt::set_socket_timeout(&sock, rustix::net::sockopt::Timeout::Recv, None)
                    .map_err(io::Error::from)?;
                return Ok(Opened { sock, bound, early, lent, version });
            }
            Ok(Incoming::Lent(loan)) => {
                lent.retain(|l: &lent::Loan| l.route() != loan.route());
                lent.push(*loan);
            }
            Ok(Incoming::LendLost(why)) => {
                // Drained, the session holds no loan: portmux accepts for the port.
                proto::send(&sock, &proto::drain(), Wait::Block)?;
                return Err(Error::Io(io::Error::other(why)));
            }
            Ok(Incoming::Refused { route, reason }) => return Err(Error::Refused { route, reason }),
            Ok(Incoming::Ended(reason)) => return Err(Error::Ended(reason)),
            Ok(Incoming::Closed) => return Err(Error::Ended("portmux closed the session during registration".into())),
            Ok(Incoming::Conn(id, stream, info)) => {
                proto::send(&sock, &proto::ack(id), Wait::Block)?;
                stream.set_nonblocking(false)?;
                early.push((stream, *info));
            }
            Ok(Incoming::Lost(id, why)) => proto::send(&sock, &proto::reject(id, &why), Wait::Block)?,
            Ok(Incoming::Nothing) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(Error::Protocol(format!(
                    "portmux did not answer the registration within {}s",
                    HANDSHAKE_TIMEOUT.as_secs()
                )));
            }
            Err(e) => return Err(Error::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_resolves_names_and_refuses_bad_input() {
        let cfg = Builder::new().route("http://:8000/a?name=web").control("/x").resolve().unwrap();
        assert_eq!(cfg.name, "web");
        assert_eq!(cfg.control, PathBuf::from("/x"));
        let cfg = Builder::new().route("tcp://:9000").name("db").control("/x").resolve().unwrap();
        assert_eq!(cfg.name, "db");
        assert!(matches!(Builder::new().resolve(), Err(Error::NoRoute)));
        assert!(matches!(Builder::new().route("nope").resolve(), Err(Error::Spec(_))));
        assert!(matches!(Builder::new().route("tcp://:1").name("a b").resolve(), Err(Error::Name(_))));
        let auto = Builder::new().route("tcp://:1").control("/x").resolve().unwrap();
        assert!(portmux_wire::spec::validate_service_name(&auto.name).is_ok(), "{}", auto.name);
    }

    #[test]
    fn connecting_without_portmux_says_how_to_fix_it() {
        let err = Builder::new().route("tcp://:1").control("/nonexistent/portmux.sock").bind().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/portmux.sock") && text.contains("portmux run"), "{text}");
    }
}
