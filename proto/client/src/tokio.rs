//! The async flavour: the same listener on tokio, and (feature `axum`) axum's
//! `serve::Listener`, so `axum::serve(listener, router)` works.

use crate::proto::{self, Config, Incoming};
use crate::{ConnInfo, Error, Opened};
use portmux_sys::scm::Wait;
use portmux_wire::{Bound, Message};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixDatagram};

/// An async listener for handed-over connections, like `tokio::net::TcpListener`.
#[derive(Debug)]
pub struct Listener {
    cfg: Config,
    /// The control session: a connected `SOCK_SEQPACKET` socket. Tokio only
    /// watches its readiness; every read and write here is our own
    /// `recvmsg`/`send`, so the datagram type is never used for I/O.
    sock: UnixDatagram,
    bound: Vec<Bound>,
    backlog: VecDeque<(std::net::TcpStream, ConnInfo)>,
    buf: Vec<u8>,
}

impl Listener {
    /// Claims one route with the defaults of [`crate::Builder`].
    pub async fn bind(spec: &str) -> Result<Listener, Error> {
        crate::Builder::new().route(spec).bind_async().await
    }

    pub(crate) async fn open(cfg: Config) -> Result<Listener, Error> {
        let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
        let opened = handshake(&cfg, &mut buf).await?;
        Ok(Listener { cfg, sock: opened.sock, bound: opened.bound, backlog: opened.early.into(), buf })
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

    /// Waits for the next connection; reconnects by itself if portmux restarts.
    pub async fn accept(&mut self) -> io::Result<(TcpStream, ConnInfo)> {
        loop {
            if let Some((stream, info)) = self.backlog.pop_front() {
                stream.set_nonblocking(true)?;
                return Ok((TcpStream::from_std(stream)?, info));
            }
            let buf = &mut self.buf;
            let sock = &self.sock;
            let incoming =
                sock.async_io(Interest::READABLE, || proto::receive(sock.as_fd(), buf, Wait::DontWait)).await;
            let incoming = match incoming {
                Ok(i) => i,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Incoming::Closed,
                Err(e) => return Err(e),
            };
            match incoming {
                Incoming::Conn(id, stream, info) => {
                    let _ = send(&self.sock, &proto::ack(id)).await;
                    stream.set_nonblocking(true)?;
                    return Ok((TcpStream::from_std(stream)?, info));
                }
                Incoming::Lost(id, why) => {
                    let _ = send(&self.sock, &proto::reject(id, &why)).await;
                    return Err(io::Error::other(crate::FdNotReceived { id, reason: why }));
                }
                Incoming::Closed | Incoming::Ended(_) => self.reconnect().await?,
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
                    self.sock = opened.sock;
                    self.bound = opened.bound;
                    self.backlog.extend(opened.early);
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

    /// Asks portmux to send no new connections to this instance.
    pub async fn drain(&self) -> io::Result<()> {
        send(&self.sock, &portmux_wire::encode(&Message::Drain).map_err(io::Error::other)?).await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Ok(bytes) = portmux_wire::encode(&Message::Bye) {
            let _ = proto::send(self.sock.as_fd(), &bytes, Wait::DontWait);
        }
    }
}

async fn send(sock: &UnixDatagram, bytes: &[u8]) -> io::Result<()> {
    sock.async_io(Interest::WRITABLE, || proto::send(sock.as_fd(), bytes, Wait::DontWait)).await
}

async fn handshake(cfg: &Config, buf: &mut [u8]) -> Result<Opened<UnixDatagram>, Error> {
    let fd: OwnedFd = proto::connect(cfg, true)?;
    let sock = UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(fd))?;
    for msg in cfg.opening()? {
        send(&sock, &msg).await?;
    }
    let mut early = Vec::new();
    let answer = async {
        loop {
            let incoming =
                sock.async_io(Interest::READABLE, || proto::receive(sock.as_fd(), buf, Wait::DontWait)).await?;
            match incoming {
                Incoming::Registered(bound) => return Ok(bound),
                Incoming::Refused { route, reason } => return Err(Error::Refused { route, reason }),
                Incoming::Ended(reason) => return Err(Error::Ended(reason)),
                Incoming::Closed => {
                    return Err(Error::Ended("portmux closed the session during registration".into()));
                }
                Incoming::Conn(id, stream, info) => {
                    send(&sock, &proto::ack(id)).await?;
                    early.push((stream, info));
                }
                Incoming::Lost(id, why) => send(&sock, &proto::reject(id, &why)).await?,
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
    Ok(Opened { sock, bound, early })
}

/// axum's listener: `axum::serve(listener, router)`. The address type is
/// [`ConnInfo`], so handlers can take `ConnectInfo<ConnInfo>` (peer, SNI, Host…)
/// with `into_make_service_with_connect_info::<ConnInfo>()`.
#[cfg(feature = "axum")]
impl axum::serve::Listener for Listener {
    type Io = TcpStream;
    type Addr = ConnInfo;

    async fn accept(&mut self) -> (TcpStream, ConnInfo) {
        loop {
            match Listener::accept(self).await {
                Ok(accepted) => return accepted,
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
        let meta = portmux_wire::ConnMeta {
            route: first.route.clone(),
            proto: portmux_wire::Proto::Tcp,
            peer: first.listen,
            local: first.listen,
            sni: None,
            alpn: Vec::new(),
            host: None,
            path: None,
            peeked: 0,
        };
        Ok(ConnInfo { id: 0, meta })
    }
}

#[cfg(feature = "axum")]
impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>> for ConnInfo {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> ConnInfo {
        stream.remote_addr().clone()
    }
}
