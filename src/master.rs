//! The foreground supervisor (HAProxy's master-worker idea): `portmux run`
//! started from a terminal stays as one process that never serves. It starts
//! the serving process, becomes the child subreaper so that each process an
//! upgrade starts is its child once the old one exits, and ends when the
//! last of them ends, with its exit status. The shell's job, and Ctrl-C,
//! thus follow portmux across `portmux upgrade`. Signals sent to it go on to
//! the serving processes: SIGINT and SIGTERM to all of them, SIGHUP, SIGUSR1
//! and SIGUSR2 to the newest.

use rustix::process::{Pid, Signal, WaitOptions};
use std::process::ExitCode;

/// Set in the serving processes' environment (inherited across upgrades).
pub const CHILD_ENV: &str = "PORTMUX_SUPERVISED";

/// When `portmux run` supervises itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// When started from a terminal, outside systemd and not by an upgrade.
    Auto,
    On,
    Off,
}

/// Whether this `portmux run` should be the supervisor.
pub fn wanted(mode: Mode) -> bool {
    use std::io::IsTerminal;
    let supervised = std::env::var_os(CHILD_ENV).is_some();
    let by_upgrade = std::env::var_os(portmux::upgrade::UPGRADE_FD_ENV).is_some();
    let systemd = ["NOTIFY_SOCKET", "LISTEN_FDS"].iter().any(|v| std::env::var_os(v).is_some());
    match mode {
        _ if supervised || by_upgrade => false,
        Mode::On => true,
        Mode::Off => false,
        Mode::Auto => std::io::stdin().is_terminal() && !systemd,
    }
}

/// Runs the supervisor until the last serving process ends.
pub fn run() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("portmux: cannot start the supervisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(supervise())
}

async fn supervise() -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let me = rustix::process::getpid();
    // Orphans (the process an upgrade started, once the old one exits) become ours.
    if let Err(e) = rustix::process::set_child_subreaper(Some(me)) {
        eprintln!("portmux: cannot become the child subreaper ({e}): after an upgrade, this terminal loses portmux");
    }
    // Taken before the child starts, so that no SIGCHLD is missed.
    let kinds = [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
        SignalKind::user_defined1(),
        SignalKind::user_defined2(),
        SignalKind::child(),
    ];
    let mut streams = Vec::new();
    for k in kinds {
        match signal(k) {
            Ok(s) => streams.push(s),
            Err(e) => {
                eprintln!("portmux: cannot take signals for the supervisor: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let [int, term, hup, usr1, usr2, chld] = &mut streams[..] else { unreachable!("six streams") };
    let exe = std::env::current_exe().unwrap_or_else(|_| "portmux".into());
    let spawned = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(CHILD_ENV, me.as_raw_nonzero().to_string())
        .spawn();
    if let Err(e) = spawned {
        eprintln!("portmux: cannot start {}: {e}", exe.display());
        return ExitCode::FAILURE;
    }
    // Reaped below with waitpid, like every later process.
    let mut last = ExitCode::SUCCESS;
    loop {
        tokio::select! {
            _ = int.recv() => send(&descendants(me), Signal::INT),
            _ = term.recv() => send(&descendants(me), Signal::TERM),
            _ = hup.recv() => send(&newest(me), Signal::HUP),
            _ = usr1.recv() => send(&newest(me), Signal::USR1),
            _ = usr2.recv() => send(&newest(me), Signal::USR2),
            _ = chld.recv() => loop {
                match rustix::process::waitpid(None, WaitOptions::NOHANG) {
                    Ok(Some((_, status))) => {
                        last = match (status.exit_status(), status.terminating_signal()) {
                            (Some(code), _) => ExitCode::from(code as u8),
                            (None, Some(sig)) => ExitCode::from(128u8.wrapping_add(sig as u8)),
                            _ => last,
                        };
                    }
                    Ok(None) => break,
                    // No child left: the last serving process ended.
                    Err(e) if e == rustix::io::Errno::CHILD => return last,
                    Err(e) if e == rustix::io::Errno::INTR => {}
                    Err(e) => {
                        eprintln!("portmux: the supervisor cannot wait for portmux: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            },
        }
    }
}

fn send(pids: &[Pid], sig: Signal) {
    for pid in pids {
        let _ = rustix::process::kill_process(*pid, sig);
    }
}

/// Every process below `me` (the serving ones, and during an upgrade the
/// new one, still the old one's child), with its start time (clock ticks
/// since boot), from /proc.
fn descendants_started(me: Pid) -> Vec<(Pid, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let all: Vec<(i32, i32, u64)> = dir
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // After the command's closing parenthesis: state, ppid, … starttime (field 22).
            let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some((pid, rest.get(1)?.parse().ok()?, rest.get(19)?.parse().ok()?))
        })
        .collect();
    let mut below = vec![me.as_raw_nonzero().get()];
    let mut found = Vec::new();
    while let Some(parent) = below.pop() {
        for &(pid, ppid, started) in &all {
            if ppid == parent && !found.iter().any(|(p, _)| *p == pid) {
                below.push(pid);
                found.push((pid, started));
            }
        }
    }
    found.into_iter().filter_map(|(pid, started)| Some((Pid::from_raw(pid)?, started))).collect()
}

fn descendants(me: Pid) -> Vec<Pid> {
    descendants_started(me).into_iter().map(|(p, _)| p).collect()
}

/// The serving process started last (during an upgrade, the new one).
fn newest(me: Pid) -> Vec<Pid> {
    let started = descendants_started(me).into_iter();
    started.max_by_key(|(p, t)| (*t, p.as_raw_nonzero())).map(|(p, _)| p).into_iter().collect()
}
