//! Boot register state for the two entry protocols.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::EntryPoint;
use crate::error::{Error, Result};
use crate::layout::{BOOT_GDT, BOOT_IDT, PML4, PVH_INFO, ZERO_PAGE};

/// GDT: null, 64-bit code, 32-bit code, data, TSS.
pub const BOOT_GDT_ENTRIES: [u64; 5] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 0x08: 64-bit code
    gdt_entry(0xc09b, 0, 0xfffff), // 0x10: 32-bit code
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
    gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS
];

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The hidden segment state KVM loads for a GDT entry.
fn segment(index: u16, entry: u64) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            if (entry >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

pub fn setup_sregs(vcpu: &VcpuFd, entry: EntryPoint) -> Result<()> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::kvm("reading sregs"))?;
    let code = match entry {
        EntryPoint::Pvh(_) => segment(2, BOOT_GDT_ENTRIES[2]),
        EntryPoint::Linux64(_) => segment(1, BOOT_GDT_ENTRIES[1]),
    };
    let data = segment(3, BOOT_GDT_ENTRIES[3]);
    let tss = segment(4, BOOT_GDT_ENTRIES[4]);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::Linux64(_) => {
            sregs.cr3 = PML4;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::kvm("setting sregs"))
}

pub fn setup_regs(vcpu: &VcpuFd, entry: EntryPoint) -> Result<()> {
    let regs = match entry {
        EntryPoint::Pvh(ip) => kvm_regs {
            rflags: 0x2,
            rip: ip,
            rbx: PVH_INFO,
            ..Default::default()
        },
        EntryPoint::Linux64(ip) => kvm_regs {
            rflags: 0x2,
            rip: ip,
            rsp: 0x8ff0,
            rbp: 0x8ff0,
            rsi: ZERO_PAGE,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs)
        .map_err(Error::kvm("setting registers"))
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("setting the FPU"))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

pub fn setup_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<()> {
    let supported = kvm
        .get_msr_index_list()
        .map_err(Error::kvm("listing MSRs"))?;
    let supported = supported.as_slice();
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs =
        Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
    let written = vcpu.set_msrs(&msrs).map_err(Error::kvm("setting MSRs"))?;
    if written != entries.len() {
        return Err(Error::KvmCapability(format!(
            "KVM accepted {written} of {} boot MSRs",
            entries.len()
        )));
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Wires LINT0 to ExtINT and LINT1 to NMI, as firmware would.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(Error::kvm("reading the LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = u32::from_le_bytes(bytes);
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(Error::kvm("setting the LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_as_expected() {
        let code64 = segment(1, BOOT_GDT_ENTRIES[1]);
        assert_eq!(
            (code64.l, code64.db, code64.type_, code64.present),
            (1, 0, 0xb, 1)
        );
        assert_eq!(code64.limit, 0xffff_ffff);
        let code32 = segment(2, BOOT_GDT_ENTRIES[2]);
        assert_eq!((code32.l, code32.db, code32.selector), (0, 1, 0x10));
        let data = segment(3, BOOT_GDT_ENTRIES[3]);
        assert_eq!((data.type_, data.s, data.g), (0x3, 1, 1));
        let tss = segment(4, BOOT_GDT_ENTRIES[4]);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }
}
