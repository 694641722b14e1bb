//! Settings of a running portmux (from the command line; no config file is
//! needed), and how users write the things they configure: backends and
//! routes with backends.

pub mod file;
pub mod limits;
pub mod policy;
mod secret;
mod srp;

pub use limits::Limits;
pub use secret::Secret;

use portmux_sys::net::Endpoint;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Most backends' weight; keeps the round-robin schedule short.
pub const MAX_WEIGHT: u32 = 100;

/// Everything `portmux run` can be told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Path of the control socket services connect to (`None`: no control
    /// socket, as in seamless mode).
    pub control: Option<PathBuf>,
    /// The admin API's Unix socket (beside the control socket by default; authorised by the policy).
    pub admin_socket: Option<PathBuf>,
    /// A TCP address for the admin API as well (`--admin`); `None`: none.
    pub admin: Option<SocketAddr>,
    /// The bearer token changes over TCP need (`--admin-token-file`).
    pub admin_token: Option<std::sync::Arc<Secret>>,
    /// The TCP admin address may be off loopback (`--admin-public`).
    pub admin_public: bool,
    /// seamless mode (`portmux tcp`): its GET verbs change backends.
    pub seamless: bool,
    /// What one client, user or session may take.
    pub limits: Limits,
    /// Shared counters of how often each limit refused (for `/status`).
    pub limit_hits: std::sync::Arc<limits::Hits>,
    /// Listening address for routes whose spec names none.
    pub bind: IpAddr,
    /// How long a departed service's routes stay reserved (connections queue
    /// meanwhile), and how long a listener stays open after its last route.
    pub linger: Duration,
    /// Absolute deadline for a new connection's first bytes to identify it.
    pub peek_timeout: Duration,
    /// How long a connection a service gave back (between requests) is held
    /// waiting for its next request.
    pub keepalive_timeout: Duration,
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
    pub relay_mode: RelayMode,
    /// Where established forwarded flows are relayed: the kernel (sockhash) or user space.
    pub relay: Relay,
    /// Connections from these networks (load balancers in front) start with a
    /// PROXY protocol header (v1 or v2); from anywhere else one is refused.
    /// Empty: no PROXY headers are accepted.
    pub accept_proxy: Vec<ipnet::IpNet>,
    /// Routes with backends to create at start-up (seamless mode).
    pub initial_routes: Vec<RouteConfig>,
    /// After an upgrade, how long the old process may finish its last work.
    pub drain: Duration,
    /// During an upgrade, how long the state may stay frozen for the new
    /// process to take it and say it serves; then the upgrade is undone.
    pub upgrade_timeout: Duration,
    /// The binary and arguments this process was started with: an upgrade
    /// starts the binary now at that path with the same arguments.
    pub exe: PathBuf,
    pub args: Vec<std::ffi::OsString>,
    /// Who may claim what (the config file's `[policy]`, or the built-in default).
    pub policy: std::sync::Arc<policy::Policy>,
    /// The config file, if one was read (the sandbox lets portmux read it again), and its
    /// format as `--config-format` named it (`None`: told by the content).
    pub config_file: Option<PathBuf>,
    pub config_format: Option<file::Format>,
    /// The config file's routes (created at start; a reload replaces them),
    /// its `[run]` settings and its policy's text as read at start (a reload
    /// says when they changed: they take effect at the next start or upgrade).
    pub file_routes: Vec<file::FileRoute>,
    pub file_settings: Vec<file::Setting>,
    pub file_policy: String,
    /// Clients that may read `/services` (the config file's `[api] subnets`).
    pub api_subnets: Vec<ipnet::IpNet>,
    /// The port an SRP config file's hosts are served on (`--http-port`).
    pub http_port: u16,
    /// Apply the sandbox at start (`--no-sandbox` turns it off).
    pub sandbox: bool,
    /// Started as root, become this user (`--user`).
    pub user: Option<String>,
    /// What the sandbox put in force, once applied (for `/status`).
    pub sandboxed: Option<String>,
    /// Where certificate files may be read (the sandbox allows these only).
    pub cert_dirs: Vec<PathBuf>,
    /// How often the session-ticket key is replaced (the previous one still opens tickets).
    pub ticket_rotation: Duration,
    /// Where portmux keeps what must survive it (the routes made at run time,
    /// ACME's account and certificates).
    pub state_dir: PathBuf,
    /// Recreate the routes kept in the state directory at start (`--no-resume`: start without them).
    pub resume: bool,
    /// Where the access log goes (`None`: no access log), and as what.
    pub access_log: Option<crate::telemetry::access::Destination>,
    pub access_log_format: crate::telemetry::access::Format,
    /// Certificates from ACME (`https://HOST?acme`).
    pub acme: AcmeSettings,
    /// The per-request engine's limits and habits.
    pub http: HttpSettings,
}

/// How the per-request engine treats requests.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// A target that has not begun its response this long after the request was sent: 504.
    pub response_timeout: Duration,
    /// Request bodies longer than this get 413 (`None`: no limit).
    pub max_request_body: Option<u64>,
    /// Idle connections to backends are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Most idle connections kept per backend and worker.
    pub pool_max_idle: usize,
    /// Clients whose X-Forwarded-*/Forwarded headers are kept (proxies in front).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Add `Via: 1.1 portmux` both ways.
    pub via: bool,
    /// Most concurrent streams per HTTP/2 client connection.
    pub h2_max_streams: u32,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            response_timeout: Duration::from_secs(60),
            max_request_body: None,
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle: 64,
            trusted_proxies: Vec::new(),
            via: false,
            h2_max_streams: 100,
        }
    }
}

/// How portmux gets certificates from ACME.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The ACME server's directory URL.
    pub directory: String,
    /// The account's contact address.
    pub email: Option<String>,
    /// A CA to trust for the ACME server's own HTTPS (a private or test server).
    pub ca: Option<PathBuf>,
    /// The challenge types to use, in order of preference.
    pub challenges: Vec<AcmeChallenge>,
    /// The port HTTP-01 validation connects to.
    pub http_port: u16,
    /// Renew this long before a certificate expires (or with a third of its life left).
    pub renew_before: Duration,
}

/// An ACME challenge type portmux answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    Http01,
    TlsAlpn01,
}

impl AcmeChallenge {
    /// Parses `http-01` or `tls-alpn-01`.
    pub fn parse(s: &str) -> Result<AcmeChallenge, String> {
        match s {
            "http-01" => Ok(AcmeChallenge::Http01),
            "tls-alpn-01" => Ok(AcmeChallenge::TlsAlpn01),
            other => Err(format!("'{other}' is not a challenge portmux answers; use http-01 or tls-alpn-01")),
        }
    }
}

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Where state lives: `/var/lib/portmux` for root, else
/// `$XDG_STATE_HOME/portmux` (or `~/.local/state/portmux`; without a home,
/// `/var/lib/portmux` too, which such a user must name with --state-dir).
pub fn default_state_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/portmux");
    }
    let xdg = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = || std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".local/state"));
    xdg.or_else(home).map_or_else(|| PathBuf::from("/var/lib/portmux"), |d| d.join("portmux"))
}

/// Where certificates usually live: readable under the sandbox unless `--cert-dir` says otherwise.
pub const CERT_DIRS: [&str; 4] = ["/etc/portmux", "/etc/ssl", "/etc/letsencrypt", "/etc/pki"];

impl Settings {
    /// Whether `peer` may send a PROXY protocol header (it is in `--accept-proxy`).
    pub fn proxy_trusted(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.accept_proxy.iter().any(|n| n.contains(&peer))
    }

    /// Defaults for everything but the control socket.
    pub fn with_control(control: Option<PathBuf>) -> Settings {
        Settings {
            control,
            admin_socket: None,
            admin: None,
            admin_token: None,
            admin_public: false,
            seamless: false,
            limits: Limits::default(),
            limit_hits: std::sync::Arc::default(),
            bind: IpAddr::from([0u16; 8]),
            linger: Duration::from_secs(30),
            peek_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            peek_max: 16 * 1024,
            park_limit: 1024,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            handoff_patience: Duration::from_secs(1),
            max_unacked: 4096,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            backend_cooldown: Duration::from_secs(10),
            relay_mode: RelayMode::Auto,
            relay: Relay::User,
            accept_proxy: Vec::new(),
            initial_routes: Vec::new(),
            drain: Duration::from_secs(30),
            upgrade_timeout: Duration::from_secs(10),
            exe: std::env::current_exe().unwrap_or_else(|_| "portmux".into()),
            args: std::env::args_os().skip(1).collect(),
            policy: std::sync::Arc::new(policy::Policy::builtin(rustix::process::getuid().as_raw())),
            config_file: None,
            config_format: None,
            file_routes: Vec::new(),
            file_settings: Vec::new(),
            file_policy: String::new(),
            api_subnets: Vec::new(),
            http_port: 80,
            sandbox: true,
            user: None,
            sandboxed: None,
            cert_dirs: CERT_DIRS.iter().map(PathBuf::from).collect(),
            ticket_rotation: Duration::from_secs(12 * 3600),
            state_dir: default_state_dir(),
            resume: true,
            access_log: None,
            access_log_format: crate::telemetry::access::Format::Human,
            acme: AcmeSettings {
                directory: LETS_ENCRYPT.into(),
                email: None,
                ca: None,
                challenges: vec![AcmeChallenge::TlsAlpn01, AcmeChallenge::Http01],
                http_port: 80,
                renew_before: Duration::from_secs(30 * 86_400),
            },
            http: HttpSettings::default(),
        }
    }
}

/// A backend as written by a user: `host:port`, `[v6]:port`, `unix:/path`,
/// optionally followed by `@WEIGHT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// The address as given, without the weight (host names kept).
    pub name: String,
    pub weight: u32,
}

impl BackendSpec {
    pub fn parse(text: &str) -> Result<BackendSpec, String> {
        let text = text.trim();
        let (name, weight) = match text.rsplit_once('@') {
            Some((n, w)) if !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()) => {
                let w: u32 = w.parse().map_err(|_| format!("'{w}' is not a weight"))?;
                if !(1..=MAX_WEIGHT).contains(&w) {
                    return Err(format!("weight {w} of '{n}' is out of range; use 1 to {MAX_WEIGHT}"));
                }
                (n, w)
            }
            _ => (text, 1),
        };
        if name.is_empty() {
            return Err("empty backend address".into());
        }
        if let Some(path) = name.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("'{name}': a Unix socket backend needs an absolute path, e.g. unix:/run/app.sock"));
            }
        } else {
            let port_ok =
                name.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !port_ok {
                return Err(format!("'{name}' is not a backend address; write host:port, [v6]:port or unix:/path"));
            }
        }
        Ok(BackendSpec { name: name.to_string(), weight })
    }

    /// Parses a comma-separated list (at least one).
    pub fn parse_list(text: &str) -> Result<Vec<BackendSpec>, String> {
        let list: Vec<BackendSpec> =
            text.split(',').filter(|s| !s.trim().is_empty()).map(BackendSpec::parse).collect::<Result<_, _>>()?;
        if list.is_empty() {
            return Err("no backends given".into());
        }
        Ok(list)
    }

    /// Resolves the address (host names through the system resolver; this may block).
    pub fn resolve(&self) -> Result<Vec<Endpoint>, String> {
        if let Some(path) = self.name.strip_prefix("unix:") {
            return Ok(vec![Endpoint::Unix(path.into())]);
        }
        let addrs: Vec<Endpoint> = self
            .name
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve backend '{}': {e}", self.name))?
            .map(Endpoint::Tcp)
            .collect();
        if addrs.is_empty() {
            return Err(format!("backend '{}' resolves to no address", self.name));
        }
        Ok(addrs)
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weight == 1 { f.write_str(&self.name) } else { write!(f, "{}@{}", self.name, self.weight) }
    }
}

/// Backends with their resolved addresses, ready to build a pool from.
pub type Resolved = Vec<(BackendSpec, Vec<Endpoint>)>;

/// A route with backends, as a user asks for it.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub route: String,
    pub backends: Vec<BackendSpec>,
}

/// How relays move bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Copy on loopback and for small exchanges; splice bulk transfers across a NIC.
    #[default]
    Auto,
    /// Always copy through user-space buffers (for measurements).
    Copy,
    /// Always splice(2) through pipes (for measurements).
    Splice,
}

/// Where established forwarded flows are relayed (`--relay`). User space is
/// the default: measured on this project's machines, the kernel relay is
/// slower (docs/ARCHITECTURE.md, "In the kernel").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Relay {
    /// In the kernel where it takes the flow, in user space otherwise.
    Auto,
    /// In the kernel; portmux does not start if the kernel refuses.
    Kernel,
    /// In user space only.
    #[default]
    User,
}

impl std::str::FromStr for Relay {
    type Err = String;
    fn from_str(s: &str) -> Result<Relay, String> {
        match s {
            "auto" => Ok(Relay::Auto),
            "kernel" => Ok(Relay::Kernel),
            "user" => Ok(Relay::User),
            _ => Err(format!("'{s}' is not a relay; use auto, kernel or user")),
        }
    }
}

impl std::str::FromStr for RelayMode {
    type Err = String;
    fn from_str(s: &str) -> Result<RelayMode, String> {
        match s {
            "auto" => Ok(RelayMode::Auto),
            "copy" => Ok(RelayMode::Copy),
            "splice" => Ok(RelayMode::Splice),
            _ => Err(format!("'{s}' is not a relay mode; use auto, copy or splice")),
        }
    }
}
