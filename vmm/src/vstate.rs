//! The KVM VM itself: opening KVM, creating the VM with its in-kernel
//! interrupt controllers and PIT, and their state for a snapshot.

use kvm_bindings::CpuId;
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::error::{Error, Result};
use crate::layout::KVM_TSS;
use crate::persist::VmState;

pub fn open_kvm() -> Result<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Ok(kvm),
        Err(e) if e.errno() == libc::ENOENT => Err(Error::NoKvm),
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            Err(Error::KvmPermission)
        }
        Err(e) => Err(Error::KvmOpen(e)),
    }
}

/// Creates a KVM VM with the in-kernel interrupt controllers and PIT.
pub fn create_vm() -> Result<(Kvm, VmFd)> {
    let kvm = open_kvm()?;
    let vm_fd = kvm.create_vm().map_err(Error::kvm("creating the VM"))?;
    vm_fd
        .set_tss_address(KVM_TSS as usize)
        .map_err(Error::kvm("setting the TSS address"))?;
    vm_fd
        .create_irq_chip()
        .map_err(Error::kvm("creating the interrupt controller"))?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(Error::kvm("creating the PIT"))?;
    Ok((kvm, vm_fd))
}

pub fn supported_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("reading supported CPUID"))
}

/// The CPUID a guest booted on this host is shown, as KVM reports it
/// back once set on `vcpu` (a fresh one, whose CPUID a restore then
/// replaces with the snapshot's).
pub fn cpuid_shown(vcpu: &VcpuFd, supported: &CpuId, cpus: u8) -> Result<CpuId> {
    vcpu.set_cpuid2(&crate::cpu::cpuid::for_vcpu(supported, 0, cpus))
        .map_err(Error::kvm("setting CPUID"))?;
    vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("reading CPUID"))
}

fn irqchip(vm_fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm_fd
        .get_irqchip(&mut chip)
        .map_err(Error::kvm("reading the interrupt controller"))?;
    Ok(chip)
}

/// The interrupt controllers, the PIT and the clock, for a snapshot.
pub fn save(vm_fd: &VmFd) -> Result<VmState> {
    Ok(VmState {
        pic_master: irqchip(vm_fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm_fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm_fd, KVM_IRQCHIP_IOAPIC)?,
        pit: vm_fd.get_pit2().map_err(Error::kvm("reading the PIT"))?,
        clock: vm_fd
            .get_clock()
            .map_err(Error::kvm("reading the VM clock"))?,
    })
}

/// Puts a snapshot's VM-wide state back: before vCPUs and devices, since a
/// restored device may raise its interrupt at once.
pub fn restore(vm_fd: &VmFd, state: &VmState) -> Result<()> {
    vm_fd
        .set_pit2(&state.pit)
        .map_err(Error::kvm("restoring the PIT"))?;
    let mut clock = state.clock;
    // Only KVM_CLOCK_REALTIME is meaningful to set; the other flags
    // describe the source host's clock.
    clock.flags = 0;
    vm_fd
        .set_clock(&clock)
        .map_err(Error::kvm("restoring the VM clock"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm_fd
            .set_irqchip(chip)
            .map_err(Error::kvm("restoring the interrupt controller"))?;
    }
    Ok(())
}
