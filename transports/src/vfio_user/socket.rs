//! Message framing on the vfio-user AF_UNIX stream socket: header + payload, file
//! descriptors as SCM_RIGHTS ancillary data (vfio-user.rst, "Header" and "Socket"), with
//! limits on message size and fds per message.
//!
//! Receiving validates only what framing needs: a size below the header size cannot be
//! framed (the connection must end); a size over the limit is drained and reported so
//! the session can answer `E2BIG` and keep going; more fds than allowed are closed and
//! reported; fds the kernel could not pass (this process's open files limit was reached)
//! are reported once the message is read in full, so the session can answer the error
//! and the connection stays framed. Sends are serialized by a lock so replies and server-initiated DMA requests
//! from other threads never interleave.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use libc::iovec;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::codec::{Header, HEADER_SIZE};
use crate::scm_rights::{fd_table_errno, recv_with_fds, SCM_MAX_FD};

use unidev_core::sync::lock;

/// Past this size a message is not drained but the connection dropped: reading gigabytes
/// to skip a bogus message would only help an attacker.
const MAX_DRAIN: usize = 64 << 20;

/// A received message.
#[derive(Debug)]
pub struct Message {
    /// Its header.
    pub header: Header,
    /// Its payload (header excluded).
    pub payload: Vec<u8>,
    /// File descriptors that came with it, owned (closed on drop).
    pub fds: Vec<OwnedFd>,
}

/// Why no message could be returned.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The peer closed the connection at a message boundary.
    #[error("peer closed the connection")]
    Closed,
    /// The socket failed, timed out, or closed mid-message.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The byte stream can no longer be framed; the connection must end.
    #[error("cannot frame message: {0}")]
    Framing(String),
    /// The message was larger than allowed; its payload was drained. Answer `E2BIG`.
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooBig {
        /// Its header.
        header: Header,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The message carried more fds than allowed; they were closed. Answer `EINVAL`.
    #[error("message carried {count} fds, at most {limit} allowed")]
    TooManyFds {
        /// Its header.
        header: Header,
        /// Fds received.
        count: usize,
        /// The limit.
        limit: usize,
    },
}

/// Descriptors sent with a message did not arrive: the kernel could not install them
/// (`errno` EMFILE: this process's open files limit; ENFILE: the system's) or the control
/// buffer was too small (ENOBUFS). Those that did arrive were closed; the message was read
/// in full, so the connection is still framed. Carried in [`RecvError::Io`] (see
/// [`RecvError::lost_fds`]).
#[derive(Debug)]
struct FdsLost {
    header: Header,
    errno: i32,
}

impl std::fmt::Display for FdsLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "file descriptors sent with the message were lost ({})",
            io::Error::from_raw_os_error(self.errno)
        )
    }
}

impl std::error::Error for FdsLost {}

impl RecvError {
    /// When descriptors sent with a message did not arrive (the kernel could not install
    /// them: errno EMFILE, this process's open files limit, or ENFILE; or ENOBUFS), the
    /// message's header and that errno. The message was read in full: answer the errno
    /// and go on with the connection.
    pub fn lost_fds(&self) -> Option<(&Header, i32)> {
        match self {
            RecvError::Io(e) => e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<FdsLost>())
                .map(|l| (&l.header, l.errno)),
            _ => None,
        }
    }
}

/// Limits applied to incoming messages.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest message accepted, header included.
    pub max_msg_size: usize,
    /// Most fds accepted with one message.
    pub max_fds: usize,
}

/// A connected vfio-user socket.
#[derive(Debug)]
pub struct MessageSocket {
    stream: UnixStream,
    limits: Limits,
    send_lock: Mutex<()>,
}

impl MessageSocket {
    /// Wrap a connected stream.
    pub fn new(stream: UnixStream, limits: Limits) -> Self {
        MessageSocket {
            stream,
            limits,
            send_lock: Mutex::new(()),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Set a timeout for blocking reads and writes (a peer that stalls mid-message or
    /// stops reading replies then fails instead of blocking forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(t)?;
        self.stream.set_write_timeout(t)
    }

    /// recvmsg into `buf`, collecting fds; returns bytes read. The control buffer lives
    /// on the stack (room for [`SCM_MAX_FD`] descriptors): this runs twice per message,
    /// and allocating and initialising a buffer that size each time cost more than the
    /// rest of a small message's handling.
    ///
    /// Descriptors the kernel dropped (`MSG_CTRUNC`) are recorded in `lost` (with the
    /// errno that explains it) and those received with them closed; the bytes still count.
    fn recv_part(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        lost: &mut Option<i32>,
    ) -> io::Result<usize> {
        let first = fds.len();
        let got = recv_with_fds(self.stream.as_raw_fd(), buf, 0, SCM_MAX_FD, fds)?;
        if got.truncated {
            // Descriptors were lost: the message cannot be handled as sent. With room
            // left in the control buffer, the kernel failed to install them (its
            // scm_detach_fds stops at the first that fails): the descriptor table is
            // full. Those received are closed (dropped).
            let errno = if fds.len() - first < SCM_MAX_FD {
                fd_table_errno(self.stream.as_raw_fd())
            } else {
                libc::ENOBUFS
            };
            fds.truncate(first);
            lost.get_or_insert(errno);
        }
        Ok(got.bytes)
    }

    fn recv_exact(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        lost: &mut Option<i32>,
    ) -> Result<usize, io::Error> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.recv_part(&mut buf[got..], fds, lost)?;
            if n == 0 {
                return Ok(got);
            }
            got += n;
        }
        Ok(got)
    }

    /// Receive one whole message (blocking until it is complete or the read times out).
    pub fn recv(&self) -> Result<Message, RecvError> {
        let mut fds = Vec::new();
        let mut lost = None;
        let mut hbuf = [0u8; HEADER_SIZE];
        let got = self.recv_exact(&mut hbuf, &mut fds, &mut lost)?;
        if got == 0 {
            return Err(RecvError::Closed);
        }
        if got < HEADER_SIZE {
            return Err(RecvError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {got} bytes of a header"),
            )));
        }
        let header = Header::decode(&hbuf);
        let size = header.size as usize;
        if size < HEADER_SIZE {
            return Err(RecvError::Framing(format!(
                "message size {size} is smaller than the header ({header:?})"
            )));
        }
        let payload_len = size - HEADER_SIZE;
        if size > self.limits.max_msg_size {
            if size > MAX_DRAIN {
                return Err(RecvError::Framing(format!(
                    "message size {size} is absurd ({header:?})"
                )));
            }
            self.drain(payload_len, &mut fds, &mut lost)?;
            return Err(RecvError::TooBig {
                header,
                size,
                limit: self.limits.max_msg_size,
            });
        }
        let mut payload = vec![0u8; payload_len];
        let got = self.recv_exact(&mut payload, &mut fds, &mut lost)?;
        if got < payload_len {
            return Err(RecvError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {got} of {payload_len} payload bytes"),
            )));
        }
        if let Some(errno) = lost {
            return Err(RecvError::Io(io::Error::other(FdsLost { header, errno })));
        }
        if fds.len() > self.limits.max_fds {
            return Err(RecvError::TooManyFds {
                header,
                count: fds.len(),
                limit: self.limits.max_fds,
            });
        }
        Ok(Message {
            header,
            payload,
            fds,
        })
    }

    fn drain(
        &self,
        mut left: usize,
        fds: &mut Vec<OwnedFd>,
        lost: &mut Option<i32>,
    ) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        while left > 0 {
            let want = left.min(scratch.len());
            let n = self.recv_part(&mut scratch[..want], fds, lost)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside an oversized message",
                ));
            }
            left -= n;
        }
        fds.clear();
        Ok(())
    }

    /// Send a message with optional fds. The header's `size` must match the payload.
    pub fn send(&self, header: &Header, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let hbuf = header.encode();
        let _guard = lock(&self.send_lock);
        let total = hbuf.len() + payload.len();
        // First sendmsg carries the fds; retry the rest without them.
        let mut sent = loop {
            let r = if fds.is_empty() {
                self.send_plain(&hbuf, payload)
            } else {
                self.stream
                    .send_with_fds(&[&hbuf[..], payload], fds)
                    .map_err(|e| io::Error::from_raw_os_error(e.errno()))
            };
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        while sent < total {
            let bufs: Vec<IoSlice> = if sent < hbuf.len() {
                vec![IoSlice::new(&hbuf[sent..]), IoSlice::new(payload)]
            } else {
                vec![IoSlice::new(&payload[sent - hbuf.len()..])]
            };
            match io::Write::write_vectored(&mut &self.stream, &bufs) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "socket closed while sending",
                    ))
                }
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One sendmsg of header and payload without descriptors (most messages): no
    /// allocation, and MSG_NOSIGNAL so a vanished peer is an error, not a signal.
    fn send_plain(&self, header: &[u8], payload: &[u8]) -> io::Result<usize> {
        let mut iov = [
            iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            },
            iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            },
        ];
        // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: the iovecs point into `header` and `payload`, valid for reads of their
        // lengths for the duration of the call (sendmsg does not write through them).
        let n = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Raw fd (for epoll).
    pub fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Bytes waiting to be read (FIONREAD), without consuming anything.
    pub fn pending_bytes(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the valid pointer we pass.
        let r = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::FIONREAD, &mut n) };
        if r < 0 {
            0
        } else {
            n.max(0) as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio_user::codec::Command;
    use vmm_sys_util::eventfd::EventFd;

    fn pair() -> (MessageSocket, MessageSocket) {
        let (a, b) = UnixStream::pair().unwrap();
        let limits = Limits {
            max_msg_size: 4096,
            max_fds: 16,
        };
        (MessageSocket::new(a, limits), MessageSocket::new(b, limits))
    }

    #[test]
    fn messages_with_and_without_descriptors_round_trip() {
        let (a, b) = pair();
        let payload = b"payload".to_vec();
        let h = Header::command(7, Command::RegionRead, payload.len(), false);
        a.send(&h, &payload, &[]).unwrap();
        let m = b.recv().unwrap();
        assert_eq!((m.header.id, &m.payload, m.fds.len()), (7, &payload, 0));

        let efds: Vec<EventFd> = (0..3).map(|_| EventFd::new(0).unwrap()).collect();
        let raw: Vec<RawFd> = efds.iter().map(|e| e.as_raw_fd()).collect();
        let h = Header::command(8, Command::DeviceSetIrqs, payload.len(), false);
        a.send(&h, &payload, &raw).unwrap();
        let m = b.recv().unwrap();
        assert_eq!((m.header.id, m.fds.len()), (8, 3));
        // The received descriptors are the same eventfds.
        efds[1].write(5).unwrap();
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a valid u64 from an owned, valid eventfd.
        let n = unsafe { libc::read(m.fds[1].as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!((n, v), (8, 5));
    }
}
