//! One vhost-user connection: the `vhost` crate's [`BackendReqHandler`] does the framing
//! (headers, payload checks, fds, REPLY_ACK) and calls this session, which translates each
//! request into calls on the core's [`VirtioDevice`] and [`DmaSpace`].
//!
//! The session holds only connection state: negotiated features, the frontend's memory
//! table (to turn its virtual addresses into guest addresses), and per-ring set-up
//! (size, addresses, base, fds, enable). Queue state proper lives in the device.
//!
//! Ring life cycle (vhost-user.rst, "Starting and stopping rings"): a ring is *started*
//! once it has a kick fd and is stopped by GET_VRING_BASE; it is *enabled* from the start
//! when `VHOST_USER_F_PROTOCOL_FEATURES` was not negotiated, otherwise by
//! SET_VRING_ENABLE. The device's queue runs while the ring is both.
//!
//! [`BackendReqHandler`]: vhost::vhost_user::BackendReqHandler

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use log::{debug, info, warn};
use unidev_core::memory::{DmaSpace, FdBacking, MapRequest, Prot};
use unidev_core::virtio::inflight::InflightError;
use unidev_core::virtio::spec;
use unidev_core::virtio::{InflightRegion, QueueConfig, VirtioDevice};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VhostError, GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vmm_sys_util::eventfd::EventFd;

/// `VHOST_USER_F_PROTOCOL_FEATURES`, a vhost-user bit in the virtio feature word.
const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Most memory slots offered (QEMU's own vhost-user limit is 509 on x86).
pub const MAX_MEM_SLOTS: u64 = 509;

/// Largest config-space access served (the virtio-pci device-specific window is 4 KiB).
const MAX_CONFIG_ACCESS: u32 = 4096;

/// The protocol features this transport implements for every device (`INFLIGHT_SHMFD`
/// is added for devices that can log in-flight requests).
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::STATUS
}

/// Largest queue size an inflight region is made for (the virtio split-ring maximum).
const MAX_INFLIGHT_QUEUE_SIZE: u16 = 32768;

/// One region of the frontend's memory table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Region {
    gpa: u64,
    size: u64,
    uaddr: u64,
    mmap_offset: u64,
}

impl Region {
    fn from_msg(r: &VhostUserMemoryRegion) -> Self {
        Region {
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            uaddr: r.user_addr,
            mmap_offset: r.mmap_offset,
        }
    }

    /// The guest address of frontend virtual address `va`, if this region holds it.
    fn translate(&self, va: u64) -> Option<u64> {
        let off = va.checked_sub(self.uaddr)?;
        if off < self.size {
            self.gpa.checked_add(off)
        } else {
            None
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingAddrs {
    desc: u64,
    avail: u64,
    used: u64,
}

#[derive(Default)]
struct Ring {
    size: u16,
    addrs: Option<RingAddrs>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    /// SET_VRING_ENABLE's last word (meaningful only with PROTOCOL_FEATURES).
    enabled: bool,
    /// The device's queue runs.
    running: bool,
}

/// The vhost-user requests of one frontend, as calls on one device.
pub struct Session {
    name: String,
    device: Arc<dyn VirtioDevice>,
    dma: Arc<DmaSpace>,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    regions: Vec<Region>,
    rings: Vec<Ring>,
    /// Device status (STATUS protocol feature).
    status: u8,
    /// The frontend's inflight region, handed to the device.
    inflight: Option<Arc<InflightRegion>>,
}

fn refuse(why: impl Into<String>) -> VhostError {
    VhostError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, why.into()))
}

fn os_error(e: io::Error) -> VhostError {
    VhostError::ReqHandlerError(e)
}

/// An `EventFd` on a duplicate of `file` (the frontend's eventfd).
fn eventfd_of(file: &File) -> io::Result<EventFd> {
    let dup = file.try_clone()?;
    // SAFETY: `dup` is a freshly duplicated descriptor whose ownership passes to the
    // EventFd; nothing else closes it.
    Ok(unsafe { EventFd::from_raw_fd(dup.into_raw_fd()) })
}

impl Session {
    /// A session for a newly connected frontend.
    pub fn new(name: String, device: Arc<dyn VirtioDevice>, dma: Arc<DmaSpace>) -> Self {
        let rings = (0..device.num_queues()).map(|_| Ring::default()).collect();
        Session {
            name,
            device,
            dma,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            regions: Vec::new(),
            rings,
            status: 0,
            inflight: None,
        }
    }

    /// Protocol features the frontend acknowledged.
    pub fn acked_protocol(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol
    }

    /// The device status byte (GET_STATUS).
    pub fn status(&self) -> u8 {
        self.status
    }

    /// SET_STATUS, by the rules every transport shares (`unidev_core::virtio::spec`): 0
    /// resets the device (virtio 1.2 section 2.1: "writing 0 ... resets the device"),
    /// keeping the connection's memory table and negotiated features; FEATURES_OK is kept
    /// only for features negotiated with SET_FEATURES that the device accepts. Queues are
    /// not started here: vhost-user starts them by ring messages. Returns false when part
    /// of the write was refused (then the stored status shows what the device accepted,
    /// as with FEATURES_OK on virtio-pci).
    pub fn set_status(&mut self, value: u64) -> bool {
        let Ok(written) = u8::try_from(value) else {
            warn!("{}: SET_STATUS {value:#x} is not a status byte", self.name);
            return false;
        };
        let acked = self.acked_features;
        let update = spec::write_status(self.status, written, self.device.features(), || {
            if acked == 0 {
                Err("no features were negotiated (SET_FEATURES)".into())
            } else {
                Ok(acked & !PROTOCOL_FEATURES)
            }
        });
        if update.reset {
            self.stop_all();
            self.device.reset();
            self.reset_rings();
            if self.acked_features != 0 {
                self.device
                    .set_driver_features(self.acked_features & !PROTOCOL_FEATURES);
            }
            self.status = 0;
            debug!("{}: status 0: device reset", self.name);
            return true;
        }
        self.status = update.status;
        debug!("{}: status {:#x}", self.name, update.status);
        match update.refused {
            Some(why) => {
                warn!("{}: SET_STATUS {written:#x}: {why}", self.name);
                false
            }
            None => true,
        }
    }

    /// Log a request refused outside the crate's handler.
    pub fn log_refused(&self, what: &str) {
        warn!("{}: request refused: {what}", self.name);
    }

    fn offered_protocol(&self) -> VhostUserProtocolFeatures {
        let mut offered = offered_protocol_features();
        if self.device.can_log_inflight() {
            offered |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        // CONFIG only for a device that serves its config space (the backend offers it):
        // otherwise the VMM's device model keeps it.
        if !self.device.serves_config() {
            offered.remove(VhostUserProtocolFeatures::CONFIG);
        }
        offered
    }

    /// End of the connection: stop every queue, reset the device, drop all memory.
    pub fn close(&mut self) {
        self.stop_all();
        if let Err(e) = self.device.set_inflight(None) {
            warn!("{}: cannot drop the inflight region: {e}", self.name);
        }
        self.inflight = None;
        self.status = 0;
        self.device.reset();
        self.dma.unmap_all();
        self.regions.clear();
        self.reset_rings();
        self.acked_features = 0;
        self.acked_protocol = VhostUserProtocolFeatures::empty();
    }

    fn protocol_negotiated(&self) -> bool {
        self.acked_features & PROTOCOL_FEATURES != 0
    }

    fn ring(&mut self, index: u32) -> VhostResult<&mut Ring> {
        let n = self.rings.len();
        self.rings
            .get_mut(index as usize)
            .ok_or_else(|| refuse(format!("queue {index} does not exist ({n} queues)")))
    }

    fn stop_all(&mut self) {
        for i in 0..self.rings.len() {
            self.stop_ring(i);
        }
    }

    fn reset_rings(&mut self) {
        for r in &mut self.rings {
            *r = Ring::default();
        }
    }

    /// Stop the device's queue if it runs, keeping its position as the ring's base.
    fn stop_ring(&mut self, index: usize) {
        let Some(ring) = self.rings.get_mut(index) else {
            return;
        };
        if ring.running {
            ring.running = false;
            if let Some(next) = self.device.stop_queue(index) {
                ring.base = next;
            }
            debug!("{}: queue {index} stopped at {}", self.name, ring.base);
        }
    }

    /// Start the device's queue when the ring is started (has a kick) and enabled.
    fn try_start(&mut self, index: usize) -> VhostResult<()> {
        let proto = self.protocol_negotiated();
        let Some(ring) = self.rings.get_mut(index) else {
            return Err(refuse(format!("queue {index} does not exist")));
        };
        let enabled = ring.enabled || !proto;
        if ring.running || !enabled {
            return Ok(());
        }
        let Some(kick) = &ring.kick else {
            return Ok(());
        };
        let addrs = ring
            .addrs
            .ok_or_else(|| refuse(format!("queue {index}: ring addresses not set")))?;
        let config = QueueConfig {
            size: ring.size,
            desc: addrs.desc,
            avail: addrs.avail,
            used: addrs.used,
            kick: eventfd_of(kick).map_err(os_error)?,
            call: ring
                .call
                .as_ref()
                .map(eventfd_of)
                .transpose()
                .map_err(os_error)?,
            next_avail: ring.base,
            next_used: ring.base,
        };
        if let Err(e) = self.device.start_queue(index, config) {
            // The frontend learns it from GET_STATUS (and the error reply).
            self.status |= spec::status::DEVICE_NEEDS_RESET;
            return Err(refuse(e.to_string()));
        }
        ring.running = true;
        debug!("{}: queue {index} started at {}", self.name, ring.base);
        Ok(())
    }

    /// The guest address of the frontend's virtual address `va`.
    fn translate(&self, va: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| r.translate(va))
    }

    fn map_region(&mut self, region: Region, file: File) -> VhostResult<()> {
        // Frontends share guest memory as regular files (memfd, tmpfs, hugetlbfs); the
        // core checks the size and seals it against shrinking.
        if !file.metadata().is_ok_and(|m| m.file_type().is_file()) {
            return Err(refuse(format!(
                "memory region at {:#x}: the fd is not a regular file",
                region.gpa
            )));
        }
        if self.regions.iter().any(|r| {
            region.uaddr < r.uaddr.saturating_add(r.size)
                && r.uaddr < region.uaddr.saturating_add(region.size)
        }) {
            return Err(refuse(format!(
                "memory region at user address {:#x} overlaps another",
                region.uaddr
            )));
        }
        self.dma
            .map(MapRequest {
                iova: region.gpa,
                size: region.size,
                prot: Prot::READ_WRITE,
                backing: Some(FdBacking {
                    file,
                    offset: region.mmap_offset,
                }),
            })
            .map_err(|e| refuse(e.to_string()))?;
        self.regions.push(region);
        Ok(())
    }

    fn unmap_region(&mut self, at: usize) -> VhostResult<()> {
        let r = self.regions.remove(at);
        self.dma
            .unmap(r.gpa, r.size)
            .map(|_| ())
            .map_err(|e| refuse(e.to_string()))
    }
}

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.reset_device()
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.stop_all();
        self.device.reset();
        self.reset_rings();
        self.acked_features = 0;
        info!("{}: device reset", self.name);
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.device.features() | PROTOCOL_FEATURES)
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = self.device.features() | PROTOCOL_FEATURES;
        if features & !offered != 0 {
            return Err(refuse(format!(
                "features {:#x} were not offered",
                features & !offered
            )));
        }
        self.acked_features = features;
        self.device
            .set_driver_features(features & !PROTOCOL_FEATURES);
        // Without PROTOCOL_FEATURES every ring is enabled: a ring that already has its
        // kick starts now.
        if !self.protocol_negotiated() {
            for i in 0..self.rings.len() {
                self.try_start(i)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let new: Vec<Region> = ctx.iter().map(Region::from_msg).collect();
        // Regions that stay exactly as they were keep their maps: rings that run meanwhile
        // never see their memory disappear.
        let mut at = 0;
        while at < self.regions.len() {
            if new.contains(&self.regions[at]) {
                at += 1;
            } else {
                self.unmap_region(at)?;
            }
        }
        let mut result = Ok(());
        for (region, file) in new.into_iter().zip(files) {
            if self.regions.contains(&region) {
                continue;
            }
            if let Err(e) = self.map_region(region, file) {
                result = Err(e);
                break;
            }
        }
        self.dma.publish();
        result.map(|_| None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let max = self.device.max_queue_size();
        let ring = self.ring(index)?;
        if ring.running {
            return Err(refuse(format!("queue {index}: size change while running")));
        }
        let size = u16::try_from(num)
            .ok()
            .filter(|s| *s != 0 && s.is_power_of_two() && *s <= max)
            .ok_or_else(|| refuse(format!("queue {index}: invalid size {num} (maximum {max})")))?;
        ring.size = size;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        self.ring(index)?;
        let gpa = |va: u64, what: &str| {
            self.translate(va).ok_or_else(|| {
                refuse(format!(
                    "queue {index}: {what} address {va:#x} is outside the memory table"
                ))
            })
        };
        let addrs = RingAddrs {
            desc: gpa(descriptor, "descriptor table")?,
            avail: gpa(available, "available ring")?,
            used: gpa(used, "used ring")?,
        };
        let ring = self.ring(index)?;
        if ring.running && ring.addrs != Some(addrs) {
            return Err(refuse(format!(
                "queue {index}: address change while running"
            )));
        }
        ring.addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let ring = self.ring(index)?;
        if ring.running {
            return Err(refuse(format!("queue {index}: base change while running")));
        }
        ring.base = u16::try_from(base).map_err(|_| {
            refuse(format!(
                "queue {index}: base {base:#x} (packed rings are not offered)"
            ))
        })?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        self.ring(index)?;
        self.stop_ring(index as usize);
        let ring = self.ring(index)?;
        // Stopped: the next kick fd starts it again.
        ring.kick = None;
        Ok(VhostUserVringState::new(index, u32::from(ring.base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let fd = fd.ok_or_else(|| {
            refuse(format!(
                "queue {index}: polling mode (no kick fd) is not supported"
            ))
        })?;
        self.ring(u32::from(index))?;
        // A new kick fd on a running ring: restart it on the new fd where it stands.
        self.stop_ring(usize::from(index));
        self.ring(u32::from(index))?.kick = Some(fd);
        self.try_start(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let ring = self.ring(u32::from(index))?;
        let running = ring.running;
        ring.call = fd;
        if running {
            let call = ring
                .call
                .as_ref()
                .map(eventfd_of)
                .transpose()
                .map_err(os_error)?;
            self.device.set_queue_call(usize::from(index), call);
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        // Kept for the connection's life; the device has no error notification to route.
        self.ring(u32::from(index))?.err = fd;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(self.offered_protocol())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = self.offered_protocol().bits();
        if features & !offered != 0 {
            return Err(refuse(format!(
                "protocol features {:#x} were not offered",
                features & !offered
            )));
        }
        self.acked_protocol = VhostUserProtocolFeatures::from_bits_truncate(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(self.rings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.ring(index)?.enabled = enable;
        if enable {
            self.try_start(index as usize)
        } else {
            self.stop_ring(index as usize);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        if offset
            .checked_add(size)
            .is_none_or(|end| end > MAX_CONFIG_ACCESS)
        {
            return Err(refuse(format!(
                "config read {offset:#x}+{size:#x} out of range"
            )));
        }
        let mut data = vec![0u8; size as usize];
        self.device.read_config(offset, &mut data);
        Ok(data)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        let end = u32::try_from(buf.len())
            .ok()
            .and_then(|n| offset.checked_add(n));
        if end.is_none_or(|end| end > MAX_CONFIG_ACCESS) {
            return Err(refuse(format!("config write at {offset:#x} out of range")));
        }
        self.device.write_config(offset, buf);
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        Err(VhostError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(VhostError::InvalidOperation(
            "shared objects are not offered",
        ))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        let queues = self.rings.len();
        if inflight.num_queues == 0 || usize::from(inflight.num_queues) > queues {
            return Err(refuse(format!(
                "inflight region for {} queues; the device has {queues}",
                inflight.num_queues
            )));
        }
        if inflight.queue_size == 0 || inflight.queue_size > MAX_INFLIGHT_QUEUE_SIZE {
            return Err(refuse(format!(
                "inflight region for queues of {} descriptors",
                inflight.queue_size
            )));
        }
        let (_, file) = InflightRegion::create(inflight.num_queues, inflight.queue_size)
            .map_err(|e| refuse(e.to_string()))?;
        let reply = VhostUserInflight {
            mmap_size: InflightRegion::size_for(inflight.num_queues, inflight.queue_size),
            mmap_offset: 0,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        debug!(
            "{}: inflight region of {} bytes for {} queues of {}",
            self.name, reply.mmap_size, reply.num_queues, reply.queue_size
        );
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        let region = InflightRegion::map(
            file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(|e: InflightError| refuse(e.to_string()))?;
        let region = Arc::new(region);
        self.device
            .set_inflight(Some(region.clone()))
            .map_err(|e| refuse(e.to_string()))?;
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS.min(self.dma.max_maps() as u64))
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        self.map_region(Region::from_msg(region), fd)?;
        self.dma.publish();
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        let at = self
            .regions
            .iter()
            .position(|r| r.gpa == gpa && r.size == size)
            .ok_or_else(|| refuse(format!("no memory region is {gpa:#x}+{size:#x}")))?;
        self.unmap_region(at)?;
        self.dma.publish();
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(VhostError::InvalidOperation(
            "device state transfer is not offered",
        ))
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(VhostError::InvalidOperation(
            "device state transfer is not offered",
        ))
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(VhostError::InvalidOperation(
            "shared memory regions are not offered",
        ))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        Err(VhostError::InvalidOperation("dirty logging is not offered"))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.rings.iter().any(|r| r.running) {
            warn!(
                "{}: session dropped with running queues; stopping them",
                self.name
            );
            self.stop_all();
        }
    }
}
