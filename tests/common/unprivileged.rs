//! Running the daemon (and its clients) as ordinary users, for tests/unprivileged.rs and
//! tests/e2e_unprivileged.rs (included with `#[path]`; needs `mod common;` beside it).
//!
//! The tests run as root (as CI does) and make the identities themselves: numeric uids
//! and gids without passwd entries, set in the child between fork and exec. Binaries are
//! linked (or copied) into a fresh 0755 directory first, because the checkout may live
//! under a 0700 directory such as /root that other users cannot enter.
#![allow(dead_code)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::{test_dir, Daemon};

/// The daemon's user (and its group).
pub const DAEMON_UID: u32 = 1500;
/// The client's user (and its group).
pub const CLIENT_UID: u32 = 1501;
/// The group the socket is shared with: the client's supplementary group.
pub const SHARED_GID: u32 = 1502;
/// A user with no business with the daemon.
pub const STRANGER_UID: u32 = 1503;

/// Fail clearly unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests run as root (as CI does): they make the unprivileged users themselves"
    );
}

/// A test's directory (0755) with the daemon in `bin/`, where any user can run it.
pub struct Stage {
    /// The directory (from [`test_dir`]).
    pub dir: PathBuf,
    /// The daemon binary, runnable by anyone.
    pub unidev: PathBuf,
}

impl Stage {
    /// A fresh stage for test `name`.
    pub fn new(name: &str) -> Stage {
        require_root();
        let dir = test_dir(&format!("unpriv-{name}"));
        std::fs::create_dir(dir.join("bin")).unwrap();
        for d in [dir.clone(), dir.join("bin")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // Every directory above must be enterable by anyone too.
        let mut up = dir.parent();
        while let Some(d) = up {
            let mode = std::fs::metadata(d).unwrap().mode();
            assert!(
                mode & 0o001 != 0,
                "{} (mode {mode:o}) is not enterable by other users: set TMPDIR elsewhere",
                d.display()
            );
            up = d.parent();
        }
        let mut stage = Stage {
            dir,
            unidev: PathBuf::new(),
        };
        stage.unidev = stage.binary(Path::new(crate::common::unidev_bin()), "unidev");
        stage
    }

    /// Put binary `src` into `bin/` as `name` (a hard link, or a copy across file
    /// systems); its path there.
    pub fn binary(&self, src: &Path, name: &str) -> PathBuf {
        let dest = self.dir.join("bin").join(name);
        if std::fs::hard_link(src, &dest).is_err() {
            std::fs::copy(src, &dest).unwrap();
        }
        let mode = std::fs::metadata(&dest).unwrap().mode();
        assert!(
            mode & 0o005 == 0o005,
            "{} is not executable by others",
            dest.display()
        );
        dest
    }

    /// `run/`: owned by the daemon's user, group `gid`, mode `mode`.
    pub fn socket_dir(&self, gid: u32, mode: u32) -> PathBuf {
        let run = self.dir.join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::chown(&run, Some(DAEMON_UID), Some(gid)).unwrap();
        // After chown, which clears the set-group-ID bit.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(mode)).unwrap();
        run
    }

    /// Make `file` the daemon user's alone (mode 0600).
    pub fn give_to_daemon(&self, file: &Path) {
        std::os::unix::fs::chown(file, Some(DAEMON_UID), Some(DAEMON_UID)).unwrap();
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Start the daemon as `uid` (gid `uid`) with supplementary `groups`, logging to
    /// `dir/name.log`.
    pub fn daemon(&self, name: &str, uid: u32, groups: &[u32], args: &[&str]) -> Daemon {
        self.daemon_with(name, uid, groups, None, args)
    }

    /// [`Stage::daemon`], with the open files limit (soft and hard) set to `nofile`, as
    /// `prlimit --nofile=N` would.
    pub fn daemon_with(
        &self,
        name: &str,
        uid: u32,
        groups: &[u32],
        nofile: Option<u64>,
        args: &[&str],
    ) -> Daemon {
        let log = self.dir.join(format!("{name}.log"));
        let mut cmd = Command::new(&self.unidev);
        cmd.args(args)
            .env("RUST_LOG", "debug")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        as_user(&mut cmd, uid, uid, groups, nofile);
        Daemon {
            child: cmd.spawn().unwrap(),
            log,
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // The binaries may be copies (tens of MB); the logs stay for a look.
        let _ = std::fs::remove_dir_all(self.dir.join("bin"));
    }
}

/// Make `cmd`'s process run as `uid`/`gid` with exactly `groups` as its supplementary
/// groups, and its open files limit lowered to `nofile`. Changing all uids away from 0
/// clears every capability (no SECBIT_KEEP_CAPS).
pub fn as_user(cmd: &mut Command, uid: u32, gid: u32, groups: &[u32], nofile: Option<u64>) {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (close_range, setgroups, setgid, setuid, setrlimit)
    // on memory allocated before the fork; close_range only marks descriptors CLOEXEC,
    // so std's exec status pipe still works.
    unsafe {
        cmd.pre_exec(move || {
            // Nothing but stdio past exec: descriptors the test process inherited
            // without CLOEXEC would sit in the child's table and skew its limits.
            const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(n) = nofile {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The `Key:` line of a /proc/PID/status text, its value trimmed.
pub fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in:\n{status}"))
        .trim()
        .to_string()
}

/// The process of `status` runs with all uids `uid`, all gids `gid`, supplementary
/// groups `groups` (as /proc prints them) and no capabilities.
pub fn check_identity(status: &str, uid: u32, gid: u32, groups: &str, who: &str) {
    let all = |id: u32| format!("{id}\t{id}\t{id}\t{id}");
    assert_eq!(status_field(status, "Uid:"), all(uid), "{who}:\n{status}");
    assert_eq!(status_field(status, "Gid:"), all(gid), "{who}:\n{status}");
    assert_eq!(status_field(status, "Groups:"), groups, "{who}:\n{status}");
    for caps in ["CapEff:", "CapPrm:", "CapAmb:"] {
        assert_eq!(
            status_field(status, caps),
            "0000000000000000",
            "{who} {caps}\n{status}"
        );
    }
}

/// /proc/`pid`/status.
pub fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"))
}

/// The daemon runs as [`DAEMON_UID`] without supplementary groups or capabilities.
pub fn check_daemon_identity(daemon: &Daemon) {
    check_identity(
        &proc_status(daemon.child.id()),
        DAEMON_UID,
        DAEMON_UID,
        "",
        "the daemon",
    );
}

/// The arguments of `unidev serve` of virtio-blk image `image` over `transport` on
/// `sock`, shared with [`SHARED_GID`] (mode 0660), under `--seccomp kill`.
pub fn serve_blk_args<'a>(transport: &'a str, sock: &'a str, image: &'a str) -> Vec<&'a str> {
    vec![
        "serve",
        "--transport",
        transport,
        "--socket-path",
        sock,
        "--socket-mode",
        "0660",
        "--socket-group",
        "1502",
        "--seccomp",
        "kill",
        "virtio-blk",
        "--file",
        image,
    ]
}
