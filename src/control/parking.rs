//! The sockets of the connections the control plane's core holds (queued,
//! buffered during an upgrade, or between two delivery attempts), and the
//! watch for a queued client hanging up.

use super::core::HangUp;
use crate::ids::ConnId;
use portmux_sys::uring;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use tokio::sync::Notify;

#[derive(Debug)]
struct Parked {
    fd: Arc<OwnedFd>,
    /// Stops the hang-up watch, if one runs.
    stop: Option<Rc<Notify>>,
}

/// Connection sockets by id.
#[derive(Debug, Default)]
pub(super) struct Parking {
    held: RefCell<HashMap<ConnId, Parked>>,
}

impl Parking {
    /// Keeps `fd` for connection `id` (not watched).
    pub(super) fn hold(&self, id: ConnId, fd: Arc<OwnedFd>) {
        if let Some(old) = self.held.borrow_mut().insert(id, Parked { fd, stop: None }) {
            stop(old);
        }
    }

    /// Watches connection `id` until it leaves; `report` hears how its client hung up.
    pub(super) fn watch(&self, id: ConnId, report: impl FnOnce(HangUp) + 'static) {
        let mut held = self.held.borrow_mut();
        let Some(parked) = held.get_mut(&id) else { return };
        if parked.stop.is_some() {
            return;
        }
        let stop = Rc::new(Notify::new());
        parked.stop = Some(stop.clone());
        tokio_uring::spawn(watch_hangup(parked.fd.clone(), stop, report));
    }

    /// Takes connection `id`'s socket out (its watch stops).
    pub(super) fn take(&self, id: ConnId) -> Option<Arc<OwnedFd>> {
        let parked = self.held.borrow_mut().remove(&id)?;
        let fd = parked.fd.clone();
        stop(parked);
        Some(fd)
    }

    /// A duplicate of connection `id`'s socket (to hand it to a new process
    /// while keeping this one's, until the upgrade commits).
    pub(super) fn dup(&self, id: ConnId) -> Option<io::Result<OwnedFd>> {
        self.held.borrow().get(&id).map(|p| p.fd.try_clone())
    }

    pub(super) fn len(&self) -> usize {
        self.held.borrow().len()
    }
}

fn stop(parked: Parked) {
    if let Some(s) = parked.stop {
        s.notify_one();
    }
}

/// Waits for the client to hang up. A reset (or both directions shut) means
/// it is gone; a FIN alone means it shut down its sending side, which a
/// client waiting for its answer may do, and which looks the same as closing
/// until portmux writes to it: either way nothing more will come to watch for.
async fn watch_hangup(fd: Arc<OwnedFd>, stop: Rc<Notify>, report: impl FnOnce(HangUp)) {
    let sock = fd.as_fd();
    loop {
        let mask = libc::POLLRDHUP as u32;
        match uring::race(sock, uring::poll(sock, mask), stop.notified()).await {
            uring::Raced::Done(Ok(events)) => {
                let gone = events & (libc::POLLHUP | libc::POLLERR) as u32 != 0;
                return report(if gone { HangUp::Gone } else { HangUp::HalfClosed });
            }
            // A sibling watch on the same fd was cancelled; watch again.
            uring::Raced::Done(Err(e)) if e.raw_os_error() == Some(libc::ECANCELED) => {}
            uring::Raced::Done(Err(_)) | uring::Raced::Stopped(_) => return,
        }
    }
}
