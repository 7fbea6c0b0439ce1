//! Where things live in guest physical memory and the I/O space.

/// GDT for the boot vCPU state.
pub const BOOT_GDT: u64 = 0x500;
/// Empty IDT (interrupts stay disabled until the kernel installs its own).
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO: u64 = 0x6000;
/// Linux boot protocol "zero page".
pub const ZERO_PAGE: u64 = 0x7000;
/// Identity page tables for the 64-bit boot path (PML4, PDPT, PD).
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// MP configuration table (and, in the last KiB of base memory, the MP
/// floating pointer Linux scans for).
pub const MPTABLE: u64 = 0x9f000;
pub const MP_FLOATING_POINTER: u64 = 0x9fc00;
/// End of usable base memory; [MPTABLE, 1 MiB) is reserved.
pub const BASE_MEM_END: u64 = MPTABLE;
/// Kernel and everything else above 1 MiB.
pub const HIGH_MEM_START: u64 = 0x10_0000;

/// 32-bit MMIO hole: [MMIO_HOLE_START, 4 GiB). RAM beyond it continues at
/// 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 1 << 32;
/// virtio-mmio device windows, one page each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// KVM needs three pages for the TSS in the hole.
pub const KVM_TSS: u64 = 0xfffb_d000;
pub const IOAPIC: u64 = 0xfec0_0000;
pub const LAPIC: u64 = 0xfee0_0000;

/// Legacy I/O ports.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u64 = 0x60;
/// First interrupt line for virtio-mmio devices (one each).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins.
pub const IOAPIC_PINS: u32 = 24;

/// Highest vCPU count supported (the guest kernel's NR_CPUS and the MP
/// table's room).
pub const MAX_VCPUS: u8 = 64;

/// The most memory a guest may have: 1 TiB. Sizes beyond it are refused
/// with a clear error before anything is mapped.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
