//! Loading a Linux kernel and handing it what it needs to boot: a memory
//! map, a command line, an initramfs and an MP table.
//!
//! Two entry protocols: PVH (an ELF `vmlinux` with a PVH note; the kernel
//! starts in 32-bit protected mode with a `hvm_start_info`) and the 64-bit
//! Linux boot protocol (a `bzImage`, or an ELF without PVH note; the kernel
//! starts in long mode with a "zero page").

pub mod mptable;

use std::io::{Seek, SeekFrom};

use devices::{GuestMemory, HostFile};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{Error, Result};
use crate::layout::*;
use crate::memory::low_ram_end;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry point of a bzImage is this far into the protected-mode
/// kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode, `%ebx` = start_info.
    Pvh(u64),
    /// 64-bit long mode, `%rsi` = zero page.
    Linux64(u64),
}

/// A loaded kernel.
pub struct LoadedKernel {
    pub entry: EntryPoint,
    setup_header: Option<setup_header>,
}

/// Loads the kernel (ELF vmlinux or bzImage) into guest memory.
pub fn load_kernel(mem: &GuestMemory, kernel: &HostFile) -> Result<LoadedKernel> {
    let path = kernel.name();
    let open = || {
        // An open file's descriptors share one offset: start each try at 0.
        let opened = kernel.open(false).and_then(|mut f| {
            f.seek(SeekFrom::Start(0))?;
            Ok(f)
        });
        opened.map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::KernelMissing {
                    path: path.to_path_buf(),
                }
            } else {
                Error::File {
                    what: "guest kernel",
                    path: path.to_path_buf(),
                    source,
                }
            }
        })
    };
    let high = Some(GuestAddress(HIGH_MEM_START));
    let elf_error = match Elf::load(mem, None, &mut open()?, high) {
        Ok(result) => {
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr.raw_value()),
                _ => EntryPoint::Linux64(result.kernel_load.raw_value()),
            };
            return Ok(LoadedKernel {
                entry,
                setup_header: None,
            });
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut open()?, high) {
        Ok(result) => Ok(LoadedKernel {
            entry: EntryPoint::Linux64(result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET),
            setup_header: result.setup_header,
        }),
        Err(bz_error) => Err(Error::KernelLoad(format!(
            "{} is neither an ELF vmlinux ({elf_error}) nor a bzImage ({bz_error})",
            path.display()
        ))),
    }
}

/// Loads the initramfs as high as possible below the MMIO hole; returns
/// its address and size.
pub fn load_initramfs(mem: &GuestMemory, initramfs: &HostFile) -> Result<(u64, u64)> {
    let file_err = |source| Error::File {
        what: "initramfs",
        path: initramfs.name().to_path_buf(),
        source,
    };
    let mut file = initramfs.open(false).map_err(file_err)?;
    file.seek(SeekFrom::Start(0)).map_err(file_err)?;
    let size = file.metadata().map_err(file_err)?.len();
    let end = low_ram_end(mem);
    let addr = end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= HIGH_MEM_START + (16 << 20))
        .ok_or_else(|| {
            Error::Config(format!(
                "initramfs of {size} bytes does not fit in guest memory"
            ))
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::Memory(format!("loading the initramfs: {e}")))?;
    Ok((addr, size))
}

/// The guest's physical memory map.
pub fn e820_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, BASE_MEM_END, E820_RAM),
        (BASE_MEM_END, HIGH_MEM_START - BASE_MEM_END, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIGH_MEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

pub fn write_cmdline(mem: &GuestMemory, cmdline: &Cmdline) -> Result<()> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE), cmdline)
        .map_err(|e| Error::Config(format!("kernel command line: {e}")))
}

/// Writes the boot information the entry protocol expects.
pub fn write_boot_info(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initramfs: Option<(u64, u64)>,
) -> Result<()> {
    let map = e820_map(mem);
    match kernel.entry {
        EntryPoint::Pvh(_) => write_pvh_info(mem, &map, initramfs),
        EntryPoint::Linux64(_) => {
            write_zero_page(mem, kernel.setup_header, &map, cmdline_len, initramfs)
        }
    }
}

fn write_pvh_info(
    mem: &GuestMemory,
    map: &[(u64, u64, u32)],
    initramfs: Option<(u64, u64)>,
) -> Result<()> {
    use linux_loader::loader::elf::start_info::hvm_modlist_entry;
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let memmap_addr = PVH_INFO + info_size;
    start_info.memmap_paddr = memmap_addr;
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO));
    params.set_sections(&entries, GuestAddress(memmap_addr));
    if let Some((addr, size)) = initramfs {
        let modlist_addr =
            memmap_addr + (entries.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist_addr;
        params = BootParams::new(&start_info, GuestAddress(PVH_INFO));
        params.set_sections(&entries, GuestAddress(memmap_addr));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: addr,
                size,
                ..Default::default()
            }],
            GuestAddress(modlist_addr),
        );
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(|e| Error::Memory(format!("writing PVH start info: {e}")))
}

fn write_zero_page(
    mem: &GuestMemory,
    header: Option<setup_header>,
    map: &[(u64, u64, u32)],
    cmdline_len: usize,
    initramfs: Option<(u64, u64)>,
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if map.len() > params.e820_table.len() {
        return Err(Error::Config("too many memory map entries".into()));
    }
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE));
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(&bp, mem)
        .map_err(|e| Error::Memory(format!("writing the zero page: {e}")))
}

/// Writes the boot GDT, IDT and identity page tables (used by both entry
/// protocols; page tables only by the 64-bit one).
pub fn write_boot_tables(mem: &GuestMemory) -> Result<()> {
    let err = |e: vm_memory::GuestMemoryError| Error::Memory(format!("writing boot tables: {e}"));
    for (i, entry) in crate::cpu::regs::BOOT_GDT_ENTRIES.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT + 8 * i as u64))
            .map_err(err)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT)).map_err(err)?;
    // Identity-map the first GiB with 2 MiB pages.
    mem.write_obj(PDPT | 0x03, GuestAddress(PML4))
        .map_err(err)?;
    mem.write_obj(PD | 0x03, GuestAddress(PDPT)).map_err(err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_mptable_and_skips_the_hole() {
        let mem = crate::memory::create(4 << 30).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, MPTABLE, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(
            map[2],
            (HIGH_MEM_START, MMIO_HOLE_START - HIGH_MEM_START, E820_RAM)
        );
        assert_eq!(map[3].0, FOUR_GIB);
        let total: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(total + (HIGH_MEM_START - BASE_MEM_END), 4 << 30);
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(matches!(
            load_kernel(&mem, &path.into()),
            Err(Error::KernelLoad(_))
        ));
        assert!(matches!(
            load_kernel(&mem, &dir.path().join("missing").into()),
            Err(Error::KernelMissing { .. })
        ));
    }

    #[test]
    fn initramfs_too_big_for_memory_is_refused() {
        let mem = crate::memory::create(32 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.cpio");
        std::fs::write(&path, vec![0; 20 << 20]).unwrap();
        assert!(matches!(
            load_initramfs(&mem, &path.into()),
            Err(Error::Config(_))
        ));
    }
}
