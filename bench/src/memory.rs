//! Memory layer: how fast [`DmaSpace`] takes and drops maps, and what translating an
//! address costs with 1, 1,000 and 65,535 maps.
//!
//! * map + unmap: one 4 KiB map (with a memfd, published into the snapshot as a client's
//!   DMA_MAP is; or without an fd) and its unmap, on an empty space and on one that
//!   already holds 1,000 fd-backed maps (every fd-backed unmap republishes the
//!   snapshot);
//! * translation: random addresses, each in a random map, through the lock-free snapshot
//!   the data path uses (`GuestMemoryMmap::get_host_address`: vm-memory's region lookup)
//!   and through `DmaSpace::find` (the locked map table the message path and the core
//!   use).
//!
//! The snapshot rows use regions carved from one anonymous reservation, collected exactly
//! as `DmaSpace::publish` does: 65,535 fd-backed maps would need 65,535 descriptors (one
//! per map, as a vfio-user client sends them) and as many mmaps, past this machine's
//! RLIMIT_NOFILE (20,000, not raisable here) and vm.max_map_count (65,530). The lookup
//! structure, and so the translation cost, is the same. The `DmaSpace::find` rows use
//! maps without fds, whose table entries are the same as fd-backed ones.

use std::fs::File;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use unidev_core::memory::{DmaSpace, FdBacking, MapRequest, Prot};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Bytes of every map.
const MAP_BYTES: u64 = 4096;
/// IOVA of the first map; maps are 8 KiB apart (not adjacent in IOVA space).
const IOVA_BASE: u64 = 0x10_0000_0000;
const IOVA_STRIDE: u64 = 2 * MAP_BYTES;

fn memfd(len: u64) -> Result<File, String> {
    let name = c"unidev-bench-dma";
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).map_err(|e| format!("memfd size: {e}"))?;
    Ok(f)
}

/// Allow at least `want` open descriptors (soft limit up to the hard one; the hard one
/// too when privileged).
fn raise_fd_limit(want: u64) -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    if lim.rlim_cur >= want {
        return Ok(());
    }
    let raised = libc::rlimit {
        rlim_cur: want.max(lim.rlim_cur),
        rlim_max: want.max(lim.rlim_max),
    };
    // SAFETY: setrlimit reads a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(());
    }
    Err(format!(
        "{want} descriptors needed, RLIMIT_NOFILE is {} (hard {}) and cannot be raised: {}",
        lim.rlim_cur,
        lim.rlim_max,
        std::io::Error::last_os_error()
    ))
}

/// A space holding `n` fd-backed 4 KiB maps, published.
struct Filled {
    dma: DmaSpace,
    _file: File,
}

fn filled(n: u64) -> Result<Filled, String> {
    raise_fd_limit(n + 1024)?;
    let file = memfd(n * MAP_BYTES)?;
    let dma = DmaSpace::new(65535);
    for i in 0..n {
        let backing = FdBacking {
            file: file.try_clone().map_err(|e| format!("dup: {e}"))?,
            // Descending offsets: with top-down placement consecutive mmaps become
            // adjacent, and the kernel merges their VMAs.
            offset: (n - 1 - i) * MAP_BYTES,
        };
        dma.map(MapRequest {
            iova: IOVA_BASE + i * IOVA_STRIDE,
            size: MAP_BYTES,
            prot: Prot::READ_WRITE,
            backing: Some(backing),
        })
        .map_err(|e| format!("map {i} of {n}: {e}"))?;
    }
    dma.publish();
    Ok(Filled { dma, _file: file })
}

/// xorshift64: a cheap, reproducible address stream.
fn addresses(maps: u64, count: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let map = x % maps;
            let within = (x >> 32) % MAP_BYTES;
            IOVA_BASE + map * IOVA_STRIDE + within
        })
        .collect()
}

/// One anonymous reservation carved into `maps` 4 KiB guest regions, collected into a
/// `GuestMemoryMmap` exactly as `DmaSpace::publish` builds its snapshot (sorted
/// `Arc<GuestRegionMmap>`s, one per map, at the same IOVAs as [`sparse_space`]).
struct RegionSnapshot {
    // Dropped before the reservation the regions point into.
    memory: GuestMemoryMmap,
    base: *mut libc::c_void,
    len: usize,
}

impl RegionSnapshot {
    fn new(maps: u64) -> Result<Self, String> {
        let len = usize::try_from(maps * MAP_BYTES).map_err(|_| "too many maps")?;
        // SAFETY: a fresh private anonymous reservation; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let mut snapshot = RegionSnapshot {
            memory: GuestMemoryMmap::new(),
            base,
            len,
        };
        let mut regions = Vec::with_capacity(maps as usize);
        for i in 0..maps {
            // SAFETY: page i of the reservation above, which outlives the regions (they
            // live in `memory`, dropped first); build_raw does not take ownership.
            let raw = unsafe {
                MmapRegion::build_raw(
                    base.cast::<u8>().add((i * MAP_BYTES) as usize),
                    MAP_BYTES as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .map_err(|e| format!("region {i}: {e}"))?;
            let region = GuestRegionMmap::new(raw, GuestAddress(IOVA_BASE + i * IOVA_STRIDE))
                .ok_or_else(|| format!("region {i}: bad address"))?;
            regions.push(Arc::new(region));
        }
        snapshot.memory =
            GuestMemoryMmap::from_arc_regions(regions).map_err(|e| format!("snapshot: {e}"))?;
        Ok(snapshot)
    }
}

impl Drop for RegionSnapshot {
    fn drop(&mut self) {
        self.memory = GuestMemoryMmap::new();
        // SAFETY: the reservation made in new(); no region refers to it any more.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// A space holding `maps` 4 KiB maps without fds (the table the message path uses).
fn sparse_space(maps: u64) -> Result<DmaSpace, String> {
    let dma = DmaSpace::new(65535);
    for i in 0..maps {
        dma.map(MapRequest {
            iova: IOVA_BASE + i * IOVA_STRIDE,
            size: MAP_BYTES,
            prot: Prot::READ_WRITE,
            backing: None,
        })
        .map_err(|e| format!("map {i} of {maps}: {e}"))?;
    }
    Ok(dma)
}

/// Translation cost with `maps` maps, ns per lookup: (snapshot, DmaSpace::find).
pub fn translation(maps: u64, lookups: usize) -> Result<(f64, f64), String> {
    let addrs = addresses(maps, lookups);
    let snapshot = RegionSnapshot::new(maps)?;
    let mem = &snapshot.memory;
    if mem.num_regions() as u64 != maps {
        return Err(format!(
            "{} regions published for {maps} maps",
            mem.num_regions()
        ));
    }
    // Warm up, and check every address translates.
    for &a in &addrs {
        mem.get_host_address(GuestAddress(a))
            .map_err(|e| format!("{a:#x} does not translate: {e}"))?;
    }
    let t = Instant::now();
    for &a in &addrs {
        black_box(mem.get_host_address(GuestAddress(black_box(a))).ok());
    }
    let snap_ns = t.elapsed().as_nanos() as f64 / addrs.len() as f64;
    drop(snapshot);
    let dma = sparse_space(maps)?;
    for &a in &addrs {
        dma.find(a).ok_or_else(|| format!("{a:#x} is in no map"))?;
    }
    let t = Instant::now();
    for &a in &addrs {
        black_box(dma.find(black_box(a)));
    }
    let find_ns = t.elapsed().as_nanos() as f64 / addrs.len() as f64;
    Ok((snap_ns, find_ns))
}

/// Map + unmap pairs per second of one 4 KiB map, with or without an fd, next to
/// `present` fd-backed maps.
pub fn map_unmap_rate(with_fd: bool, present: u64, pairs: usize) -> Result<(u64, f64), String> {
    let space = filled(present)?;
    let file = Arc::new(memfd(MAP_BYTES)?);
    let iova = IOVA_BASE + (present + 1) * IOVA_STRIDE;
    let t = Instant::now();
    for i in 0..pairs {
        let backing = if with_fd {
            Some(FdBacking {
                file: file.try_clone().map_err(|e| format!("dup: {e}"))?,
                offset: 0,
            })
        } else {
            None
        };
        space
            .dma
            .map(MapRequest {
                iova,
                size: MAP_BYTES,
                prot: Prot::READ_WRITE,
                backing,
            })
            .map_err(|e| format!("map {i}: {e}"))?;
        // A transport publishes after each batch of client messages.
        space.dma.publish();
        space
            .dma
            .unmap(iova, MAP_BYTES)
            .map_err(|e| format!("unmap {i}: {e}"))?;
    }
    let secs = t.elapsed().as_secs_f64();
    space.dma.unmap_all();
    Ok((pairs as u64, secs))
}
