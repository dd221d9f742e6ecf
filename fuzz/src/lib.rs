//! Helpers shared by unidev's fuzz targets: reading structure out of the fuzzer's bytes,
//! and being a hostile client on a Unix socket (messages with file descriptors).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The fuzzer's bytes, consumed front to back; reads past the end give zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wrap the fuzzer's input.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
}

/// A memfd of `size` bytes whose start holds `content`.
pub fn memfd(size: u64, content: &[u8]) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(c"unidev-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: a new descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(raw) };
    file.set_len(size).expect("memfd size");
    let n = content.len().min(size as usize);
    std::os::unix::fs::FileExt::write_all_at(&file, &content[..n], 0).expect("memfd content");
    file
}

/// A file descriptor the hostile client attaches to a message.
pub enum FdKind {
    /// A memfd (guest memory) of this many bytes, filled with the given bytes.
    Memory(u64, Vec<u8>),
    /// An eventfd (kick, call, interrupt); the client keeps a copy to signal it.
    Event,
    /// A file that is neither (a pipe end).
    Pipe,
}

/// What the client keeps of the fds it sent: eventfds to signal later, and the rest so
/// they stay open while the server uses them.
#[derive(Default)]
pub struct SentFds {
    /// Copies of the eventfds sent.
    pub events: Vec<EventFd>,
    /// Everything else.
    pub others: Vec<OwnedFd>,
}

impl SentFds {
    /// Make the fds for one message.
    pub fn make(&mut self, kinds: &[FdKind]) -> Vec<OwnedFd> {
        let mut out = Vec::new();
        for k in kinds {
            match k {
                FdKind::Memory(size, content) => out.push(OwnedFd::from(memfd(*size, content))),
                FdKind::Event => {
                    let e = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                    let dup = e.try_clone().expect("eventfd dup");
                    self.events.push(dup);
                    // SAFETY: into_raw_fd hands over the descriptor to the OwnedFd.
                    out.push(unsafe {
                        OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(e))
                    });
                }
                FdKind::Pipe => {
                    let mut fds = [0; 2];
                    // SAFETY: pipe2 fills the two-element array; the result is checked.
                    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
                    assert_eq!(r, 0, "pipe2");
                    // SAFETY: both descriptors are new and owned here.
                    unsafe {
                        out.push(OwnedFd::from_raw_fd(fds[0]));
                        self.others.push(OwnedFd::from_raw_fd(fds[1]));
                    }
                }
            }
        }
        out
    }

    /// Signal every eventfd sent (kicks, for a device that took them as such).
    pub fn signal_all(&self) {
        for e in &self.events {
            let _ = e.write(1);
        }
    }
}

/// Send `bytes` with `fds` attached (SCM_RIGHTS), all of it, ignoring a vanished peer.
pub fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> bool {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation on a length.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(raw.as_slice()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    // SAFETY: an all-zero msghdr is valid; the fields are filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer has room for one header and `raw`'s descriptors
        // (CMSG_SPACE above); CMSG_FIRSTHDR/CMSG_DATA point inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(raw.as_slice()) as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                raw.len(),
            );
        }
    }
    // SAFETY: msg points at live buffers for the call's duration.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return false;
    }
    let sent = n as usize;
    if sent < bytes.len() {
        // The rest without fds (they went with the first byte).
        return std::io::Write::write_all(&mut &*sock, &bytes[sent..]).is_ok();
    }
    true
}

/// Read and discard everything until the peer closes (or an error).
pub fn drain(mut sock: &UnixStream) {
    let mut buf = [0u8; 65536];
    loop {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Fds for one message, chosen by a byte of input: bits 0-1 count, then kinds.
pub fn fd_kinds(input: &mut Input, spec: u8) -> Vec<FdKind> {
    let count = usize::from(spec & 3);
    (0..count)
        .map(|_| match input.u8() % 3 {
            0 => {
                let pages = u64::from(input.u8() % 16) + 1;
                let content_len = usize::from(input.u8()) * 4;
                FdKind::Memory(pages * 4096, input.bytes(content_len).to_vec())
            }
            1 => FdKind::Event,
            _ => FdKind::Pipe,
        })
        .collect()
}
