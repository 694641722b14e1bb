//! Relaying established flows in the kernel: both sockets go in a sockhash
//! whose sk_skb verdict program (`sys/bpf/relay.bpf.c`) sends each socket's
//! incoming bytes straight to its peer's send path. No wake-up, copy or
//! system call per message; portmux only watches for the ends.
//!
//! What the kernel does not do, this module does:
//! - end of file: a FIN wakes the socket's readers; once every byte before
//!   it reached the peer's send queue (the program's counts against the
//!   peer's `TCP_INFO`), the peer's writing side is shut down. RST and
//!   errors end the flow, as in user space;
//! - backpressure: the kernel queues redirected bytes without bound when the
//!   peer stops reading. Each direction may redirect a budget beyond what its
//!   peer took; past it, bytes stay on the socket (its receive buffer fills,
//!   the TCP window closes). A timer, paced by the flow's rate, raises the
//!   budget as the peer takes bytes;
//! - bytes the program left for user space (past the budget, or while the
//!   peer was not in the map yet) are written here, after every byte the
//!   kernel redirected before them, and before the kernel redirects again;
//! - the idle timeout, from the program's time of the last byte;
//! - an upgrade: the flow stays in the map (bytes keep moving) while its
//!   sockets and slots pass to the new process with the maps.
//!
//! Whenever the kernel refuses (no privileges, no program, a policy that
//! forbids `bpf`, a side already closed), the flow is relayed in user space.

use super::relay::{Closed, Failure, Outcome, Pause, Side};
use crate::config::Relay as Asked;
use portmux_sys::sockmap::{self, Ctl, Maps, Stats};
use portmux_sys::{net, uring};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// Bytes a direction may redirect beyond what its peer has taken.
pub const BUDGET: u64 = 8 << 20;
/// Bytes written per step when user space writes what the program left.
const CHUNK: usize = 64 * 1024;
/// Chunks written per look at a direction before the other gets its turn.
const PUMP_CHUNKS: usize = 16;
/// How often the budget is raised at least, and at most.
const REFRESH_MIN: Duration = Duration::from_micros(500);
const REFRESH_MAX: Duration = Duration::from_secs(10);
/// Waiting for the kernel to flush a direction: first and longest pause.
const RETRY_MIN: Duration = Duration::from_micros(500);
const RETRY_MAX: Duration = Duration::from_millis(20);

/// How this process relays forwarded flows.
#[derive(Debug)]
pub enum InForce {
    Kernel(InKernel),
    /// In user space, and why.
    User(String),
}

/// The maps in force, and where the next slot search starts.
#[derive(Debug)]
pub struct InKernel {
    maps: Maps,
    cursor: AtomicU32,
}

static IN_FORCE: OnceLock<InForce> = OnceLock::new();
/// Forwarded flows this process relayed in the kernel, and in user space.
static FLOWS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Counts a flow: relayed in the kernel, or not.
pub fn count(in_kernel: bool) {
    FLOWS[usize::from(!in_kernel)].fetch_add(1, Ordering::Relaxed);
}

/// Flows relayed so far: (in the kernel, in user space).
pub fn flows() -> (u64, u64) {
    (FLOWS[0].load(Ordering::Relaxed), FLOWS[1].load(Ordering::Relaxed))
}

/// Decides at start (before the sandbox: loading needs CAP_BPF and
/// CAP_NET_ADMIN). An error only when the kernel relay was demanded.
pub fn choose(asked: Asked) -> Result<InForce, String> {
    match asked {
        Asked::User => Ok(InForce::User("--relay user".into())),
        Asked::Auto | Asked::Kernel => match sockmap::load() {
            Ok(maps) => Ok(InForce::Kernel(InKernel::new(maps))),
            Err(why) if asked == Asked::Auto => Ok(InForce::User(why)),
            Err(why) => Err(why),
        },
    }
}

impl InKernel {
    pub fn new(maps: Maps) -> InKernel {
        // Processes sharing the maps (an upgrade) start their searches apart.
        let start = (std::process::id().wrapping_mul(2654435761) % sockmap::SLOTS) & !1;
        InKernel { maps, cursor: AtomicU32::new(start) }
    }

    /// Maps a previous process passed (an upgrade).
    pub fn adopt(fds: [OwnedFd; 5]) -> Result<InKernel, String> {
        Maps::adopt(fds).map(InKernel::new)
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// A free pair of slots (claimed in the kernel: no other process takes it).
    fn claim(&self) -> Option<u32> {
        for _ in 0..64 {
            let even = (self.cursor.fetch_add(2, Ordering::Relaxed) % sockmap::SLOTS) & !1;
            match self.maps.claim(even) {
                Ok(true) => return Some(even),
                Ok(false) => {}
                Err(_) => return None,
            }
        }
        None
    }
}

/// Sets what is in force (once) and says so.
pub fn set(choice: InForce) {
    match &choice {
        InForce::Kernel(_) => tracing::info!("relay: established forwarded flows are relayed in the kernel (sockhash)"),
        InForce::User(why) => tracing::info!("relay: in user space ({why})"),
    }
    let _ = IN_FORCE.set(choice);
}

/// Whether the relay was decided already.
pub fn decided() -> bool {
    IN_FORCE.get().is_some()
}

/// The kernel relay, if it is in force.
pub fn in_force() -> Option<&'static InKernel> {
    match IN_FORCE.get() {
        Some(InForce::Kernel(k)) => Some(k),
        _ => None,
    }
}

/// "kernel", or "user (why)", for the status.
pub fn describe() -> String {
    match IN_FORCE.get() {
        Some(InForce::Kernel(_)) => "kernel".into(),
        Some(InForce::User(why)) => format!("user ({why})"),
        None => "user (not decided yet)".into(),
    }
}

/// A flow's place in the maps, as it passes to a new process: its pair of
/// slots (the client's direction at `even`, the backend's at `even + 1`),
/// and what each socket had been sent when it went in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InMap {
    pub even: u32,
    /// [client, backend]: `net::tcp_written` at insertion.
    pub base: [u64; 2],
}

/// Why a flow stays in user space; `pending`: bytes the client sent that
/// already left its socket, to write to the backend first.
#[derive(Debug)]
pub struct Refused {
    pub why: String,
    pub pending: Vec<u8>,
}

impl Refused {
    fn new(why: impl Into<String>) -> Refused {
        Refused { why: why.into(), pending: Vec::new() }
    }
}

/// Puts a flow's sockets in the map. Its first bytes (peeked only, or sent
/// by either side meanwhile) wait on the sockets and go through the program.
pub fn start(k: &InKernel, client: BorrowedFd<'_>, backend: BorrowedFd<'_>) -> Result<InMap, Refused> {
    for (fd, side) in [(client, Side::Client), (backend, Side::Backend)] {
        match net::tcp_progress(fd) {
            Ok(p) if p.state == 1 => {}
            Ok(_) => return Err(Refused::new(format!("the {side} closed its side already"))),
            Err(e) => return Err(Refused::new(format!("the {side}'s socket: {e}"))),
        }
    }
    let Some(even) = k.claim() else { return Err(Refused::new("every slot of the kernel relay is in use")) };
    let m = &k.maps;
    let undo_claim = |why: String| {
        let _ = m.release(even);
        Refused::new(why)
    };
    let cookies = match (net::socket_cookie(client), net::socket_cookie(backend)) {
        (Ok(c), Ok(b)) => [c, b],
        (Err(e), _) | (_, Err(e)) => return Err(undo_claim(format!("no socket cookie: {e}"))),
    };
    let base = match (net::tcp_written(client), net::tcp_written(backend)) {
        (Ok(c), Ok(b)) => [c, b],
        (Err(e), _) | (_, Err(e)) => return Err(undo_claim(format!("TCP_INFO: {e}"))),
    };
    let fresh = Ctl { written: 0, limit: BUDGET };
    let prepared = m
        .reset_stats(even)
        .and_then(|()| m.reset_stats(even + 1))
        .and_then(|()| m.set_ctl(even, fresh))
        .and_then(|()| m.set_ctl(even + 1, fresh))
        .and_then(|()| m.link(cookies[0], cookies[1], even))
        .and_then(|()| m.link(cookies[1], cookies[0], even + 1));
    let unlink = || {
        let _ = m.unlink(cookies[0]);
        let _ = m.unlink(cookies[1]);
    };
    if let Err(e) = prepared {
        unlink();
        return Err(undo_claim(format!("the relay's maps: {e}")));
    }
    if let Err(e) = m.insert_socket(cookies[0], client) {
        unlink();
        return Err(undo_claim(format!("the kernel did not take the client's socket: {e}")));
    }
    if let Err(e) = m.insert_socket(cookies[1], backend) {
        // Bytes the client sent meanwhile may have left its socket's receive
        // queue for the program's: take them back before it leaves the map.
        let mut pending = Vec::new();
        let passed = m.stats(even).map(|s| s.passed).unwrap_or(0) as usize;
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..1000 {
            if pending.len() >= passed {
                break;
            }
            match net::recv(client, &mut buf) {
                Ok(0) => break,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(_) => std::thread::yield_now(),
            }
        }
        let _ = m.remove_socket(cookies[0]);
        unlink();
        let mut refused = undo_claim(format!("the kernel did not take the backend's socket: {e}"));
        refused.pending = pending;
        return Err(refused);
    }
    // The program runs when bytes arrive; these make it look at those that
    // came before (a verdict needs SO_RCVLOWAT 1 anyway).
    let _ = net::set_rcvlowat(client, 1);
    let _ = net::set_rcvlowat(backend, 1);
    Ok(InMap { even, base })
}

/// One direction of a flow in the kernel.
#[derive(Debug)]
struct Dir {
    done: bool,
    ctl: Ctl,
    /// Passed bytes read from the source and not yet all written: (buf, sent, len).
    pending: Option<(Box<[u8]>, usize, usize)>,
    /// `redirected` when the peer last had taken every redirected byte:
    /// user space may write passed bytes after them.
    flushed_at: Option<u64>,
    /// When the budget is next raised, and the count then.
    refresh_at: Instant,
    refresh_every: Duration,
    refreshed: u64,
}

/// What a flow waits for before it looks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// An event (or a timer already set).
    Event,
    /// The kernel to move bytes it holds: look again shortly.
    Retry,
    /// Room in the destination for pending bytes.
    Writable,
    /// More to write at once, after the other direction's turn.
    Again,
}

/// Watches a flow in the map until both directions are over, one fails, it
/// idles out, or a pause is asked (then it stays in the map for the next
/// process). `ends`: [client, backend], registered for reading.
pub async fn watch(
    k: &InKernel,
    at: InMap,
    ends: [&AsyncFd<OwnedFd>; 2],
    idle: Duration,
    pause: &Pause,
    closed: Closed,
) -> (Outcome, InMap) {
    let now = Instant::now();
    let dir = |done: bool, slot: u32| Dir {
        done,
        ctl: k.maps.ctl(slot).unwrap_or(Ctl { written: 0, limit: BUDGET }),
        pending: None,
        flushed_at: None,
        refresh_at: now + REFRESH_MIN * 2,
        refresh_every: REFRESH_MIN * 2,
        refreshed: 0,
    };
    let mut flow = Flow {
        k,
        at,
        ends,
        dirs: [dir(closed.client, at.even), dir(closed.backend, at.even + 1)],
        last_user: now,
        retry: RETRY_MIN,
    };
    let failure = loop {
        let mut needs = [Need::Event; 2];
        let mut failed = None;
        for (i, need) in needs.iter_mut().enumerate() {
            match flow.service(i) {
                Ok(n) => *need = n,
                Err(f) => {
                    failed = Some(f);
                    break;
                }
            }
        }
        if failed.is_some() {
            break failed;
        }
        if flow.dirs.iter().all(|d| d.done) {
            break None;
        }
        if pause.is_requested() && flow.dirs.iter().all(|d| d.pending.is_none()) {
            let outcome = flow.outcome(None, true);
            return (outcome, at);
        }
        let idle_at = flow.idle_deadline(idle);
        if Instant::now() >= idle_at {
            break Some(Failure::Idle(idle));
        }
        let mut next = idle_at;
        for d in flow.dirs.iter().filter(|d| !d.done) {
            next = next.min(d.refresh_at);
        }
        if needs.contains(&Need::Again) {
            next = Instant::now();
        } else if needs.contains(&Need::Retry) {
            next = next.min(Instant::now() + flow.retry);
            flow.retry = (flow.retry * 2).min(RETRY_MAX);
        } else {
            flow.retry = RETRY_MIN;
        }
        let writable = [needs[1] == Need::Writable, needs[0] == Need::Writable];
        flow.wait(next, writable, pause).await;
    };
    let outcome = flow.outcome(failure, false);
    flow.remove();
    (outcome, at)
}

struct Flow<'a> {
    k: &'a InKernel,
    at: InMap,
    /// [client, backend]; direction 0 reads the client, 1 the backend.
    ends: [&'a AsyncFd<OwnedFd>; 2],
    dirs: [Dir; 2],
    /// When user space last moved a byte itself.
    last_user: Instant,
    retry: Duration,
}

impl Flow<'_> {
    fn fd(&self, i: usize) -> BorrowedFd<'_> {
        self.ends[i].get_ref().as_fd()
    }

    fn side(i: usize) -> Side {
        if i == 0 { Side::Client } else { Side::Backend }
    }

    /// Bytes the destination of direction `i` was sent since it went in.
    fn taken(&self, i: usize) -> io::Result<u64> {
        let j = 1 - i;
        Ok(net::tcp_written(self.fd(j))?.saturating_sub(self.at.base[j]))
    }

    fn stats(&self, i: usize) -> Result<Stats, Failure> {
        self.k.maps.stats(self.at.even + i as u32).map_err(|error| Failure::Io {
            side: Self::side(i),
            op: "reading the kernel relay's counts",
            error,
        })
    }

    /// Looks at direction `i`: writes what the program left, raises the
    /// budget when due, passes an end of file on, notices errors.
    fn service(&mut self, i: usize) -> Result<Need, Failure> {
        let (src_side, dst_side) = (Self::side(i), Self::side(1 - i));
        let reading = |error| Failure::Io { side: src_side, op: "reading", error };
        let writing = |error| Failure::Io { side: dst_side, op: "writing", error };
        // An error on either socket (a reset, or the kernel failing to send).
        for (j, side) in [(i, src_side), (1 - i, dst_side)] {
            if let Err(error) = net::take_socket_error(self.fd(j)) {
                let op = if side == src_side { "reading" } else { "writing" };
                return Err(Failure::Io { side, op, error });
            }
        }
        if self.dirs[i].done {
            return Ok(Need::Event);
        }
        if let Some(need) = self.flush_pending(i).map_err(writing)? {
            return Ok(need);
        }
        let stats = self.stats(i)?;
        let now = Instant::now();
        if now >= self.dirs[i].refresh_at {
            self.refresh(i, &stats, now).map_err(writing)?;
        }
        if stats.passed > self.dirs[i].ctl.written {
            // Bytes after every redirected one: only once the peer took those.
            if self.dirs[i].flushed_at != Some(stats.redirected) {
                let taken = self.taken(i).map_err(writing)?;
                if taken < stats.redirected + self.dirs[i].ctl.written {
                    return Ok(Need::Retry);
                }
                self.dirs[i].flushed_at = Some(stats.redirected);
            }
            // Until the socket has no more (what comes later wakes the
            // flow), the destination is full, or a fair share is written.
            let mut buf = vec![0u8; CHUNK].into_boxed_slice();
            let mut drained = false;
            for _ in 0..PUMP_CHUNKS {
                match net::recv(self.fd(i), &mut buf) {
                    Ok(0) => {
                        drained = true;
                        break;
                    }
                    Ok(n) => {
                        self.dirs[i].pending = Some((std::mem::take(&mut buf), 0, n));
                        if let Some(need) = self.flush_pending(i).map_err(writing)? {
                            return Ok(need);
                        }
                        buf = vec![0u8; CHUNK].into_boxed_slice();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(reading(e)),
                }
            }
            if !drained {
                return Ok(Need::Again);
            }
        }
        let progress = net::tcp_progress(self.fd(i)).map_err(reading)?;
        if progress.peer_closed() {
            // Every byte before the FIN must have reached the destination.
            let unread = net::tcp_unread(self.fd(i)).map_err(reading)?;
            let stats = self.stats(i)?;
            let taken = self.taken(i).map_err(writing)?;
            if unread > 0 || stats.passed != self.dirs[i].ctl.written || taken < stats.redirected + stats.passed {
                return Ok(Need::Retry);
            }
            if !self.dirs[1 - i].done {
                let _ = net::shutdown_write(self.fd(1 - i));
            }
            self.dirs[i].done = true;
        }
        Ok(Need::Event)
    }

    /// Writes pending passed bytes; `Some(need)` while some are left.
    fn flush_pending(&mut self, i: usize) -> io::Result<Option<Need>> {
        let Some((buf, sent, len)) = &mut self.dirs[i].pending else { return Ok(None) };
        while *sent < *len {
            match net::send(self.ends[1 - i].get_ref().as_fd(), &buf[*sent..*len]) {
                Ok(n) => *sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(Need::Writable)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let n = *len as u64;
        self.dirs[i].pending = None;
        self.last_user = Instant::now();
        let redirected = self.dirs[i].flushed_at.unwrap_or(0);
        let d = &mut self.dirs[i];
        d.ctl = Ctl { written: d.ctl.written + n, limit: d.ctl.limit.max(redirected + BUDGET) };
        self.k.maps.set_ctl(self.at.even + i as u32, self.dirs[i].ctl)?;
        Ok(None)
    }

    /// Raises direction `i`'s budget to what its peer took plus [`BUDGET`],
    /// and paces the next time by the flow's rate.
    fn refresh(&mut self, i: usize, stats: &Stats, now: Instant) -> io::Result<()> {
        let moved = stats.redirected - self.dirs[i].refreshed.min(stats.redirected);
        if moved > 0 {
            let taken = self.taken(i)?.saturating_sub(self.dirs[i].ctl.written);
            let limit = taken + BUDGET;
            if limit > self.dirs[i].ctl.limit {
                self.dirs[i].ctl.limit = limit;
                self.k.maps.set_ctl(self.at.even + i as u32, self.dirs[i].ctl)?;
            }
        }
        let d = &mut self.dirs[i];
        // Look again before a quarter of the budget could go at this rate.
        d.refresh_every = if moved > BUDGET / 4 {
            (d.refresh_every / 2).max(REFRESH_MIN)
        } else if moved < BUDGET / 16 {
            (d.refresh_every * 2).min(REFRESH_MAX)
        } else {
            d.refresh_every
        };
        d.refreshed = stats.redirected;
        d.refresh_at = now + d.refresh_every;
        Ok(())
    }

    /// When the flow idles out: `idle` after the last byte either way.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        let now = Instant::now();
        let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let now_ns = mono.tv_sec as u64 * 1_000_000_000 + mono.tv_nsec as u64;
        let mut last = self.last_user;
        for i in 0..2 {
            if let Ok(s) = self.k.maps.stats(self.at.even + i)
                && s.last_ns > 0
            {
                let ago = Duration::from_nanos(now_ns.saturating_sub(s.last_ns));
                last = last.max(now.checked_sub(ago).unwrap_or(now));
            }
        }
        last + idle
    }

    /// Waits for an event on either socket, room in one, a pause, or `until`.
    async fn wait(&self, until: Instant, writable: [bool; 2], pause: &Pause) {
        let sleep = tokio::time::sleep_until(until);
        tokio::pin!(sleep);
        // Room to write is rare to wait for: one io_uring poll then, boxed,
        // so that an idle flow's future does not carry two of them (9 500
        // idle flows in `bench/run --quick --only idle`: 64.5 → 63.0 MiB
        // peak RSS).
        let room = |i: usize| {
            let fd = self.fd(i);
            writable[i].then(|| Box::pin(async move { drop(uring::poll(fd, libc::POLLOUT as u32).await) }))
        };
        let (mut room0, mut room1) = (room(0), room(1));
        std::future::poll_fn(|cx| {
            pause.register(cx.waker());
            if pause.is_requested() {
                return Poll::Ready(());
            }
            let mut woke = false;
            for end in self.ends {
                if let Poll::Ready(Ok(mut guard)) = end.poll_read_ready(cx) {
                    guard.clear_ready();
                    woke = true;
                }
            }
            for room in [&mut room0, &mut room1] {
                if room.as_mut().is_some_and(|r| r.as_mut().poll(cx).is_ready()) {
                    woke = true;
                }
            }
            if woke || sleep.as_mut().poll(cx).is_ready() { Poll::Ready(()) } else { Poll::Pending }
        })
        .await;
    }

    fn outcome(&self, failure: Option<Failure>, paused: bool) -> Outcome {
        let moved = |i: usize| {
            let s = self.k.maps.stats(self.at.even + i as u32).unwrap_or_default();
            s.redirected + self.dirs[i].ctl.written
        };
        Outcome {
            to_backend: moved(0),
            to_client: moved(1),
            failure,
            paused,
            closed: Closed { client: self.dirs[0].done, backend: self.dirs[1].done },
        }
    }

    /// Takes the flow out of the maps (its sockets close after).
    fn remove(&self) {
        let m = &self.k.maps;
        for i in 0..2 {
            if let Ok(cookie) = net::socket_cookie(self.fd(i)) {
                let _ = m.remove_socket(cookie);
                let _ = m.unlink(cookie);
            }
        }
        let _ = m.release(self.at.even);
    }
}
