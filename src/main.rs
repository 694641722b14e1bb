//! The `portmux` command line: run the daemon, manage routes with backends
//! through the admin API, or run seamless mode.
#![forbid(unsafe_code)]

mod cli_file;
mod cli_status;
mod master;

use clap::{Parser, Subcommand};
use portmux::admin::{self, AdminAddr, RouteView};
use portmux::config::{Limits, Settings};
use portmux::forward::backend::BackendSpec;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const ADMIN_ENV: &str = "PORTMUX_ADMIN";

/// mimalloc instead of glibc's malloc: the per-request engine allocates and
/// frees small buffers on every request, from two worker threads.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "portmux", version, about = "Services share ports 80/443 and restart without dropping a connection")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run portmux. No configuration is needed: services claim routes over the control socket.
    Run(Box<RunArgs>),
    /// Manage routes that forward to backend addresses, on a running portmux.
    Route {
        #[command(subcommand)]
        action: RouteAction,
        /// Admin API of the running portmux: its socket's path, or a TCP address
        /// [default: admin.sock beside the control socket]
        #[arg(long, global = true, env = ADMIN_ENV, value_name = "PATH|ADDR")]
        admin: Option<String>,
        /// For a TCP admin address: the file with the bearer token that changes need
        #[arg(long, global = true, env = "PORTMUX_ADMIN_TOKEN_FILE", value_name = "FILE")]
        admin_token_file: Option<PathBuf>,
    },
    /// Replace the running portmux with the binary now on disk (or --binary), without
    /// dropping a connection; returns when the new process serves, or fails with its error.
    Upgrade {
        /// Control socket of the running portmux [default: as for `run`]
        #[arg(long, env = portmux_wire::CONTROL_ENV, value_name = "PATH")]
        control: Option<PathBuf>,
        /// The new binary [default: the path the running portmux was started from]
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
    /// Check a config file (TOML, or SRP's JSON) without running: prints each problem with
    /// its line and column, and exits non-zero if there is one.
    Check {
        #[command(flatten)]
        file: FileArgs,
    },
    /// Re-read the running portmux's config file and apply what changed (as SIGHUP does);
    /// a file with a problem is refused and the running configuration stays.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// What the running portmux holds and does: its listeners, routes with their owners or
    /// backends and health, connections and counts, upgrades, uptime and version.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the admin API's JSON ({"status": …, "routes": […]})
        #[arg(long)]
        json: bool,
    },
    /// List every route with its counts (as `portmux route list`).
    Routes {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the admin API's JSON
        #[arg(long)]
        json: bool,
    },
    /// Print the man page (roff) of portmux and its commands.
    Man,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// seamless mode: a TCP proxy on LISTEN_PORT to BACKENDS (round robin), switched
    /// with HTTP verbs on --http-port: /set?backends=, /add?backend=, /remove?backend=, /get.
    Tcp(Box<TcpArgs>),
}

#[derive(Subcommand, Debug)]
enum RouteAction {
    /// Forward SPEC to backends (replaces the backends of an existing route with backends).
    Add {
        /// Route spec, e.g. http://api.example.com:80, tcp://:5432?lb=least_conn, tls://:443?proxy=v2
        spec: String,
        /// Comma-separated backends: host:port, [v6]:port, unix:/path; @WEIGHT for weights
        /// (none for a redirect: http://HOST:80?redirect=https)
        #[arg(long, value_name = "LIST")]
        backend: Option<String>,
    },
    /// List every route: services' and those with backends, with health and counts.
    List {
        /// Print the admin API's JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove a route with backends (connections already relayed carry on).
    Remove { spec: String },
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Listening address for routes whose spec names none ([::] listens dual-stack)
    #[arg(long, value_name = "ADDR", default_value = "::")]
    bind: IpAddr,
    /// Deadline for each connect to a backend
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Close a forwarded connection on which neither side sends or reads for this long
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// How long a backend that failed to connect is skipped
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    backend_cooldown: Duration,
    /// Per-request routes: a target that has not begun its response this long after the
    /// request was sent gets the client a 504
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    response_timeout: Duration,
    /// Per-request routes: request bodies longer than this get 413 [default: no limit]
    #[arg(long, value_name = "BYTES")]
    max_request_body: Option<u64>,
    /// Per-request routes: idle keep-alive connections to a backend are closed after this long
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pool_idle_timeout: Duration,
    /// Per-request routes: most idle connections kept per backend (and worker thread)
    #[arg(long, value_name = "N", default_value_t = 64)]
    pool_max_idle: usize,
    /// Proxies in front whose X-Forwarded-For/-Proto/-Host and Forwarded headers are kept
    /// (and extended); from anyone else they are replaced. Comma-separated CIDRs [default: none]
    #[arg(long, value_name = "CIDRS", value_parser = parse_networks)]
    trusted_proxies: Option<Networks>,
    /// Per-request routes: add "Via: 1.1 portmux" to requests and responses
    #[arg(long)]
    via: bool,
    /// Most concurrent streams per HTTP/2 client connection
    #[arg(long, value_name = "N", default_value_t = 100)]
    h2_max_streams: u32,
    /// Connections from these networks (load balancers in front) start with a PROXY protocol
    /// header (v1 or v2); a PROXY header from anyone else is refused. Comma-separated CIDRs,
    /// e.g. 10.0.0.0/8,192.0.2.7/32 [default: none]
    #[arg(long, value_name = "CIDRS", value_parser = parse_networks)]
    accept_proxy: Option<Networks>,
    /// After an upgrade, how long the old process may finish its last work (relays that
    /// cannot move, clients still being read); on SIGTERM, how long connections in flight
    /// may finish after portmux stopped accepting
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// During an upgrade, how long the state may stay frozen for the new process to take it
    /// and say it serves; then the upgrade is undone and this process serves on
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    upgrade_timeout: Duration,
    /// How long a hand-over waits for room in a service's full control socket before trying another instance
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration, hide = true)]
    handoff_patience: Duration,
    /// Worker threads, one io_uring runtime each [default: one per core]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    /// How relays move bytes: auto (copy on loopback and for small exchanges, splice bulk across a NIC), or copy/splice only (for measurements)
    #[arg(long, value_name = "MODE", default_value = "auto", hide = true)]
    relay_mode: portmux::config::RelayMode,
    /// Where established forwarded flows are relayed: user (portmux's own relay; measured faster here), kernel (sockhash and an sk_skb program; needs CAP_BPF and CAP_NET_ADMIN at start), or auto (the kernel where it takes the flow)
    #[arg(long, value_name = "WHERE", default_value = "user")]
    relay: portmux::config::Relay,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); RUST_LOG also works
    #[arg(long, visible_alias = "log-level", value_name = "FILTER", default_value = "info")]
    log: String,
    #[command(flatten)]
    limits: LimitArgs,
    /// The admin API's TCP address must be on loopback unless this is given
    #[arg(long)]
    admin_public: bool,
    /// Run without the sandbox (Landlock, seccomp, dropped capabilities); for debugging
    #[arg(long)]
    no_sandbox: bool,
    /// Started as root, become this user (keeping only CAP_NET_BIND_SERVICE)
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
}

/// Limits: what one client, user or session may take. Each hit is counted in /status.
#[derive(clap::Args, Debug)]
struct LimitArgs {
    /// Connections portmux holds at once (peeked at, queued, held, relayed) [default: what the
    /// open-file limit allows for relayed ones (two fds each), less a reserve]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_conns: Option<u32>,
    /// Connections one client address holds at once; over it HTTP clients get 429, others a close
    #[arg(long, value_name = "N", default_value_t = Limits::default().conns_per_ip)]
    max_conns_per_ip: usize,
    /// Connections whose first bytes are not in yet (slow or silent clients)
    #[arg(long, value_name = "N", default_value_t = Limits::default().peeking)]
    max_peeking: usize,
    /// Connections queued for services that are away, all routes together
    #[arg(long, value_name = "N", default_value_t = Limits::default().parked)]
    max_parked: usize,
    /// Control sessions (connected services)
    #[arg(long, value_name = "N", default_value_t = Limits::default().sessions)]
    max_sessions: usize,
    /// Control sessions of one uid (other than root and portmux's own)
    #[arg(long, value_name = "N", default_value_t = Limits::default().sessions_per_uid)]
    max_sessions_per_uid: usize,
    /// Routes one session may claim
    #[arg(long, value_name = "N", default_value_t = Limits::default().routes_per_session)]
    max_routes_per_session: usize,
    /// Listening addresses one session's routes may use
    #[arg(long, value_name = "N", default_value_t = Limits::default().listeners_per_session)]
    max_listeners_per_session: usize,
    /// Backends of one route
    #[arg(long, value_name = "N", default_value_t = Limits::default().backends_per_route)]
    max_backends_per_route: usize,
    /// Admin API connections at once
    #[arg(long, value_name = "N", default_value_t = Limits::default().admin_conns)]
    max_admin_conns: usize,
    /// How long an admin API client may take to send a request head
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    admin_header_timeout: Duration,
    /// Largest admin API request body, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().admin_body)]
    max_admin_body: usize,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            // 0: derived from the open-file limit at start.
            conns: self.max_conns.map_or(0, |n| n as usize),
            conns_per_ip: self.max_conns_per_ip,
            peeking: self.max_peeking,
            parked: self.max_parked,
            sessions: self.max_sessions,
            sessions_per_uid: self.max_sessions_per_uid,
            routes_per_session: self.max_routes_per_session,
            listeners_per_session: self.max_listeners_per_session,
            backends_per_route: self.max_backends_per_route,
            admin_conns: self.max_admin_conns,
            admin_header_timeout: self.admin_header_timeout,
            admin_body: self.max_admin_body,
        }
    }
}

/// Networks trusted to send PROXY headers.
#[derive(Debug, Clone)]
struct Networks(Vec<ipnet::IpNet>);

fn parse_networks(s: &str) -> Result<Networks, String> {
    let parse = |n: &str| -> Result<ipnet::IpNet, String> {
        let n = n.trim();
        n.parse::<ipnet::IpNet>()
            .or_else(|_| n.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| format!("'{n}' is not a network; write CIDRs like 10.0.0.0/8 or 2001:db8::/32"))
    };
    let list = s.split(',').filter(|n| !n.trim().is_empty()).map(parse).collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() {
        return Err("name the networks of the load balancers in front, e.g. 10.0.0.0/8".into());
    }
    Ok(Networks(list))
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Control socket path [default: /run/portmux/control.sock for root,
    /// $XDG_RUNTIME_DIR/portmux/control.sock otherwise]
    #[arg(long, env = portmux_wire::CONTROL_ENV, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The admin API's Unix socket (mode 0660; changes need root, portmux's uid or a policy
    /// rule with admin = true), or "off" [default: admin.sock beside the control socket]
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Also serve the admin API on this TCP address (loopback unless --admin-public);
    /// changes over TCP need POST/PUT/DELETE, a JSON body and --admin-token-file's token
    #[arg(long, value_name = "ADDR", value_parser = parse_admin)]
    admin: Option<TcpAdmin>,
    /// File holding the bearer token that changes over the TCP admin API need
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// How long a departed service's routes stay reserved (connections queue meanwhile),
    /// and how long a listener stays open after its last route
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    linger: Duration,
    /// Deadline for a new connection's first bytes (TLS ClientHello or HTTP request head)
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    peek_timeout: Duration,
    /// Most bytes looked at to identify a connection
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(512..=1 << 20))]
    peek_max: u32,
    /// How long a keep-alive connection a restarting service gave back is held waiting for its
    /// next request (then it is closed, as an idle keep-alive connection is)
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    keepalive_timeout: Duration,
    /// Most connections queued per route while its service is away
    #[arg(long, value_name = "N", default_value_t = 1024)]
    park_limit: usize,
    /// A directory certificate files (cert=, key=, client_ca=) may be read from under the
    /// sandbox; repeatable [default: /etc/portmux /etc/ssl /etc/letsencrypt /etc/pki]
    #[arg(long, value_name = "DIR")]
    cert_dir: Vec<PathBuf>,
    /// How often the TLS session-ticket key is replaced (tickets of the previous key still resume)
    #[arg(long, value_name = "DURATION", default_value = "12h", value_parser = humantime::parse_duration)]
    ticket_rotation: Duration,
    /// Where portmux keeps the routes made at run time (routes.json) and ACME's account and
    /// certificates (mode 0700) [default: /var/lib/portmux as root, else $XDG_STATE_HOME/portmux]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Start without the routes kept in the state directory (they are replaced at the next change)
    #[arg(long)]
    no_resume: bool,
    /// Stay one process in the foreground across upgrades (a supervisor that starts the serving
    /// process and follows each one an upgrade makes; Ctrl-C stops whichever serves):
    /// auto is on when started from a terminal, outside systemd
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    master: master::Mode,
    /// The access log: one line per connection and per request; - for stdout (journald), or a
    /// file (SIGUSR1 reopens it, for logrotate) [default: none]
    #[arg(long, value_name = "FILE|-", env = "PORTMUX_ACCESS_LOG")]
    access_log: Option<String>,
    /// The access log's lines: human (one readable line) or json (one object per line)
    #[arg(long, value_name = "FORMAT", default_value = "human")]
    access_log_format: portmux::telemetry::access::Format,
    /// The ACME server's directory, for https://HOST?acme routes
    #[arg(long, value_name = "URL", default_value = portmux::config::LETS_ENCRYPT)]
    acme_directory: String,
    /// The ACME account's contact address
    #[arg(long, value_name = "ADDR")]
    acme_email: Option<String>,
    /// A CA certificate (PEM) to trust for the ACME server's own HTTPS, for a private ACME server
    #[arg(long, value_name = "FILE")]
    acme_ca: Option<PathBuf>,
    /// The ACME challenges to answer, in order of preference
    #[arg(long, value_name = "LIST", default_value = "tls-alpn-01,http-01", value_delimiter = ',',
          value_parser = portmux::config::AcmeChallenge::parse)]
    acme_challenge: Vec<portmux::config::AcmeChallenge>,
    /// The port ACME's HTTP-01 validation connects to (portmux answers it there)
    #[arg(long, value_name = "PORT", default_value_t = 80)]
    acme_http_port: u16,
    /// Renew an ACME certificate this long before it expires (or with a third of its life left)
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = humantime::parse_duration)]
    acme_renew_before: Duration,
    #[command(flatten)]
    file: FileArgs,
    #[command(flatten)]
    common: Common,
}

/// Where the config file is and how to read it (`run` and `check`).
#[derive(clap::Args, Debug)]
struct FileArgs {
    /// Config file: TOML ([run] settings, [policy], [api], [[route]]s) or SRP's JSON; flags
    /// given here win over its settings; SIGHUP or `portmux reload` re-read it
    /// [default: /etc/portmux/portmux.toml if it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The config file's format: toml or srp [default: told by the content]
    #[arg(long, value_name = "FORMAT", value_parser = cli_file::parse_format)]
    config_format: Option<portmux::config::file::Format>,
    /// The port the hosts of an SRP config file are served on (and 443 with ACME)
    #[arg(long, value_name = "PORT", default_value_t = 80)]
    http_port: u16,
}

#[derive(clap::Args, Debug)]
struct TcpArgs {
    /// Port to listen on
    listen_port: u16,
    /// Comma-separated backends (host:port, …; @WEIGHT for weights)
    backends: String,
    /// Port of the HTTP interface (on 127.0.0.1)
    #[arg(long, value_name = "PORT", default_value_t = 6777)]
    http_port: u16,
    #[command(flatten)]
    common: Common,
}

/// The admin API's TCP address, or none ("off").
#[derive(Debug, Clone, Copy)]
struct TcpAdmin(Option<SocketAddr>);

fn parse_admin(s: &str) -> Result<TcpAdmin, String> {
    match s {
        "off" | "none" => Ok(TcpAdmin(None)),
        _ => {
            use std::net::ToSocketAddrs;
            // A host name (localhost:9999) resolves; IPv4 first, as on loopback by default.
            let mut addrs: Vec<SocketAddr> = s.to_socket_addrs().map(Iterator::collect).unwrap_or_default();
            addrs.sort_by_key(|a| !a.is_ipv4());
            addrs
                .into_iter()
                .next()
                .map(|a| TcpAdmin(Some(a)))
                .ok_or_else(|| format!("'{s}' is not an address like 127.0.0.1:9999 or localhost:9999 (or 'off')"))
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Started by an upgrade: the old process reports this error too.
            if let Ok(Some(fd)) = portmux::upgrade::inherited() {
                portmux::upgrade::report_failure(fd, e.to_string().trim());
            }
            e.exit();
        }
    };
    if let Command::Run(args) = &cli.command
        && master::wanted(args.master)
    {
        return master::run();
    }
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Tcp(args) => seamless(*args),
        Command::Route { action, admin, admin_token_file } => route(action, admin, admin_token_file),
        Command::Upgrade { control, binary } => upgrade(control, binary),
        Command::Check { file } => check(file.config, file.config_format, file.http_port),
        Command::Reload { admin } => reload(admin.admin, admin.admin_token_file),
        Command::Status { admin, json } => status(admin, json),
        Command::Routes { admin, json } => route(RouteAction::List { json }, admin.admin, admin.admin_token_file),
        Command::Man => man(),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "portmux", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portmux: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn settings(control: Option<PathBuf>, common: &Common) -> Settings {
    let mut s = Settings::with_control(control);
    s.bind = common.bind;
    s.connect_timeout = common.connect_timeout;
    s.idle_timeout = common.idle_timeout;
    s.backend_cooldown = common.backend_cooldown;
    s.http = portmux::config::HttpSettings {
        response_timeout: common.response_timeout,
        max_request_body: common.max_request_body,
        pool_idle_timeout: common.pool_idle_timeout,
        pool_max_idle: common.pool_max_idle.max(1),
        trusted_proxies: common.trusted_proxies.clone().map(|n| n.0).unwrap_or_default(),
        via: common.via,
        h2_max_streams: common.h2_max_streams.max(1),
    };
    s.accept_proxy = common.accept_proxy.clone().map(|n| n.0).unwrap_or_default();
    s.limits = common.limits.limits();
    s.admin_public = common.admin_public;
    s.sandbox = !common.no_sandbox;
    s.user = common.user.clone();
    s.policy = std::sync::Arc::new(portmux::config::policy::Policy::builtin(own_uid(common)));
    s.drain = common.drain;
    s.upgrade_timeout = common.upgrade_timeout;
    s.handoff_patience = common.handoff_patience;
    s.relay_mode = common.relay_mode;
    s.relay = common.relay;
    if let Some(w) = common.workers {
        s.workers = w.into();
    }
    s
}

/// portmux's own uid, trusted like root's: started as root with --user, that user's.
fn own_uid(common: &Common) -> u32 {
    common
        .user
        .as_deref()
        .filter(|_| rustix::process::geteuid().is_root())
        .and_then(portmux::config::policy::user_ids)
        .map_or_else(|| rustix::process::getuid().as_raw(), |(uid, _)| uid)
}

fn run(first: RunArgs) -> Result<(), String> {
    // Started by an upgrade, the previous process learns why this one cannot start.
    let report = |e: String| {
        if let Ok(Some(fd)) = portmux::upgrade::inherited() {
            portmux::upgrade::report_failure(fd, &e);
        }
        e
    };
    let cx = portmux::config::file::Context {
        own_uid: own_uid(&first.common),
        http_port: first.file.http_port,
        acme: first.acme_email.is_some(),
    };
    let argv = std::env::args_os().collect();
    let (args, mut file) =
        cli_file::resolve(argv, first.file.config.as_deref(), first.file.config_format, cx).map_err(report)?;
    // The file's own settings (user, http-port, acme-email) may change what its routes and policy mean.
    let cx_now = portmux::config::file::Context {
        own_uid: own_uid(&args.common),
        http_port: args.file.http_port,
        acme: args.acme_email.is_some(),
    };
    if let Some((path, config)) = &mut file
        && (cx_now.own_uid, cx_now.http_port, cx_now.acme) != (cx.own_uid, cx.http_port, cx.acme)
    {
        *config =
            portmux::config::file::load(path, args.file.config_format, cx_now).map_err(|e| report(e.to_string()))?;
    }
    init_logging(&args.common.log);
    let control = args.control.unwrap_or_else(default_control);
    let mut s = settings(Some(control.clone()), &args.common);
    s.admin_socket = match args.admin_socket {
        Some(p) if p.as_os_str() == "off" => None,
        Some(p) => Some(p),
        None => Some(control.with_file_name("admin.sock")),
    };
    s.admin = args.admin.and_then(|a| a.0);
    if let Some(path) = &args.admin_token_file {
        s.admin_token = Some(std::sync::Arc::new(portmux::config::Secret::from_file(path).map_err(report)?));
    }
    s.linger = args.linger;
    s.peek_timeout = args.peek_timeout;
    s.peek_max = args.peek_max as usize;
    s.keepalive_timeout = args.keepalive_timeout;
    s.park_limit = args.park_limit;
    s.cert_dirs.extend(args.cert_dir.iter().cloned());
    s.ticket_rotation = args.ticket_rotation;
    if let Some(dir) = &args.state_dir {
        s.state_dir = dir.clone();
    }
    s.resume = !args.no_resume;
    s.access_log = args.access_log.as_deref().map(portmux::telemetry::access::Destination::parse);
    s.access_log_format = args.access_log_format;
    s.acme = portmux::config::AcmeSettings {
        directory: args.acme_directory.clone(),
        email: args.acme_email.clone(),
        ca: args.acme_ca.clone(),
        challenges: args.acme_challenge.clone(),
        http_port: args.acme_http_port,
        renew_before: args.acme_renew_before,
    };
    s.http_port = args.file.http_port;
    s.config_format = args.file.config_format;
    if let Some((path, config)) = file {
        tracing::info!(file = %path.display(), routes = config.routes.len(), "config file read");
        s.policy = std::sync::Arc::new(config.policy);
        s.file_routes = config.routes;
        s.file_settings = config.settings;
        s.file_policy = config.policy_text;
        s.api_subnets = config.api_subnets;
        s.config_file = Some(path);
    }
    portmux::runtime::run(s).map_err(|e| e.to_string())
}

fn seamless(args: TcpArgs) -> Result<(), String> {
    init_logging(&args.common.log);
    let backends = BackendSpec::parse_list(&args.backends)?;
    let mut s = settings(None, &args.common);
    s.admin = Some(SocketAddr::from(([127, 0, 0, 1], args.http_port)));
    s.seamless = true;
    s.initial_routes = vec![portmux::config::RouteConfig { route: format!("tcp://:{}", args.listen_port), backends }];
    portmux::runtime::run(s).map_err(|e| e.to_string())
}

fn default_control() -> PathBuf {
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    portmux_wire::default_control_path(rustix::process::getuid().as_raw(), xdg.as_deref())
}

/// Asks the running portmux (over its control socket) to replace itself.
fn upgrade(control: Option<PathBuf>, binary: Option<PathBuf>) -> Result<(), String> {
    use portmux_wire::Message;
    use rustix::net::{RecvFlags, SendFlags};
    let path = control.unwrap_or_else(default_control);
    let binary = match binary {
        Some(b) => Some(std::fs::canonicalize(&b).map_err(|e| format!("{}: {e}", b.display()))?),
        None => None,
    };
    let sock = portmux_sys::net::seqpacket_connect(&path, false).map_err(|e| {
        format!(
            "cannot reach portmux at {}: {e}; is it running? (--control or PORTMUX_CONTROL name its socket)",
            path.display()
        )
    })?;
    let request = Message::Upgrade { binary: binary.map(|b| b.to_string_lossy().into_owned()) };
    let bytes = portmux_wire::encode(&request).map_err(|e| e.to_string())?;
    rustix::net::send(&sock, &bytes, SendFlags::NOSIGNAL).map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(120);
    rustix::net::sockopt::set_socket_timeout(&sock, rustix::net::sockopt::Timeout::Recv, Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
    let (_, n) = rustix::net::recv(&sock, &mut buf, RecvFlags::empty())
        .map_err(|e| format!("no answer from portmux within {}s: {e}", timeout.as_secs()))?;
    if n == 0 {
        return Err("portmux closed the connection without an answer".into());
    }
    match portmux_wire::decode::<Message>(&buf[..n]).map_err(|e| e.to_string())? {
        Message::Upgraded { pid } => {
            println!("upgraded: portmux now runs as pid {pid}");
            Ok(())
        }
        Message::Error { reason } => Err(format!("upgrade failed, the running portmux keeps serving: {reason}")),
        other => Err(format!("unexpected answer {}", other.kind())),
    }
}

/// `portmux check`: the file as `portmux run` would take it, backends resolved.
fn check(config: Option<PathBuf>, format: Option<portmux::config::file::Format>, http_port: u16) -> Result<(), String> {
    let Some(path) = cli_file::path_of(config.as_deref()) else {
        return Err(format!(
            "no config file: {} does not exist (name one with --config)",
            portmux::config::file::DEFAULT_PATH
        ));
    };
    let cx = portmux::config::file::Context { own_uid: rustix::process::getuid().as_raw(), http_port, acme: false };
    let argv = ["portmux", "run", "--config"].map(std::ffi::OsString::from).into_iter().chain([path.clone().into()]);
    let (_, file) = cli_file::resolve(argv.collect(), Some(&path), format, cx)?;
    let (_, config) = file.expect("a file was named");
    let unresolved: Vec<String> = config
        .routes
        .iter()
        .flat_map(|r| r.backends.iter().map(move |b| (r, b)))
        .filter_map(|(r, b)| b.resolve().err().map(|e| format!("\n  line {}, column {}: {e}", r.at.line, r.at.column)))
        .collect();
    if !unresolved.is_empty() {
        return Err(format!("config file {}:{}", path.display(), unresolved.concat()));
    }
    println!(
        "{}: OK ({:?}; {} settings, {} routes, {} /services subnets)",
        path.display(),
        config.format,
        config.settings.len(),
        config.routes.len(),
        config.api_subnets.len()
    );
    Ok(())
}

/// Where the admin API of the running portmux is.
#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// Admin API of the running portmux: its socket's path, or a TCP address
    /// [default: admin.sock beside the control socket]
    #[arg(long, env = ADMIN_ENV, value_name = "PATH|ADDR")]
    admin: Option<String>,
    /// For a TCP admin address: the file with the bearer token that changes need
    #[arg(long, env = "PORTMUX_ADMIN_TOKEN_FILE", value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
}

/// `portmux status`: the process, then its routes.
fn status(admin: AdminArgs, json: bool) -> Result<(), String> {
    let addr = admin_addr(admin.admin, admin.admin_token_file)?;
    let get = |path: &str| -> Result<serde_json::Value, String> {
        let (status, body) = admin::request(&addr, "GET", path, None)?;
        let value: serde_json::Value = serde_json::from_str(&body).map_err(|_| format!("HTTP {status}: {body}"))?;
        if status >= 400 {
            return Err(value["error"].as_str().unwrap_or(&body).to_string());
        }
        Ok(value)
    };
    let (state, routes) = (get("/status")?, get("/routes")?);
    if json {
        println!("{}", serde_json::json!({ "status": state, "routes": routes["routes"] }));
        return Ok(());
    }
    let state: admin::StatusView = serde_json::from_value(state).map_err(|e| e.to_string())?;
    let views: Vec<RouteView> = serde_json::from_value(routes["routes"].clone()).map_err(|e| e.to_string())?;
    print!("{}", cli_status::status(&state, &views));
    Ok(())
}

/// `portmux man`: the man pages of portmux and each command, one roff document.
fn man() -> Result<(), String> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out).map_err(|e| e.to_string())?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("portmux-{}", sub.get_name());
        let sub = sub.clone().name(name);
        clap_mangen::Man::new(sub).render(&mut out).map_err(|e| e.to_string())?;
    }
    std::io::Write::write_all(&mut std::io::stdout(), &out).map_err(|e| e.to_string())
}

/// `portmux reload`: the running portmux re-reads its config file.
fn reload(admin: Option<String>, token_file: Option<PathBuf>) -> Result<(), String> {
    let addr = admin_addr(admin, token_file)?;
    let (status, body) = admin::request(&addr, "POST", "/reload", Some("{}"))?;
    let value: serde_json::Value = serde_json::from_str(&body).map_err(|_| format!("HTTP {status}: {body}"))?;
    if status >= 400 {
        return Err(value["error"].as_str().unwrap_or(&body).to_string());
    }
    println!("{}", value["summary"].as_str().unwrap_or(&body));
    Ok(())
}

fn admin_addr(admin: Option<String>, token_file: Option<PathBuf>) -> Result<AdminAddr, String> {
    let token = match &token_file {
        Some(path) => {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            );
            Some(zeroize::Zeroizing::new(text.lines().next().unwrap_or_default().trim().to_string()))
        }
        None => None,
    };
    Ok(match admin {
        Some(text) => AdminAddr::parse(&text, token),
        None => AdminAddr::Unix(default_control().with_file_name("admin.sock")),
    })
}

fn route(action: RouteAction, admin: Option<String>, token_file: Option<PathBuf>) -> Result<(), String> {
    let addr = &admin_addr(admin, token_file)?;
    let answer = match &action {
        RouteAction::Add { spec, backend } => {
            let backends: Vec<String> = match backend {
                Some(list) => BackendSpec::parse_list(list)?.iter().map(ToString::to_string).collect(),
                None if spec.contains("redirect=") => Vec::new(),
                None => {
                    return Err("--backend LIST is needed (a route with no backends must be ?redirect=https)".into());
                }
            };
            let body = serde_json::json!({ "route": spec, "backends": backends }).to_string();
            admin::request(addr, "POST", "/routes", Some(&body))?
        }
        RouteAction::List { .. } => admin::request(addr, "GET", "/routes", None)?,
        RouteAction::Remove { spec } => {
            admin::request(addr, "DELETE", &format!("/routes?route={}", admin::encode_query(spec)), None)?
        }
    };
    let (status, body) = answer;
    let value: serde_json::Value = serde_json::from_str(&body).map_err(|_| format!("HTTP {status}: {body}"))?;
    if status >= 400 {
        return Err(value["error"].as_str().unwrap_or(&body).to_string());
    }
    match action {
        RouteAction::Add { .. } => {
            let view: RouteView = serde_json::from_value(value).map_err(|e| e.to_string())?;
            println!("{}", cli_status::describe(&view));
        }
        RouteAction::List { json: true } => println!("{body}"),
        RouteAction::List { json: false } => {
            let views: Vec<RouteView> = serde_json::from_value(value["routes"].clone()).map_err(|e| e.to_string())?;
            print!("{}", cli_status::routes(&views));
        }
        RouteAction::Remove { .. } => println!("removed {}", value["removed"].as_str().unwrap_or_default()),
    }
    Ok(())
}
