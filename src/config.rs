//! Settings of a running portmux (from the command line; no config file is needed).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything `portmux run` can be told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Path of the control socket services connect to.
    pub control: PathBuf,
    /// Listening address for routes whose spec names none.
    pub bind: IpAddr,
    /// How long a departed service's routes stay reserved (connections queue
    /// meanwhile), and how long a listener stays open after its last route.
    pub linger: Duration,
    /// Absolute deadline for a new connection's first bytes to identify it.
    pub peek_timeout: Duration,
    /// Most bytes looked at to identify a connection.
    pub peek_max: usize,
    /// Most connections queued per route while its service is away.
    pub park_limit: usize,
    /// Worker threads (one io_uring runtime each).
    pub workers: usize,
    /// How long a worker waits for a service's full control socket before trying another.
    pub handoff_patience: Duration,
    /// Most connections sent to one session and not yet acked.
    pub max_unacked: usize,
}

impl Settings {
    /// Defaults for everything but the control path.
    pub fn with_control(control: PathBuf) -> Settings {
        Settings {
            control,
            bind: IpAddr::from([0u16; 8]),
            linger: Duration::from_secs(30),
            peek_timeout: Duration::from_secs(10),
            peek_max: 16 * 1024,
            park_limit: 1024,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            handoff_patience: Duration::from_secs(1),
            max_unacked: 4096,
        }
    }
}
