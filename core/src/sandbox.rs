//! Seccomp filters for the threads that process guest-controlled data (issue 7).
//!
//! **Experimental**: the policy switch is the daemon's, and the allow-lists grow with
//! the backends; the API may change in any 0.y release (`docs/api-stability.md`).
//!
//! Guest-controlled data — descriptor tables, rings, request headers, buffers — is parsed
//! on a few threads only: the vring workers of [`LocalVirtio`](crate::virtio::LocalVirtio)
//! (they run the backend's `handle_event`), the interrupt relay of
//! [`VirtioPci`](crate::virtio::VirtioPci), and a kernel transport's serving thread (VDUSE:
//! the kernel's requests and IOTLB). Those threads are started with [`spawn`], which, when
//! a policy is set, installs a seccomp-BPF allow-list on the new thread *before* it runs
//! anything else: a bug in that code that hands control to an attacker leaves it with the
//! handful of system calls listed below, not `socket`, `open`, `execve` or `ptrace`.
//!
//! The policy is process-wide and set once, before the first device starts
//! ([`set_worker_policy`]; `unidev serve --seccomp`, `seccomp =` in a devices file):
//! * [`SeccompPolicy::Off`] (the default): no filter; threads start as plain threads.
//! * [`SeccompPolicy::Log`]: a call outside the list is allowed and logged by the kernel
//!   (audit record type 1326, `SECCOMP_RET_LOG`) — to find what a new backend needs.
//! * [`SeccompPolicy::Kill`]: a call outside the list kills the whole process with SIGSYS
//!   (`SECCOMP_RET_KILL_PROCESS`), so a compromised worker cannot go on half-alive.
//!
//! Filters are per thread (`seccomp(SECCOMP_SET_MODE_FILTER)` without TSYNC): the
//! transport threads that accept connections and parse protocol messages, and the main
//! thread, are not filtered. A thread created by a filtered thread inherits its filter.
//!
//! If a filter cannot be installed, the thread never runs its work: [`spawn`] logs the
//! error and fails, so the queue start (or the device start) fails — a worker never runs
//! unfiltered when a policy asks for a filter.
//!
//! # What the filters allow, and why
//!
//! The list is what the workers were seen to call (`strace -f` of the daemon serving
//! every virtio-blk request type and virtio-rng over vhost-user and vfio-user) plus the
//! few calls of paths those runs do not reach, each named below. Every [`Role`]:
//! * waiting and signalling: `epoll_wait` (`epoll_pwait` where there is no
//!   `epoll_wait`), `read` and `write` (kick, call and stop eventfds; log lines to
//!   stderr), `futex` (locks, vring and memory-snapshot synchronisation, thread
//!   start/join), `clock_gettime` (polling deadlines, log timestamps: the vDSO, which
//!   falls back to the system call on some clock sources);
//! * block I/O (virtio-blk): `preadv`, `pwritev` (requests), `pread64`, `pwrite64`
//!   (`FileExt::read_at`/`write_at`), `fdatasync` (FLUSH, write-through), `fallocate`
//!   (DISCARD, WRITE_ZEROES on files), and `ioctl` with the request `BLKDISCARD` only
//!   (DISCARD on a block device);
//! * entropy (virtio-rng): `getrandom` (also Rust's hash-map keys);
//! * memory: `mmap` and `mprotect` without `PROT_EXEC` (a thread's malloc heap grows,
//!   large blocks; never executable memory), `munmap`, `mremap` (realloc of large
//!   blocks), `madvise` (freed heap, a thread's stack at exit), `brk` (once threads
//!   outnumber glibc's arenas they share the main heap), `sched_getaffinity` (glibc sizes
//!   its arenas with it when a thread first needs one);
//! * descriptors: `close`, and `fcntl(F_GETFD)` (Rust's debug builds check that a
//!   descriptor is open before closing it);
//! * signals and the end of a thread: `rt_sigreturn` (return from a handler, e.g. the
//!   SIGBUS guard of client memory), `rt_sigprocmask`, `sigaltstack` (Rust removes its
//!   stack-overflow handler's stack when a thread exits), `exit`, `exit_group`, and for
//!   an abort (a panic while panicking) `getpid`, `gettid` and `tgkill` on this process
//!   only.
//!
//! `open`/`openat` are not allowed but fail with `EACCES` instead of killing: glibc's
//! malloc reads `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's heap
//! and copes with the failure (a second, errno-returning filter; the kernel applies the
//! strictest result of all filters, so the allow-list lets these two through to it).
//! Everything else — `socket`, `connect`, `execve`, `fork`, `ptrace`, `kill`, `mount`,
//! `open_by_handle_at`, other ioctls, ... — is outside the list.
//!
//! [`Role::KernelTransport`] adds what a VDUSE serving thread does besides a worker's job
//! (seen with `log` in the 6.12 guest of `tests/e2e_vduse.rs`, whose kernel logs every
//! call outside the list): `ioctl` with the transport's request numbers only (IOTLB,
//! queue set-up, interrupt injection, destroying its device); `eventfd2`,
//! `epoll_create1`, `epoll_ctl` (its event loop, kick and call relays); `fcntl` with
//! `F_DUPFD_CLOEXEC` (duplicating eventfds), `statx` (what kind of file an IOTLB entry
//! is) and, for a VMM's memory file behind vhost-vdpa, `F_GET_SEALS`/`F_ADD_SEALS` and
//! `fstatfs` (sealed against shrinking, page size); and starting vring workers: `clone`
//! with `CLONE_THREAD` only (no new processes; `clone3`, whose flags a filter cannot
//! read, fails with `ENOSYS` so glibc falls back to `clone`), `set_robust_list`, `rseq`,
//! `prctl(PR_SET_NAME)` and, to install the worker's own filter on top of the inherited
//! one, `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp(SECCOMP_SET_MODE_FILTER)` (a filter can
//! only take rights away).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use log::error;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What happens when a filtered thread makes a system call outside its allow-list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompPolicy {
    /// No filter (the default).
    #[default]
    Off,
    /// Allow the call and have the kernel log it (`SECCOMP_RET_LOG`).
    Log,
    /// Kill the process with SIGSYS (`SECCOMP_RET_KILL_PROCESS`).
    Kill,
}

impl SeccompPolicy {
    /// The name used on the command line and in devices files.
    pub fn as_str(self) -> &'static str {
        match self {
            SeccompPolicy::Off => "off",
            SeccompPolicy::Log => "log",
            SeccompPolicy::Kill => "kill",
        }
    }
}

impl fmt::Display for SeccompPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SeccompPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(SeccompPolicy::Off),
            "log" => Ok(SeccompPolicy::Log),
            "kill" => Ok(SeccompPolicy::Kill),
            other => Err(format!(
                "unknown seccomp policy {other:?} (off, log or kill)"
            )),
        }
    }
}

/// What a filtered thread does, and so which allow-list it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// A vring worker or an interrupt relay: waits on eventfds, runs the backend (block
    /// I/O, entropy), signals eventfds.
    Worker,
    /// A kernel transport's serving thread (VDUSE): a worker's calls, plus its event loop,
    /// mapping the kernel's IOTLB, starting vring workers, and the `ioctl` request numbers
    /// given here (nothing else reaches `ioctl`).
    KernelTransport {
        /// The ioctl requests the thread issues.
        ioctls: Vec<u32>,
    },
}

/// Why a filter was not set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The policy was set already, to another value.
    #[error("the seccomp policy is set already ({0})")]
    AlreadySet(SeccompPolicy),
    /// This architecture has no filter.
    #[error("seccomp filters are not available on {0}")]
    UnsupportedArch(&'static str),
    /// The filter could not be compiled.
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter: {0}")]
    Apply(String),
}

static POLICY: OnceLock<SeccompPolicy> = OnceLock::new();

/// Set the process-wide policy for the threads started by [`spawn`]. Once only (setting
/// the same value again is fine); threads started before keep what they had. The filters
/// are built once here, so a policy that cannot work fails now rather than at the first
/// queue start.
pub fn set_worker_policy(policy: SeccompPolicy) -> Result<(), SandboxError> {
    filters(&Role::Worker, policy)?;
    let set = *POLICY.get_or_init(|| policy);
    if set != policy {
        return Err(SandboxError::AlreadySet(set));
    }
    Ok(())
}

/// The process-wide policy ([`SeccompPolicy::Off`] until set).
pub fn worker_policy() -> SeccompPolicy {
    POLICY.get().copied().unwrap_or_default()
}

/// A thread started by [`spawn`].
#[derive(Debug)]
pub struct SandboxedThread<T>(JoinHandle<Option<T>>);

impl<T> SandboxedThread<T> {
    /// Wait for the thread to end, like [`JoinHandle::join`].
    pub fn join(self) -> std::thread::Result<T> {
        // None only when the filter failed, and then spawn returned no SandboxedThread.
        self.0
            .join()?
            .ok_or_else(|| Box::new("the thread did not run") as Box<dyn std::any::Any + Send>)
    }

    /// The thread.
    pub fn thread(&self) -> &std::thread::Thread {
        self.0.thread()
    }
}

/// Start thread `name` running `f`, filtered for `role` under the process-wide policy
/// (see the module docs). With a policy set, returns only once the filter is installed;
/// if it cannot be, `f` never runs and this fails (the error is logged too).
pub fn spawn<T, F>(name: String, role: Role, f: F) -> io::Result<SandboxedThread<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_with(worker_policy(), name, role, f)
}

/// [`spawn`] with an explicit policy instead of the process-wide one.
pub fn spawn_with<T, F>(
    policy: SeccompPolicy,
    name: String,
    role: Role,
    f: F,
) -> io::Result<SandboxedThread<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let programs = match filters(&role, policy) {
        Ok(p) => p,
        Err(e) => {
            error!("{name}: {e}; the thread is not started");
            return Err(io::Error::other(format!("{name}: {e}")));
        }
    };
    spawn_filtered(name, programs, f)
}

/// Start thread `name` running `f` once `programs` are installed on it (none: a plain
/// thread); if they cannot be, `f` never runs and this fails.
fn spawn_filtered<T, F>(
    name: String,
    programs: Vec<BpfProgram>,
    f: F,
) -> io::Result<SandboxedThread<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = std::thread::Builder::new().name(name.clone());
    if programs.is_empty() {
        return builder.spawn(move || Some(f())).map(SandboxedThread);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), SandboxError>>(1);
    let handle = builder.spawn(move || {
        let applied = install(&programs);
        drop(programs);
        let ok = applied.is_ok();
        let _ = tx.send(applied);
        // Nothing of the thread's work runs without its filter.
        ok.then(f)
    })?;
    let failure = match rx.recv() {
        Ok(Ok(())) => return Ok(SandboxedThread(handle)),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the thread ended before its seccomp filter was installed".to_string(),
    };
    let _ = handle.join();
    error!("{name}: {failure}; the thread does not run");
    Err(io::Error::other(format!("{name}: {failure}")))
}

/// Install `programs` on the calling thread, the allow-list last (installing a filter
/// needs `prctl` and `seccomp`, which the allow-list of a worker does not grant).
fn install(programs: &[BpfProgram]) -> Result<(), SandboxError> {
    for p in programs {
        seccompiler::apply_filter(p).map_err(|e| SandboxError::Apply(e.to_string()))?;
    }
    Ok(())
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SandboxError::UnsupportedArch(std::env::consts::ARCH))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| SandboxError::Build(e.to_string()))
}

fn cond32(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .map_err(|e| SandboxError::Build(e.to_string()))
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conditions).map_err(|e| SandboxError::Build(e.to_string()))
}

/// Allow `nrs` whatever their arguments.
fn allow(rules: &mut Rules, nrs: &[libc::c_long]) {
    for &nr in nrs {
        rules.insert(nr, Vec::new());
    }
}

/// Allow `nr` when one of `alternatives` (each a list of conditions that must all hold)
/// holds.
fn allow_if(
    rules: &mut Rules,
    nr: libc::c_long,
    alternatives: Vec<SeccompRule>,
) -> Result<(), SandboxError> {
    if alternatives.is_empty() {
        return Err(SandboxError::Build(format!(
            "syscall {nr}: no allowed arguments"
        )));
    }
    rules.entry(nr).or_default().extend(alternatives);
    Ok(())
}

/// `ioctl` with one of `requests` (the request number is 32 bits in the kernel).
fn allow_ioctls(rules: &mut Rules, requests: &[u32]) -> Result<(), SandboxError> {
    let alternatives = requests
        .iter()
        .map(|&r| rule(vec![cond32(1, SeccompCmpOp::Eq, u64::from(r))?]))
        .collect::<Result<Vec<_>, _>>()?;
    allow_if(rules, libc::SYS_ioctl, alternatives)
}

/// `fcntl` with one of `commands`.
fn allow_fcntl(rules: &mut Rules, commands: &[libc::c_int]) -> Result<(), SandboxError> {
    let alternatives = commands
        .iter()
        .map(|&c| rule(vec![cond32(1, SeccompCmpOp::Eq, c as u64)?]))
        .collect::<Result<Vec<_>, _>>()?;
    allow_if(rules, libc::SYS_fcntl, alternatives)
}

/// `BLKDISCARD`, `_IO(0x12, 119)`.
const BLKDISCARD: u32 = (0x12 << 8) | 119;

/// The calls every role needs (see the module docs for why).
fn add_worker_calls(rules: &mut Rules) -> Result<(), SandboxError> {
    use libc::*;
    // Waiting for kicks, signalling calls (eventfds); log lines to stderr; locks and
    // thread synchronisation; clocks where the vDSO falls back to the system call.
    #[cfg(target_arch = "x86_64")]
    allow(rules, &[SYS_epoll_wait]);
    #[cfg(not(target_arch = "x86_64"))]
    allow(rules, &[SYS_epoll_pwait]);
    allow(rules, &[SYS_read, SYS_write, SYS_futex, SYS_clock_gettime]);
    // Block I/O (virtio-blk): data (vectored, and `FileExt::read_at`/`write_at`), FLUSH,
    // DISCARD and WRITE_ZEROES on files.
    allow(
        rules,
        &[
            SYS_preadv,
            SYS_pwritev,
            SYS_pread64,
            SYS_pwrite64,
            SYS_fdatasync,
            SYS_fallocate,
        ],
    );
    // DISCARD on a block device.
    allow_ioctls(rules, &[BLKDISCARD])?;
    // Entropy (virtio-rng) and hash-map keys.
    allow(rules, &[SYS_getrandom]);
    // The allocator (its own heaps, or the main heap once the arenas are shared; large
    // blocks), thread stacks; never executable memory.
    for nr in [SYS_mmap, SYS_mprotect] {
        allow_if(
            rules,
            nr,
            vec![rule(vec![cond(
                2,
                SeccompCmpOp::MaskedEq(PROT_EXEC as u64),
                0,
            )?])?],
        )?;
    }
    allow(
        rules,
        &[
            SYS_munmap,
            SYS_mremap,
            SYS_madvise,
            SYS_brk,
            SYS_sched_getaffinity,
        ],
    );
    // Closing descriptors (Rust's debug builds check first that one is open).
    allow(rules, &[SYS_close]);
    allow_fcntl(rules, &[F_GETFD])?;
    // Returning from a signal handler; the end of a thread (Rust removes its
    // stack-overflow handler's stack); an abort, which signals this process only.
    allow(
        rules,
        &[
            SYS_rt_sigreturn,
            SYS_rt_sigprocmask,
            SYS_sigaltstack,
            SYS_exit,
            SYS_exit_group,
            SYS_getpid,
            SYS_gettid,
        ],
    );
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    allow_if(
        rules,
        SYS_tgkill,
        vec![rule(vec![cond32(0, SeccompCmpOp::Eq, pid as u64)?])?],
    )?;
    // Refused by the errno filter (glibc's malloc copes), not fatal here.
    #[cfg(target_arch = "x86_64")]
    allow(rules, &[SYS_open]);
    allow(rules, &[SYS_openat]);
    Ok(())
}

/// What a kernel transport's thread needs on top of a worker's.
fn add_kernel_transport_calls(rules: &mut Rules, ioctls: &[u32]) -> Result<(), SandboxError> {
    use libc::*;
    if !ioctls.is_empty() {
        allow_ioctls(rules, ioctls)?;
    }
    // Its event loop, kick and call eventfds (duplicated with F_DUPFD_CLOEXEC); what
    // kind of file an IOTLB entry is (statx), and for a VMM's memory file (vhost-vdpa)
    // its size, seals and page size.
    allow(
        rules,
        &[
            SYS_eventfd2,
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_statx,
            SYS_fstatfs,
        ],
    );
    allow_fcntl(rules, &[F_GET_SEALS, F_ADD_SEALS, F_DUPFD_CLOEXEC])?;
    // Starting vring workers: threads only, never processes.
    allow_if(
        rules,
        SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(CLONE_THREAD as u64),
            CLONE_THREAD as u64,
        )?])?],
    )?;
    allow(rules, &[SYS_clone3, SYS_set_robust_list, SYS_rseq]);
    allow_if(
        rules,
        SYS_prctl,
        vec![
            rule(vec![cond32(0, SeccompCmpOp::Eq, PR_SET_NAME as u64)?])?,
            rule(vec![cond32(
                0,
                SeccompCmpOp::Eq,
                PR_SET_NO_NEW_PRIVS as u64,
            )?])?,
        ],
    )?;
    allow_if(
        rules,
        SYS_seccomp,
        vec![rule(vec![cond32(
            0,
            SeccompCmpOp::Eq,
            u64::from(SECCOMP_SET_MODE_FILTER),
        )?])?],
    )?;
    Ok(())
}

/// A filter returning `errno` for `nrs` and allowing everything else.
fn errno_filter(
    nrs: &[libc::c_long],
    errno: i32,
    arch: TargetArch,
) -> Result<BpfProgram, SandboxError> {
    let mut rules = Rules::new();
    allow(&mut rules, nrs);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch,
    )
    .map_err(|e| SandboxError::Build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Build(e.to_string()))
}

/// The programs to install for `role` under `policy`, in order (none when off).
fn filters(role: &Role, policy: SeccompPolicy) -> Result<Vec<BpfProgram>, SandboxError> {
    let mismatch = match policy {
        SeccompPolicy::Off => return Ok(Vec::new()),
        SeccompPolicy::Log => SeccompAction::Log,
        SeccompPolicy::Kill => SeccompAction::KillProcess,
    };
    let arch = target_arch()?;
    let mut rules = Rules::new();
    add_worker_calls(&mut rules)?;
    #[cfg(target_arch = "x86_64")]
    let opens: &[libc::c_long] = &[libc::SYS_open, libc::SYS_openat];
    #[cfg(not(target_arch = "x86_64"))]
    let opens: &[libc::c_long] = &[libc::SYS_openat];
    let mut programs = vec![errno_filter(opens, libc::EACCES, arch)?];
    if let Role::KernelTransport { ioctls } = role {
        add_kernel_transport_calls(&mut rules, ioctls)?;
        programs.push(errno_filter(&[libc::SYS_clone3], libc::ENOSYS, arch)?);
    }
    let allow_list = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| SandboxError::Build(e.to_string()))?;
    programs.push(
        allow_list
            .try_into()
            .map_err(|e: seccompiler::BackendError| SandboxError::Build(e.to_string()))?,
    );
    Ok(programs)
}

/// The seccomp mode of thread `tid` of this process (`Seccomp:` in its status: 0 none,
/// 1 strict, 2 filter).
pub fn thread_seccomp_mode(tid: libc::pid_t) -> io::Result<u8> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Seccomp line in the thread's status"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    fn gettid() -> libc::pid_t {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }

    #[test]
    fn policies_parse_and_unknown_ones_are_named() {
        assert_eq!("off".parse(), Ok(SeccompPolicy::Off));
        assert_eq!("log".parse(), Ok(SeccompPolicy::Log));
        assert_eq!("kill".parse(), Ok(SeccompPolicy::Kill));
        let e = "strict".parse::<SeccompPolicy>().unwrap_err();
        assert!(
            e.contains("\"strict\"") && e.contains("off, log or kill"),
            "{e}"
        );
        assert_eq!(SeccompPolicy::default(), SeccompPolicy::Off);
    }

    #[test]
    fn every_role_and_policy_compiles() {
        for policy in [SeccompPolicy::Log, SeccompPolicy::Kill] {
            assert_eq!(filters(&Role::Worker, policy).unwrap().len(), 2);
            let kt = Role::KernelTransport {
                ioctls: vec![0xc020_8110, 0x4004_8117],
            };
            assert_eq!(filters(&kt, policy).unwrap().len(), 3);
        }
        assert!(filters(&Role::Worker, SeccompPolicy::Off)
            .unwrap()
            .is_empty());
    }

    /// A worker under Kill does its job: block I/O on a file, entropy, eventfds, the
    /// allocator; `open` fails with EACCES; it shows as filtered and its parent does not.
    /// (A call missing from the list kills this test process with SIGSYS.)
    #[test]
    fn a_killing_worker_filter_allows_the_workers_calls_and_only_that_thread_is_filtered() {
        let path = std::env::temp_dir().join(format!("unidev-sandbox-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let _ = std::fs::remove_file(&path);
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let efd2 = efd.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let t = spawn_with(
            SeccompPolicy::Kill,
            "sandbox-test".into(),
            Role::Worker,
            move || {
                tx.send(gettid()).unwrap();
                wait.recv().unwrap();
                // Block I/O.
                let data = vec![0x5au8; 8192];
                file.write_all_at(&data, 4096).unwrap();
                let mut back = vec![0u8; 8192];
                file.read_exact_at(&mut back, 4096).unwrap();
                assert_eq!(back, data);
                let (mut a, mut b) = ([0u8; 100], [0u8; 200]);
                let mut iov = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
                // SAFETY: preadv into two valid buffers described by `iov`.
                let n = unsafe { libc::preadv(file.as_raw_fd(), iov.as_mut_ptr().cast(), 2, 4096) };
                assert_eq!(n, 300);
                let iov = [IoSlice::new(&a), IoSlice::new(&b)];
                // SAFETY: pwritev from two valid buffers described by `iov`.
                let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr().cast(), 2, 65536) };
                assert_eq!(n, 300);
                file.sync_data().unwrap();
                // SAFETY: fallocate on our own descriptor, no memory passed.
                let r = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        0,
                        4096,
                    )
                };
                assert!(
                    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP)
                );
                // Entropy.
                let mut rnd = [0u8; 64];
                // SAFETY: getrandom writes at most 64 bytes into `rnd`.
                let n = unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), 64, 0) };
                assert_eq!(n, 64);
                // The allocator, large blocks included (mmap, mremap, munmap).
                let mut v: Vec<u8> = Vec::with_capacity(1 << 20);
                v.resize(4 << 20, 1);
                drop(v);
                let boxes: Vec<Box<[u8; 4096]>> = (0..256).map(|_| Box::new([0; 4096])).collect();
                drop(boxes);
                // Eventfds.
                efd2.write(1).unwrap();
                assert_eq!(efd2.read().unwrap(), 1);
                // Opening a file is refused without killing.
                let e = std::fs::File::open("/proc/self/status").unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EACCES));
                7
            },
        )
        .unwrap();
        // The filter is installed before the work runs.
        let tid = rx.recv().unwrap();
        assert_eq!(thread_seccomp_mode(tid).unwrap(), 2);
        go.send(()).unwrap();
        assert_eq!(t.join().unwrap(), 7);
        assert_eq!(thread_seccomp_mode(gettid()).unwrap(), 0);
        drop(efd);
    }

    #[test]
    fn a_thread_whose_filter_the_kernel_refuses_never_runs_and_its_start_fails() {
        use std::sync::atomic::{AtomicBool, Ordering};
        // An instruction the kernel's checker rejects (EINVAL).
        let bad = seccompiler::sock_filter {
            code: 0xffff,
            jt: 0,
            jf: 0,
            k: 0,
        };
        let ran = std::sync::Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        let e = spawn_filtered("sandbox-refused".into(), vec![vec![bad]], move || {
            r.store(true, Ordering::SeqCst)
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("cannot install the seccomp filter"),
            "{e}"
        );
        assert!(
            !ran.load(Ordering::SeqCst),
            "the work ran without its filter"
        );
    }

    #[test]
    fn off_starts_a_plain_thread() {
        let t = spawn_with(
            SeccompPolicy::Off,
            "sandbox-off".into(),
            Role::Worker,
            || thread_seccomp_mode(gettid()).unwrap(),
        )
        .unwrap();
        assert_eq!(t.join().unwrap(), 0);
    }
}
