//! Guest memory files: every guest RAM region back to back, in guest
//! address order, so a restore can map the file privately and N forks
//! share one page-cache copy. Zero pages are left as holes (a fresh guest
//! is mostly zeros), so the file costs disk only for what the guest used.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

pub const PAGE_SIZE: usize = 4096;
/// Guest memory is copied out in chunks of this size (a multiple of the
/// page size): large enough for few syscalls, small enough to stay cached.
const CHUNK: usize = 2 << 20;
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Where one guest memory region lives in a memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// What writing a memory file did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Bytes actually written (non-zero pages).
    pub bytes_written: u64,
    /// Bytes left as holes because they were zero.
    pub zero_bytes_skipped: u64,
    /// In a diff: the bytes of the dirty pages it holds (written or left
    /// as holes).
    pub dirty_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot read guest memory at {addr:#x}: {message}")]
    Guest { addr: u64, message: String },
    #[error("guest memory region at {0:#x} is not a whole number of pages")]
    Unaligned(u64),
    #[error("the dirty page bitmaps do not match the memory regions")]
    DirtyBitmaps,
    #[error("memory file i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes all of `mem` to `file` (truncating it first) and returns where
/// each region went. The guest must not run meanwhile (its vCPUs paused),
/// or the file is not a consistent image.
pub fn write_full<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
) -> Result<(Vec<RegionLayout>, WriteStats), MemoryFileError> {
    write_pages(mem, file, None)
}

/// Writes only the pages marked in `dirty` (one bitmap per region, in
/// address order, bit i of word j = page 64j+i, as KVM's dirty log) into
/// `file`, at the same places as [`write_full`] would: a diff against an
/// earlier memory file. Dirty pages that are zero are left as holes too
/// (a hole reads as zeros); the bitmap, saved with the snapshot, says
/// which pages the diff holds.
pub fn write_diff<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    dirty: &[Vec<u64>],
) -> Result<(Vec<RegionLayout>, WriteStats), MemoryFileError> {
    write_pages(mem, file, Some(dirty))
}

/// Where each region of `mem` goes in a memory file.
pub fn layout<M: GuestMemoryBackend>(mem: &M) -> Result<Vec<RegionLayout>, MemoryFileError> {
    let mut regions: Vec<_> = mem.iter().collect();
    regions.sort_by_key(|r| r.start_addr().0);
    let mut layout = Vec::with_capacity(regions.len());
    let mut file_offset = 0u64;
    for region in &regions {
        let size = region.len();
        if size % PAGE_SIZE as u64 != 0 {
            return Err(MemoryFileError::Unaligned(region.start_addr().0));
        }
        layout.push(RegionLayout {
            guest_addr: region.start_addr().0,
            size,
            file_offset,
        });
        file_offset += size;
    }
    Ok(layout)
}

fn is_dirty(bitmap: &[u64], page: u64) -> bool {
    bitmap
        .get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

fn write_pages<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    dirty: Option<&[Vec<u64>]>,
) -> Result<(Vec<RegionLayout>, WriteStats), MemoryFileError> {
    let mut regions: Vec<_> = mem.iter().collect();
    regions.sort_by_key(|r| r.start_addr().0);
    let layout = layout(mem)?;
    if dirty.is_some_and(|d| d.len() != layout.len()) {
        return Err(MemoryFileError::DirtyBitmaps);
    }
    let file_offset: u64 = layout.iter().map(|r| r.size).sum();
    // Truncating to zero first turns every old byte into a hole.
    file.set_len(0)?;
    file.set_len(file_offset)?;

    let mut stats = WriteStats::default();
    let mut buf = vec![0u8; CHUNK];
    for (i, (region, place)) in regions.iter().zip(&layout).enumerate() {
        let mut offset = 0u64;
        while offset < place.size {
            // In a diff, skip to the next run of dirty pages and copy just
            // that run (at most one chunk).
            if let Some(bitmap) = dirty.map(|d| &d[i]) {
                let pages = place.size / PAGE_SIZE as u64;
                let mut page = offset / PAGE_SIZE as u64;
                while page < pages && !is_dirty(bitmap, page) {
                    page += 1;
                }
                if page == pages {
                    break;
                }
                let mut end = page;
                while end < pages
                    && is_dirty(bitmap, end)
                    && (end - page) < (CHUNK / PAGE_SIZE) as u64
                {
                    end += 1;
                }
                offset = page * PAGE_SIZE as u64;
                let len = ((end - page) * PAGE_SIZE as u64) as usize;
                stats.dirty_bytes += len as u64;
                copy_out(*region, place, offset, &mut buf[..len], file, &mut stats)?;
                offset += len as u64;
                continue;
            }
            let len = (place.size - offset).min(CHUNK as u64) as usize;
            copy_out(*region, place, offset, &mut buf[..len], file, &mut stats)?;
            offset += len as u64;
        }
    }
    Ok((layout, stats))
}

/// Copies `chunk.len()` bytes at `offset` in `region` to their place in
/// the memory file, skipping zero pages.
fn copy_out<R: GuestMemoryRegion>(
    region: &R,
    place: &RegionLayout,
    offset: u64,
    chunk: &mut [u8],
    file: &File,
    stats: &mut WriteStats,
) -> Result<(), MemoryFileError> {
    let addr = place.guest_addr + offset;
    let slice = region
        .get_slice(MemoryRegionAddress(offset), chunk.len())
        .map_err(|e| MemoryFileError::Guest {
            addr,
            message: e.to_string(),
        })?;
    slice.copy_to(&mut chunk[..]);
    stats.merge(write_non_zero_runs(
        file,
        chunk,
        place.file_offset + offset,
    )?);
    Ok(())
}

/// Copies the pages marked in `dirty` from a diff memory file (see
/// [`write_diff`]) into guest memory, run by run; returns the bytes
/// copied. `layout` is where each region sits in the file; the file must
/// be as long as the layout says (the caller checks).
pub fn apply_diff<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    layout: &[RegionLayout],
    dirty: &[Vec<u64>],
) -> Result<u64, MemoryFileError> {
    if dirty.len() != layout.len() {
        return Err(MemoryFileError::DirtyBitmaps);
    }
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0u64;
    for (place, bitmap) in layout.iter().zip(dirty) {
        let pages = place.size / PAGE_SIZE as u64;
        let mut page = 0u64;
        while page < pages {
            if !is_dirty(bitmap, page) {
                page += 1;
                continue;
            }
            let mut end = page;
            while end < pages && is_dirty(bitmap, end) && (end - page) < (CHUNK / PAGE_SIZE) as u64
            {
                end += 1;
            }
            let len = ((end - page) * PAGE_SIZE as u64) as usize;
            let at = page * PAGE_SIZE as u64;
            file.read_exact_at(&mut buf[..len], place.file_offset + at)?;
            let addr = vm_memory::GuestAddress(place.guest_addr + at);
            mem.write_slice(&buf[..len], addr)
                .map_err(|e| MemoryFileError::Guest {
                    addr: addr.0,
                    message: e.to_string(),
                })?;
            copied += len as u64;
            page = end;
        }
    }
    Ok(copied)
}

impl WriteStats {
    fn merge(&mut self, other: WriteStats) {
        self.bytes_written += other.bytes_written;
        self.zero_bytes_skipped += other.zero_bytes_skipped;
        self.dirty_bytes += other.dirty_bytes;
    }
}

/// Writes each run of consecutive non-zero pages of `chunk` with one call.
fn write_non_zero_runs(file: &File, chunk: &[u8], at: u64) -> std::io::Result<WriteStats> {
    let mut stats = WriteStats::default();
    let mut run_start: Option<usize> = None;
    let pages = chunk.len() / PAGE_SIZE;
    for page in 0..=pages {
        let zero = page == pages || chunk[page * PAGE_SIZE..][..PAGE_SIZE] == ZERO_PAGE;
        match (zero, run_start) {
            (false, None) => run_start = Some(page),
            (true, Some(start)) => {
                let bytes = &chunk[start * PAGE_SIZE..page * PAGE_SIZE];
                file.write_all_at(bytes, at + (start * PAGE_SIZE) as u64)?;
                stats.bytes_written += bytes.len() as u64;
                run_start = None;
            }
            _ => {}
        }
        if zero && page < pages {
            stats.zero_bytes_skipped += PAGE_SIZE as u64;
        }
    }
    Ok(stats)
}

/// Copies `src` into `dst` (which ends up the same length), reading and
/// writing only the data ranges: holes stay holes (zero pages of a memory
/// file are holes).
pub fn copy_sparse(src: &File, dst: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let seek = |offset: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: plain syscall on a descriptor `src` owns; the result is
        // checked.
        let at = unsafe { libc::lseek(src.as_raw_fd(), offset, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        let e = io::Error::last_os_error();
        // ENXIO: no data past `offset`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut at = data;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src = File::create(&src_path).unwrap();
        src.set_len(64 << 20).unwrap();
        src.write_all_at(b"start", 0).unwrap();
        src.write_all_at(&[7u8; 8192], 40 << 20).unwrap();
        src.write_all_at(b"end", (64 << 20) - 3).unwrap();
        let src = File::open(&src_path).unwrap();
        let dst_path = dir.path().join("dst");
        let dst = File::create(&dst_path).unwrap();
        copy_sparse(&src, &dst).unwrap();
        drop(dst);
        let copied = std::fs::read(&dst_path).unwrap();
        let original = std::fs::read(&src_path).unwrap();
        assert!(copied == original);
        let used = std::fs::metadata(&dst_path).unwrap().blocks() * 512;
        assert!(used < 1 << 20, "the copy uses {used} bytes");
    }

    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MIB: usize = 1 << 20;

    #[test]
    fn writes_regions_back_to_back_with_zero_pages_as_holes() {
        // Two regions with a gap, as around the MMIO hole; the second is
        // larger than one copy chunk.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), MIB),
            (GuestAddress(16 * MIB as u64), 3 * MIB),
        ])
        .unwrap();
        let touched: [(u64, &[u8]); 4] = [
            (3 * PAGE_SIZE as u64, b"page three"),
            (4 * PAGE_SIZE as u64 - 1, b"\x01"), // last byte of a page
            (16 * MIB as u64 + 2 * MIB as u64 - 5, b"spans a chunk edge"),
            (19 * MIB as u64 - 1, b"\xff"), // the very last byte
        ];
        for (addr, data) in touched {
            mem.write_slice(data, GuestAddress(addr)).unwrap();
        }
        let file = tempfile::tempfile().unwrap();
        // Old contents must not survive.
        file.write_all_at(&[0xaa; 8192], 0).unwrap();

        let (layout, stats) = write_full(&mem, &file).unwrap();
        assert_eq!(
            layout,
            [
                RegionLayout {
                    guest_addr: 0,
                    size: MIB as u64,
                    file_offset: 0
                },
                RegionLayout {
                    guest_addr: 16 * MIB as u64,
                    size: 3 * MIB as u64,
                    file_offset: MIB as u64
                },
            ]
        );
        // Pages 3 (both writes), the two either side of the chunk edge,
        // and the last one.
        assert_eq!(stats.bytes_written, 4 * PAGE_SIZE as u64);
        assert_eq!(
            stats.bytes_written + stats.zero_bytes_skipped,
            4 * MIB as u64
        );
        assert_eq!(file.metadata().unwrap().len(), 4 * MIB as u64);
        let allocated = file.metadata().unwrap().blocks() * 512;
        assert!(
            allocated <= 64 * 1024,
            "zero pages take no space ({allocated} bytes allocated)"
        );

        // The file is the guest's memory, byte for byte.
        let mut image = vec![0u8; 4 * MIB];
        file.read_exact_at(&mut image, 0).unwrap();
        for place in &layout {
            let mut expected = vec![0u8; place.size as usize];
            mem.read_slice(&mut expected, GuestAddress(place.guest_addr))
                .unwrap();
            let start = place.file_offset as usize;
            assert!(image[start..start + place.size as usize] == expected[..]);
        }
    }

    #[test]
    fn a_diff_holds_just_the_dirty_pages_and_applies_over_the_full_image() {
        let ranges = [
            (GuestAddress(0), MIB),
            (GuestAddress(16 * MIB as u64), 3 * MIB),
        ];
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        for page in 0..(4 * MIB / PAGE_SIZE) as u64 {
            let addr = if page < 256 {
                page * 4096
            } else {
                16 * MIB as u64 + (page - 256) * 4096
            };
            mem.write_slice(&[page as u8 | 1; 8], GuestAddress(addr))
                .unwrap();
        }
        let full = tempfile::tempfile().unwrap();
        let (layout, _) = write_full(&mem, &full).unwrap();

        // Change 3 pages of region 0 (one back to all zeros) and a run of
        // 600 pages (more than a copy chunk) in region 1.
        let mut dirty = vec![vec![0u64; 4], vec![0u64; 12]];
        for page in [5u64, 6, 200] {
            let fill = if page == 6 { 0 } else { 0xee };
            mem.write_slice(&[fill; PAGE_SIZE], GuestAddress(page * 4096))
                .unwrap();
            dirty[0][(page / 64) as usize] |= 1 << (page % 64);
        }
        for page in 100..700u64 {
            mem.write_slice(&[0x77; 16], GuestAddress(16 * MIB as u64 + page * 4096))
                .unwrap();
            dirty[1][(page / 64) as usize] |= 1 << (page % 64);
        }
        let diff = tempfile::tempfile().unwrap();
        let (diff_layout, stats) = write_diff(&mem, &diff, &dirty).unwrap();
        assert_eq!(diff_layout, layout);
        assert_eq!(stats.dirty_bytes, 603 * PAGE_SIZE as u64);
        assert_eq!(
            stats.bytes_written,
            602 * PAGE_SIZE as u64,
            "the zero page is a hole"
        );

        // Restore: the full image, then the diff over it.
        let restored = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        for place in &layout {
            let mut buf = vec![0u8; place.size as usize];
            full.read_exact_at(&mut buf, place.file_offset).unwrap();
            restored
                .write_slice(&buf, GuestAddress(place.guest_addr))
                .unwrap();
        }
        let copied = apply_diff(&restored, &diff, &layout, &dirty).unwrap();
        assert_eq!(copied, 603 * PAGE_SIZE as u64);
        for (addr, len) in ranges {
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            mem.read_slice(&mut a, addr).unwrap();
            restored.read_slice(&mut b, addr).unwrap();
            assert!(a == b, "region at {addr:?} differs after applying the diff");
        }
        assert!(matches!(
            write_diff(&mem, &diff, &dirty[..1]),
            Err(MemoryFileError::DirtyBitmaps)
        ));
    }
}
