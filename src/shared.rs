//! What the workers and the control plane share: the settings, the published
//! route table, the channel from workers to the control plane, the switches
//! that stop or pause the workers, and the counts that say when they are done.

use crate::config::Settings;
use crate::forward::{Paused, Resume};
use crate::handoff::Conn;
use crate::ids::ConnId;
use crate::route::Table;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::sync::{Notify, mpsc, watch};

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
    pub in_flight: AtomicUsize,
    pub idle: Notify,
    /// Accept loops running (all workers), and a wake-up when it reaches zero:
    /// an upgrade's freeze waits for every accept to be over, so that a
    /// connection accepted at that moment is counted in flight, not lost.
    pub accepting: AtomicUsize,
    pub accepts_over: Notify,
    /// Work for the workers (relays resumed after an upgrade, connections
    /// given back), round robin.
    pub inboxes: Vec<mpsc::UnboundedSender<Queued>>,
    pub next_inbox: AtomicUsize,
    /// Workers still running.
    pub workers_running: watch::Sender<usize>,
    pub next_conn_id: AtomicU64,
    /// Given-back connections waiting for their next request.
    pub idle_held: AtomicUsize,
}

/// Work a worker is given.
#[derive(Debug)]
pub enum Job {
    /// Relay on (after an upgrade).
    Resume(Resume),
    /// Hold a connection a service gave back until its next request.
    Idle(Idle),
}

/// A connection between requests, given back by a service: held until its
/// next request (at most `--keepalive-timeout` after `since`).
#[derive(Debug)]
pub struct Idle {
    pub fd: std::os::fd::OwnedFd,
    pub listener: crate::ids::ListenerId,
    /// The addresses the next instance is told (those portmux first saw:
    /// behind a load balancer, the PROXY header's).
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub since: std::time::Instant,
}

/// What reaches the control plane from the workers.
#[derive(Debug)]
pub enum ToControl {
    /// A connection to queue or deliver through the control plane.
    Conn(Conn),
    /// A relay paused for an upgrade, to hand to the new process.
    Relay(Paused),
    /// A given-back connection, still idle, to hand to the new process.
    Idle(Idle),
    /// Answered once everything sent before it was handled (the channel is FIFO).
    Marker(tokio::sync::oneshot::Sender<()>),
}

impl Shared {
    /// Shared state for `workers` workers; the receivers are the control
    /// plane's intake and each worker's inbox.
    pub fn new(
        settings: Settings,
        workers: usize,
    ) -> (Arc<Shared>, mpsc::UnboundedReceiver<ToControl>, Vec<mpsc::UnboundedReceiver<Queued>>) {
        let (to_control, intake) = mpsc::unbounded_channel();
        let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let shared = Arc::new(Shared {
            settings,
            table: ArcSwap::from_pointee(Table::default()),
            table_version: watch::Sender::new(0),
            to_control,
            stopping: watch::Sender::new(false),
            handing_over: watch::Sender::new(false),
            pause_relays: watch::Sender::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            accepting: AtomicUsize::new(0),
            accepts_over: Notify::new(),
            inboxes,
            next_inbox: AtomicUsize::new(0),
            workers_running: watch::Sender::new(workers),
            next_conn_id: AtomicU64::new(1),
            idle_held: AtomicUsize::new(0),
        });
        (shared, intake, receivers)
    }

    /// Hands work to the next worker. It counts as in flight from here, so
    /// that an upgrade's last wait for tasks cannot miss a job still queued.
    pub fn to_worker(self: &Arc<Self>, job: Job) {
        if self.inboxes.is_empty() {
            return;
        }
        let i = self.next_inbox.fetch_add(1, Ordering::Relaxed) % self.inboxes.len();
        let _ = self.inboxes[i].send(Queued { job, guard: TaskGuard::new(self) });
    }

    /// A new connection id, unique for the life of the process (and across upgrades).
    pub fn conn_id(&self) -> ConnId {
        ConnId(self.next_conn_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Publishes a new table and wakes the workers.
    pub fn publish(&self, table: Table) {
        self.table.store(Arc::new(table));
        self.table_version.send_modify(|v| *v += 1);
    }

    /// Waits until every connection task of this process ended, at most `within`.
    pub async fn tasks_done(&self, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let idle = self.idle.notified();
            if self.in_flight.load(Ordering::Relaxed) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return false;
            }
        }
    }
}

/// A job on its way to a worker, counted in flight until its task ends.
#[derive(Debug)]
pub struct Queued {
    pub job: Job,
    pub guard: TaskGuard,
}

/// Counts a connection task in the process-wide in-flight count while it runs.
#[derive(Debug)]
pub struct TaskGuard(Arc<Shared>);

impl TaskGuard {
    pub fn new(shared: &Arc<Shared>) -> TaskGuard {
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        TaskGuard(shared.clone())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
