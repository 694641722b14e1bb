//! Replacing a running portmux with a new binary without dropping a connection.
//!
//! The old process starts the new one with one end of a `SOCK_SEQPACKET`
//! socketpair. When the new one says Start, the old freezes (workers stop
//! accepting; the listening sockets stay open and the kernel queues), sends its
//! state with the fds (listeners, control and admin sockets, routes, sessions,
//! unacked and queued connections) and waits for Ready. If the new process
//! fails or stops answering before that (every wait is bounded by
//! `--upgrade-timeout`), the old kills it, thaws and keeps serving. After
//! Ready, the old commits and says Commit (only then does the new process
//! serve: until Commit the old may still thaw), pauses its relays at safe
//! points and sends them, sends what its last connections turn into, says
//! Done, and exits.

mod channel;

pub use channel::Channel;

use crate::control::{Control, Exit, HandoverError, Importer, Outgoing};
use crate::reply::{self, Reply};
use crate::shared::{Shared, TaskGuard, ToControl};
use crate::systemd;
use portmux_sys::{net, scm};
use portmux_wire::{HANDOVER_VERSION, Handover};
use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Environment variable naming the handover socket's fd in the new process.
pub const UPGRADE_FD_ENV: &str = "PORTMUX_UPGRADE_FD";
/// How long the new process may take to say Start (nothing is frozen yet).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new process that closed the handover may take to exit before it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(2);
/// A handover message that cannot be written for this long: the new process
/// stopped reading.
const SEND_STALL: Duration = Duration::from_secs(5);

/// Why an upgrade failed; the old process keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already under way")]
    InProgress,
    #[error("cannot create the handover socket: {0}")]
    Socket(#[source] io::Error),
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the new binary speaks handover version {theirs}, this one {HANDOVER_VERSION}")]
    Version { theirs: u32 },
    #[error("the new process failed: {0}")]
    Failed(String),
    #[error("the new process (pid {pid}) exited before it was ready: {status}")]
    Exited { pid: u32, status: ExitStatus },
    #[error("the new process (pid {pid}) closed the handover before it was ready; it was stopped")]
    Closed { pid: u32 },
    #[error("the new process (pid {pid}) sent {kind} instead of {expected}")]
    Unexpected { pid: u32, kind: &'static str, expected: &'static str },
    #[error("the new process (pid {pid}) did not start within {}s", START_TIMEOUT.as_secs())]
    StartTimeout { pid: u32 },
    #[error("the new process (pid {pid}) was not ready within {secs}s of the freeze; it was stopped")]
    ReadyTimeout { pid: u32, secs: u64 },
    #[error("handover: {0}")]
    Handover(#[from] HandoverError),
    #[error("handover socket: {0}")]
    Channel(#[source] io::Error),
    #[error("portmux is stopping; the upgrade was undone")]
    Aborted,
    #[error("the previous portmux did not commit the upgrade within {secs}s")]
    NoCommit { secs: u64 },
}

/// Which process an upgrade failure is to blame on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The new binary: it did not start, failed, or stopped answering.
    NewProcess,
    /// This process: it could not start the new one or send its state.
    ThisProcess,
}

impl UpgradeError {
    pub fn side(&self) -> Side {
        match self {
            UpgradeError::InProgress
            | UpgradeError::Socket(_)
            | UpgradeError::Spawn { .. }
            | UpgradeError::Handover(_)
            | UpgradeError::Channel(_)
            | UpgradeError::Aborted
            | UpgradeError::NoCommit { .. } => Side::ThisProcess,
            _ => Side::NewProcess,
        }
    }
}

/// In a new process: the handover socket, if an upgrade started it.
pub fn inherited() -> io::Result<Option<OwnedFd>> {
    portmux_sys::inherit::socket_from_env(UPGRADE_FD_ENV)
        .map_err(|e| io::Error::new(e.kind(), format!("{UPGRADE_FD_ENV}: {e}")))
}

/// Tells the previous process this one cannot start, and why.
pub fn report_failure(fd: OwnedFd, reason: &str) {
    let bytes = portmux_wire::encode(&Handover::Failed { reason: reason.into() }).unwrap_or_default();
    let _ = net::set_nonblocking(fd.as_fd(), false);
    let _ = scm::send_datagram(fd.as_fd(), &bytes, scm::Wait::Block);
}

fn kill(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// Serves upgrade requests (`portmux upgrade`, SIGUSR2) one after another.
pub async fn serve_requests(
    control: Rc<Control>,
    mut requests: mpsc::UnboundedReceiver<crate::control::UpgradeRequest>,
) {
    while let Some(request) = requests.recv().await {
        let result = upgrade(&control, request.binary).await;
        match &result {
            Ok(pid) => tracing::info!(pid, "upgrade done: the new process serves"),
            Err(e) => tracing::error!("upgrade failed, this process keeps serving: {e}"),
        }
        if let Some(reply) = request.reply {
            let _ = reply.send(result.map_err(|e| e.to_string()));
        }
    }
}

/// Replaces this process with `binary` (default: the one it was started from).
/// Returns the new process's pid once it serves; on failure this process keeps
/// serving and the error says why (the new process's own reason when it gave one).
pub async fn upgrade(control: &Rc<Control>, binary: Option<PathBuf>) -> Result<u32, UpgradeError> {
    if !control.begin_upgrade() {
        return Err(UpgradeError::InProgress);
    }
    let result = run(control, binary).await;
    if result.is_err() {
        control.end_upgrade();
        systemd::notify(&["READY=1", "STATUS=serving (the last upgrade failed)"]);
    }
    result
}

/// How the new process ended, once it closed the handover: its exit status
/// if it exits soon, else it is killed.
async fn exited(pid: u32, status: oneshot::Receiver<io::Result<ExitStatus>>) -> UpgradeError {
    match tokio::time::timeout(EXIT_WAIT, status).await {
        Ok(Ok(Ok(status))) => UpgradeError::Exited { pid, status },
        _ => {
            kill(pid);
            UpgradeError::Closed { pid }
        }
    }
}

async fn run(control: &Rc<Control>, binary: Option<PathBuf>) -> Result<u32, UpgradeError> {
    let settings = &control.shared().settings;
    let binary = binary.unwrap_or_else(|| settings.exe.clone());
    systemd::reloading();
    let (ours, theirs) = net::seqpacket_pair().map_err(UpgradeError::Socket)?;
    net::set_cloexec(theirs.as_fd(), false).map_err(UpgradeError::Socket)?;
    let mut command = std::process::Command::new(&binary);
    // The new process inherits this one's sandbox (Landlock and seccomp stack,
    // up to a limit): it is told so, instead of stacking another layer.
    match &settings.sandboxed {
        Some(report) => command.env(crate::sandbox::INHERITED_ENV, report),
        None => command.env_remove(crate::sandbox::INHERITED_ENV),
    };
    let child = command
        .args(&settings.args)
        .env(UPGRADE_FD_ENV, theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|source| UpgradeError::Spawn { binary: binary.clone(), source })?;
    drop(theirs);
    let pid = child.id();
    tracing::info!(pid, binary = %binary.display(), "started the new process");
    // A thread reaps it, whatever happens to the upgrade.
    let (status_tx, status_rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = status_tx.send(child.wait());
    });
    let channel = Rc::new(Channel::new(ours).map_err(UpgradeError::Socket)?);

    // 1. It starts.
    match tokio::time::timeout(START_TIMEOUT, channel.recv()).await {
        Ok(Ok(Some((Handover::Start { version, .. }, _)))) if version == HANDOVER_VERSION => {}
        Ok(Ok(Some((Handover::Start { version, .. }, _)))) => {
            kill(pid);
            return Err(UpgradeError::Version { theirs: version });
        }
        Ok(Ok(Some((Handover::Failed { reason }, _)))) => return Err(UpgradeError::Failed(reason)),
        Ok(Ok(None)) | Ok(Err(_)) => return Err(exited(pid, status_rx).await),
        Ok(Ok(Some((other, _)))) => {
            kill(pid);
            return Err(UpgradeError::Unexpected { pid, kind: other.kind(), expected: "Start" });
        }
        Err(_) => {
            kill(pid);
            return Err(UpgradeError::StartTimeout { pid });
        }
    }

    if control.is_stopping() {
        kill(pid);
        return Err(UpgradeError::Aborted);
    }

    // 2. Freeze and hand over the state; from here on every wait ends by the deadline.
    let within = settings.upgrade_timeout;
    let deadline = tokio::time::Instant::now() + within;
    let frozen = control.freeze(within).await;
    let (out, rx) = mpsc::unbounded_channel();
    let committed = Rc::new(Cell::new(false));
    let sender = tokio_uring::spawn(send_all(channel.clone(), rx, committed.clone(), control.shared().clone()));
    let mut failure = control.export(&frozen, &out).err().map(UpgradeError::from);

    // 3. It serves, or the upgrade is undone.
    if failure.is_none() {
        let ready = tokio::select! {
            r = tokio::time::timeout_at(deadline, channel.recv()) => Some(r),
            () = control.upgrade_aborted() => None,
        };
        failure = match ready {
            Some(Ok(Ok(Some((Handover::Ready, _))))) => None,
            Some(Ok(Ok(Some((Handover::Failed { reason }, _))))) => Some(UpgradeError::Failed(reason)),
            Some(Ok(Ok(None)) | Ok(Err(_))) => Some(exited(pid, status_rx).await),
            Some(Ok(Ok(Some((other, _))))) => {
                Some(UpgradeError::Unexpected { pid, kind: other.kind(), expected: "Ready" })
            }
            Some(Err(_)) => Some(UpgradeError::ReadyTimeout { pid, secs: within.as_secs() }),
            None => Some(UpgradeError::Aborted),
        };
    }
    if let Some(reason) = failure {
        kill(pid);
        sender.abort();
        control.thaw(frozen);
        return Err(reason);
    }

    // 4. Committed: the new process serves.
    committed.set(true);
    let _ = out.send((Handover::Commit, Vec::new()));
    control.commit(frozen, out.clone());
    systemd::notify(&[&format!("MAINPID={pid}"), "STATUS=handed over to the new process; draining"]);
    tracing::info!(pid, "the new process serves; moving relays and draining");
    tokio_uring::spawn(finish(control.clone(), out, sender));
    Ok(pid)
}

/// Writes the handover messages in order. If the new process stops taking
/// them after the commit, what they carried is this process's to settle: a
/// connection to deliver gets its answer here (it is not dropped unanswered);
/// a relay is closed, and said so. (Before the commit nothing is answered:
/// this process still holds the originals and thaws.)
async fn send_all(
    channel: Rc<Channel>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    committed: Rc<Cell<bool>>,
    shared: Arc<Shared>,
) {
    let mut broken: Option<String> = None;
    while let Some((mut msg, fds)) = rx.recv().await {
        let sent = match broken {
            None => Some(tokio::time::timeout(SEND_STALL, channel.send(&msg, &fds)).await),
            Some(_) => None,
        };
        channel::zero_secrets(&mut msg);
        if let Some(sent) = sent {
            match sent {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => broken = Some(e.to_string()),
                Err(_) => broken = Some(format!("the new process took no message for {}s", SEND_STALL.as_secs())),
            }
            tracing::warn!("handover: cannot send {}: {}", msg.kind(), broken.as_deref().unwrap_or_default());
        }
        if !committed.get() {
            continue;
        }
        undeliverable(&shared, msg, fds, broken.as_deref().unwrap_or_default());
    }
}

/// A connection or relay that could not reach the new process after the commit.
fn undeliverable(shared: &Arc<Shared>, msg: Handover, fds: Vec<OwnedFd>, why: &str) {
    match msg {
        Handover::Deliver { id, meta, .. } => {
            let Some(fd) = fds.into_iter().next() else { return };
            tracing::warn!(conn = id, peer = %meta.peer, "cannot hand a connection to the new process ({why}); answering it here");
            let reply = match meta.proto {
                portmux_wire::Proto::Http => {
                    Reply::unavailable("portmux is being replaced and cannot serve this request now; retry")
                }
                _ => Reply::Close,
            };
            // Counted, so this process waits for the answer before it exits.
            let guard = TaskGuard::new(shared);
            tokio_uring::spawn(async move {
                reply::send(fd, reply).await;
                drop(guard);
            });
        }
        Handover::Relay { meta, .. } | Handover::RelayInKernel { meta, .. } => {
            tracing::warn!(client = %meta.peer, "cannot hand a relay to the new process ({why}); it is closed");
        }
        Handover::Idle { peer, .. } => {
            let Some(fd) = fds.into_iter().next() else { return };
            tracing::warn!(client = %peer, "cannot hand an idle connection to the new process ({why}); it is closed");
            let guard = TaskGuard::new(shared);
            tokio_uring::spawn(async move {
                reply::send(fd, Reply::Close).await;
                drop(guard);
            });
        }
        _ => {}
    }
}

/// After the commit: pause the relays (they move to the new process), wait for
/// the last connection tasks (bounded by `--drain`), say Done, exit.
async fn finish(control: Rc<Control>, out: mpsc::UnboundedSender<Outgoing>, sender: tokio::task::JoinHandle<()>) {
    let shared = control.shared().clone();
    shared.pause_relays.send_replace(true);
    crate::forward::pause_all();
    if !shared.tasks_done(shared.settings.drain).await {
        let left = shared.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(left, "connections still busy at the end of the drain period are closed");
    }
    // Everything the workers sent before this marker has been handed over.
    let (marker, handled) = oneshot::channel();
    if shared.to_control.send(ToControl::Marker(marker)).is_ok() {
        let _ = handled.await;
    }
    let _ = out.send((Handover::Done, Vec::new()));
    drop(out);
    control.drop_handover();
    if tokio::time::timeout(SEND_STALL * 2, sender).await.is_err() {
        tracing::warn!("the new process stopped taking the last handover messages");
    }
    // Answers to what could not be handed over go out before this process exits.
    shared.tasks_done(Duration::from_secs(3)).await;
    control.request_exit(Exit::Upgraded);
}

/// In the new process: tells the previous one this one started, and takes
/// its state (installed, not yet served). On a failure the previous process is
/// told why (it thaws and keeps serving).
pub async fn import(control: &Rc<Control>, fd: OwnedFd) -> Result<(Rc<Channel>, Importer), UpgradeError> {
    let channel = Rc::new(Channel::new(fd).map_err(UpgradeError::Channel)?);
    let start = Handover::Start { version: HANDOVER_VERSION, pid: std::process::id() };
    channel.send(&start, &[]).await.map_err(UpgradeError::Channel)?;
    let mut importer = control.begin_import();
    let result = loop {
        let (msg, fds) = match channel.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                break Err(UpgradeError::Failed(
                    "the previous portmux closed the handover before sending its state".into(),
                ));
            }
            Err(e) => break Err(UpgradeError::Channel(e)),
        };
        match control.import(&mut importer, msg, fds) {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => break Err(UpgradeError::Handover(e)),
        }
    };
    if let Err(e) = result {
        let _ = channel.send(&Handover::Failed { reason: e.to_string() }, &[]).await;
        return Err(e);
    }
    Ok((channel, importer))
}

/// In the new process, with the state installed: says Ready and waits for
/// the previous process to commit, then serves the state and takes what the
/// previous process still hands over (late connections, paused relays) until
/// it is done. A previous process that goes away after sending its state (or
/// one of a release without Commit, which sends late messages at once) counts
/// as committed: this process holds everything it had.
pub async fn serve_imported(
    control: &Rc<Control>,
    channel: Rc<Channel>,
    importer: Importer,
) -> Result<(), UpgradeError> {
    channel.send(&Handover::Ready, &[]).await.map_err(UpgradeError::Channel)?;
    let within = control.shared().settings.upgrade_timeout * 2;
    let first = match tokio::time::timeout(within, channel.recv()).await {
        Ok(Ok(Some((Handover::Commit, _)))) => None,
        Ok(Ok(Some(late))) => Some(late),
        Ok(Ok(None)) | Ok(Err(_)) => {
            tracing::warn!("the previous portmux went away after handing over its state; serving it");
            None
        }
        Err(_) => return Err(UpgradeError::NoCommit { secs: within.as_secs() }),
    };
    control.end_import(importer);
    let control = control.clone();
    tokio_uring::spawn(async move {
        let mut relays = 0usize;
        let mut next = first.map(Ok);
        loop {
            let msg = match next.take() {
                Some(m) => m,
                None => match channel.recv().await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => break,
                    Err(e) => Err(e),
                },
            };
            match msg {
                Ok((Handover::Done, _)) => break,
                Ok((msg, fds)) => {
                    let kind = msg.kind();
                    if kind == "Relay" || kind == "RelayInKernel" {
                        relays += 1;
                    }
                    if !control.take_late(msg, fds) {
                        tracing::warn!("handover: unexpected {kind} after ready");
                    }
                }
                Err(e) => {
                    tracing::warn!("handover: {e}");
                    break;
                }
            }
        }
        tracing::info!(relays, "the previous portmux handed over everything");
    });
    Ok(())
}
