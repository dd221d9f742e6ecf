//! VHOST_USER_SET_STATUS (39) and VHOST_USER_GET_STATUS (40), the `STATUS` protocol
//! feature (vhost-user.rst, "Front-end message types").
//!
//! Hand-written because the `vhost` crate's `BackendReqHandler` (0.18) has no handler
//! hook for them: it rejects both as unknown requests. The server therefore peeks at each
//! request header before handing the socket to the crate; these two requests (which carry
//! a u64 and never fds) are read, applied to the session and answered here, everything
//! else goes to the crate untouched. Framing follows the spec: a 12-byte header
//! (request, flags, size), flags version 1, REPLY (bit 2) on replies, NEED_REPLY (bit 3)
//! asking for a REPLY_ACK u64 (0 = success).

use std::io;
use std::os::fd::RawFd;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::session::Session;
use crate::scm_rights::{fd_table_errno, recv_with_fds};

/// VHOST_USER_SET_STATUS.
pub const SET_STATUS: u32 = 39;
/// VHOST_USER_GET_STATUS.
pub const GET_STATUS: u32 = 40;

const HEADER: usize = 12;
const VERSION_MASK: u32 = 0x3;
const VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Largest payload this module ever consumes from a malformed status request.
const MAX_PAYLOAD: usize = 4096;

/// What [`intercept`] did with the next request.
#[derive(Debug, PartialEq, Eq)]
pub enum Intercepted {
    /// Not a status request: the crate handles it.
    No,
    /// A status request, handled and answered.
    Handled,
}

/// The header of the next request, read without consuming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Request code.
    pub request: u32,
    /// Flags word (version, REPLY, NEED_REPLY).
    pub flags: u32,
    /// Payload bytes that follow.
    pub size: u32,
}

/// Requests the frontend always waits on a reply for (vhost-user.rst, "Front-end message
/// types"): GET_FEATURES, SET_LOG_BASE, GET_VRING_BASE, GET_PROTOCOL_FEATURES,
/// GET_QUEUE_NUM, GET_CONFIG, POSTCOPY_ADVISE, GET_INFLIGHT_FD, GET_MAX_MEM_SLOTS,
/// GET_STATUS, GET_SHARED_OBJECT, SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE,
/// GET_SHMEM_CONFIG.
const ALWAYS_REPLIED: [u32; 14] = [1, 6, 11, 15, 17, 24, 28, 31, 36, 40, 41, 42, 43, 44];

impl RequestHeader {
    /// Whether a failed request left the frontend waiting for a reply that will never
    /// come. The `vhost` crate answers GET-style requests only on success, and acks a
    /// NEED_REPLY request (with REPLY_ACK negotiated) only when the failure came from the
    /// handler (`handler_error`), not from its own validation. The server drops such a
    /// connection rather than leave the frontend waiting forever.
    pub fn left_unanswered(
        &self,
        protocol: VhostUserProtocolFeatures,
        handler_error: bool,
    ) -> bool {
        if ALWAYS_REPLIED.contains(&self.request) {
            return true;
        }
        let acked = self.flags & FLAG_NEED_REPLY != 0
            && protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        acked && !handler_error
    }
}

/// Peek at the next request's header. Blocks (up to the socket's receive timeout) until a
/// whole header is there; `None` at end of stream or on a stalled half header (the crate
/// then reports it).
///
/// The peek also checks that the descriptors sent with the request can be received:
/// when they cannot — this process's descriptor table is full (EMFILE, ENFILE: the open
/// files limit), or there are more than a request may carry — it fails instead of
/// letting the `vhost` crate read the request. The crate cannot recover from lost
/// descriptors: it retries the read and takes the body for the next header.
pub fn peek_header(fd: RawFd) -> io::Result<Option<RequestHeader>> {
    let mut hdr = [0u8; HEADER];
    let n = peek_with_fds(fd, &mut hdr)?;
    if n < HEADER {
        return Ok(None);
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    Ok(Some(RequestHeader {
        request: word(0),
        flags: word(4),
        size: word(8),
    }))
}

/// The most descriptors the `vhost` crate receives with one request.
const MAX_FDS: usize = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;

/// recv(MSG_PEEK | MSG_WAITALL) of `buf`, with room for the request's descriptors: the
/// kernel installs a peeked message's descriptors too (closed again here), so a full
/// table shows as MSG_CTRUNC with fewer descriptors than there was room for.
fn peek_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut peeked = Vec::new();
    let got = recv_with_fds(
        fd,
        buf,
        libc::MSG_PEEK | libc::MSG_WAITALL,
        MAX_FDS,
        &mut peeked,
    )?;
    if got.truncated {
        if peeked.len() >= MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the request carries more than {MAX_FDS} file descriptors"),
            ));
        }
        // The table is as full as the kernel found it (the peeked descriptors are still
        // open): the probe tells EMFILE from ENFILE.
        return Err(io::Error::from_raw_os_error(fd_table_errno(fd)));
    }
    Ok(got.bytes)
}

fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call's duration;
        // no control buffer is passed, so attached fds (none are expected) are dropped by
        // the kernel rather than installed.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn send_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes; MSG_NOSIGNAL turns a
        // vanished peer into EPIPE instead of SIGPIPE.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn reply(fd: RawFd, request: u32, value: u64) -> io::Result<()> {
    let mut msg = [0u8; HEADER + 8];
    msg[0..4].copy_from_slice(&request.to_le_bytes());
    msg[4..8].copy_from_slice(&(VERSION | FLAG_REPLY).to_le_bytes());
    msg[8..12].copy_from_slice(&8u32.to_le_bytes());
    msg[12..20].copy_from_slice(&value.to_le_bytes());
    send_all(fd, &msg)
}

/// If the request whose header is `header` is SET_STATUS or GET_STATUS and the frontend
/// negotiated `STATUS`, consume, apply and answer it. An error means the connection
/// cannot continue.
pub fn intercept(
    fd: RawFd,
    header: RequestHeader,
    session: &mut Session,
) -> io::Result<Intercepted> {
    let (request, flags, size) = (header.request, header.flags, header.size as usize);
    if request != SET_STATUS && request != GET_STATUS {
        return Ok(Intercepted::No);
    }
    let protocol = session.acked_protocol();
    if !protocol.contains(VhostUserProtocolFeatures::STATUS) {
        // Not negotiated: the crate refuses it as an unknown request.
        return Ok(Intercepted::No);
    }
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("status request with a {size}-byte payload"),
        ));
    }
    let mut msg = vec![0u8; HEADER + size];
    if recv(fd, &mut msg, libc::MSG_WAITALL)? != msg.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "status request cut short",
        ));
    }
    let need_ack =
        flags & FLAG_NEED_REPLY != 0 && protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
    let well_formed = flags & VERSION_MASK == VERSION
        && flags & FLAG_REPLY == 0
        && match request {
            SET_STATUS => size == 8,
            _ => size == 0 || size == 8,
        };
    if !well_formed {
        session.log_refused(&format!(
            "malformed status request {request} (flags {flags:#x}, {size} bytes)"
        ));
        if need_ack || request == GET_STATUS {
            reply(fd, request, 1)?;
        }
        return Ok(Intercepted::Handled);
    }
    if request == GET_STATUS {
        reply(fd, GET_STATUS, u64::from(session.status()))?;
    } else {
        let mut value = [0u8; 8];
        value.copy_from_slice(&msg[HEADER..HEADER + 8]);
        let ok = session.set_status(u64::from_le_bytes(value));
        if need_ack {
            reply(fd, SET_STATUS, u64::from(!ok))?;
        }
    }
    Ok(Intercepted::Handled)
}
