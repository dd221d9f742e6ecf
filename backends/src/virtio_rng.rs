//! virtio-rng (virtio 1.2 section 5.4): an entropy device fed from the OS random source
//! (getrandom(2)).
//!
//! Written only against rust-vmm's `VhostUserBackend` trait: it runs unchanged over
//! every unidev transport and in vhost-user-backend's own daemon.

use std::io;
use std::sync::RwLock;

use log::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Virtio device type of an entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Largest number of bytes handed out per request.
const MAX_REQUEST: usize = 64 * 1024;
const QUEUE_SIZE: usize = 256;

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The virtio-rng backend.
pub struct VirtioRng {
    mem: RwLock<Option<Memory>>,
    event_idx: RwLock<bool>,
    exit: (EventConsumer, EventNotifier),
}

impl VirtioRng {
    /// A new entropy device.
    pub fn new() -> io::Result<Self> {
        Ok(VirtioRng {
            mem: RwLock::new(None),
            event_idx: RwLock::new(false),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
        })
    }

    fn process(&self, vring: &VringRwLock) -> io::Result<bool> {
        let Some(mem) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(false);
        };
        let m = mem.memory();
        let mut used_any = false;
        let mut buf = vec![0u8; MAX_REQUEST];
        loop {
            let chain = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().pop_descriptor_chain(m.clone()) {
                    Some(c) => c,
                    None => break,
                }
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain {
                if !desc.is_write_only() || written >= MAX_REQUEST {
                    continue;
                }
                let len = (desc.len() as usize).min(MAX_REQUEST - written);
                let part = &mut buf[..len];
                if fill_random(part).is_err() {
                    break;
                }
                if m.write_slice(part, desc.addr()).is_err() {
                    warn!("virtio-rng: descriptor outside guest memory");
                    break;
                }
                written += len;
            }
            if let Err(e) = vring.add_used(head, written as u32) {
                warn!("virtio-rng: cannot add used entry: {e:?}");
            }
            used_any = true;
        }
        Ok(used_any)
    }
}

fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the valid buffer given.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VhostUserBackend for VirtioRng {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        *self.event_idx.write().unwrap_or_else(|e| e.into_inner()) = enabled;
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        let event_idx = *self.event_idx.read().unwrap_or_else(|e| e.into_inner());
        if event_idx {
            loop {
                let _ = vring.disable_notification();
                self.process(vring)?;
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
            if vring.needs_notification().unwrap_or(true) {
                vring.signal_used_queue()?;
            }
        } else if self.process(vring)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn fills_writable_buffers_and_signals() {
        let rng = VirtioRng::new().unwrap();
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mem = GuestMemoryAtomic::new(gm);
        rng.update_memory(mem.clone()).unwrap();
        let vring = VringRwLock::new(mem.clone(), 16).unwrap();
        let (desc, avail, used) = (0x0u64, 0x1000u64, 0x2000u64);
        vring.set_queue_info(desc, avail, used).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        vring.set_call(Some(
            // SAFETY: the File takes sole ownership of a fresh duplicate.
            unsafe {
                <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(
                    std::os::fd::IntoRawFd::into_raw_fd(call.try_clone().unwrap()),
                )
            },
        ));
        let m = mem.memory();
        // One 4 KiB writable buffer, and a read-only one that must be ignored.
        m.write_obj(0x10000u64, GuestAddress(desc)).unwrap();
        m.write_obj(4096u32, GuestAddress(desc + 8)).unwrap();
        m.write_obj(VRING_DESC_F_WRITE as u16, GuestAddress(desc + 12))
            .unwrap();
        m.write_obj(0x20000u64, GuestAddress(desc + 16)).unwrap();
        m.write_obj(64u32, GuestAddress(desc + 24)).unwrap();
        m.write_obj(0u16, GuestAddress(desc + 28)).unwrap();
        m.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        m.write_obj(1u16, GuestAddress(avail + 6)).unwrap();
        m.write_obj(2u16, GuestAddress(avail + 2)).unwrap();
        rng.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
        assert_eq!(m.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 2);
        assert_eq!(m.read_obj::<u32>(GuestAddress(used + 8)).unwrap(), 4096);
        assert_eq!(m.read_obj::<u32>(GuestAddress(used + 16)).unwrap(), 0);
        let mut buf = vec![0u8; 4096];
        m.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
        let distinct: std::collections::HashSet<u8> = buf.iter().copied().collect();
        assert!(distinct.len() > 200, "random bytes, not a constant");
        assert_eq!(call.read().unwrap(), 1, "the driver was notified");
    }
}
