//! Replacing a running portmux with a new binary without dropping a connection.
//!
//! The old process starts the new one with one end of a `SOCK_SEQPACKET`
//! socketpair. When the new one says Start, the old freezes (workers stop
//! accepting; the listening sockets stay open and the kernel queues), sends its
//! state with the fds (listeners, control and admin sockets, routes, sessions,
//! unacked and queued connections) and waits for Ready. If the new process
//! fails before that, the old thaws and keeps serving. After Ready, the old
//! pauses its relays at safe points and sends them, sends what its last
//! connections turn into, says Done, and exits.

use crate::control::{ControlPlane, Exit};
use crate::runtime::ToControl;
use portmux_sys::{net, reactor, scm};
use portmux_wire::{Handover, PROTOCOL_VERSION};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

/// Environment variable naming the handover socket's fd in the new process.
pub const UPGRADE_FD_ENV: &str = "PORTMUX_UPGRADE_FD";
/// How long the new process may take to say Start, and then Ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One handover message to send, with the fds it carries.
pub type Outgoing = (Handover, Vec<OwnedFd>);

/// The handover socket, one message per datagram.
#[derive(Debug)]
pub struct Channel {
    sock: AsyncFd<OwnedFd>,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> io::Result<Channel> {
        net::set_nonblocking(fd.as_fd(), true)?;
        Ok(Channel { sock: reactor::register(fd, Interest::READABLE | Interest::WRITABLE)? })
    }

    pub async fn send(&self, msg: &Handover, fds: Vec<OwnedFd>) -> io::Result<()> {
        let bytes = portmux_wire::encode(msg).map_err(io::Error::other)?;
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        self.sock
            .async_io(Interest::WRITABLE, |s| scm::send_with_fds(s.as_fd(), &bytes, &borrowed, scm::Wait::DontWait))
            .await
    }

    /// The next message and its fds; `None` when the other process is gone.
    pub async fn recv(&self) -> io::Result<Option<(Handover, Vec<OwnedFd>)>> {
        let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
        let dg =
            self.sock.async_io(Interest::READABLE, |s| scm::recv_with_fds(s, &mut buf, scm::Wait::DontWait)).await?;
        if dg.len == 0 && dg.fds.is_empty() {
            return Ok(None);
        }
        if dg.truncated || dg.fds_truncated {
            return Err(io::Error::other("truncated handover message"));
        }
        let msg = portmux_wire::decode(&buf[..dg.len]).map_err(io::Error::other)?;
        Ok(Some((msg, dg.fds)))
    }
}

/// In a new process: the handover socket, if an upgrade started it.
pub fn inherited() -> Result<Option<OwnedFd>, String> {
    portmux_sys::inherit::socket_from_env(UPGRADE_FD_ENV).map_err(|e| format!("{UPGRADE_FD_ENV}: {e}"))
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

/// Replaces this process with `binary` (default: the one it was started from).
/// Returns the new process's pid once it serves; on failure this process keeps
/// serving and the error says why (the new process's own reason when it gave one).
pub(crate) async fn upgrade(cp: &Rc<ControlPlane>, binary: Option<PathBuf>) -> Result<u32, String> {
    if !cp.begin_upgrade() {
        return Err("an upgrade is already under way".into());
    }
    let result = run(cp, binary).await;
    if result.is_err() {
        cp.end_upgrade();
        crate::systemd::notify(&["READY=1", "STATUS=serving (the last upgrade failed)"]);
    }
    result
}

async fn run(cp: &Rc<ControlPlane>, binary: Option<PathBuf>) -> Result<u32, String> {
    let settings = &cp.shared().settings;
    let binary = binary.unwrap_or_else(|| settings.exe.clone());
    crate::systemd::reloading();
    let (ours, theirs) = net::seqpacket_pair().map_err(|e| format!("socketpair: {e}"))?;
    net::set_cloexec(theirs.as_fd(), false).map_err(|e| e.to_string())?;
    let child = std::process::Command::new(&binary)
        .args(&settings.args)
        .env(UPGRADE_FD_ENV, theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    drop(theirs);
    let pid = child.id();
    tracing::info!(pid, binary = %binary.display(), "started the new process");
    let (status_tx, status_rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = status_tx.send(child.wait());
    });
    let exited = |rx: oneshot::Receiver<io::Result<std::process::ExitStatus>>| async move {
        match rx.await {
            Ok(Ok(status)) => format!("the new process (pid {pid}) exited before it was ready: {status}"),
            _ => format!("the new process (pid {pid}) closed the handover before it was ready"),
        }
    };
    let channel = Rc::new(Channel::new(ours).map_err(|e| e.to_string())?);

    // 1. It starts.
    match tokio::time::timeout(START_TIMEOUT, channel.recv()).await {
        Ok(Ok(Some((Handover::Start { version, .. }, _)))) if version == PROTOCOL_VERSION => {}
        Ok(Ok(Some((Handover::Start { version, .. }, _)))) => {
            kill(pid);
            return Err(format!("the new binary speaks handover version {version}, this one {PROTOCOL_VERSION}"));
        }
        Ok(Ok(Some((Handover::Failed { reason }, _)))) => return Err(format!("the new process failed: {reason}")),
        Ok(Ok(None)) | Ok(Err(_)) => return Err(exited(status_rx).await),
        Ok(Ok(Some((other, _)))) => {
            kill(pid);
            return Err(format!("the new process sent {} instead of Start", other.kind()));
        }
        Err(_) => {
            kill(pid);
            return Err(format!("the new process did not start within {}s", START_TIMEOUT.as_secs()));
        }
    }

    // 2. Freeze and hand over the state.
    let frozen = cp.freeze().await;
    let (out, rx) = mpsc::unbounded_channel();
    let sender = tokio_uring::spawn(send_all(channel.clone(), rx));
    let mut failure = cp.export(&frozen, &out).err();

    // 3. It serves, or the upgrade is undone.
    if failure.is_none() {
        failure = match tokio::time::timeout(READY_TIMEOUT, channel.recv()).await {
            Ok(Ok(Some((Handover::Ready, _)))) => None,
            Ok(Ok(Some((Handover::Failed { reason }, _)))) => Some(format!("the new process failed: {reason}")),
            Ok(Ok(None)) | Ok(Err(_)) => Some(exited(status_rx).await),
            Ok(Ok(Some((other, _)))) => Some(format!("the new process sent {} instead of Ready", other.kind())),
            Err(_) => Some(format!("the new process was not ready within {}s", READY_TIMEOUT.as_secs())),
        };
    }
    if let Some(reason) = failure {
        kill(pid);
        sender.abort();
        cp.thaw(frozen);
        tracing::error!("upgrade failed, this process keeps serving: {reason}");
        return Err(reason);
    }

    // 4. Committed: the new process serves.
    cp.commit(frozen, out.clone());
    crate::systemd::notify(&[&format!("MAINPID={pid}"), "STATUS=handed over to the new process; draining"]);
    tracing::info!(pid, "the new process serves; moving relays and draining");
    tokio_uring::spawn(finish(cp.clone(), out, sender));
    Ok(pid)
}

/// Writes the handover messages in order.
async fn send_all(channel: Rc<Channel>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some((msg, fds)) = rx.recv().await {
        if let Err(e) = channel.send(&msg, fds).await {
            tracing::warn!("handover: cannot send {}: {e}", msg.kind());
            return;
        }
    }
}

/// After the commit: pause the relays (they move to the new process), wait for
/// the last connection tasks (bounded by `--drain`), say Done, exit.
async fn finish(cp: Rc<ControlPlane>, out: mpsc::UnboundedSender<Outgoing>, sender: tokio::task::JoinHandle<()>) {
    let shared = cp.shared().clone();
    shared.pause_relays.send_replace(true);
    crate::forward::pause_all();
    let deadline = tokio::time::Instant::now() + shared.settings.drain;
    loop {
        let idle = shared.idle.notified();
        let left = shared.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        if left == 0 {
            break;
        }
        tokio::select! {
            () = idle => {}
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(left, "connections still busy at the end of the drain period are closed");
                break;
            }
        }
    }
    // Everything the workers sent before this marker has been handed over.
    let (marker, handled) = oneshot::channel();
    if shared.to_control.send(ToControl::Marker(marker)).is_ok() {
        let _ = handled.await;
    }
    let _ = out.send((Handover::Done, Vec::new()));
    drop(out);
    cp.drop_handover();
    let _ = sender.await;
    cp.request_exit(Exit::Upgraded);
}
