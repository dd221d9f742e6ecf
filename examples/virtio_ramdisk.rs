//! A small virtio device written against rust-vmm's `VhostUserBackend`, served by one call
//! over the transport named on the command line: a virtio-blk RAM disk.
//!
//! ```text
//! virtio_ramdisk vfio-user  SOCKET [MIB]   # QEMU: -device vfio-user-pci (a virtio-pci disk)
//! virtio_ramdisk vhost-user SOCKET [MIB]   # QEMU: -chardev socket,path=SOCKET -device vhost-user-blk-pci
//! virtio_ramdisk vduse      NAME   [MIB]   # as root: /dev/vdX in this kernel (virtio_vdpa)
//! ```
//!
//! Requests (virtio 1.2 section 5.2.6): IN, OUT, FLUSH and GET_ID; anything else is
//! UNSUPP, accesses past the end are IOERR. The disk is `MIB` MiB (default 16) of zeros.
//! Enter or EOF on stdin stops it.

use std::io::{self, BufRead, Read, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, RwLock};

use unidev_core::virtio::spec::{VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK};
use unidev_transports::export::{
    Export, ExportOptions, Vduse, VfioUser, VhostUser, VirtioTransport,
};
use unidev_transports::vduse::VdpaDriver;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const SECTOR: usize = 512;
const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

struct RamDisk {
    disk: Mutex<Vec<u8>>,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
}

impl RamDisk {
    /// Serve one request; returns how many bytes it wrote (data and status).
    fn request(
        &self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        m: &GuestMemoryMmap,
    ) -> io::Result<u32> {
        let mut reader = chain.clone().reader(m).map_err(io::Error::other)?;
        let mut writer = chain.writer(m).map_err(io::Error::other)?;
        let kind: u32 = reader.read_obj()?;
        let _ioprio: u32 = reader.read_obj()?;
        let sector: u64 = reader.read_obj()?;
        // The last byte the device may write is the status; data comes before it.
        let data_len = writer.available_bytes().checked_sub(1);
        let data_len = data_len.ok_or_else(|| io::Error::other("no status byte"))?;
        let mut status_writer = writer.split_at(data_len).map_err(io::Error::other)?;
        let len = if kind == OUT {
            reader.available_bytes()
        } else {
            data_len
        };
        let mut disk = self.disk.lock().unwrap();
        let start = usize::try_from(sector)
            .unwrap_or(usize::MAX)
            .saturating_mul(SECTOR);
        let range = start..start.saturating_add(len);
        let in_disk = range.end <= disk.len();
        let status = match kind {
            IN if in_disk => writer.write_all(&disk[range]).map(|_| S_OK)?,
            OUT if in_disk => reader.read_exact(&mut disk[range]).map(|_| S_OK)?,
            IN | OUT => S_IOERR,
            FLUSH => S_OK,
            GET_ID => {
                let id = *b"unidev-ramdisk\0\0\0\0\0\0";
                writer.write_all(&id[..len.min(20)]).map(|_| S_OK)?
            }
            _ => S_UNSUPP,
        };
        status_writer.write_all(&[status])?;
        Ok(writer.bytes_written() as u32 + 1)
    }
}

impl VhostUserBackend for RamDisk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, _enabled: bool) {} // EVENT_IDX is not offered

    // Config space (virtio 1.2 5.2.4): the capacity in 512-byte sectors, then zeros.
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let capacity = (self.disk.lock().unwrap().len() / SECTOR) as u64;
        let mut config = capacity.to_le_bytes().to_vec();
        config.resize(offset as usize + size as usize, 0);
        config.split_off(offset as usize)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().unwrap() = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        event: u16,
        _: EventSet,
        vrings: &[VringRwLock],
        _: usize,
    ) -> io::Result<()> {
        let (Some(vring), Some(mem)) = (
            vrings.get(usize::from(event)),
            self.mem.read().unwrap().clone(),
        ) else {
            return Ok(()); // the exit event, or no memory yet
        };
        let guard = mem.memory();
        let m: &GuestMemoryMmap = &guard;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(m);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let used = self.request(chain, m).unwrap_or(0); // a malformed chain: nothing written
            vring.add_used(head, used).map_err(io::Error::other)?;
        }
        vring.signal_used_queue()
    }
}

fn serve(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (Some(transport), Some(place)) = (args.get(1), args.get(2)) else {
        return Err("usage: virtio_ramdisk vfio-user|vhost-user|vduse SOCKET|NAME [MIB]".into());
    };
    let mib: usize = args.get(3).map_or(Ok(16), |s| s.parse())?;
    // The transport is picked at run time: any of them carries a virtio device.
    let transport: Box<dyn VirtioTransport> = match transport.as_str() {
        "vfio-user" => Box::new(VfioUser::new(place.as_str())),
        "vhost-user" => Box::new(VhostUser::new(place.as_str())),
        "vduse" => Box::new(Vduse::new(place).attach(VdpaDriver::VirtioVdpa)),
        other => return Err(format!("unknown transport {other:?}").into()),
    };
    let disk = RamDisk {
        disk: Mutex::new(vec![0; mib << 20]),
        mem: RwLock::new(None),
    };
    let served = Export::virtio("ramdisk", VIRTIO_ID_BLOCK, Arc::new(disk))
        .serve(transport, &ExportOptions::default())?;
    let stop = served.stop_handle();
    std::thread::spawn(move || {
        let _ = io::stdin().lock().read_line(&mut String::new());
        stop.stop();
    });
    println!(
        "virtio-ramdisk: serving {mib} MiB over {}",
        served.transport_name()
    );
    Ok(served.run()?)
}

fn main() -> ExitCode {
    if let Err(e) = serve(&std::env::args().collect::<Vec<_>>()) {
        eprintln!("virtio-ramdisk: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
