//! Start-up and shutdown: checks, the control socket, one tokio-uring worker
//! thread per core, and the control plane on the main thread.

use crate::config::Settings;
use crate::handoff::Conn;
use crate::route::Table;
use arc_swap::ArcSwap;
use portmux_sys::{net, uring};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use tokio::sync::{mpsc, watch};

/// State shared by the workers and the control plane.
#[derive(Debug)]
pub struct Shared {
    pub settings: Settings,
    /// The current route table; replaced whole on every change.
    pub table: ArcSwap<Table>,
    /// Bumped after every new table, to wake workers (new or closed listeners).
    pub table_version: watch::Sender<u64>,
    /// Connections the workers could not deliver directly (queued routes, busy
    /// services), and relays paused for an upgrade.
    pub to_control: mpsc::UnboundedSender<ToControl>,
    /// Set when portmux is stopping: workers stop accepting.
    pub stopping: watch::Sender<bool>,
    /// Set while handing over to a new process: workers stop accepting (the
    /// listeners stay open; the kernel queues), and once `pause_relays` is also
    /// set, relays pause to move.
    pub handing_over: watch::Sender<bool>,
    pub pause_relays: watch::Sender<bool>,
    /// Connection tasks running in this process (all workers), and a wake-up
    /// when it reaches zero.
    pub in_flight: std::sync::atomic::AtomicUsize,
    pub idle: tokio::sync::Notify,
    /// Accept loops running (all workers), and a wake-up when it reaches zero:
    /// an upgrade's freeze waits for every accept to be over, so that a
    /// connection accepted at that moment is counted in flight, not lost.
    pub accepting: std::sync::atomic::AtomicUsize,
    pub accepts_over: tokio::sync::Notify,
    /// Work for the workers (relays resumed after an upgrade), round robin.
    pub inboxes: Vec<mpsc::UnboundedSender<crate::forward::Resume>>,
    pub next_inbox: std::sync::atomic::AtomicUsize,
    /// Workers still running.
    pub workers_running: watch::Sender<usize>,
    pub next_conn_id: AtomicU64,
}

/// What reaches the control plane from the workers.
#[derive(Debug)]
pub enum ToControl {
    /// A connection to queue or deliver through the control plane.
    Conn(Conn),
    /// A relay paused for an upgrade, to hand to the new process.
    Relay(crate::forward::Paused),
    /// Answered once everything sent before it was handled (the channel is FIFO).
    Marker(tokio::sync::oneshot::Sender<()>),
}

impl Shared {
    /// Hands a resumed relay to the next worker.
    pub fn to_worker(&self, job: crate::forward::Resume) {
        if self.inboxes.is_empty() {
            return;
        }
        let i = self.next_inbox.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.inboxes.len();
        let _ = self.inboxes[i].send(job);
    }
}

/// Why portmux could not start; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    IoUring(String),
    #[error(
        "another portmux is already serving the control socket {0}; stop it first, or give this one another --control path"
    )]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; remove it or choose another --control path")]
    NotASocket(PathBuf),
    #[error("cannot create the directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot bind the control socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot start the io_uring runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot start a worker thread: {0}")]
    Thread(io::Error),
    #[error("cannot listen for the admin API on {addr}: {source}; choose another --admin address")]
    Admin { addr: std::net::SocketAddr, source: io::Error },
    #[error("{0}")]
    Route(String),
}

/// Runs portmux until SIGTERM or SIGINT, or until an upgrade replaced it.
/// Started by an upgrade, a failure before serving is also reported to the
/// previous process (which keeps serving).
pub fn run(settings: Settings) -> Result<(), StartError> {
    let handover = crate::upgrade::inherited().map_err(StartError::Route)?;
    start(settings, handover)
}

fn start(mut settings: Settings, handover: Option<OwnedFd>) -> Result<(), StartError> {
    if let Err(e) = uring::probe() {
        if let Some(fd) = handover {
            crate::upgrade::report_failure(fd, &e);
        }
        return Err(StartError::IoUring(e));
    }
    match portmux_sys::raise_nofile_limit() {
        Ok((before, after)) if before != after => tracing::debug!("open-file limit raised from {before} to {after}"),
        Ok((_, after)) => tracing::debug!("open-file limit is {after}"),
        Err(e) => tracing::warn!("cannot raise the open-file limit to the hard limit: {e}"),
    }
    if settings.bind.is_unspecified() && settings.bind.is_ipv6() && !net::ipv6_available() {
        tracing::warn!("IPv6 is unavailable on this host; listening on 0.0.0.0 instead of [::] by default");
        settings.bind = std::net::Ipv4Addr::UNSPECIFIED.into();
    }
    let mut routes = Vec::new();
    for r in &settings.initial_routes {
        let spec = portmux_wire::RouteSpec::parse(&r.route).map_err(|e| StartError::Route(e.to_string()))?;
        let backends = r
            .backends
            .iter()
            .map(|b| b.resolve().map(|e| (b.clone(), e)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError::Route)?;
        routes.push((spec, backends));
    }
    // After an upgrade, the sockets and the routes come from the previous process.
    let upgraded = handover.is_some();
    if upgraded {
        routes.clear();
    }
    // Under systemd: sockets from socket activation or the fd store.
    let mut systemd = if upgraded {
        crate::systemd::Inherited::default()
    } else {
        crate::systemd::inherited().map_err(StartError::Route)?
    };
    let mut remove_on_stop = false;
    let control = match (&settings.control, systemd.control.take()) {
        _ if upgraded => None,
        (_, Some(fd)) => {
            remove_on_stop = systemd.control_stored;
            // A socket unit's socket comes in blocking mode; the acceptor
            // relies on EAGAIN to know the backlog is empty.
            net::set_nonblocking(fd.as_fd(), true).map_err(|e| StartError::Route(format!("control socket: {e}")))?;
            Some(fd)
        }
        (Some(path), None) => {
            let fd = bind_control(path)?;
            crate::systemd::store(fd.as_fd(), crate::systemd::STORED_CONTROL_NAME);
            remove_on_stop = true;
            Some(fd)
        }
        (None, None) => None,
    };
    let admin = match settings.admin {
        Some(addr) if !upgraded => match std::net::TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(source) => {
                if let (Some(path), true) = (&settings.control, remove_on_stop) {
                    let _ = std::fs::remove_file(path);
                }
                return Err(StartError::Admin { addr, source });
            }
        },
        _ => None,
    };
    // The socket file as it is now: removed on a clean stop only if it is still
    // this one (an upgraded process or another portmux may have replaced it).
    let identity =
        settings.control.as_ref().and_then(|p| std::fs::symlink_metadata(p).ok()).map(|m| (m.dev(), m.ino()));
    let start = crate::control::Start {
        control,
        admin,
        routes,
        control_owned: remove_on_stop,
        handover,
        listeners: systemd.listeners,
        state_file: systemd.state,
    };
    let result = serve(settings.clone(), start);
    // After an upgrade the socket file belongs to the new process.
    if let (Ok(crate::control::Exit::Stopped { control_owned: true }), Some(path), Some(identity)) =
        (&result, &settings.control, identity)
    {
        remove_if_ours(path, identity);
    }
    result.map(|_| ())
}

fn serve(settings: Settings, start: crate::control::Start) -> Result<crate::control::Exit, StartError> {
    let (to_control, from_workers) = mpsc::unbounded_channel();
    let workers = settings.workers.max(1);
    let (inboxes, mut receivers): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
    let shared = Arc::new(Shared {
        settings,
        table: ArcSwap::from_pointee(Table::default()),
        table_version: watch::Sender::new(0),
        to_control,
        stopping: watch::Sender::new(false),
        handing_over: watch::Sender::new(false),
        pause_relays: watch::Sender::new(false),
        in_flight: std::sync::atomic::AtomicUsize::new(0),
        idle: tokio::sync::Notify::new(),
        accepting: std::sync::atomic::AtomicUsize::new(0),
        accepts_over: tokio::sync::Notify::new(),
        inboxes,
        next_inbox: std::sync::atomic::AtomicUsize::new(0),
        workers_running: watch::Sender::new(workers),
        next_conn_id: AtomicU64::new(1),
    });
    let control_rt = tokio_uring::Runtime::new(&uring_builder()).map_err(StartError::Runtime)?;
    let mut threads = Vec::new();
    for i in 0..workers {
        let shared = shared.clone();
        let inbox = receivers.remove(0);
        let t = std::thread::Builder::new()
            .name(format!("portmux-worker-{i}"))
            .spawn(move || match tokio_uring::Runtime::new(&uring_builder()) {
                Ok(rt) => rt.block_on(crate::accept::worker(shared, i, inbox)),
                Err(e) => {
                    tracing::error!("worker {i}: cannot start its io_uring runtime: {e}");
                    shared.workers_running.send_modify(|n| *n -= 1);
                }
            })
            .map_err(StartError::Thread)?;
        threads.push(t);
    }
    let result = control_rt.block_on(crate::control::run(shared.clone(), start, from_workers));
    drop(control_rt);
    for t in threads {
        let _ = t.join();
    }
    result.map_err(StartError::Route)
}

/// Ring size of every runtime: room for many connections being peeked at once.
fn uring_builder() -> tokio_uring::Builder {
    let mut b = tokio_uring::builder();
    b.entries(1024);
    b
}

/// Binds the control socket, replacing a stale one, refusing a live one.
fn bind_control(path: &Path) -> Result<OwnedFd, StartError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        std::fs::create_dir_all(dir).map_err(|source| StartError::Dir { path: dir.to_path_buf(), source })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => return Err(StartError::NotASocket(path.to_path_buf())),
        Ok(_) if net::seqpacket_alive(path) => return Err(StartError::AlreadyRunning(path.to_path_buf())),
        Ok(_) => {
            tracing::info!("removing stale control socket {}", path.display());
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
    net::seqpacket_listener(path).map_err(|source| StartError::Bind { path: path.to_path_buf(), source })
}

/// Removes the control socket file unless another process has replaced it.
fn remove_if_ours(path: &Path, identity: (u64, u64)) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == identity) {
        let _ = std::fs::remove_file(path);
    }
}
