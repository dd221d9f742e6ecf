//! The notification structure of a virtio-pci function (virtio 1.2 section 4.1.4.4): a
//! driver write at `queue_notify_off * notify_off_multiplier` in the notify page kicks
//! that queue. Each queue's notify offset is its index and the multiplier is 4, so queue
//! `q` is kicked at byte `4 * q` of the page.
//!
//! With [`VirtioPciOptions::notify_mmap`](super::VirtioPciOptions::notify_mmap) the page
//! is a sparse-mmap area backed by a memfd: the client maps it, the driver's writes land
//! in shared memory without trapping, and the queues must be polled.

use std::fs::File;
use std::io;

use log::warn;

use super::{VirtioPci, NOTIFY, NOTIFY_MULTIPLIER, PAGE, VIRTIO_BAR_SIZE};
use crate::pci::{RegionMmap, SparseArea};

/// A memfd the size of the virtio BAR, for the mappable notify page.
pub(super) fn notify_memfd() -> io::Result<File> {
    let name = std::ffi::CString::new("unidev-virtio-notify").map_err(io::Error::other)?;
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nobody else.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(VIRTIO_BAR_SIZE)?;
    Ok(f)
}

impl VirtioPci {
    /// The mappable notify page of the virtio BAR, when notifications are mapped.
    pub(super) fn notify_mmap(&self) -> Option<RegionMmap> {
        self.notify_mem.as_ref().map(|f| RegionMmap {
            file: f.clone(),
            file_offset: 0,
            areas: vec![SparseArea {
                offset: NOTIFY,
                size: PAGE,
            }],
        })
    }

    /// A driver write at `offset` in the notify page: kick the queue it names, if that
    /// queue runs.
    pub(super) fn notify_write(&self, offset: u64) {
        let q = (offset / u64::from(NOTIFY_MULTIPLIER)) as usize;
        match self.kicks.get(q) {
            Some(k) if self.queues[q].running => {
                let _ = k.write(1);
            }
            Some(_) => {} // not started: the kick is meaningless
            None => warn!("{}: notify for queue {q}, which does not exist", self.name),
        }
    }
}
