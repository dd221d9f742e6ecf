//! Receiving descriptors passed with socket messages (SCM_RIGHTS, unix(7)): the one
//! `recvmsg` both socket transports use — vfio-user to read messages with their fds,
//! vhost-user to peek at a request before the `vhost` crate reads it.
//!
//! Hand-written rather than vmm-sys-util's `ScmSocket`: that helper sizes a heap control
//! buffer per call and does not report descriptors the kernel dropped (`MSG_CTRUNC`), which
//! both transports must tell apart from a full descriptor table (EMFILE, ENFILE).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The most fds the kernel passes in one message (SCM_MAX_FD).
pub const SCM_MAX_FD: usize = 253;

/// Bytes of a control message carrying [`SCM_MAX_FD`] descriptors: CMSG_SPACE(253 * 4)
/// on Linux (a 16-byte header and the data rounded up to 8 bytes).
const CONTROL_BYTES: usize = control_space(SCM_MAX_FD);

/// CMSG_SPACE of `fds` descriptors on Linux (64-bit): header, data rounded up to 8.
const fn control_space(fds: usize) -> usize {
    16 + (fds * 4).next_multiple_of(8)
}

/// Room for one control message, aligned as `cmsghdr` requires; on the stack, because
/// this runs for every message.
#[repr(C, align(8))]
struct ControlBuffer([u8; CONTROL_BYTES]);

/// What one [`recv_with_fds`] got.
pub struct Received {
    /// Bytes received (or peeked).
    pub bytes: usize,
    /// The kernel dropped descriptors (`MSG_CTRUNC`): more than `max_fds` were sent, or
    /// the descriptor table is full. The descriptors that did arrive are in `fds`.
    pub truncated: bool,
}

/// `recvmsg(fd, flags)` into `buf`, with room for `max_fds` (at most [`SCM_MAX_FD`])
/// descriptors, which are appended to `fds` (a peek installs them too). Retries on EINTR.
pub fn recv_with_fds(
    fd: RawFd,
    buf: &mut [u8],
    flags: libc::c_int,
    max_fds: usize,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = ControlBuffer([0u8; CONTROL_BYTES]);
    let control_len = control_space(max_fds.min(SCM_MAX_FD));
    loop {
        // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control_len as _;
        // SAFETY: msg points at one iovec into `buf` (valid for writes of its length) and
        // at `control` (valid for control_len <= CONTROL_BYTES, aligned for cmsghdr);
        // both outlive the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: CMSG_FIRSTHDR and CMSG_NXTHDR walk the control data the kernel wrote,
        // bounded by the msg_controllen it set; each header they return lies inside
        // `control`.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: non-null headers from CMSG_FIRSTHDR/NXTHDR are inside `control`.
            let h = unsafe { std::ptr::read_unaligned(cmsg) };
            if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN has no preconditions.
                let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
                let count =
                    (h.cmsg_len as usize).saturating_sub(header_len) / std::mem::size_of::<RawFd>();
                // SAFETY: the data of this header follows it inside `control`.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: `count` descriptors follow the header (cmsg_len says so, and
                    // the kernel never writes past msg_controllen); they were just
                    // installed in our table and nothing else owns them.
                    let received = unsafe { std::ptr::read_unaligned(data.add(i)) };
                    // SAFETY: as above.
                    fds.push(unsafe { OwnedFd::from_raw_fd(received) });
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        return Ok(Received {
            bytes: n as usize,
            truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        });
    }
}

/// Why the kernel could not install a received descriptor: EMFILE or ENFILE, as a probe
/// duplicating `fd` now reports (call it while the descriptors that did arrive are still
/// open, so the table is as full as the kernel found it); EMFILE when the probe succeeds
/// (another thread closed one meanwhile).
pub fn fd_table_errno(fd: RawFd) -> i32 {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor of ours; a new descriptor is closed at once.
    let probe = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if probe >= 0 {
        // SAFETY: `probe` was just created here and is owned by nothing else.
        unsafe { libc::close(probe) };
        return libc::EMFILE;
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENFILE) => libc::ENFILE,
        _ => libc::EMFILE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_buffer_holds_the_most_descriptors_a_message_can_carry() {
        // SAFETY: CMSG_SPACE has no preconditions.
        let needed = unsafe { libc::CMSG_SPACE((SCM_MAX_FD * 4) as u32) } as usize;
        assert!(CONTROL_BYTES >= needed, "{CONTROL_BYTES} < {needed}");
        // SAFETY: as above.
        let one = unsafe { libc::CMSG_SPACE(4) } as usize;
        assert_eq!(control_space(1), one);
    }
}
