//! Unprivileged operation (issue 8): the daemon runs as an ordinary user (uid 1500, no
//! supplementary groups, no capabilities) and a client running as another ordinary user
//! (uid 1501, supplementary group 1502) completes virtio-blk I/O over vfio-user and over
//! vhost-user, granted access only through the socket's mode and group; other users are
//! refused; a socket group the daemon's user is not in is a clear error; the open files
//! limit, hit by a client's descriptors, is named in the log and the daemon serves on;
//! VDUSE as an ordinary user says that it needs root.
//!
//! The tests run as root (as CI does) and make the identities themselves: numeric uids
//! and gids without passwd entries, set in the child between fork and exec. The client
//! is this test binary re-executed ([`client_role`]). Both binaries are linked (or
//! copied) into a fresh 0755 directory first, because the checkout may live under a 0700
//! directory such as /root that the other users cannot enter.
//!
//! The socket directory is the recommended layout: owned by the daemon's user, group
//! 1502, mode 02750 — set-group-ID, so the daemon's socket is born with group 1502
//! without the daemon being in that group, and `--socket-group 1502` only confirms it.

mod common;
#[path = "common/unprivileged.rs"]
mod unprivileged_common;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Daemon};
use unidev_testkit::{
    vhost_user, DriverMemory, DriverOptions, VhostUserRing, VirtioBlkRequest, VirtioPciDriver,
    Virtqueue,
};
use unidev_transports::vfio_user::VfioUserClient;
use unprivileged_common::{
    as_user, check_daemon_identity, check_identity, serve_blk_args, status_field, Stage,
    CLIENT_UID, DAEMON_UID, SHARED_GID, STRANGER_UID,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::EventFd;

const TIMEOUT: Duration = Duration::from_secs(10);
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const BLK_F_FLUSH: u64 = 1 << 9;
const S_OK: u8 = 0;
const IMAGE_SIZE: u64 = 4 << 20;
/// Where the client writes (sector 64).
const IO_SECTOR: u64 = 64;

const ROLE_ENV: &str = "UNIDEV_UNPRIV_ROLE";
const SOCK_ENV: &str = "UNIDEV_UNPRIV_SOCK";
const CLIENT_TEST: &str = "client_role";

/// A stage with this test binary in it too (the client), and a zeroed 4 MiB image only
/// the daemon's user may read and write.
struct ClientStage {
    stage: Stage,
    exe: PathBuf,
    image: PathBuf,
}

impl ClientStage {
    fn new(name: &str) -> ClientStage {
        let stage = Stage::new(name);
        let exe = stage.binary(&std::env::current_exe().unwrap(), "unprivileged-tests");
        let image = stage.dir.join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(IMAGE_SIZE)
            .unwrap();
        stage.give_to_daemon(&image);
        ClientStage { stage, exe, image }
    }

    /// Run [`client_role`] `role` against `sock` as `uid` with `groups`: its exit status
    /// and output.
    fn client(&self, role: &str, sock: &Path, uid: u32, groups: &[u32]) -> (bool, String) {
        let mut cmd = Command::new(&self.exe);
        cmd.args([CLIENT_TEST, "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(ROLE_ENV, role)
            .env(SOCK_ENV, sock)
            .current_dir(&self.stage.dir)
            .stdin(Stdio::null());
        as_user(&mut cmd, uid, uid, groups, None);
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl std::ops::Deref for ClientStage {
    type Target = Stage;
    fn deref(&self) -> &Stage {
        &self.stage
    }
}

/// The bytes the client writes over `transport`.
fn pattern(transport: &str) -> Vec<u8> {
    let salt = transport.len() as u32;
    (0..8192u32)
        .map(|i| (i * 13 + salt + i / 512) as u8)
        .collect()
}

/// The daemon as uid 1500 serves virtio-blk over `transport`; a client as uid 1501 in
/// group 1502 writes, reads back and flushes; users without the group cannot connect.
fn two_users(transport: &str) {
    let stage = ClientStage::new(transport);
    let run = stage.socket_dir(SHARED_GID, 0o2750);
    let image = stage.image.clone();
    let sock = run.join("blk.sock");
    let mut daemon = stage.daemon(
        "unidev",
        DAEMON_UID,
        &[],
        &serve_blk_args(transport, sock.to_str().unwrap(), image.to_str().unwrap()),
    );
    wait_for(20, "the daemon's socket", || {
        sock.exists() || matches!(daemon.child.try_wait(), Ok(Some(_)))
    });
    assert!(sock.exists(), "no socket; log:\n{}", daemon.log_text());
    check_daemon_identity(&daemon);
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (DAEMON_UID, SHARED_GID, 0o660),
        "the socket's owner, group and mode"
    );

    // The client: another user, granted access by group 1502 only.
    let (ok, out) = stage.client(transport, &sock, CLIENT_UID, &[SHARED_GID]);
    assert!(
        ok && out.contains("CLIENT-IO-OK"),
        "client failed:\n{out}\n--- daemon ---\n{}",
        daemon.log_text()
    );
    let status: String = out
        .lines()
        // The first may share its line with libtest's "test client_role ... ".
        .filter_map(|l| Some(l.split_once("CLIENT-STATUS ")?.1))
        .map(|l| format!("{l}\n"))
        .collect();
    check_identity(
        &status,
        CLIENT_UID,
        CLIENT_UID,
        &SHARED_GID.to_string(),
        "the client",
    );
    // What the client wrote went through the daemon into the image.
    let mut on_disk = vec![0u8; 8192];
    let mut f = std::fs::File::open(&image).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(IO_SECTOR * 512)).unwrap();
    f.read_exact(&mut on_disk).unwrap();
    assert!(
        on_disk == pattern(transport),
        "the client's write is in the image"
    );

    // Refused: a user without the group, at the directory (02750)...
    let refused = |uid, groups: &[u32]| {
        let (ok, out) = stage.client("connect", &sock, uid, groups);
        assert!(ok, "{out}");
        assert!(
            out.contains(&format!("CONNECT-ERRNO {}", libc::EACCES)),
            "uid {uid} groups {groups:?} must get EACCES:\n{out}"
        );
    };
    refused(STRANGER_UID, &[]);
    refused(CLIENT_UID, &[]);
    // ... and, with the directory open to all (02751), at the socket's mode (0660).
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o2751)).unwrap();
    refused(STRANGER_UID, &[]);
    refused(CLIENT_UID, &[]);
    let (ok, out) = stage.client("connect", &sock, CLIENT_UID, &[SHARED_GID]);
    assert!(ok && out.contains("CONNECT-OK"), "{out}");

    // Still serving, still unprivileged; SIGTERM stops it and it removes its socket.
    assert!(
        matches!(daemon.child.try_wait(), Ok(None)),
        "{}",
        daemon.log_text()
    );
    check_daemon_identity(&daemon);
    daemon.signal(libc::SIGTERM);
    let st = daemon.wait(10);
    assert!(st.success(), "{st:?}:\n{}", daemon.log_text());
    assert!(!sock.exists(), "socket removed");
}

#[test]
fn virtio_blk_over_vfio_user_between_two_unprivileged_users() {
    two_users("vfio-user");
}

#[test]
fn virtio_blk_over_vhost_user_between_two_unprivileged_users() {
    two_users("vhost-user");
}

#[test]
fn a_socket_group_the_daemons_user_is_not_in_is_a_clear_error() {
    let stage = ClientStage::new("group");
    // A plain directory of the daemon's user: no set-group-ID to lend group 1502.
    let run = stage.socket_dir(DAEMON_UID, 0o750);
    let image = stage.image.clone();
    let sock = run.join("blk.sock");
    let args = serve_blk_args(
        "vhost-user",
        sock.to_str().unwrap(),
        image.to_str().unwrap(),
    );
    let mut daemon = stage.daemon("refused", DAEMON_UID, &[], &args);
    let st = daemon.wait(20);
    assert!(!st.success());
    let log = daemon.log_text();
    for needle in [
        &format!(
            "cannot set the group of {}: Operation not permitted (os error 1): the daemon is \
             not a member of group 1502",
            sock.display()
        ),
        "(it runs as uid 1500 (effective 1500), no capabilities)",
        "setpriv --groups=1502",
        "chmod g+s",
    ] {
        assert!(log.contains(needle), "{needle:?} in:\n{log}");
    }
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        0,
        "nothing left in the socket directory"
    );
    // In the group, the same daemon starts and the socket has it.
    let daemon = stage.daemon("member", DAEMON_UID, &[SHARED_GID], &args);
    wait_for(20, "the socket", || sock.exists());
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (DAEMON_UID, SHARED_GID));
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.child.id())).unwrap();
    check_identity(&status, DAEMON_UID, DAEMON_UID, "1502", "the daemon");
}

// ---- the open files limit ----

/// Descriptor numbers open in process `pid`.
fn fds_of(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Room the tests leave: descriptors free once one client is attached.
const ROOM: u64 = 24;

/// Start the daemon of `args` as uid 1500 under an open files limit that leaves [`ROOM`]
/// descriptors free once a client is attached (`attach` connects one and returns it).
/// The limit is found by a first run without one, stopped once measured: the descriptor
/// numbers a daemon uses up to that point are the same every run. Returns the daemon
/// (with the client attached) and the limit.
fn squeezed_daemon<C>(
    stage: &ClientStage,
    args: &[&str],
    sock: &Path,
    attach: impl Fn() -> C,
) -> (Daemon, C, u64) {
    // New descriptors take the lowest free numbers below the limit: the free ones there.
    let free_below = |fds: &[i32], limit: u64| {
        limit - fds.iter().filter(|&&fd| (fd as u64) < limit).count() as u64
    };
    let probe = stage.daemon("probe", DAEMON_UID, &[], args);
    wait_for(20, "the socket", || sock.exists());
    let client = attach();
    let fds = fds_of(probe.child.id());
    drop(client);
    drop(probe);
    let limit = (0..).find(|&l| free_below(&fds, l) == ROOM).unwrap();
    let _ = std::fs::remove_file(sock);
    let daemon = stage.daemon_with("unidev", DAEMON_UID, &[], Some(limit), args);
    wait_for(20, "the socket", || sock.exists());
    let client = attach();
    assert_eq!(
        free_below(&fds_of(daemon.child.id()), limit),
        ROOM,
        "the same descriptors as in the first run"
    );
    (daemon, client, limit)
}

/// A memfd of one page.
fn page_memfd() -> std::fs::File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"unpriv-page".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor owned by nothing else.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(4096).unwrap();
    f
}

/// The daemon logged, in a line containing `context`, that the open files limit (with its
/// value) was reached and how to raise it; that line.
fn wait_for_limit_line(daemon: &Daemon, context: &str, limit: u64) -> String {
    let needle = "open files limit (RLIMIT_NOFILE, `ulimit -n`) (";
    let of = format!("limit {limit}, hard limit {limit}) reached: raise it");
    let found = |log: &str| {
        log.lines()
            .find(|l| l.contains(context) && l.contains(needle) && l.contains(&of))
            .map(str::to_string)
    };
    let end = Instant::now() + TIMEOUT;
    loop {
        let log = daemon.log_text();
        if let Some(line) = found(&log) {
            return line;
        }
        assert!(
            Instant::now() < end,
            "no {context:?} line naming RLIMIT_NOFILE ({limit}):\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn vfio_user_clients_descriptors_hitting_the_open_files_limit_are_named_and_serving_goes_on() {
    let stage = ClientStage::new("nofile-vfio-user");
    let run = stage.socket_dir(SHARED_GID, 0o2750);
    let image = stage.image.clone();
    let sock = run.join("blk.sock");
    let args = serve_blk_args("vfio-user", sock.to_str().unwrap(), image.to_str().unwrap());
    // A client (this process) attaches, the daemon has ROOM descriptors left.
    let (mut daemon, mut a, limit) = squeezed_daemon(&stage, &args, &sock, || {
        let mut a = VfioUserClient::connect(&sock).unwrap();
        a.device_info().unwrap();
        a
    });
    // Every fd-backed DMA map keeps its descriptor in the daemon: map page after page
    // until the kernel cannot pass one.
    let mut mapped = 0;
    let errno = loop {
        let page = page_memfd();
        let iova = 0x1_0000_0000 + mapped * 0x1000;
        match a.dma_map(
            iova,
            0x1000,
            true,
            true,
            Some((std::os::fd::AsRawFd::as_raw_fd(&page), 0)),
        ) {
            Ok(()) => mapped += 1,
            Err(e) => break e.errno(),
        }
        assert!(mapped < 1000, "the limit of {limit} never bit");
    };
    assert_eq!(errno, Some(libc::EMFILE), "the map fails with EMFILE");
    assert!(mapped >= 20, "{mapped} maps before the limit");
    let line = wait_for_limit_line(
        &daemon,
        "file descriptors passed with the message were lost",
        limit,
    );
    assert!(line.contains("DmaMap"), "{line}");
    // The connection is still in step: the next request is answered.
    a.device_info().unwrap();

    // A connection arriving now cannot even be accepted: it is named and closed (not
    // left hanging), and the daemon does not spin on its readable listener.
    assert!(
        VfioUserClient::connect(&sock).is_err(),
        "a connection without room must be closed"
    );
    wait_for_limit_line(&daemon, "accept failed, connection closed", limit);
    std::thread::sleep(Duration::from_millis(500));
    let accepts = daemon.log_text().matches("accept failed").count();
    assert_eq!(
        accepts,
        1,
        "one line per refused connection:\n{}",
        daemon.log_text()
    );

    // The client goes; its maps and their descriptors with it: a new client does I/O.
    drop(a);
    vfio_user_blk_io(&sock);
    assert!(matches!(daemon.child.try_wait(), Ok(None)));
    check_daemon_identity(&daemon);
}

#[test]
fn vhost_user_frontends_descriptors_hitting_the_open_files_limit_are_named_and_serving_goes_on() {
    let stage = ClientStage::new("nofile-vhost-user");
    let run = stage.socket_dir(SHARED_GID, 0o2750);
    let image = stage.image.clone();
    let sock = run.join("blk.sock");
    let args = serve_blk_args(
        "vhost-user",
        sock.to_str().unwrap(),
        image.to_str().unwrap(),
    );
    let mem = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
    let protocol = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    let (mut daemon, ring, limit) = squeezed_daemon(&stage, &args, &sock, || {
        VhostUserRing::connect(&sock, &mem, VERSION_1 | PROTOCOL_FEATURES, protocol, 64).unwrap()
    });
    let mut fe = ring.fe;
    // Each memory region keeps its descriptor in the daemon.
    let mut added = 0u64;
    let failed = loop {
        let page = page_memfd();
        let region = vhost::VhostUserMemoryRegionInfo {
            guest_phys_addr: 0x10_0000_0000 + added * 0x1_0000,
            memory_size: 0x1000,
            userspace_addr: 0x7000_0000_0000 + added * 0x1_0000,
            mmap_handle: std::os::fd::AsRawFd::as_raw_fd(&page),
            // mmap_offset 0
            ..Default::default()
        };
        match vhost::vhost_user::VhostUserFrontend::add_mem_region(&mut fe, &region) {
            Ok(_) => added += 1,
            Err(e) => break e,
        }
        assert!(added < 400, "the limit of {limit} never bit");
    };
    assert!(added >= 20, "{added} regions before the limit ({failed})");
    // vhost-user cannot answer a request whose descriptors were lost (the frontend would
    // take the error for the region's reply or resend nothing): the connection ends, and
    // the log says why.
    wait_for_limit_line(
        &daemon,
        "dropping the connection: file descriptors passed with the message were lost",
        limit,
    );
    drop(fe);
    // The next frontend is served.
    let ring = VhostUserRing::connect(
        &sock,
        &mem,
        VERSION_1 | PROTOCOL_FEATURES | BLK_F_FLUSH,
        VhostUserProtocolFeatures::MQ,
        64,
    )
    .unwrap();
    let (_fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
    blk_io(
        |r| vhost_user_request(&mem, &mut vq, &kick, r),
        "vhost-user",
    );
    assert!(matches!(daemon.child.try_wait(), Ok(None)));
    check_daemon_identity(&daemon);
}

// ---- VDUSE ----

/// `serve --transport vduse` as `uid` (no groups) with `--vduse-control control`: it
/// fails; what it said (also in `vduse-LABEL.log`).
fn vduse_as(stage: &ClientStage, label: &str, uid: u32, control: &Path, image: &Path) -> String {
    let mut daemon = stage.daemon(
        &format!("vduse-{label}"),
        uid,
        &[],
        &[
            "serve",
            "--transport",
            "vduse",
            "--name",
            "unpriv0",
            "--vduse-control",
            control.to_str().unwrap(),
            "virtio-blk",
            "--file",
            image.to_str().unwrap(),
        ],
    );
    let st = daemon.wait(20);
    let log = daemon.log_text();
    assert!(!st.success(), "uid {uid} must fail:\n{log}");
    log
}

#[test]
fn vduse_as_an_ordinary_user_says_it_needs_root() {
    let stage = ClientStage::new("vduse");
    let image = stage.image.clone();
    // The control device of a kernel with VDUSE: root's, mode 0600. (A plain file: the
    // open is refused before anything could tell.)
    let control = stage.dir.join("control");
    std::fs::write(&control, b"").unwrap();
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log = vduse_as(&stage, "eacces", DAEMON_UID, &control, &image);
    for needle in [
        &format!("cannot open {}: permission denied", control.display()),
        "VDUSE needs root: the kernel makes /dev/vduse/control and /dev/vduse/NAME \
         root-only (mode 0600)",
        "CAP_NET_ADMIN",
        "this process runs as uid 1500 (effective 1500), no capabilities",
        "the vfio-user and vhost-user transports need no privileges",
    ] {
        assert!(log.contains(needle), "{needle:?} in:\n{log}");
    }
    assert!(
        !log.contains("modprobe") && !log.contains("does not exist"),
        "EACCES is not a missing module:\n{log}"
    );

    // No VDUSE in the kernel (this host: no /dev/vduse): the modules are named, and that
    // root is needed as well.
    let missing = stage.dir.join("no-vduse").join("control");
    let log = vduse_as(&stage, "missing", DAEMON_UID, &missing, &image);
    for needle in [
        &format!(
            "{} does not exist: VDUSE is not available (the kernel module `vduse` is not \
             loaded",
            missing.display()
        ),
        "modprobe vduse",
        "Besides, VDUSE needs root",
        "this process runs as uid 1500 (effective 1500), no capabilities",
    ] {
        assert!(log.contains(needle), "{needle:?} in:\n{log}");
    }
    assert!(!log.contains("permission denied"), "{log}");
    // Root is told about the modules only.
    let log = vduse_as(&stage, "missing-root", 0, &missing, &image);
    assert!(log.contains("modprobe vduse"), "{log}");
    assert!(!log.contains("needs root"), "{log}");

    // The default control device, whatever this host has: either way the user learns
    // that root is needed.
    let default = Path::new("/dev/vduse/control");
    let log = vduse_as(&stage, "default", DAEMON_UID, default, &image);
    assert!(log.contains("VDUSE needs root"), "{log}");
    assert_eq!(
        log.contains("modprobe vduse"),
        !default.exists(),
        "a missing module is named only when it is missing:\n{log}"
    );
}

// ---- I/O, shared by the client process and the limit tests ----

/// Write the pattern for `transport` at [`IO_SECTOR`], read it back, flush.
/// A vfio-user virtio-blk client on `sock` runs [`blk_io`].
fn vfio_user_blk_io(sock: &Path) {
    let mut d = VirtioPciDriver::new(
        VfioUserClient::connect(sock).unwrap(),
        DriverOptions {
            features: VERSION_1 | BLK_F_FLUSH,
            queue_size: 64,
            memory_size: 4 << 20,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    d.init().unwrap();
    blk_io(
        |r| {
            let c = d.blk_request(0, r, TIMEOUT).unwrap();
            (c.status, c.data)
        },
        "vfio-user",
    );
}

fn blk_io(mut submit: impl FnMut(&VirtioBlkRequest) -> (u8, Vec<u8>), transport: &str) {
    let data = pattern(transport);
    assert_eq!(
        submit(&VirtioBlkRequest::write(IO_SECTOR, &data)).0,
        S_OK,
        "write"
    );
    let (st, back) = submit(&VirtioBlkRequest::read(IO_SECTOR, data.len() as u32));
    assert_eq!(st, S_OK, "read");
    assert!(back == data, "read back what was written");
    assert_eq!(submit(&VirtioBlkRequest::flush()).0, S_OK, "flush");
}

/// Submit one request on a vhost-user ring and wait for it.
fn vhost_user_request(
    mem: &DriverMemory,
    vq: &mut Virtqueue,
    kick: &EventFd,
    req: &VirtioBlkRequest,
) -> (u8, Vec<u8>) {
    let c = vhost_user::blk_request(mem, vq, kick, req).unwrap();
    (c.status, c.data)
}

/// The client process: prints its identity, then does what ROLE_ENV says with the
/// socket at SOCK_ENV — "connect" (prints CONNECT-OK or CONNECT-ERRNO n), "vfio-user"
/// or "vhost-user" (virtio-blk write, read back, flush; prints CLIENT-IO-OK).
#[test]
#[ignore = "run as another user by the tests above"]
fn client_role() {
    let (Ok(role), Ok(sock)) = (std::env::var(ROLE_ENV), std::env::var(SOCK_ENV)) else {
        return;
    };
    let sock = PathBuf::from(sock);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    for key in ["Uid:", "Gid:", "Groups:", "CapEff:", "CapPrm:", "CapAmb:"] {
        println!("CLIENT-STATUS {key}\t{}", status_field(&status, key));
    }
    match role.as_str() {
        "connect" => match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(_) => println!("CONNECT-OK"),
            Err(e) => println!("CONNECT-ERRNO {}", e.raw_os_error().unwrap_or(-1)),
        },
        "vfio-user" => {
            vfio_user_blk_io(&sock);
            println!("CLIENT-IO-OK");
        }
        "vhost-user" => {
            let mem = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
            let ring = VhostUserRing::connect(
                &sock,
                &mem,
                VERSION_1 | PROTOCOL_FEATURES | BLK_F_FLUSH,
                VhostUserProtocolFeatures::MQ,
                64,
            )
            .unwrap();
            let (_fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
            blk_io(
                |r| vhost_user_request(&mem, &mut vq, &kick, r),
                "vhost-user",
            );
            println!("CLIENT-IO-OK");
        }
        other => panic!("unknown role {other}"),
    }
}
