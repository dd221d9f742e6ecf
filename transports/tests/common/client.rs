//! The raw test client: sends [`Request`]s and receives [`Msg`]s on the socket, byte by
//! byte (it does not use the transport's codec or client).

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{four_u32s, irq, parse_caps, region_access_reply, u16_at, u32_at, Msg, Request, WAIT};

/// A client speaking raw bytes on the socket.
pub struct Client {
    /// The socket.
    pub sock: UnixStream,
    next_id: u16,
}

impl Client {
    /// Connect to `path`.
    pub fn connect(path: &Path) -> Client {
        let sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        sock.set_write_timeout(Some(WAIT)).unwrap();
        Client { sock, next_id: 1 }
    }

    /// Send raw bytes with `fds` attached to the first chunk.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) {
        let mut sent = self.sock.send_with_fds(&[bytes], fds).unwrap();
        while sent < bytes.len() {
            sent += (&self.sock).write(&bytes[sent..]).unwrap();
        }
    }

    /// A fresh message ID.
    pub fn id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    /// Send `req` (with its own ID, or a fresh one); returns the ID.
    pub fn send(&mut self, req: Request) -> u16 {
        let id = match req.id {
            Some(id) => id,
            None => self.id(),
        };
        self.send_bytes(&req.to_bytes(id), &req.fds);
        id
    }

    /// Send `reply`, the client's answer to a command the server sent
    /// ([`Request::reply_to`]), with that command's ID.
    #[track_caller]
    pub fn send_reply(&self, reply: &Request) {
        let id = reply
            .id
            .expect("a reply carries the ID of the command it answers");
        self.send_bytes(&reply.to_bytes(id), &reply.fds);
    }

    /// Send `req` with No_reply; returns its ID.
    pub fn post(&mut self, req: Request) -> u16 {
        self.send(req.no_reply())
    }

    fn recv_exact(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            let mut raw = [-1 as RawFd; 32];
            let rest = &mut buf[got..];
            let mut iov = [libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            }];
            // SAFETY: the iovec points into `buf`, valid for writes of its length.
            let (n, nfds) = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw) }
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            for &fd in &raw[..nfds] {
                // SAFETY: recvmsg just installed this fd; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(got)
    }

    /// Receive one message; `Ok(None)` when the server closed the connection.
    pub fn try_recv(&self) -> io::Result<Option<Msg>> {
        let mut fds = Vec::new();
        let mut h = [0u8; 16];
        let got = self.recv_exact(&mut h, &mut fds)?;
        if got == 0 {
            return Ok(None);
        }
        assert_eq!(got, 16, "connection closed inside a header");
        let size = u32_at(&h, 4);
        assert!(size >= 16, "server sent size {size}");
        let mut payload = vec![0u8; size as usize - 16];
        let got = self.recv_exact(&mut payload, &mut fds)?;
        assert_eq!(got, payload.len(), "connection closed inside a payload");
        Ok(Some(Msg {
            id: u16_at(&h, 0),
            command: u16_at(&h, 2),
            size,
            flags: u32_at(&h, 8),
            error: u32_at(&h, 12),
            payload,
            fds,
        }))
    }

    /// Receive one message (panics on EOF or timeout).
    #[track_caller]
    pub fn recv(&self) -> Msg {
        self.try_recv()
            .expect("receiving from the server")
            .expect("server closed the connection")
    }

    /// Receive the reply to command `command` with `id`, checking the header.
    #[track_caller]
    pub fn reply(&self, id: u16, command: u16) -> Msg {
        let m = self.recv();
        assert!(m.is_reply(), "expected a reply, got {m:?}");
        assert_eq!((m.id, m.command), (id, command), "reply header");
        assert_eq!(m.size as usize, 16 + m.payload.len());
        m
    }

    /// Send a command and wait for its reply.
    #[track_caller]
    pub fn call(&mut self, req: Request) -> Msg {
        let command = req.command;
        let id = self.send(req);
        self.reply(id, command)
    }

    /// Negotiate with `json` capabilities (NUL-terminated on the wire) and minor 0.
    #[track_caller]
    pub fn negotiate_json(&mut self, json: &str) -> serde_json::Value {
        let r = self.call(Request::version_json(0, 0, json.as_bytes()));
        let payload = r.ok();
        assert_eq!(u16_at(payload, 0), 0, "major");
        parse_caps(payload)
    }

    /// Negotiate with QEMU's usual capabilities.
    #[track_caller]
    pub fn negotiate(&mut self) -> serde_json::Value {
        self.negotiate_json(
            r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#,
        )
    }

    /// DEVICE_GET_INFO must succeed with 9 regions and 5 irqs.
    #[track_caller]
    pub fn assert_alive(&mut self) {
        let r = self.call(Request::device_info(16));
        let p = r.ok();
        assert_eq!(p.len(), 16);
        let (_, _, num_regions, num_irqs) = four_u32s(p);
        assert_eq!((num_regions, num_irqs), (9, 5));
    }

    /// Whether the server closed this connection (EOF or reset) within [`WAIT`].
    pub fn closed_by_server(&self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match io::Read::read(&mut &self.sock, &mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// REGION_READ that must succeed; the data.
    #[track_caller]
    pub fn read_region(&mut self, region: u32, offset: u64, count: u32) -> Vec<u8> {
        let r = self.call(Request::region_read(region, offset, count));
        let p = r.ok();
        assert_eq!(p.len(), 16 + count as usize);
        let (got_offset, got_region, got_count, data) = region_access_reply(p);
        assert_eq!(got_offset, offset);
        assert_eq!(got_region, region);
        assert_eq!(got_count, count);
        data.to_vec()
    }

    /// REGION_WRITE that must succeed.
    #[track_caller]
    pub fn write_region(&mut self, region: u32, offset: u64, data: &[u8]) {
        let r = self.call(Request::region_write(region, offset, data));
        let p = r.ok();
        assert_eq!(p.len(), 16);
        let (got_offset, got_region, got_count, _) = region_access_reply(p);
        assert_eq!(
            (got_offset, got_region, got_count),
            (offset, region, data.len() as u32)
        );
    }

    /// SET_IRQS with eventfds that must succeed.
    #[track_caller]
    pub fn set_irq_fds(&mut self, action: u32, index: u32, start: u32, fds: &[&EventFd]) {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.call(
            Request::set_irqs(
                irq::DATA_EVENTFD | action,
                index,
                start,
                fds.len() as u32,
                &[],
            )
            .fds(&raw),
        )
        .ok();
    }
}
