//! What the workers and the control plane share: the settings, the published
//! route table, the channel from workers to the control plane, the switches
//! that stop or pause the workers, and the counts that say when they are done.

use crate::config::Settings;
use crate::config::limits::Limit;
use crate::forward::{Paused, Resume};
use crate::handoff::Conn;
use crate::ids::ConnId;
use crate::route::Table;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    /// What the connection limits count.
    pub admission: Admission,
    /// What every terminated TLS connection shares (the session-ticket keys).
    pub tls: crate::tls::Context,
    /// The socketpair ends services hold for terminated connections, by (device, inode).
    pub terminated: Mutex<HashMap<(u64, u64), Terminated>>,
    /// The socketpair ends services hold for the per-request engine's
    /// streams, by (device, inode): given back, they are simply closed.
    pub engine_ends: Mutex<std::collections::HashSet<(u64, u64)>>,
    /// The Prometheus metrics (`/metrics`).
    pub metrics: crate::telemetry::Metrics,
    /// The access log (off unless `--access-log`).
    pub access: crate::telemetry::access::AccessLog,
}

/// What the connection limits count: connections admitted (all, and per
/// client address), those being peeked at, and those parked by the control plane.
#[derive(Debug, Default)]
pub struct Admission {
    open: AtomicUsize,
    peeking: AtomicUsize,
    /// Set by the control plane: connections it queues now.
    pub parked: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, u32>>,
}

impl Admission {
    /// Connections admitted and not yet ended, handed off or parked.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections being peeked at.
    pub fn peeking(&self) -> usize {
        self.peeking.load(Ordering::Relaxed)
    }
}

/// The address a client is counted under: its IPv4 address, or its IPv6 /64
/// (one host usually has a whole /64 to pick addresses from).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// A connection counted against the limits while it lives.
#[derive(Debug)]
pub struct Permit<'a> {
    shared: &'a Shared,
    client: IpAddr,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let a = &self.shared.admission;
        a.open.fetch_sub(1, Ordering::Relaxed);
        let mut per = a.per_client.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = per.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.client);
            }
        }
    }
}

/// A connection counted as being peeked at while it lives.
#[derive(Debug)]
pub struct Peeking<'a>(&'a Shared);

impl Drop for Peeking<'_> {
    fn drop(&mut self) {
        self.0.admission.peeking.fetch_sub(1, Ordering::Relaxed);
    }
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
    /// portmux terminated its TLS: the socket is the plaintext socketpair
    /// end, and its next request is routed among the `https://` routes.
    pub tls: Option<Box<portmux_wire::TlsInfo>>,
}

/// A socket's (device, inode): what identifies it for as long as it is open.
/// `None` for anything but a socket.
pub fn socket_id(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u64, u64)> {
    let st = rustix::fs::fstat(fd).ok()?;
    let socket = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket;
    socket.then_some((st.st_dev, st.st_ino))
}

/// A connection whose TLS a worker terminates, as a service has it: the
/// plaintext socketpair end the service got, known by its inode while the
/// worker relays, so that the service may give it back.
#[derive(Debug, Clone)]
pub struct Terminated {
    pub listener: crate::ids::ListenerId,
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub tls: portmux_wire::TlsInfo,
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
        access: crate::telemetry::access::AccessLog,
    ) -> (Arc<Shared>, mpsc::UnboundedReceiver<ToControl>, Vec<mpsc::UnboundedReceiver<Queued>>) {
        let tls = crate::tls::Context::new(settings.ticket_rotation);
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
            admission: Admission::default(),
            tls,
            terminated: Mutex::default(),
            engine_ends: Mutex::default(),
            metrics: crate::telemetry::Metrics::new(),
            access,
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

    /// The terminated connection whose service end is `fd`, if it is one.
    pub fn terminated(&self, fd: std::os::fd::BorrowedFd<'_>) -> Option<Terminated> {
        let id = socket_id(fd)?;
        self.terminated.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
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

    /// Admits a new connection from `client`, or names the limit it is over
    /// (and counts the hit). The permit counts it until dropped.
    pub fn admit(&self, client: IpAddr) -> Result<Permit<'_>, Limit> {
        let (a, limits) = (&self.admission, &self.settings.limits);
        let refuse = |limit| {
            self.settings.limit_hits.hit(limit);
            Err(limit)
        };
        if a.open.load(Ordering::Relaxed) + a.parked.load(Ordering::Relaxed) >= limits.conns {
            return refuse(Limit::Conns);
        }
        if a.peeking.load(Ordering::Relaxed) >= limits.peeking {
            return refuse(Limit::Peeking);
        }
        let client = client_key(client);
        {
            let mut per = a.per_client.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = per.entry(client).or_insert(0);
            if *n as usize >= limits.conns_per_ip {
                return refuse(Limit::ConnsPerIp);
            }
            *n += 1;
        }
        a.open.fetch_add(1, Ordering::Relaxed);
        Ok(Permit { shared: self, client })
    }

    /// Counts a connection as being peeked at until the guard drops.
    pub fn peeking(&self) -> Peeking<'_> {
        self.admission.peeking.fetch_add(1, Ordering::Relaxed);
        Peeking(self)
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
