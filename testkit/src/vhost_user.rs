//! The frontend side of one vhost-user ring, in this process: what a VMM does before its
//! guest's first request on queue 0 (QEMU's `docs/interop/vhost-user.rst`: "Starting and
//! stopping rings", and the front-end's SET_OWNER, feature negotiation, SET_MEM_TABLE and
//! SET_VRING_* sequence), with the `vhost` crate's `Frontend` speaking the protocol and
//! this crate's [`DriverMemory`] and [`Virtqueue`] as the guest's memory and driver.
//!
//! [`VhostUserRing::connect`] sets the ring up; [`run_chain`] and [`blk_request`] submit
//! one chain and poll the used ring for it (no interrupt wait: the call eventfd is left
//! to the caller).

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::DriverError;
use crate::memory::DriverMemory;
use crate::virtio_blk::{BlkCompletion, VirtioBlkRequest};
use crate::virtio_pci::VIRTIO_RING_F_EVENT_IDX;
use crate::virtqueue::Virtqueue;

/// How long [`run_chain`] and [`blk_request`] wait for the device to return a chain.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why setting up or using a vhost-user ring failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A vhost-user request failed, or the backend refused it.
    #[error("vhost-user {request}: {source}")]
    Request {
        /// The request (or "connect").
        request: &'static str,
        /// What the `vhost` crate reported.
        source: vhost::Error,
    },
    /// Driver memory or the ring refused something, or the device broke the ring
    /// protocol.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// An eventfd could not be created or signalled.
    #[error("eventfd: {0}")]
    EventFd(#[from] io::Error),
    /// The device did not return the chain within [`REQUEST_TIMEOUT`].
    #[error("the device did not return chain {head} within {REQUEST_TIMEOUT:?}")]
    Timeout {
        /// The chain's head descriptor.
        head: u16,
    },
    /// The device returned another chain than the one in flight.
    #[error("the device returned head {returned}, the chain in flight is {submitted}")]
    UnexpectedHead {
        /// What the used ring said.
        returned: u16,
        /// The head of the chain submitted.
        submitted: u16,
    },
}

/// `map_err` for a vhost request named `request`.
fn failed(request: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::Request { request, source }
}

/// A vhost-user frontend (the `vhost` crate's `Frontend`) driving ring 0 of a device.
pub struct VhostUserRing {
    /// The connection.
    pub fe: Frontend,
    /// Virtio features the device offered.
    pub offered: u64,
    /// The driver side of ring 0.
    pub vq: Virtqueue,
    /// Kick eventfd of ring 0.
    pub kick: EventFd,
    /// Call eventfd of ring 0.
    pub call: EventFd,
}

impl VhostUserRing {
    /// Connect to `sock`, negotiate `features` (those offered) and `protocol` (NEED_REPLY
    /// on every request if it holds REPLY_ACK), share `mem` as the memory table and start
    /// ring 0 with `size` descriptors (EVENT_IDX if both sides have it).
    pub fn connect(
        sock: &Path,
        mem: &DriverMemory,
        features: u64,
        protocol: VhostUserProtocolFeatures,
        size: u16,
    ) -> Result<VhostUserRing, FrontendError> {
        let mut fe = Frontend::connect(sock, 1).map_err(failed("connect"))?;
        fe.set_owner().map_err(failed("SET_OWNER"))?;
        let offered = fe.get_features().map_err(failed("GET_FEATURES"))?;
        fe.set_features(offered & features)
            .map_err(failed("SET_FEATURES"))?;
        let pf = fe
            .get_protocol_features()
            .map_err(failed("GET_PROTOCOL_FEATURES"))?;
        fe.set_protocol_features(pf & protocol)
            .map_err(failed("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let region = mem
            .guest_memory()
            .iter()
            .next()
            .ok_or_else(|| DriverError::Memory("driver memory has no region".into()))?;
        let mut info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(failed("SET_MEM_TABLE (describing driver memory)"))?;
        info.mmap_handle = mem.file().as_raw_fd();
        fe.set_mem_table(&[info]).map_err(failed("SET_MEM_TABLE"))?;
        let host = |iova: u64| info.userspace_addr + (iova - mem.iova_base());
        let event_idx = offered & features & VIRTIO_RING_F_EVENT_IDX != 0;
        let vq = Virtqueue::new(mem, 0, size, event_idx)?;
        fe.set_vring_num(0, size).map_err(failed("SET_VRING_NUM"))?;
        fe.set_vring_base(0, 0).map_err(failed("SET_VRING_BASE"))?;
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: host(vq.desc_iova()),
                used_ring_addr: host(vq.used_iova()),
                avail_ring_addr: host(vq.avail_iova()),
                log_addr: None,
            },
        )
        .map_err(failed("SET_VRING_ADDR"))?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        fe.set_vring_call(0, &call)
            .map_err(failed("SET_VRING_CALL"))?;
        fe.set_vring_kick(0, &kick)
            .map_err(failed("SET_VRING_KICK"))?;
        fe.set_vring_enable(0, true)
            .map_err(failed("SET_VRING_ENABLE"))?;
        Ok(VhostUserRing {
            fe,
            offered,
            vq,
            kick,
            call,
        })
    }
}

/// Submit `chain` (as [`Virtqueue::add_chain`] takes it) on `vq`, kick through `kick`
/// only if the device asked for notifications, and poll the used ring until the device
/// returns it, at most [`REQUEST_TIMEOUT`]; the used length. No other chain may be in
/// flight on `vq`.
pub fn run_chain(
    vq: &mut Virtqueue,
    kick: &EventFd,
    chain: &[(u64, u32, bool)],
) -> Result<u32, FrontendError> {
    let head = vq.add_chain(chain)?;
    if vq.kick_prepare()? {
        kick.write(1)?;
    }
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        if let Some((returned, len)) = vq.poll_used()? {
            if returned != head {
                return Err(FrontendError::UnexpectedHead {
                    returned,
                    submitted: head,
                });
            }
            return Ok(len);
        }
        if Instant::now() >= deadline {
            return Err(FrontendError::Timeout { head });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Run one virtio-blk request on a vhost-user ring with [`run_chain`], its buffer
/// allocated in `mem` (and freed once the device returned it; after an error it stays
/// allocated, since the device may still own it); its completion.
pub fn blk_request(
    mem: &DriverMemory,
    vq: &mut Virtqueue,
    kick: &EventFd,
    req: &VirtioBlkRequest,
) -> Result<BlkCompletion, FrontendError> {
    let buf = mem.alloc(req.buffer_len(), 64)?;
    let placed = req.place(mem, buf.iova)?;
    let len = run_chain(vq, kick, &placed.chain)?;
    let done = placed.complete(mem, len)?;
    mem.free(buf)?;
    Ok(done)
}
