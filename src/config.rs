//! Settings of a running portmux (from the command line; no config file is needed).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Everything `portmux run` can be told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Path of the control socket services connect to (`None`: no control
    /// socket, as in seamless mode).
    pub control: Option<PathBuf>,
    /// Address of the admin API (JSON over HTTP); `None`: no admin API.
    pub admin: Option<SocketAddr>,
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
    /// Deadline for each connect to a backend.
    pub connect_timeout: Duration,
    /// A relayed connection on which neither side sends or reads for this long is closed.
    pub idle_timeout: Duration,
    /// How long a backend that failed to connect is skipped.
    pub backend_cooldown: Duration,
    /// How relays move bytes (auto; copy or splice only for measurements).
    pub relay_mode: crate::forward::relay::Mode,
    /// Public listeners expect a PROXY protocol header (v1 or v2) first.
    pub accept_proxy: bool,
    /// Routes with backends to create at start-up (seamless mode).
    pub initial_routes: Vec<crate::admin::RouteConfig>,
    /// After an upgrade, how long the old process may finish its last work.
    pub drain: Duration,
    /// The binary and arguments this process was started with: an upgrade
    /// starts the binary now at that path with the same arguments.
    pub exe: PathBuf,
    pub args: Vec<std::ffi::OsString>,
}

impl Settings {
    /// Defaults for everything but the control socket.
    pub fn with_control(control: Option<PathBuf>) -> Settings {
        Settings {
            control,
            admin: None,
            bind: IpAddr::from([0u16; 8]),
            linger: Duration::from_secs(30),
            peek_timeout: Duration::from_secs(10),
            peek_max: 16 * 1024,
            park_limit: 1024,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            handoff_patience: Duration::from_secs(1),
            max_unacked: 4096,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            backend_cooldown: Duration::from_secs(10),
            relay_mode: crate::forward::relay::Mode::Auto,
            accept_proxy: false,
            initial_routes: Vec::new(),
            drain: Duration::from_secs(30),
            exe: std::env::current_exe().unwrap_or_else(|_| "portmux".into()),
            args: std::env::args_os().skip(1).collect(),
        }
    }
}
