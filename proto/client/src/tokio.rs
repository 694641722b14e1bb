//! The async flavour: the same listener on tokio, and (feature `axum`) axum's
//! `serve::Listener`, so `axum::serve(listener, router)` works, graceful
//! shutdown included.

use crate::handle::{Handle, ReadWaker, Tracked};
use crate::lent::Loan;
use crate::proto::{self, Config, Incoming, Opened};
use crate::{ConnInfo, Error, ShuttingDown};
use portmux_sys::scm::Wait;
use portmux_wire::{Bound, Message};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// An async listener for handed-over connections, like `tokio::net::TcpListener`.
#[derive(Debug)]
pub struct Listener {
    cfg: Config,
    /// The control session: a connected `SOCK_SEQPACKET` socket. Tokio only
    /// watches its readiness; every read and write here is our own
    /// `recvmsg`/`send`.
    sock: AsyncFd<OwnedFd>,
    /// Shared with the connections handed out: a copy of the session socket
    /// to give them back on, their count, the shutdown switch.
    handle: Arc<Handle>,
    bound: Vec<Bound>,
    backlog: VecDeque<(std::net::TcpStream, ConnInfo)>,
    /// A message taken from the socket behind a batch of connections: next.
    pending: Option<Incoming>,
    /// The protocol version the session speaks.
    version: u32,
    buf: Vec<u8>,
    /// Listening sockets portmux lent this session (`?lend` routes).
    lent: Vec<Loan<AsyncFd<OwnedFd>>>,
    /// Connections taken from them since the session was last looked at.
    streak: u32,
    /// Drain was sent: a loan that crossed it is not taken.
    drained: bool,
}

impl Listener {
    /// Claims one route with the defaults of [`crate::Builder`].
    pub async fn bind(spec: &str) -> Result<Listener, Error> {
        crate::Builder::new().route(spec).bind_async().await
    }

    pub(crate) async fn open(cfg: Config) -> Result<Listener, Error> {
        let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
        let opened = handshake(&cfg, &mut buf).await?;
        let handle = Handle::new(Arc::new(opened.sock.as_fd().try_clone_to_owned()?))?;
        let (sock, bound, backlog, version) = (opened.sock, opened.bound, opened.early.into(), opened.version);
        let lent = opened.lent.into_iter().map(register).collect::<io::Result<_>>()?;
        Ok(Listener { cfg, sock, handle, bound, backlog, pending: None, version, buf, lent, streak: 0, drained: false })
    }

    /// The routes as portmux serves them, with their listening addresses.
    pub fn routes(&self) -> &[Bound] {
        &self.bound
    }

    /// The service name this listener registered as.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The listening address of the first route.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.bound.first().map(|b| b.listen).ok_or_else(|| io::ErrorKind::NotConnected.into())
    }

    /// Waits for the next connection; reconnects by itself if portmux
    /// restarts. Once a graceful shutdown began, fails with [`ShuttingDown`].
    pub async fn accept(&mut self) -> io::Result<(Stream, ConnInfo)> {
        loop {
            if self.handle.is_closing() {
                self.let_go();
                return Err(io::Error::other(ShuttingDown));
            }
            if let Some((stream, info)) = self.backlog.pop_front() {
                stream.set_nonblocking(true)?;
                return Ok(self.track(TcpStream::from_std(stream)?, info));
            }
            let Some(incoming) = self.pending.take() else {
                // What waits on a lent socket is taken at once (but the session
                // is looked at every few), then whichever comes first, the session
                // before the sockets.
                let mut i = 0;
                while let (true, Some(loan)) = (self.streak < crate::lent::STREAK, self.lent.get(i)) {
                    match loan.try_accept(true) {
                        Ok(Some((stream, info))) => {
                            self.streak += 1;
                            return Ok(self.track(TcpStream::from_std(stream)?, info));
                        }
                        Ok(None) => i += 1,
                        // Shut down by portmux: the loan is over.
                        Err(e) if crate::lent::revoked(&e) => drop(self.lent.remove(i)),
                        Err(e) => {
                            self.streak = crate::lent::STREAK; // The session next: not starved meanwhile.
                            return Err(e);
                        }
                    }
                }
                self.streak = 0;
                let woken = tokio::select! {
                    biased;
                    r = receive(&self.sock, &self.handle, &mut self.buf, &mut self.pending) => Err(r),
                    r = wait_lent(&self.lent) => Ok(r),
                };
                let conns = match woken {
                    Ok(accepted) => match accepted? {
                        Some((stream, info)) => return Ok(self.track(TcpStream::from_std(stream)?, info)),
                        None => continue, // Dropped on the next turn.
                    },
                    Err(received) => received,
                };
                let Some(conns) = conns? else { continue }; // A shutdown began.
                // One ack for the lot; if portmux is gone, they are ours all the same.
                for ack in proto::acks(self.version, &conns) {
                    let _ = send(&self.sock, &ack).await;
                }
                self.backlog.extend(conns.into_iter().map(|(_, stream, info)| (stream, *info)));
                continue;
            };
            match incoming {
                Incoming::Conn(id, stream, info) => {
                    let _ = send(&self.sock, &proto::ack(id)).await;
                    self.backlog.push_back((stream, *info));
                }
                Incoming::Lost(id, why) => {
                    let _ = send(&self.sock, &proto::reject(id, &why)).await;
                    return Err(io::Error::other(crate::FdNotReceived { id, reason: why }));
                }
                Incoming::Lent(loan) => self.take_loan(*loan)?,
                lost @ (Incoming::LendLost(_) | Incoming::Closed | Incoming::Ended(_)) => {
                    if let Incoming::LendLost(_) = lost {
                        // Drained, the session holds no loan: portmux accepts
                        // for the port while this listener reconnects.
                        let _ = send(&self.sock, &proto::drain()).await;
                    }
                    self.lent.clear(); // portmux takes the ports back.
                    self.reconnect().await?
                }
                Incoming::Registered(_) | Incoming::Refused { .. } | Incoming::Nothing => {}
            }
        }
    }

    async fn reconnect(&mut self) -> io::Result<()> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(10);
        loop {
            match handshake(&self.cfg, &mut self.buf).await {
                Ok(opened) => {
                    self.handle.set_socket(Arc::new(opened.sock.as_fd().try_clone_to_owned()?));
                    self.sock = opened.sock;
                    self.bound = opened.bound;
                    (self.version, self.pending) = (opened.version, None);
                    self.backlog.extend(opened.early);
                    for loan in opened.lent {
                        self.take_loan(loan)?;
                    }
                    return Ok(());
                }
                Err(e) if e.is_transient() && self.cfg.reconnect.is_none_or(|limit| started.elapsed() < limit) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Takes a loan (one for a route already lent replaces it), unless Drain was sent.
    fn take_loan(&mut self, loan: Loan) -> io::Result<()> {
        if !self.drained {
            self.lent.retain(|l| l.route() != loan.route());
            self.lent.push(register(loan)?);
        }
        Ok(())
    }

    /// Asks portmux to send no new connections to this instance (a lent
    /// listening socket goes back first).
    pub async fn drain(&mut self) -> io::Result<()> {
        self.drained = true;
        self.lent.clear();
        send(&self.sock, &proto::drain()).await
    }

    fn track(&self, stream: TcpStream, info: ConnInfo) -> (Stream, ConnInfo) {
        let tracked = Tracked::new(self.handle.clone(), info.meta.clone());
        let reader = Arc::new(ReadWaker::default());
        self.handle.register_reader(&reader);
        (Stream { inner: stream, tracked, reader }, info)
    }

    /// A handle to begin this listener's graceful shutdown from elsewhere,
    /// for frameworks that own the listener: `axum::serve(listener,
    /// app).with_graceful_shutdown(listener.graceful().after(signal))`.
    pub fn graceful(&self) -> Graceful {
        Graceful { handle: self.handle.clone(), grace: Graceful::GRACE }
    }

    /// Gives a connection back to portmux instead of closing it (see
    /// [`crate::Listener::give_back`]).
    pub fn give_back(&self, stream: Stream) -> io::Result<()> {
        if !stream.tracked.can_go_back() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, stream.tracked.why_not()));
        }
        if stream.tracked.give_back(stream.inner.as_fd()) {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::NotConnected, "the connection could not go back to portmux"))
        }
    }

    /// Connections handed out by this listener and not yet closed or given back.
    pub fn open_connections(&self) -> usize {
        self.handle.open()
    }

    /// Shuts down gracefully (as [`crate::Listener::shutdown`] does): Drain,
    /// no more accepts, connections that arrived meanwhile back to portmux
    /// unread, handed-out connections end between requests and go back; waits
    /// until they are all closed or given back, or `grace`, and returns how
    /// many were still open; then says Bye.
    pub async fn shutdown(mut self, grace: Duration) -> io::Result<usize> {
        let deadline = Instant::now() + grace;
        self.drain().await?;
        self.handle.begin_closing();
        self.let_go();
        let open = self.handle.wait_closed_async(deadline, true).await;
        self.handle.say_bye();
        Ok(open)
    }

    /// Lets go of the connections not accepted: those already taken from
    /// the session go back untouched (GiveBack), those still in it are
    /// refused unread (Reject); portmux routes both again.
    fn let_go(&mut self) {
        self.drained = true;
        self.lent.clear();
        for (stream, info) in self.backlog.drain(..) {
            let _ = self.handle.give_back(stream.as_fd(), &info.meta);
        }
        self.reject_pending();
    }

    /// Gives every connection still in the session socket back unread (Reject).
    fn reject_pending(&mut self) {
        proto::reject_waiting(self.sock.as_fd(), &mut self.buf);
    }
}

impl Drop for Listener {
    /// Gives back what was not accepted and says Bye; during a graceful
    /// shutdown with connections still open (axum drops the listener, then
    /// waits for them), the last of them says it.
    fn drop(&mut self) {
        if self.handle.socket().is_none() {
            return;
        }
        self.let_go();
        if !self.handle.bye_when_all_closed() {
            self.handle.say_bye();
        }
    }
}

/// Begins a listener's graceful shutdown from elsewhere (see
/// [`Listener::graceful`]): Drain, and every connection handed out ends
/// between requests, going back to portmux for the next instance. Whoever owns
/// the listener stops accepting; dropping it says Bye.
#[derive(Debug, Clone)]
pub struct Graceful {
    handle: Arc<Handle>,
    grace: Duration,
}

impl Graceful {
    /// How long [`Graceful::after`] waits for connections by default.
    pub const GRACE: Duration = Duration::from_secs(30);

    /// Sets how long [`Graceful::after`] waits for the connections that can
    /// go back (default [`Graceful::GRACE`]).
    pub fn within(self, grace: Duration) -> Graceful {
        Graceful { grace, ..self }
    }

    /// Begins the shutdown now.
    pub fn begin(&self) {
        let _ = self.handle.send(&Message::Drain, None);
        self.handle.begin_closing();
    }

    /// A future that waits for `signal`, begins the shutdown, and resolves
    /// once every plain HTTP/1 connection went back to portmux or closed (at
    /// most the grace period): what axum's `with_graceful_shutdown` takes.
    /// Requests in progress finish as usual and their connections then go
    /// back; axum's own graceful shutdown, which starts when this resolves,
    /// handles what is left (TLS, HTTP/2: it answers with `Connection: close`
    /// or GOAWAY, and waits for them).
    pub async fn after(self, signal: impl Future<Output = ()> + Send + 'static) {
        signal.await;
        self.begin();
        self.handle.wait_closed_async(Instant::now() + self.grace, false).await;
    }
}

/// A handed-over connection on tokio: an `AsyncRead + AsyncWrite` over the
/// `TcpStream` (reachable with [`Stream::get_ref`]), counted by its listener
/// until dropped. During a graceful shutdown, a read that would wait for a
/// next request returns end-of-file (HTTP servers then close the connection
/// as if the client had gone), and closing or dropping the stream gives it
/// back to portmux, unread, for the next instance: the client never notices.
#[derive(Debug)]
pub struct Stream {
    inner: TcpStream,
    tracked: Tracked,
    /// Where a read waits. A shutdown wakes it (registered with the
    /// listener's handle), and so does, during a shutdown, a write that
    /// completes the exchange: it can end there (hyper, having read a request,
    /// waits on its read while it writes the response).
    reader: Arc<ReadWaker>,
}

impl Stream {
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    /// Whether the connection sits between requests (see [`crate::Stream::between_requests`]).
    pub fn between_requests(&self) -> bool {
        self.tracked.between_requests()
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr()
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.inner.set_nodelay(on)
    }
}

impl Stream {
    /// During a shutdown, a write that brought the exchange to rest wakes
    /// the read waiting meanwhile: it ends there, and the connection goes back.
    fn wake_reader_at_rest(&self) {
        if self.tracked.ends_here() {
            self.reader.wake();
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.tracked.ends_here() {
            return Poll::Ready(Ok(())); // End-of-file: the connection goes back.
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.tracked.read(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                this.reader.set(cx.waker());
                // A shutdown that began meanwhile may have missed the waker.
                if this.tracked.ends_here() {
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.tracked.wrote(&buf[..n]);
            this.wake_reader_at_rest();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Going back: no FIN, the socket is portmux's (and the next instance's).
        if this.tracked.is_given_back() || (this.tracked.ends_here() && this.tracked.give_back(this.inner.as_fd())) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            let mut left = n;
            for b in bufs {
                let used = b.len().min(left);
                this.tracked.wrote(&b[..used]);
                left -= used;
                if left == 0 {
                    break;
                }
            }
            this.wake_reader_at_rest();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.tracked.finish(self.inner.as_fd());
    }
}

async fn send(sock: &AsyncFd<OwnedFd>, bytes: &[u8]) -> io::Result<()> {
    sock.async_io(Interest::WRITABLE, |fd| proto::send(fd, bytes, Wait::DontWait)).await
}

/// Opens a session (in the newest protocol version portmux speaks).
async fn handshake(cfg: &Config, buf: &mut [u8]) -> Result<Opened<AsyncFd<OwnedFd>>, Error> {
    let mut version = portmux_wire::PROTOCOL_VERSION;
    loop {
        match handshake_as(cfg, buf, version).await {
            Err(e) if version > portmux_wire::MIN_PROTOCOL_VERSION && proto::refused_version(&e, version) => {
                version -= 1
            }
            opened => return opened,
        }
    }
}

async fn handshake_as(cfg: &Config, buf: &mut [u8], version: u32) -> Result<Opened<AsyncFd<OwnedFd>>, Error> {
    let sock = portmux_sys::reactor::register(proto::connect(cfg, true)?, Interest::READABLE | Interest::WRITABLE)?;
    for msg in cfg.opening(version)? {
        send(&sock, &msg).await?;
    }
    let (mut early, mut lent): (_, Vec<Loan>) = (Vec::new(), Vec::new());
    let answer = async {
        loop {
            let incoming = sock.async_io(Interest::READABLE, |fd| proto::receive(fd, buf, Wait::DontWait)).await?;
            match incoming {
                Incoming::Registered(bound) => return Ok(bound),
                Incoming::Refused { route, reason } => return Err(Error::Refused { route, reason }),
                Incoming::Ended(reason) => return Err(Error::Ended(reason)),
                Incoming::Closed => {
                    return Err(Error::Ended("portmux closed the session during registration".into()));
                }
                Incoming::Conn(id, stream, info) => {
                    send(&sock, &proto::ack(id)).await?;
                    early.push((stream, *info));
                }
                Incoming::Lost(id, why) => send(&sock, &proto::reject(id, &why)).await?,
                Incoming::Lent(loan) => {
                    lent.retain(|l| l.route() != loan.route());
                    lent.push(*loan);
                }
                Incoming::LendLost(why) => {
                    // Drained, the session holds no loan: portmux accepts for the port.
                    send(&sock, &proto::drain()).await?;
                    return Err(Error::Io(io::Error::other(why)));
                }
                Incoming::Nothing => {}
            }
        }
    };
    let bound = tokio::time::timeout(crate::HANDSHAKE_TIMEOUT, answer).await.map_err(|_| {
        Error::Protocol(format!(
            "portmux did not answer the registration within {}s",
            crate::HANDSHAKE_TIMEOUT.as_secs()
        ))
    })??;
    Ok(Opened { sock, bound, early, lent, version })
}

/// Waits for the session socket, then takes what it holds: connections
/// (up to [`proto::BATCH`]), and the first other message into `pending`.
/// `None` when a shutdown began meanwhile.
/// (It takes the listener's fields it needs, so that `accept` can wait on
/// the lent sockets beside it without moving them out: a cancelled accept
/// loses nothing.)
async fn receive(
    sock: &AsyncFd<OwnedFd>,
    handle: &Handle,
    buf: &mut [u8],
    pending: &mut Option<Incoming>,
) -> io::Result<Option<Vec<proto::Received>>> {
    loop {
        let woken = handle.wake_async.clone().notified_owned();
        let mut woken = std::pin::pin!(woken);
        woken.as_mut().enable();
        if handle.is_closing() {
            return Ok(None);
        }
        let mut ready = tokio::select! {
            r = sock.readable() => r?,
            () = woken => return Ok(None),
        };
        let sock = ready.get_inner().as_fd();
        let first = match proto::receive(sock, buf, Wait::DontWait) {
            Ok(first) => first,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready.clear_ready();
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Incoming::Closed,
            Err(e) => return Err(e),
        };
        let Incoming::Conn(id, stream, info) = first else {
            *pending = Some(first);
            return Ok(Some(Vec::new()));
        };
        let mut conns = vec![(id, stream, info)];
        let emptied;
        (*pending, emptied) = proto::take_more(sock, buf, &mut conns);
        if emptied {
            // Seen empty: the next accept waits for the next message
            // instead of trying the socket again.
            ready.clear_ready();
        }
        return Ok(Some(conns));
    }
}

/// A lent socket, watched by tokio's reactor.
fn register(loan: Loan) -> io::Result<Loan<AsyncFd<OwnedFd>>> {
    loan.wrap(|fd| portmux_sys::reactor::register(fd, Interest::READABLE))
}

/// Waits for a connection on any lent socket (forever if there is none);
/// `None` when one of them was shut down (the caller drops it).
async fn wait_lent(lent: &[Loan<AsyncFd<OwnedFd>>]) -> io::Result<Option<(std::net::TcpStream, ConnInfo)>> {
    std::future::poll_fn(|cx| {
        for loan in lent {
            loop {
                let mut ready = match loan.held().poll_read_ready(cx) {
                    Poll::Ready(Ok(ready)) => ready,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                };
                match loan.try_accept(true) {
                    Ok(Some(accepted)) => return Poll::Ready(Ok(Some(accepted))),
                    Ok(None) => ready.clear_ready(),
                    Err(e) if crate::lent::revoked(&e) => return Poll::Ready(Ok(None)),
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// axum's listener: `axum::serve(listener, router)`. The address type is
/// [`ConnInfo`], so handlers can take `ConnectInfo<ConnInfo>` (peer, SNI, Host…)
/// with `into_make_service_with_connect_info::<ConnInfo>()`.
#[cfg(feature = "axum")]
impl axum::serve::Listener for Listener {
    type Io = Stream;
    type Addr = ConnInfo;

    async fn accept(&mut self) -> (Stream, ConnInfo) {
        loop {
            match Listener::accept(self).await {
                Ok(accepted) => return accepted,
                // Shutting down: whoever owns the listener stops calling accept.
                Err(e) if e.get_ref().is_some_and(|i| i.is::<ShuttingDown>()) => std::future::pending().await,
                Err(e) => {
                    // axum's contract: log and retry; a pause keeps a persistent
                    // error (portmux refusing the route) from spinning.
                    eprintln!("portmux-client: accept failed, retrying in 1s: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Describes the listener, not a connection: `local` (and `peer`) are the
    /// listening address of the first route, `route` is that route, `id` is 0.
    fn local_addr(&self) -> io::Result<ConnInfo> {
        let first = self.bound.first().ok_or(io::ErrorKind::NotConnected)?;
        let meta =
            portmux_wire::ConnMeta::unpeeked(first.route.clone(), portmux_wire::Proto::Tcp, first.listen, first.listen);
        Ok(ConnInfo { id: 0, meta, tls: None })
    }
}

#[cfg(feature = "axum")]
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>> for ConnInfo {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> ConnInfo {
        stream.remote_addr().clone()
    }
}
