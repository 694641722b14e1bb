//! The `portmux` command line.
#![deny(unsafe_code)]

use clap::{Parser, Subcommand};
use portmux::config::Settings;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "portmux", version, about = "Services share ports 80/443 and restart without dropping a connection")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run portmux. No configuration is needed: services claim routes over the control socket.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Control socket path [default: /run/portmux/control.sock for root,
    /// $XDG_RUNTIME_DIR/portmux/control.sock otherwise]
    #[arg(long, env = portmux_wire::CONTROL_ENV, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Listening address for routes whose spec names none ([::] listens dual-stack)
    #[arg(long, value_name = "ADDR", default_value = "::")]
    bind: IpAddr,
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
    /// Most connections queued per route while its service is away
    #[arg(long, value_name = "N", default_value_t = 1024)]
    park_limit: usize,
    /// Worker threads, one io_uring runtime each [default: one per core]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); RUST_LOG also works
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let control = args.control.unwrap_or_else(|| {
        let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
        portmux_wire::default_control_path(rustix::process::getuid().as_raw(), xdg.as_deref())
    });
    let mut settings = Settings::with_control(control);
    settings.bind = args.bind;
    settings.linger = args.linger;
    settings.peek_timeout = args.peek_timeout;
    settings.peek_max = args.peek_max as usize;
    settings.park_limit = args.park_limit;
    if let Some(w) = args.workers {
        settings.workers = w.into();
    }
    match portmux::runtime::run(settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portmux: {e}");
            ExitCode::FAILURE
        }
    }
}
