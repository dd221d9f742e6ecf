//! Kernel limits and privileges a daemon running as an ordinary user meets, worded for
//! the person who starts it: every error line caused by a limit names the limit and how
//! to raise it, through the helpers here (one wording for every transport).
//!
//! The vfio-user and vhost-user paths need no root and no capability, and nothing in
//! unidev locks memory (no `mlock`, no `MAP_LOCKED`), so `RLIMIT_MEMLOCK` never matters.
//! What does bite an unprivileged daemon:
//! * **open files** (`RLIMIT_NOFILE`, `ulimit -n`): each connection, every descriptor a
//!   client passes (an fd-backed DMA map or memory region keeps its descriptor for as long
//!   as it is mapped; kick, call and interrupt eventfds), memfds (inflight regions), and
//!   the daemon's own eventfds and epoll sets. [`Limit::OpenFiles`]; its system-wide
//!   sibling `fs.file-max` is [`Limit::SystemFiles`].
//! * **memory mappings per process** (`vm.max_map_count`, 65530 by default): every
//!   fd-backed DMA map is at least one mapping, so many small maps can run into it before
//!   `--max-dma-maps` (65535 by default). [`Limit::MapCount`]; a finite address-space
//!   limit (`RLIMIT_AS`, `ulimit -v`) is [`Limit::AddressSpace`].
//!
//! These helpers may run on threads under a seccomp filter (`crate::sandbox`): what they
//! learn about the process (current limits, descriptors in use) comes from `/proc` and
//! `getrlimit` only where the thread is not filtered; a filtered thread gets the same
//! advice without the numbers.

use std::fmt;
use std::io::{self, Read};

/// A kernel limit an operation can run into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The process's open files limit, `RLIMIT_NOFILE` (`EMFILE`).
    OpenFiles,
    /// The system-wide open files limit, `fs.file-max` (`ENFILE`).
    SystemFiles,
    /// Memory mappings per process, `vm.max_map_count` (`ENOMEM` from `mmap`).
    MapCount,
    /// The process's address space limit, `RLIMIT_AS` (`ENOMEM` from `mmap`).
    AddressSpace,
}

impl Limit {
    /// The limit a failed operation that creates or receives file descriptors ran into:
    /// `EMFILE` and `ENFILE`.
    pub fn of_fd_error(err: &io::Error) -> Option<Limit> {
        match err.raw_os_error() {
            Some(libc::EMFILE) => Some(Limit::OpenFiles),
            Some(libc::ENFILE) => Some(Limit::SystemFiles),
            _ => None,
        }
    }

    /// How to get past this limit, with the current values where they can be read.
    pub fn advice(self) -> String {
        let facts = Facts::read();
        self.advice_with(&facts)
    }

    fn advice_with(self, f: &Facts) -> String {
        match self {
            Limit::OpenFiles => {
                // With the table full, /proc/self/fd cannot be opened to count.
                let now = match (f.open_fds, f.nofile) {
                    (Some(open), Some((soft, hard))) => {
                        format!(" ({open} open, limit {soft}, hard limit {})", rlim(hard))
                    }
                    (None, Some((soft, hard))) => {
                        format!(" (limit {soft}, hard limit {})", rlim(hard))
                    }
                    _ => String::new(),
                };
                format!(
                    "open files limit (RLIMIT_NOFILE, `ulimit -n`){now} reached: raise it \
                     for unidev with `ulimit -n N` before starting it, `prlimit --nofile=N \
                     --pid PID` while it runs, or LimitNOFILE=N in its systemd unit"
                )
            }
            Limit::SystemFiles => "system-wide open files limit (fs.file-max) reached: raise \
                 it with `sysctl -w fs.file-max=N` (as root)"
                .to_string(),
            Limit::MapCount => {
                let now = f
                    .max_map_count
                    .map(|n| format!(" = {n}"))
                    .unwrap_or_default();
                format!(
                    "memory map count limit (vm.max_map_count{now}) reached, or the host is \
                     out of memory: every fd-backed DMA map takes at least one mapping; raise \
                     the limit with `sysctl -w vm.max_map_count=N` (as root), or have the \
                     client use fewer, larger maps (--max-dma-maps caps their number)"
                )
            }
            Limit::AddressSpace => {
                let now = f
                    .address_space
                    .map(|n| format!(" of {n} bytes"))
                    .unwrap_or_default();
                format!(
                    "address space limit (RLIMIT_AS, `ulimit -v`){now} reached: raise it \
                     with `ulimit -v unlimited` before starting unidev, or `prlimit \
                     --as=unlimited --pid PID`"
                )
            }
        }
    }
}

fn rlim(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        v.to_string()
    }
}

/// `err`, followed by the limit it means and how to raise it when it is `EMFILE` or
/// `ENFILE` (for errors of operations that create or receive descriptors: accept,
/// recvmsg, eventfd, memfd_create, epoll_create, dup, open).
pub fn describe(err: &io::Error) -> String {
    match Limit::of_fd_error(err) {
        Some(limit) => format!("{err}: {}", limit.advice()),
        None => err.to_string(),
    }
}

/// `err` of an `mmap`, followed by the limit `ENOMEM` most likely means (the address
/// space limit when one is set, otherwise the map count) and how to raise it.
pub fn describe_mmap(err: &io::Error) -> String {
    if err.raw_os_error() != Some(libc::ENOMEM) {
        return describe(err);
    }
    let facts = Facts::read();
    let mut text = format!("{err}: {}", Limit::MapCount.advice_with(&facts));
    if facts.address_space.is_some() {
        text.push_str("; or the ");
        text.push_str(&Limit::AddressSpace.advice_with(&facts));
    }
    text
}

/// Descriptors a client passed with a message were dropped by the kernel (`MSG_CTRUNC`),
/// for the reason `err` (EMFILE: no room in this process's descriptor table).
pub fn fds_lost(err: &io::Error) -> String {
    let why = match Limit::of_fd_error(err) {
        Some(limit) => limit.advice(),
        None => err.to_string(),
    };
    format!("file descriptors passed with the message were lost: {why}")
}

/// Who this process is, for messages about missing privileges, e.g. "uid 1500 (effective
/// 1500), no capabilities" or "uid 0 (effective 0), capabilities 000001ffffffffff".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Real uid.
    pub uid: u32,
    /// Effective uid.
    pub euid: u32,
    /// Effective capability set (`CapEff`).
    pub cap_eff: u64,
}

/// `CAP_DAC_OVERRIDE`: open files whatever their permissions.
pub const CAP_DAC_OVERRIDE: u32 = 1;
/// `CAP_CHOWN`: give files to any user or group.
pub const CAP_CHOWN: u32 = 0;
/// `CAP_NET_ADMIN`: network administration (the vDPA netlink family, net devices).
pub const CAP_NET_ADMIN: u32 = 12;

impl Identity {
    /// This process, from `/proc/self/status` (None if it cannot be read, e.g. on a
    /// filtered thread).
    pub fn current() -> Option<Identity> {
        parse_identity(&read_small("/proc/self/status").ok()?)
    }

    /// Whether the process is root or holds `cap`.
    pub fn has(&self, cap: u32) -> bool {
        self.euid == 0 || self.cap_eff & (1u64 << cap) != 0
    }

    /// Root (effective uid 0) or any capability at all.
    pub fn privileged(&self) -> bool {
        self.euid == 0 || self.cap_eff != 0
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} (effective {}), ", self.uid, self.euid)?;
        if self.cap_eff == 0 {
            write!(f, "no capabilities")
        } else {
            write!(f, "capabilities {:016x}", self.cap_eff)
        }
    }
}

fn parse_identity(status: &str) -> Option<Identity> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let mut uids = field("Uid:")?.split_whitespace();
    let uid = uids.next()?.parse().ok()?;
    let euid = uids.next()?.parse().ok()?;
    let cap_eff = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
    Some(Identity { uid, euid, cap_eff })
}

/// What can be learnt about the process's limits (None where unknown).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Facts {
    /// RLIMIT_NOFILE (soft, hard).
    nofile: Option<(u64, u64)>,
    /// Descriptors open now.
    open_fds: Option<u64>,
    /// vm.max_map_count.
    max_map_count: Option<u64>,
    /// RLIMIT_AS when finite.
    address_space: Option<u64>,
}

impl Facts {
    fn read() -> Facts {
        if thread_is_filtered() {
            return Facts::default();
        }
        let rl = |res| {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes one rlimit into `r`, which outlives the call.
            (unsafe { libc::getrlimit(res, &mut r) } == 0).then_some((r.rlim_cur, r.rlim_max))
        };
        Facts {
            nofile: rl(libc::RLIMIT_NOFILE),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                // One of them is the directory being listed.
                .map(|d| (d.count() as u64).saturating_sub(1)),
            max_map_count: read_small("/proc/sys/vm/max_map_count")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            address_space: rl(libc::RLIMIT_AS)
                .map(|(soft, _)| soft)
                .filter(|&s| s != libc::RLIM_INFINITY),
        }
    }
}

/// A small /proc file, read with nothing but open, read and close: allowed (or, for
/// open, refused with an error) under every seccomp filter of `crate::sandbox`, where
/// `std::fs::read_to_string`'s statx would not be.
fn read_small(path: &str) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while len < buf.len() {
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Whether the calling thread is under a seccomp filter, or that cannot be told. Under
/// `crate::sandbox`'s filters opening a file fails with EACCES; with the descriptor
/// table full it fails with EMFILE (or ENFILE), and the thread is not filtered.
fn thread_is_filtered() -> bool {
    match read_small("/proc/thread-self/status") {
        Ok(s) => s
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .is_none_or(|v| v.trim() != "0"),
        Err(e) => Limit::of_fd_error(&e).is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_errors_name_the_limit_and_how_to_raise_it() {
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        let text = describe(&e);
        for needle in [
            "Too many open files",
            "open files limit (RLIMIT_NOFILE, `ulimit -n`)",
            "prlimit --nofile",
            "LimitNOFILE",
        ] {
            assert!(text.contains(needle), "{needle:?} in {text}");
        }
        // This thread is not filtered: the numbers are there.
        let (soft, _) = Facts::read().nofile.unwrap();
        assert!(text.contains(&format!(" open, limit {soft},")), "{text}");
        let text = describe(&io::Error::from_raw_os_error(libc::ENFILE));
        assert!(text.contains("fs.file-max"), "{text}");
        let text = describe(&io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(text, io::Error::from_raw_os_error(libc::EINVAL).to_string());
    }

    #[test]
    fn mmap_enomem_names_the_map_count_and_a_finite_address_space_limit() {
        let facts = Facts {
            max_map_count: Some(65530),
            ..Facts::default()
        };
        let text = Limit::MapCount.advice_with(&facts);
        assert!(text.contains("vm.max_map_count = 65530"), "{text}");
        assert!(text.contains("sysctl -w vm.max_map_count"), "{text}");
        assert!(text.contains("--max-dma-maps"), "{text}");
        let text = Limit::AddressSpace.advice_with(&Facts {
            address_space: Some(1 << 30),
            ..Facts::default()
        });
        assert!(
            text.contains("RLIMIT_AS, `ulimit -v`) of 1073741824 bytes"),
            "{text}"
        );
        let text = describe_mmap(&io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(text.contains("vm.max_map_count = "), "{text}");
        // Not ENOMEM: no map-count advice.
        let text = describe_mmap(&io::Error::from_raw_os_error(libc::EACCES));
        assert!(!text.contains("max_map_count"), "{text}");
    }

    #[test]
    fn without_numbers_the_advice_is_the_same() {
        let text = Limit::OpenFiles.advice_with(&Facts::default());
        assert!(
            text.starts_with("open files limit (RLIMIT_NOFILE, `ulimit -n`) reached: raise"),
            "{text}"
        );
        let text = Limit::MapCount.advice_with(&Facts::default());
        assert!(text.starts_with("memory map count limit (vm.max_map_count) reached"));
    }

    #[test]
    fn identity_from_proc_status() {
        let status = "Name:\tunidev\nUid:\t1500\t1501\t1500\t1500\nGid:\t1500\t1500\t1500\t1500\n\
                      CapInh:\t0000000000000000\nCapEff:\t0000000000000000\n";
        let id = parse_identity(status).unwrap();
        assert_eq!(
            id,
            Identity {
                uid: 1500,
                euid: 1501,
                cap_eff: 0
            }
        );
        assert_eq!(id.to_string(), "uid 1500 (effective 1501), no capabilities");
        assert!(!id.privileged() && !id.has(CAP_NET_ADMIN));
        let root = parse_identity("Uid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n").unwrap();
        assert!(root.privileged() && root.has(CAP_NET_ADMIN));
        let capped = Identity {
            uid: 7,
            euid: 7,
            cap_eff: 1 << CAP_NET_ADMIN,
        };
        assert!(capped.has(CAP_NET_ADMIN) && !capped.has(CAP_DAC_OVERRIDE));
        assert!(parse_identity("Uid:\tx\n").is_none());
        // This process (the tests run as root in CI, but any user will do).
        let me = Identity::current().unwrap();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(me.euid, unsafe { libc::geteuid() });
    }

    #[test]
    fn a_filtered_thread_reads_nothing_but_still_gets_the_advice() {
        use crate::sandbox::{spawn_with, Role, SeccompPolicy};
        let t = spawn_with(
            SeccompPolicy::Kill,
            "limits-test".into(),
            Role::Worker,
            || {
                (
                    thread_is_filtered(),
                    Facts::read(),
                    describe(&io::Error::from_raw_os_error(libc::EMFILE)),
                    describe_mmap(&io::Error::from_raw_os_error(libc::ENOMEM)),
                    Identity::current(),
                )
            },
        )
        .unwrap();
        let (filtered, facts, fd_text, mmap_text, id) = t.join().unwrap();
        assert!(filtered);
        assert_eq!(facts, Facts::default());
        assert!(fd_text.contains("RLIMIT_NOFILE"), "{fd_text}");
        assert!(mmap_text.contains("vm.max_map_count"), "{mmap_text}");
        assert_eq!(id, None);
        assert!(!thread_is_filtered());
    }
}
