//! The fd `Listener::poll_fd` gives event loops.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

/// A stable fd for event loops: an epoll set holding the current session
/// socket (swapped on reconnect) and a timer that wakes the loop for the next
/// reconnection attempt while portmux is away. Readable means "call `try_accept`".
#[derive(Debug)]
pub(crate) struct Poller {
    pub(crate) epoll: OwnedFd,
    timer: OwnedFd,
}

impl Poller {
    pub(crate) fn new() -> io::Result<Poller> {
        use rustix::event::epoll;
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let timer = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK)?;
        epoll::add(&epoll, &timer, epoll::EventData::new_u64(1), epoll::EventFlags::IN)?;
        Ok(Poller { epoll, timer })
    }

    pub(crate) fn watch(&self, sock: &OwnedFd) -> io::Result<()> {
        use rustix::event::epoll;
        epoll::add(&self.epoll, sock, epoll::EventData::new_u64(0), epoll::EventFlags::IN)?;
        Ok(())
    }

    /// Stops watching a session that ended (it would stay readable forever).
    pub(crate) fn forget(&self, fd: impl AsFd) {
        let _ = rustix::event::epoll::delete(&self.epoll, fd);
    }

    /// Watches a lent listening socket too: readable, it has a connection.
    pub(crate) fn watch_loan(&self, fd: impl AsFd) -> io::Result<()> {
        use rustix::event::epoll;
        epoll::add(&self.epoll, fd, epoll::EventData::new_u64(2), epoll::EventFlags::IN)?;
        Ok(())
    }

    /// Wakes the event loop after `delay`; `None` disarms the timer. Either
    /// way an expiry not yet seen is cleared first.
    pub(crate) fn wake_after(&self, delay: Option<Duration>) {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        self.clear();
        let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
        let value =
            delay.map_or(zero, |d| Timespec { tv_sec: d.as_secs() as _, tv_nsec: d.subsec_nanos().max(1) as _ });
        let _ = timerfd_settime(
            &self.timer,
            TimerfdTimerFlags::empty(),
            &Itimerspec { it_interval: zero, it_value: value },
        );
    }

    /// Consumes an expiry of the timer, so it stops making the fd readable.
    pub(crate) fn clear(&self) {
        let mut expirations = [0u8; 8];
        let _ = rustix::io::read(&self.timer, &mut expirations);
    }
}
