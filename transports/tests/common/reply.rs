//! Messages the raw test client receives, and their payloads read at the spec's fixed
//! offsets (vfio-user.rst, each command's reply), independently of the transport's
//! codec.

use std::os::fd::OwnedFd;

use super::{F_ERROR, F_REPLY};

/// u16 at `off`.
#[track_caller]
pub fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
/// u32 at `off`.
#[track_caller]
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
/// u64 at `off`.
#[track_caller]
pub fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// A received message.
#[derive(Debug)]
pub struct Msg {
    /// Message ID.
    pub id: u16,
    /// Command.
    pub command: u16,
    /// Size from the header.
    pub size: u32,
    /// Flags.
    pub flags: u32,
    /// Error field.
    pub error: u32,
    /// Payload.
    pub payload: Vec<u8>,
    /// Fds that came with it.
    pub fds: Vec<OwnedFd>,
}

impl Msg {
    /// A reply (type bits 1).
    pub fn is_reply(&self) -> bool {
        self.flags & 0xf == F_REPLY
    }
    /// A command (type bits 0).
    pub fn is_command(&self) -> bool {
        self.flags & 0xf == 0
    }
    /// Assert this is a success reply and return its payload.
    #[track_caller]
    pub fn ok(&self) -> &[u8] {
        assert!(self.is_reply(), "not a reply: {self:?}");
        assert_eq!(
            self.flags & F_ERROR,
            0,
            "command {} failed with errno {}",
            self.command,
            self.error
        );
        &self.payload
    }
    /// Assert this is an error reply with `errno` (header only, as the spec requires).
    #[track_caller]
    pub fn errno(&self, errno: i32) {
        assert!(self.is_reply(), "not a reply: {self:?}");
        assert_ne!(
            self.flags & F_ERROR,
            0,
            "command {} succeeded, expected errno {errno}",
            self.command
        );
        assert_eq!(
            self.error, errno as u32,
            "errno of command {}",
            self.command
        );
        assert_eq!(self.size, 16, "error replies are header only");
        assert!(self.payload.is_empty() && self.fds.is_empty());
    }
}

/// Four u32s at offsets 0, 4, 8, 12: the whole reply of DEVICE_GET_INFO (argsz, flags,
/// num_regions, num_irqs), DEVICE_GET_IRQ_INFO (argsz, flags, index, count) and an empty
/// DEVICE_GET_REGION_IO_FDS (argsz, flags, index, count).
#[track_caller]
pub fn four_u32s(p: &[u8]) -> (u32, u32, u32, u32) {
    (u32_at(p, 0), u32_at(p, 4), u32_at(p, 8), u32_at(p, 12))
}

/// A DEVICE_GET_REGION_INFO reply's fixed part (`struct vfio_region_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfoReply {
    /// Size needed (offset 0).
    pub argsz: u32,
    /// READ/WRITE/MMAP/CAPS (offset 4).
    pub flags: u32,
    /// Region index (offset 8).
    pub index: u32,
    /// First capability, or 0 (offset 12).
    pub cap_offset: u32,
    /// Region size (offset 16).
    pub size: u64,
    /// mmap offset in the fd (offset 24).
    pub offset: u64,
}

impl RegionInfoReply {
    /// Read the fixed part of `p`.
    #[track_caller]
    pub fn parse(p: &[u8]) -> RegionInfoReply {
        RegionInfoReply {
            argsz: u32_at(p, 0),
            flags: u32_at(p, 4),
            index: u32_at(p, 8),
            cap_offset: u32_at(p, 12),
            size: u64_at(p, 16),
            offset: u64_at(p, 24),
        }
    }
}

/// A DMA_UNMAP reply: (argsz, flags, address, size) at offsets 0, 4, 8, 16.
#[track_caller]
pub fn dma_unmap_reply(p: &[u8]) -> (u32, u32, u64, u64) {
    (u32_at(p, 0), u32_at(p, 4), u64_at(p, 8), u64_at(p, 16))
}

/// A REGION_READ/REGION_WRITE reply: (offset, region, count) at offsets 0, 8, 12, and
/// the data from 16.
#[track_caller]
pub fn region_access_reply(p: &[u8]) -> (u64, u32, u32, &[u8]) {
    (u64_at(p, 0), u32_at(p, 8), u32_at(p, 12), &p[16..])
}

/// Parse a VERSION payload's JSON (NUL-terminated).
#[track_caller]
pub fn parse_caps(payload: &[u8]) -> serde_json::Value {
    let json = &payload[4..];
    assert_eq!(json.last(), Some(&0), "JSON must be NUL-terminated");
    serde_json::from_slice(&json[..json.len() - 1]).expect("server capabilities are JSON")
}
