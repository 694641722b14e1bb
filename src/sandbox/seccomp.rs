//! The seccomp allow-list: the system calls portmux makes (gathered by
//! running the whole integration suite with every portmux under `strace -f`;
//! docs/ARCHITECTURE.md says how to do it again), and those the process an
//! upgrade starts may need. Any other fails with EPERM instead of running.
//! The filter is inherited by every thread and by the process an upgrade
//! starts. It is written for x86_64; elsewhere the sandbox says so and
//! portmux needs --no-sandbox.

use super::SandboxError;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;

/// Lists system calls by their `libc::SYS_*` constants.
macro_rules! allow {
    ($($sys:ident),* $(,)?) => {
        /// Every system call allowed, by name and number.
        #[cfg(target_arch = "x86_64")]
        const ALLOWED: &[(&str, libc::c_long)] = &[$((stringify!($sys), libc::$sys)),*];
        #[cfg(not(target_arch = "x86_64"))]
        const ALLOWED: &[(&str, libc::c_long)] = &[];
    };
}

allow![
    // Files, descriptors, memory.
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_open,
    SYS_openat,
    SYS_close,
    SYS_close_range,
    SYS_lseek,
    SYS_fstat,
    SYS_stat,
    SYS_lstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_statfs,
    SYS_fstatfs,
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_readlink,
    SYS_readlinkat,
    SYS_getdents64,
    SYS_getcwd,
    SYS_fcntl,
    SYS_ioctl,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_pipe,
    SYS_pipe2,
    SYS_splice,
    SYS_tee,
    SYS_sendfile,
    SYS_memfd_create,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_unlink,
    SYS_unlinkat,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_fchmod,
    SYS_umask,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_brk,
    // Sockets.
    SYS_socket,
    SYS_socketpair,
    SYS_bind,
    SYS_listen,
    SYS_accept,
    SYS_accept4,
    SYS_connect,
    SYS_shutdown,
    SYS_getsockname,
    SYS_getpeername,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendmmsg,
    SYS_recvmmsg,
    // Waiting: epoll (tokio), io_uring (the workers), timers, futexes.
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_poll,
    SYS_ppoll,
    SYS_pselect6,
    SYS_eventfd2,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_futex,
    SYS_nanosleep,
    SYS_clock_nanosleep,
    SYS_clock_gettime,
    SYS_clock_getres,
    SYS_gettimeofday,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_restart_syscall,
    // Threads, signals, the process; an upgrade starts the new binary and waits for it.
    SYS_clone,
    SYS_clone3,
    SYS_vfork,
    SYS_execve,
    SYS_execveat,
    SYS_wait4,
    SYS_waitid,
    SYS_pidfd_open,
    SYS_exit,
    SYS_exit_group,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_set_tid_address,
    SYS_arch_prctl,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_kill,
    SYS_tgkill,
    SYS_tkill,
    SYS_getpid,
    SYS_getppid,
    SYS_gettid,
    SYS_getpgrp,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_getgroups,
    SYS_getresuid,
    SYS_getresgid,
    SYS_prlimit64,
    SYS_getrlimit,
    SYS_getrusage,
    SYS_getrandom,
    SYS_uname,
    SYS_sysinfo,
    // What the process an upgrade starts needs to apply its own sandbox.
    SYS_prctl,
    SYS_capget,
    SYS_capset,
    SYS_landlock_create_ruleset,
    SYS_landlock_add_rule,
    SYS_landlock_restrict_self,
    SYS_seccomp,
];

/// `bpf(2)` commands the kernel relay makes on the maps it loaded before the
/// sandbox (or adopted): look up, update and delete elements, inspect a map.
/// Never a program load, a map creation or an attachment.
pub const BPF_COMMANDS: [u64; 4] = [1, 2, 3, 15];

fn bpf_rules() -> Result<Vec<seccompiler::SeccompRule>, SandboxError> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let failed = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    BPF_COMMANDS
        .iter()
        .map(|&cmd| {
            let cond = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd).map_err(failed)?;
            SeccompRule::new(vec![cond]).map_err(failed)
        })
        .collect()
}

/// The target architecture of this build.
fn arch() -> Result<TargetArch, SandboxError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        other => Err(SandboxError::Seccomp(format!("there is no allow-list for {other} yet"))),
    }
}

/// Compiles and installs the filter on this thread (inherited by the threads it starts).
pub(super) fn install() -> Result<String, SandboxError> {
    // c_long is i64 here, i32 on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        ALLOWED.iter().map(|(_, nr)| (i64::from(*nr), Vec::new())).collect();
    #[allow(clippy::useless_conversion)]
    rules.insert(i64::from(libc::SYS_bpf), bpf_rules()?);
    let filter = SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, arch()?)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    let program: BpfProgram =
        filter.try_into().map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))?;
    seccompiler::apply_filter(&program).map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    Ok(format!("{} system calls allowed", ALLOWED.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_has_what_portmux_and_an_upgrade_need_and_no_way_to_change_user() {
        let names: Vec<&str> = ALLOWED.iter().map(|(n, _)| *n).collect();
        let mut numbers: Vec<libc::c_long> = ALLOWED.iter().map(|(_, nr)| *nr).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), ALLOWED.len(), "no call listed twice");
        for needed in ["SYS_io_uring_enter", "SYS_accept4", "SYS_sendmsg", "SYS_execve", "SYS_landlock_restrict_self"] {
            assert!(names.contains(&needed), "{needed}");
        }
        for never in ["SYS_setuid", "SYS_setresuid", "SYS_ptrace", "SYS_mount", "SYS_bpf", "SYS_init_module"] {
            assert!(!names.contains(&never), "{never}");
        }
    }
}
