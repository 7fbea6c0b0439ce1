//! Guest RAM: anonymous mappings split around the 32-bit MMIO hole, and
//! their registration with KVM.

use std::fs::File;
use std::sync::Arc;

use devices::GuestMemory;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::error::{Error, Result};
use crate::layout::{FOUR_GIB, MMIO_HOLE_START};

/// The RAM ranges for `size` bytes of guest memory.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(FOUR_GIB), (size - low) as usize));
    }
    ranges
}

pub fn create(size: u64) -> Result<GuestMemory> {
    GuestMemory::from_ranges(&ram_ranges(size)).map_err(|e| Error::Memory(e.to_string()))
}

/// Guest RAM backed by a memory file (see `snapshot::memory`), mapped
/// private and copy-on-write: pages are read from the file (the page
/// cache, shared by every VM mapping the same file) on first touch, and a
/// page the guest writes becomes this VM's own. `regions` are
/// (guest address, size, file offset) and must lie within the file.
pub fn map_file(file: File, regions: &[(u64, u64, u64)]) -> Result<GuestMemory> {
    let file = Arc::new(file);
    let mut mapped = Vec::with_capacity(regions.len());
    for &(guest_addr, size, file_offset) in regions {
        let size = usize::try_from(size).map_err(|e| Error::Memory(e.to_string()))?;
        let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::from_arc(file.clone(), file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| Error::Memory(format!("mapping the memory file: {e}")))?;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(guest_addr))
                .ok_or_else(|| Error::Memory("a memory region wraps around".into()))?,
        );
    }
    GuestMemory::from_regions(mapped).map_err(|e| Error::Memory(e.to_string()))
}

/// The host ranges of `mem`'s regions paired with their places in a
/// memory file, for a userfaultfd server.
pub fn host_ranges(
    mem: &GuestMemory,
    layout: &[snapshot::memory::RegionLayout],
) -> Result<Vec<snapshot::uffd::Range>> {
    layout
        .iter()
        .map(|place| {
            let host = mem
                .get_host_address(GuestAddress(place.guest_addr))
                .map_err(|e| Error::Memory(e.to_string()))?;
            Ok(snapshot::uffd::Range {
                host_addr: host as usize,
                len: place.size as usize,
                file_offset: place.file_offset,
            })
        })
        .collect()
}

/// Makes every region of `mem` guest RAM in `vm` (again, to change
/// `log_dirty`). With `log_dirty`, KVM records every page the guest
/// writes, for diff snapshots; it costs a fault on the first write to
/// each page after the log is read, so it is only on once needed.
pub fn register(vm: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping backing this region lives in `mem`, which the
        // VM keeps alive for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(Error::kvm("registering guest memory"))?;
    }
    Ok(())
}

/// The pages written since the last call, one bitmap per region in
/// address order (bit i of word j: page 64j+i): what the guest wrote, from
/// KVM's dirty log, and what the VMM's devices wrote, from the memory's
/// own bitmap. Reading clears both. Needs `register(.., true)`.
pub fn take_dirty(vm: &VmFd, mem: &GuestMemory) -> Result<Vec<Vec<u64>>> {
    let mut all = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let mut bitmap = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(Error::kvm("reading the dirty page log"))?;
        let by_devices = (**region).bitmap().get_and_reset();
        for (word, extra) in bitmap.iter_mut().zip(by_devices) {
            *word |= extra;
        }
        all.push(bitmap);
    }
    Ok(all)
}

/// Forgets what the VMM itself wrote so far (a restore copying pages in).
pub fn clear_device_dirty(mem: &GuestMemory) {
    for region in mem.iter() {
        (**region).bitmap().reset();
    }
}

/// The highest usable address below the MMIO hole, exclusive.
pub fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|&end| end <= MMIO_HOLE_START)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_skip_the_mmio_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(FOUR_GIB),
                ((4u64 << 30) - MMIO_HOLE_START) as usize
            )
        );
    }
}
