//! The composition root: start-up checks, the control socket and the admin
//! API, one tokio-uring worker thread per core, the control plane on the main
//! thread with the admin API and the upgrade machinery beside it, signals,
//! and the order things stop in. Nothing else wires modules together.

use crate::config::Settings;
use crate::control::{Control, Exit, Sockets};
use crate::shared::Shared;
use crate::systemd;
use portmux_sys::{net, uring};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tokio::sync::mpsc;

/// Why portmux could not start; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    IoUring(#[from] uring::Unavailable),
    #[error(
        "another portmux is already serving the control socket {0}; stop it first, or give this one another --control path"
    )]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; remove it or choose another --control path")]
    NotASocket(PathBuf),
    #[error("cannot create the directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error(
        "refusing the control socket's directory {path}: it {problem}; anyone may write where it is, so another \
         user could have made it to intercept services; remove it, or choose another --control path (or set \
         XDG_RUNTIME_DIR)"
    )]
    UnsafeDir { path: PathBuf, problem: String },
    #[error("cannot bind the control socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("the control socket from systemd: {0}")]
    ControlSocket(#[source] io::Error),
    #[error("cannot start the io_uring runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot start a worker thread: {0}")]
    Thread(io::Error),
    #[error("cannot listen for the admin API on {addr}: {source}; choose another --admin address")]
    Admin { addr: std::net::SocketAddr, source: io::Error },
    #[error("cannot bind the admin socket {path}: {source}; choose another --admin-socket path, or 'off'")]
    AdminSocket { path: PathBuf, source: io::Error },
    #[error(
        "the admin API would listen on {0}, off loopback: anyone who can reach it could read the routes; add \
         --admin-public if that is meant (changes still need --admin-token-file's token)"
    )]
    AdminPublic(std::net::SocketAddr),
    #[error("route {route}: {reason}")]
    Route { route: String, reason: String },
    #[error("config file {file}:\n  {problem}")]
    ConfigRoutes { file: String, problem: crate::config::file::Problem },
    #[error("cannot create route {route}: {source}")]
    InitialRoute {
        route: String,
        #[source]
        source: crate::control::ControlError,
    },
    #[error("the upgrade socket: {0}")]
    UpgradeSocket(#[source] io::Error),
    #[error("{0}")]
    Upgrade(#[from] crate::upgrade::UpgradeError),
    #[error("{0}")]
    Systemd(#[from] systemd::SystemdError),
    #[error("{0}; choose another --access-log")]
    AccessLog(#[source] io::Error),
    #[error(
        "--relay kernel: the kernel refused the in-kernel relay: {0}; run portmux as root or with CAP_BPF and \
         CAP_NET_ADMIN, or use --relay user (the default) or auto"
    )]
    Relay(String),
    #[error("{0} (--no-sandbox runs without it)")]
    Sandbox(#[source] crate::sandbox::SandboxError),
}

/// Runs portmux until SIGTERM or SIGINT, or until an upgrade replaced it.
/// Started by an upgrade, a failure before serving is also reported to the
/// previous process (which keeps serving).
pub fn run(settings: Settings) -> Result<(), StartError> {
    let handover = crate::upgrade::inherited().map_err(StartError::UpgradeSocket)?;
    start(settings, handover)
}

fn start(mut settings: Settings, handover: Option<OwnedFd>) -> Result<(), StartError> {
    if let Err(e) = uring::probe() {
        if let Some(fd) = handover {
            crate::upgrade::report_failure(fd, &e.to_string());
        }
        return Err(e.into());
    }
    let nofile = match portmux_sys::raise_nofile_limit() {
        Ok((before, after)) => {
            tracing::debug!("open-file limit raised from {before} to {after}");
            after
        }
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit to the hard limit: {e}");
            rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX)
        }
    };
    if settings.limits.conns == 0 {
        settings.limits.conns = crate::config::limits::conns_for(nofile);
        tracing::debug!(nofile, "at most {} connections at once (--max-conns)", settings.limits.conns);
    }
    if settings.bind.is_unspecified() && settings.bind.is_ipv6() && !net::ipv6_available() {
        tracing::warn!("IPv6 is unavailable on this host; listening on 0.0.0.0 instead of [::] by default");
        settings.bind = std::net::Ipv4Addr::UNSPECIFIED.into();
    }
    // After an upgrade, the sockets and the routes come from the previous
    // process; the config file's routes are applied again over them (the
    // file is read anew, as a reload would), and those it dropped go.
    let upgraded = handover.is_some();
    let mut routes = Vec::new();
    for r in settings.initial_routes.iter().filter(|_| !upgraded) {
        let failed = |reason: String| StartError::Route { route: r.route.clone(), reason };
        let spec = portmux_wire::RouteSpec::parse(&r.route).map_err(|e| failed(e.to_string()))?;
        let backends = r
            .backends
            .iter()
            .map(|b| b.resolve().map(|e| (b.clone(), e)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(failed)?;
        routes.push((spec, backends));
    }
    if let Err(p) = crate::config::file::check_bound(&settings.file_routes, settings.bind) {
        let file = settings.config_file.as_ref().map(|f| f.display().to_string()).unwrap_or_default();
        return Err(StartError::ConfigRoutes { file, problem: p });
    }
    for r in &settings.file_routes {
        let failed = |reason: String| StartError::Route { route: r.spec.key(), reason };
        let backends = r.backends.iter().map(|b| b.resolve().map(|e| (b.clone(), e))).collect::<Result<Vec<_>, _>>();
        match backends {
            Ok(b) => routes.push((r.spec.clone(), b)),
            // The previous process's version of the route serves on.
            Err(e) if upgraded => tracing::warn!(route = %r.spec.key(), "the config file's route is not applied: {e}"),
            Err(e) => return Err(failed(e)),
        }
    }
    // Under systemd: sockets from socket activation or the fd store.
    let mut systemd = if upgraded { systemd::Inherited::default() } else { systemd::inherited()? };
    let mut sockets = Sockets::default();
    sockets.control = match (&settings.control, systemd.control.take()) {
        _ if upgraded => None,
        (_, Some(fd)) => {
            sockets.control_owned = systemd.control_stored;
            // A socket unit's socket comes in blocking mode; the acceptor
            // relies on EAGAIN to know the backlog is empty.
            net::set_nonblocking(fd.as_fd(), true).map_err(StartError::ControlSocket)?;
            Some(fd)
        }
        (Some(path), None) => {
            let fd = bind_control(path)?;
            systemd::store(fd.as_fd(), systemd::STORED_CONTROL_NAME);
            sockets.control_owned = true;
            Some(fd)
        }
        (None, None) => None,
    };
    // The socket file as it is now: removed on a clean stop only if it is still
    // this one (an upgraded process or another portmux may have replaced it).
    let identity =
        settings.control.as_ref().and_then(|p| std::fs::symlink_metadata(p).ok()).map(|m| (m.dev(), m.ino()));
    let control_path = settings.control.clone();
    let owned_at_start = sockets.control_owned;
    // A start that fails leaves no socket file (nor its fd-store entry) behind.
    let undo = |e: StartError| {
        if let (true, Some(path), Some(identity)) = (owned_at_start, &control_path, identity) {
            remove_if_ours(path, identity);
            systemd::unstore(systemd::STORED_CONTROL_NAME);
        }
        e
    };
    sockets.admin = match settings.admin {
        Some(addr) if !addr.ip().is_loopback() && !settings.admin_public => {
            return Err(undo(StartError::AdminPublic(addr)));
        }
        Some(addr) if !upgraded => match std::net::TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(source) => return Err(undo(StartError::Admin { addr, source })),
        },
        _ => None,
    };
    sockets.admin_unix = match (&settings.admin_socket, systemd.admin.take()) {
        _ if upgraded => None,
        (Some(path), Some(fd)) => match net::set_nonblocking(fd.as_fd(), true) {
            Ok(()) => Some(std::os::unix::net::UnixListener::from(fd)),
            Err(source) => return Err(undo(StartError::AdminSocket { path: path.clone(), source })),
        },
        (Some(path), None) => match bind_admin(path) {
            Ok(l) => {
                sockets.admin_owned = true;
                Some(l)
            }
            Err(e) => return Err(undo(e)),
        },
        (None, _) => None,
    };
    // Removed on a clean stop if portmux bound it (a socket unit's stays; after
    // an upgrade the new process knows whether it is portmux's).
    let admin_identity =
        settings.admin_socket.as_ref().and_then(|p| std::fs::symlink_metadata(p).ok()).map(|m| (m.dev(), m.ino()));
    let admin_path = settings.admin_socket.clone();
    let saved = prepare_state_dir(&settings).then(|| crate::control::saved::RouteFile::new(&settings.state_dir));
    // Opened before the sandbox (and as root, if portmux starts so); SIGUSR1
    // reopens it as portmux's user, in a directory the sandbox leaves writable.
    let access = match &settings.access_log {
        Some(to) => crate::telemetry::access::AccessLog::open(to.clone(), settings.access_log_format)
            .map_err(|e| undo(StartError::AccessLog(e)))?,
        None => crate::telemetry::access::AccessLog::off(),
    };
    // Loading the kernel relay needs CAP_BPF and CAP_NET_ADMIN, which the
    // sandbox drops; after an upgrade its maps come from the previous process.
    if !upgraded {
        match crate::forward::kernel::choose(settings.relay) {
            Ok(choice) => crate::forward::kernel::set(choice),
            Err(why) => return Err(undo(StartError::Relay(why))),
        }
    }
    // What start-up parsed and dropped so far (the kernel's BTF, 14 MiB,
    // which aya parses to load the program; the config) would stay
    // resident: mimalloc keeps it until this thread allocates again.
    // Measured here: 39.5 → 20 MiB at start in kernel mode, 25 → 20 in user mode.
    portmux_sys::release_freed_memory();
    let inherited = handover.as_ref().and(std::env::var(crate::sandbox::INHERITED_ENV).ok());
    if let (true, Some(report)) = (settings.sandbox, inherited) {
        let report = format!("{}{}", report.trim_end_matches(crate::sandbox::INHERITED), crate::sandbox::INHERITED);
        tracing::info!("sandbox: {report}");
        settings.sandboxed = Some(report);
    } else if settings.sandbox {
        match crate::sandbox::apply(&sandbox_plan(&settings)) {
            Ok(report) => {
                tracing::info!("sandbox: {report}");
                settings.sandboxed = Some(report.to_string());
            }
            Err(e) => return Err(undo(StartError::Sandbox(e))),
        }
    } else {
        tracing::warn!("running without the sandbox (--no-sandbox)");
    }
    let begin = Begin { sockets, routes, handover, systemd, saved, access };
    let (exit, (control_owned, admin_owned)) = serve(settings, begin).map_err(undo)?;
    // After an upgrade the socket files belong to the new process.
    if let (Exit::Stopped, true, Some(path), Some(identity)) = (exit, control_owned, &control_path, identity) {
        remove_if_ours(path, identity);
    }
    if let (Exit::Stopped, true, Some(path), Some(identity)) = (exit, admin_owned, &admin_path, admin_identity) {
        remove_if_ours(path, identity);
    }
    Ok(())
}

/// What the sandbox allows: writing where portmux's sockets are, reading its config file.
fn sandbox_plan(settings: &Settings) -> crate::sandbox::Plan {
    let dir = |p: &Option<PathBuf>| {
        p.as_ref()
            .and_then(|p| p.parent())
            .map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d })
            .map(Path::to_path_buf)
    };
    let mut writable: Vec<PathBuf> =
        [dir(&settings.control), dir(&settings.admin_socket)].into_iter().flatten().collect();
    writable.push(settings.state_dir.clone());

    writable.dedup();
    crate::sandbox::Plan {
        user: settings.user.clone(),
        writable,
        readable: settings.config_file.iter().chain(&settings.cert_dirs).chain(&settings.acme.ca).cloned().collect(),
        appendable: match &settings.access_log {
            Some(crate::telemetry::access::Destination::File(f)) => dir(&Some(f.clone())).into_iter().collect(),
            _ => Vec::new(),
        },
    }
}

/// What the control plane starts from.
struct Begin {
    sockets: Sockets,
    /// Routes with backends to create first (resolved).
    routes: Vec<(portmux_wire::RouteSpec, crate::forward::backend::Resolved)>,
    /// Started by an upgrade: the socket to the previous process.
    handover: Option<OwnedFd>,
    /// What systemd passed.
    systemd: systemd::Inherited,
    /// Where the run-time routes are kept (none: the state directory is unusable).
    saved: Option<crate::control::saved::RouteFile>,
    access: crate::telemetry::access::AccessLog,
}

fn serve(settings: Settings, mut begin: Begin) -> Result<(Exit, (bool, bool)), StartError> {
    let workers = settings.workers.max(1);
    let access = std::mem::replace(&mut begin.access, crate::telemetry::access::AccessLog::off());
    let (shared, intake, mut inboxes) = Shared::new(settings, workers, access);
    shared.access.start().map_err(StartError::AccessLog)?;
    let control_rt = tokio_uring::Runtime::new(&uring_builder()).map_err(StartError::Runtime)?;
    let mut threads = Vec::new();
    for i in 0..workers {
        let worker_shared = shared.clone();
        let inbox = inboxes.remove(0);
        let spawned = std::thread::Builder::new().name(format!("portmux-worker-{i}")).spawn(move || {
            match tokio_uring::Runtime::new(&uring_builder()) {
                Ok(rt) => rt.block_on(crate::accept::worker(worker_shared, i, inbox)),
                Err(e) => {
                    tracing::error!("worker {i}: cannot start its io_uring runtime: {e}");
                    worker_shared.workers_running.send_modify(|n| *n -= 1);
                }
            }
        });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // The workers already started stop again.
                shared.stopping.send_replace(true);
                for t in threads {
                    let _ = t.join();
                }
                return Err(StartError::Thread(e));
            }
        }
    }
    let result = control_rt.block_on(async {
        let mut begin = begin;
        let control = Control::new(shared.clone(), std::mem::take(&mut begin.sockets));
        let outcome = run_control(&control, begin, intake).await;
        if outcome.is_err() {
            shared.stopping.send_replace(true);
        }
        outcome.map(|exit| (exit, control.sockets_owned()))
    });
    drop(control_rt);
    for t in threads {
        let _ = t.join();
    }
    shared.access.close(std::time::Duration::from_secs(2));
    result
}

async fn run_control(
    control: &Rc<Control>,
    begin: Begin,
    intake: mpsc::UnboundedReceiver<crate::shared::ToControl>,
) -> Result<Exit, StartError> {
    let Begin { routes, handover, systemd, saved, .. } = begin;
    let began = std::time::Instant::now();
    let previous = match handover {
        Some(fd) => Some(crate::upgrade::import(control, fd).await?),
        None => None,
    };
    // What systemd passed and the routes kept in its fd store go in before
    // any table is published: a listener must not serve before its routes are back.
    let restoring = previous.is_none().then(|| control.begin_import());
    for (fd, addr, pinned) in systemd.listeners {
        control.adopt_listener(fd, addr, pinned);
    }
    if let Some(fd) = systemd.state {
        let file = systemd::StateFile::adopt(fd);
        let routes = file.read();
        control.keep_state_in(file);
        match routes {
            Ok(routes) => control.restore(routes),
            Err(e) => tracing::warn!("cannot read the route state from the fd store: {e}"),
        }
    } else if systemd::managed() && !control.keeps_state() {
        match systemd::StateFile::create() {
            Ok(file) => control.keep_state_in(file),
            Err(e) => tracing::info!("the route state is not kept across crashes: {e}"),
        }
    }
    // The config file's routes are not run-time routes (marked before
    // anything is saved). After an upgrade, the previous file's routes are
    // known from the handover until the commit, when this file replaces them.
    let upgraded = previous.is_some();
    if !upgraded {
        control.mark_file_routes();
    }
    // The routes made at run time before the last stop (an upgrade brought
    // them along), once systemd's listeners are in.
    match saved {
        Some(file) if restoring.is_none() => control.save_routes_in(file),
        Some(file) if control.shared().settings.resume => control.resume(file),
        Some(file) => control.save_routes_in(file.untouched()),
        None => {}
    }
    if let Some(importer) = restoring {
        control.end_import(importer);
    }
    if let Some((channel, importer)) = previous {
        // Serving starts only once the previous process committed; then the
        // config file is applied as a reload would (a failed upgrade leaves
        // nothing of it behind, and a route it cannot set is skipped).
        crate::upgrade::serve_imported(control, channel, importer).await?;
        control.shared().metrics.upgraded(began.elapsed());
        control.mark_file_routes();
        control.apply_file_routes(routes);
    } else {
        control.start_routes(routes).map_err(|(route, source)| StartError::InitialRoute { route, source })?;
    }
    let (upgrades, requests) = mpsc::unbounded_channel();
    control.set_upgrader(upgrades.clone());
    tokio_uring::spawn(crate::upgrade::serve_requests(control.clone(), requests));
    let (unix, tcp) = control.admin_listeners();
    tokio_uring::spawn(crate::admin::serve(control.clone(), crate::admin::Listeners { unix, tcp }));
    tokio_uring::spawn(signals(control.clone(), upgrades));
    println!("{}", control.ready_line());
    let mut ready = vec!["READY=1".to_string(), "STATUS=serving".to_string()];
    if upgraded {
        ready.push(format!("MAINPID={}", std::process::id()));
    }
    systemd::notify(&ready.iter().map(String::as_str).collect::<Vec<_>>());
    Ok(control.serve(intake).await)
}

/// SIGTERM/SIGINT stop portmux; SIGHUP reloads the config file; SIGUSR2
/// upgrades it; SIGUSR1 reopens the access log.
async fn signals(control: Rc<Control>, upgrades: mpsc::UnboundedSender<crate::control::UpgradeRequest>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut usr2), Ok(mut hup), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined2()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    ) else {
        tracing::error!("cannot install signal handlers; stop portmux with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                return control.request_exit(Exit::Stopped);
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping");
                return control.request_exit(Exit::Stopped);
            }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config file");
                let control = control.clone();
                tokio_uring::spawn(async move {
                    if let Err(e) = control.reload().await {
                        tracing::error!("{e}");
                    }
                });
            }
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: reopening the access log");
                control.shared().access.reopen();
            }
            _ = usr2.recv() => {
                tracing::info!("SIGUSR2: upgrading");
                let _ = upgrades.send(crate::control::UpgradeRequest { binary: None, reply: None });
            }
        }
    }
}

/// Ring size of every runtime: room for many connections being peeked at once.
fn uring_builder() -> tokio_uring::Builder {
    let mut b = tokio_uring::builder();
    b.entries(1024);
    b
}

/// Binds the control socket, replacing a stale one, refusing a live one.
fn bind_control(path: &Path) -> Result<OwnedFd, StartError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir)?;
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

/// Binds the admin socket in a checked directory, replacing a stale file,
/// refusing one another process serves.
fn bind_admin(path: &Path) -> Result<std::os::unix::net::UnixListener, StartError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir)?;
    }
    let failed = |source: io::Error| StartError::AdminSocket { path: path.to_path_buf(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(failed(io::Error::new(io::ErrorKind::AlreadyExists, "it exists and is not a socket")));
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            return Err(failed(io::Error::new(io::ErrorKind::AddrInUse, "another process serves it")));
        }
        Ok(_) => std::fs::remove_file(path).map_err(failed)?,
        Err(_) => {}
    }
    net::stream_listener(path).map(std::os::unix::net::UnixListener::from).map_err(failed)
}

/// The state directory (the routes made at run time, ACME's account and
/// certificates), created 0700 before the sandbox limits writing to it; owned
/// by `--user` when portmux becomes that user. A failure is reported (and
/// nothing is kept there); portmux serves without it.
fn prepare_state_dir(settings: &Settings) -> bool {
    if settings.seamless {
        return false; // seamless mode is its command line, nothing more.
    }
    let dir = &settings.state_dir;
    // Another user's directory, or one others may write to, could hold
    // certificates and keys planted there: not used.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(dir) {
        let owner = settings
            .user
            .as_deref()
            .and_then(crate::config::policy::user_ids)
            .map_or_else(|| rustix::process::geteuid().as_raw(), |(uid, _)| uid);
        let mode = meta.permissions().mode();
        if !meta.is_dir() || (meta.uid() != owner && meta.uid() != 0) || mode & 0o022 != 0 {
            tracing::warn!(dir = %dir.display(), "the state directory (--state-dir) is not a directory of portmux's user that only it may write to (mode {:o}, owner uid {}); routes made at run time and ACME certificates cannot be kept", mode & 0o7777, meta.uid());
            return false;
        }
    }
    if let Err(e) = crate::tls::acme::create_private_dir(dir) {
        tracing::warn!(dir = %dir.display(), "cannot create the state directory (--state-dir): {e}; routes made at run time and ACME certificates cannot be kept");
        return false;
    }
    if let Some((uid, gid)) = settings.user.as_deref().and_then(crate::config::policy::user_ids)
        && rustix::process::geteuid().is_root()
        && let Err(e) = std::os::unix::fs::chown(dir, Some(uid), Some(gid))
    {
        tracing::warn!(dir = %dir.display(), "cannot give the state directory to --user: {e}");
    }
    true
}

/// The control socket's directory: created if missing, and checked when it
/// sits in a directory anyone may write to (`/tmp`, where the fallback
/// `/tmp/portmux-UID` lives): another user could have made it first, to
/// receive the services' routes and connections. There it must be a real
/// directory of this uid that nobody else may write to; the fallback itself
/// is created 0700 and must be accessible to nobody else.
fn prepare_dir(dir: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let uid = rustix::process::getuid().as_raw();
    let parent_open =
        dir.parent().and_then(|p| std::fs::metadata(p).ok()).is_some_and(|m| m.permissions().mode() & 0o002 != 0);
    let fallback = parent_open && dir.file_name().is_some_and(|n| *n == *format!("portmux-{uid}"));
    if std::fs::symlink_metadata(dir).is_err() {
        let mode = if parent_open { 0o700 } else { 0o755 };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .map_err(|source| StartError::Dir { path: dir.to_path_buf(), source })?;
    }
    if !parent_open {
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|source| StartError::Dir { path: dir.to_path_buf(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    let problem = if !meta.file_type().is_dir() {
        Some("is not a directory (a symlink?)".to_string())
    } else if meta.uid() != uid {
        Some(format!("belongs to uid {}, not to this uid {uid}", meta.uid()))
    } else if fallback && mode & 0o077 != 0 {
        Some(format!("has mode {mode:o}; it must be 700"))
    } else if mode & 0o022 != 0 {
        Some(format!("has mode {mode:o}: others may write to it"))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(StartError::UnsafeDir { path: dir.to_path_buf(), problem }),
        None => Ok(()),
    }
}

/// Removes the control socket file unless another process has replaced it.
fn remove_if_ours(path: &Path, identity: (u64, u64)) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == identity) {
        let _ = std::fs::remove_file(path);
    }
}
