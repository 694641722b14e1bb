//! Least privilege at run time, applied once every socket portmux needs at
//! start is open and before any thread exists (credentials, capabilities and
//! seccomp filters are per thread; the threads made later inherit them):
//!
//! - started as root, portmux keeps only `CAP_NET_BIND_SERVICE` (listeners on
//!   ports below 1024 open on demand), in every set including the ambient one,
//!   so that the process an upgrade starts has it too and nothing more; with
//!   `--user NAME` it also becomes that user;
//! - `no_new_privs`;
//! - Landlock: the file system is read-only and limited to what portmux reads
//!   (system libraries, a few files of `/etc`, `/proc`, its own binary's
//!   directory), writable only in the directories of its sockets and state;
//! - seccomp: an allow-list of the system calls portmux makes (others fail
//!   with EPERM). io_uring operations are not system calls and are not
//!   filtered; the ring itself is set up before the filter.
//!
//! `--no-sandbox` skips all of it (debugging).

use std::io;
use std::path::{Path, PathBuf};

/// Set by an upgrade for the new process: the sandbox it inherited (what
/// the previous process reported).
pub const INHERITED_ENV: &str = "PORTMUX_SANDBOX_INHERITED";
/// How the report of an inherited sandbox ends.
pub const INHERITED: &str = " (inherited from the previous process)";

/// What the sandbox is to allow.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Become this user (when started as root).
    pub user: Option<String>,
    /// Directories portmux writes in (its sockets', its state's).
    pub writable: Vec<PathBuf>,
    /// Files or directories it reads besides the system's (its config file).
    pub readable: Vec<PathBuf>,
    /// Directories where it only makes and appends to files (the access log's).
    pub appendable: Vec<PathBuf>,
}

/// What is in force, for the log and `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub user: String,
    pub capabilities: String,
    pub landlock: String,
    pub seccomp: String,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; capabilities {}; landlock {}; seccomp {}",
            self.user, self.capabilities, self.landlock, self.seccomp
        )
    }
}

/// Why the sandbox could not be applied; portmux does not start without it
/// (unless `--no-sandbox`).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the sandbox must be applied before any thread starts, but {0} threads run")]
    Threads(usize),
    #[error("no user '{0}' in /etc/passwd; create it (the Debian package does) or choose another --user")]
    NoUser(String),
    #[error("cannot drop privileges: {what}: {source}")]
    Privileges {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot apply the Landlock rules: {0}")]
    Landlock(String),
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
}

fn privileges(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> SandboxError {
    move |e| SandboxError::Privileges { what, source: e.into() }
}

/// Threads of this process now.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:"))?.trim().parse().ok())
        .unwrap_or(1)
}

/// Applies the sandbox to this (single-threaded) process.
pub fn apply(plan: &Plan) -> Result<Report, SandboxError> {
    let n = threads();
    if n > 1 {
        return Err(SandboxError::Threads(n));
    }
    let user = drop_privileges(plan)?;
    let capabilities = keep_only_bind_service()?;
    rustix::thread::set_no_new_privs(true).map_err(privileges("no_new_privs"))?;
    let landlock = landlock(plan)?;
    let seccomp = seccomp::install()?;
    Ok(Report { user, capabilities, landlock, seccomp })
}

/// As root with `--user`: becomes that user, keeping the capabilities
/// through the change (they are narrowed next).
fn drop_privileges(plan: &Plan) -> Result<String, SandboxError> {
    use rustix::thread::{set_keep_capabilities, set_thread_groups, set_thread_res_gid, set_thread_res_uid};
    let euid = rustix::process::geteuid();
    let Some(name) = plan.user.as_deref().filter(|_| euid.is_root()) else {
        if euid.is_root() {
            tracing::info!("running as root with CAP_NET_BIND_SERVICE only; --user NAME would leave uid 0 too");
        } else if plan.user.is_some() {
            tracing::warn!("--user applies only when portmux starts as root; it runs as uid {}", euid.as_raw());
        }
        return Ok(format!("uid {}", euid.as_raw()));
    };
    let (uid, gid) = crate::config::policy::user_ids(name).ok_or_else(|| SandboxError::NoUser(name.to_string()))?;
    let (uid, gid) = (rustix::process::Uid::from_raw(uid), rustix::process::Gid::from_raw(gid));
    set_keep_capabilities(true).map_err(privileges("keep capabilities"))?;
    set_thread_groups(&[]).map_err(privileges("clear the supplementary groups"))?;
    set_thread_res_gid(gid, gid, gid).map_err(privileges("change the group"))?;
    set_thread_res_uid(uid, uid, uid).map_err(privileges("change the user"))?;
    set_keep_capabilities(false).map_err(privileges("keep capabilities"))?;
    Ok(format!("user {name} (uid {})", uid.as_raw()))
}

/// Narrows every capability set to `CAP_NET_BIND_SERVICE` (if held at all),
/// raises it in the ambient set so that an upgrade's new process has it, and
/// makes sure that new process, run as root, gains nothing else (securebits
/// `NOROOT`, locked).
fn keep_only_bind_service() -> Result<String, SandboxError> {
    use rustix::thread::{
        CapabilitiesSecureBits, CapabilitySet, CapabilitySets, capabilities, capabilities_secure_bits,
        capability_is_in_ambient_set, configure_capability_in_ambient_set, set_capabilities,
        set_capabilities_secure_bits,
    };
    let now = capabilities(None).map_err(privileges("read the capabilities"))?;
    let keep = CapabilitySet::NET_BIND_SERVICE & now.permitted;
    let bits = capabilities_secure_bits().map_err(privileges("read the securebits"))?;
    let want = CapabilitiesSecureBits::NO_ROOT | CapabilitiesSecureBits::NO_ROOT_LOCKED;
    if !bits.contains(want) && now.effective.contains(CapabilitySet::SETPCAP) {
        set_capabilities_secure_bits(bits | want).map_err(privileges("set securebits"))?;
    }
    // Only when something changes: under systemd's unit the sets are already
    // these, and its system call filter refuses capset (as ~@privileged).
    let target = CapabilitySets { effective: keep, permitted: keep, inheritable: keep };
    if (now.effective, now.permitted, now.inheritable) != (keep, keep, keep) {
        set_capabilities(None, target).map_err(privileges("narrow the capabilities"))?;
    }
    if !keep.is_empty() {
        if !capability_is_in_ambient_set(CapabilitySet::NET_BIND_SERVICE).unwrap_or(false) {
            configure_capability_in_ambient_set(CapabilitySet::NET_BIND_SERVICE, true)
                .map_err(privileges("keep CAP_NET_BIND_SERVICE across an upgrade"))?;
        }
        Ok("CAP_NET_BIND_SERVICE only".into())
    } else {
        Ok("none".into())
    }
}

/// Files of `/etc` portmux (and the resolver it uses for backend names) reads.
const ETC: &[&str] = &[
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/passwd",
    "/etc/group",
    "/etc/localtime",
    "/etc/ld.so.cache",
    "/etc/ssl",
];

/// Where system libraries and programs live (read and execute).
const SYSTEM: &[&str] = &["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"];

fn landlock(plan: &Plan) -> Result<String, SandboxError> {
    use landlock::{
        ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
        path_beneath_rules,
    };
    let abi = ABI::V8;
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let existing = |paths: Vec<PathBuf>| -> Vec<PathBuf> { paths.into_iter().filter(|p| p.exists()).collect() };
    let exe_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
    let mut read: Vec<PathBuf> = SYSTEM.iter().chain(ETC).map(PathBuf::from).collect();
    read.extend(["/proc", "/sys", "/dev/urandom", "/dev/random"].map(PathBuf::from));
    read.extend(exe_dir);
    read.extend(plan.readable.iter().cloned());
    let mut write = plan.writable.clone();
    write.push("/dev/null".into());
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(existing(read), AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(existing(write), AccessFs::from_all(abi) & !AccessFs::Execute))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            existing(plan.appendable.clone()),
            AccessFs::MakeReg | AccessFs::WriteFile | AccessFs::Truncate,
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "enforced".into(),
        RulesetStatus::PartiallyEnforced => "partly enforced (this kernel's Landlock is older)".into(),
        RulesetStatus::NotEnforced => "not available on this kernel".into(),
    })
}

mod seccomp;
