//! Guest memory files: every guest RAM region back to back, in guest
//! address order, so a restore can map the file privately and N forks
//! share one page-cache copy. Zero pages are left as holes (a fresh guest
//! is mostly zeros), so the file costs disk only for what the guest used.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

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
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot read guest memory at {addr:#x}: {message}")]
    Guest { addr: u64, message: String },
    #[error("guest memory region at {0:#x} is not a whole number of pages")]
    Unaligned(u64),
    #[error("cannot write the memory file: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes all of `mem` to `file` (truncating it first) and returns where
/// each region went. The guest must not run meanwhile (its vCPUs paused),
/// or the file is not a consistent image.
pub fn write_full<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
) -> Result<(Vec<RegionLayout>, WriteStats), MemoryFileError> {
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
    // Truncating to zero first turns every old byte into a hole.
    file.set_len(0)?;
    file.set_len(file_offset)?;

    let mut stats = WriteStats::default();
    let mut buf = vec![0u8; CHUNK];
    for (region, place) in regions.iter().zip(&layout) {
        let mut offset = 0u64;
        while offset < place.size {
            let len = (place.size - offset).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..len];
            let addr = place.guest_addr + offset;
            let slice = region
                .get_slice(MemoryRegionAddress(offset), len)
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
            offset += len as u64;
        }
    }
    Ok((layout, stats))
}

impl WriteStats {
    fn merge(&mut self, other: WriteStats) {
        self.bytes_written += other.bytes_written;
        self.zero_bytes_skipped += other.zero_bytes_skipped;
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

#[cfg(test)]
mod tests {
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
}
