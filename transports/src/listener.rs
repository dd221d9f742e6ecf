//! Listening sockets for socket transports (vfio-user now, vhost-user later).
//!
//! `bind` makes the socket path appear only once the socket accepts connections: it
//! binds and listens on a temporary name in the same directory, sets the mode, and
//! renames it onto the requested path. An existing *socket* at the path is replaced (a
//! daemon restarting after a crash); any other kind of file is refused, never clobbered.
//! `from_fd` adopts an already-listening socket (socket activation).
//!
//! Access: the socket's mode (0600 by default in the daemon) and group decide who can
//! connect at all; a [`PeerPolicy`] additionally checks each accepted connection's
//! SO_PEERCRED uid against an allow-list, so that a server refuses (and logs) any other
//! local user even where file permissions are wider.
//!
//! Nothing here needs privileges: the daemon's user owns the socket; giving it to a group
//! needs that user to be in the group (or the socket directory to be set-group-ID with
//! that group, so the socket is born with it). [`accept`] is the accept step of every
//! socket transport: when the open files limit is reached it names the limit (through
//! `unidev_core::limits`) and sheds the waiting connection with a reserved descriptor,
//! instead of spinning on a listener that stays readable.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use log::error;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use unidev_core::sync::lock;

/// Why a listening socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The path has no parent directory or file name.
    #[error("{0} is not a usable socket path")]
    BadPath(PathBuf),
    /// The OS refused.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The fd given for socket activation is not a listening AF_UNIX stream socket.
    #[error("fd {0} is not a listening unix stream socket")]
    NotListening(RawFd),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ListenError + 'a {
    move |source| ListenError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The socket cannot be given to group `gid`: with EPERM, the daemon's user is not a
/// member (and has no CAP_CHOWN); the error says so and what to do.
fn group_error(e: io::Error, path: &Path, gid: u32) -> ListenError {
    let source = if e.raw_os_error() == Some(libc::EPERM) {
        let who = unidev_core::limits::Identity::current()
            .map(|id| id.to_string())
            .unwrap_or_else(|| "an unknown user".into());
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{e}: the daemon is not a member of group {gid} (it runs as {who}); start \
                 unidev with {gid} among its groups (e.g. `setpriv --groups={gid}`, or add \
                 the user to the group), or make the socket directory set-group-ID with \
                 group {gid} (`chgrp {gid} DIR && chmod g+s DIR`) so that sockets are born \
                 with it"
            ),
        )
    } else {
        e
    };
    ListenError::Io {
        what: "cannot set the group of",
        path: path.to_path_buf(),
        source,
    }
}

/// Bind a listening socket at `path` with permission bits `mode` (e.g. 0o600).
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    bind_with(path, mode, None)
}

/// [`bind`], and give the socket to group `group` (so that a client running as another
/// user in that group may connect with mode 0660).
pub fn bind_with(path: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener, ListenError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotASocket(path.to_path_buf()))
        }
        Ok(_) | Err(_) => {}
    }
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .ok_or_else(|| ListenError::BadPath(path.to_path_buf()))?;
    let file = path
        .file_name()
        .ok_or_else(|| ListenError::BadPath(path.to_path_buf()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io_err("cannot bind", &tmp))?;
    let cleanup = |e| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("cannot set mode of", &tmp))
        .map_err(cleanup)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(&tmp, None, Some(gid))
            .map_err(|e| group_error(e, path, gid))
            .map_err(cleanup)?;
    }
    // Re-check right before replacing: never clobber a non-socket.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            let _ = std::fs::remove_file(&tmp);
            return Err(ListenError::NotASocket(path.to_path_buf()));
        }
    }
    std::fs::rename(&tmp, path)
        .map_err(io_err("cannot move socket to", path))
        .map_err(cleanup)?;
    Ok(listener)
}

/// A descriptor kept in reserve for [`accept`]: when the open files limit is reached, it
/// is closed to make room for accepting (and at once closing) the waiting connection,
/// then taken again. One for the whole process: accept steps run one at a time per
/// listener, and the lock serialises the rest.
static SPARE_FD: Mutex<Option<OwnedFd>> = Mutex::new(None);

fn open_spare() -> io::Result<OwnedFd> {
    std::fs::File::open("/dev/null").map(OwnedFd::from)
}

/// Keep the reserve descriptor [`accept`] sheds connections with (servers call this when
/// they are created, while descriptors are still free).
pub fn reserve_fd() {
    let mut spare = lock(&SPARE_FD);
    if spare.is_none() {
        *spare = open_spare().ok();
    }
}

/// Accept the next connection on `listener` (non-blocking); `None` when there was none or
/// it failed (logged, prefixed with `name`). When the open files limit is reached the
/// error names it (`unidev_core::limits`) and the waiting connection is accepted into
/// the reserve descriptor's slot and closed, so the client sees its connection end
/// rather than hang, and a level-triggered event loop does not spin on the listener.
pub fn accept(listener: &UnixListener, name: &str) -> Option<UnixStream> {
    let err = match listener.accept() {
        Ok((s, _)) => return Some(s),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
        Err(e) => e,
    };
    let text = unidev_core::limits::describe(&err);
    if !matches!(err.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
        error!("{name}: accept failed: {text}");
        return None;
    }
    let mut spare = lock(&SPARE_FD);
    let shed = spare.take().is_some() && listener.accept().is_ok();
    *spare = open_spare().ok();
    if shed {
        error!("{name}: accept failed, connection closed: {text}");
    } else {
        // Nothing to shed with: wait a little rather than spin on the readable listener.
        error!("{name}: accept failed: {text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

/// The credentials (pid, uid, gid) of a connected peer, from SO_PEERCRED.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid ucred.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(cred)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Which local users may connect, checked on every accepted connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Only these uids are served (None: anyone the socket's permissions let in).
    pub allowed_uids: Option<Vec<u32>>,
}

impl PeerPolicy {
    /// Whether the peer of `stream` may be served; the error says who was refused.
    pub fn admit(&self, stream: &UnixStream) -> Result<(), String> {
        let Some(allowed) = &self.allowed_uids else {
            return Ok(());
        };
        match peer_credentials(stream) {
            Ok(c) if allowed.contains(&c.uid) => Ok(()),
            Ok(c) => Err(format!(
                "peer pid {} uid {} is not in the allowed uids {allowed:?}",
                c.pid, c.uid
            )),
            Err(e) => Err(format!("cannot tell who the peer is ({e})")),
        }
    }
}

/// Adopt an inherited, already-listening socket (systemd-style activation).
pub fn from_fd(fd: RawFd) -> Result<UnixListener, ListenError> {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one c_int into `accepting`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    let mut domain: libc::c_int = 0;
    let mut dlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above, one c_int.
    let r2 = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut dlen,
        )
    };
    if r != 0 || r2 != 0 || accepting == 0 || domain != libc::AF_UNIX {
        return Err(ListenError::NotListening(fd));
    }
    // SAFETY: the caller hands over an inherited fd we now own; it is a listening
    // AF_UNIX socket as checked above.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "unidev-listener-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn binds_with_mode_and_replaces_stale_socket() {
        let d = tmpdir();
        let p = d.join("dev.sock");
        let l1 = bind(&p, 0o600).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(l1);
        let _l2 = bind(&p, 0o660).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o660
        );
        std::os::unix::net::UnixStream::connect(&p).unwrap();
        // No temporary names left behind.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    }

    #[test]
    fn group_is_set_and_peers_are_checked_by_uid() {
        let dir = tmpdir();
        let path = dir.join("grp.sock");
        let gid = 12345;
        let l = bind_with(&path, 0o660, Some(gid)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.gid(), meta.mode() & 0o777), (gid, 0o660));
        let me = unsafe_getuid();
        let _c = UnixStream::connect(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        assert!(PeerPolicy::default().admit(&s).is_ok());
        let mine = PeerPolicy {
            allowed_uids: Some(vec![me]),
        };
        assert!(mine.admit(&s).is_ok());
        let other = PeerPolicy {
            allowed_uids: Some(vec![me.wrapping_add(1)]),
        };
        let why = other.admit(&s).unwrap_err();
        assert!(why.contains(&format!("uid {me}")), "{why}");
    }

    fn unsafe_getuid() -> u32 {
        // SAFETY: getuid has no preconditions and cannot fail.
        unsafe { libc::getuid() }
    }

    #[test]
    fn refuses_to_clobber_other_files() {
        let d = tmpdir();
        let p = d.join("precious");
        std::fs::write(&p, b"data").unwrap();
        assert!(matches!(bind(&p, 0o600), Err(ListenError::NotASocket(_))));
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
        let dirp = d.join("adir");
        std::fs::create_dir(&dirp).unwrap();
        assert!(matches!(
            bind(&dirp, 0o600),
            Err(ListenError::NotASocket(_))
        ));
    }

    #[test]
    fn adopts_only_listening_sockets() {
        let d = tmpdir();
        let l = UnixListener::bind(d.join("s")).unwrap();
        let fd = l.into_raw_fd();
        let l = from_fd(fd).unwrap();
        drop(l);
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            from_fd(f.as_raw_fd()),
            Err(ListenError::NotListening(_))
        ));
    }
    use std::os::fd::AsRawFd;
}
