//! A vCPU's complete architectural state, as KVM exposes it, for
//! snapshots: saved from a paused vCPU, put back into a fresh one.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// IA32_TSC: restored first, so MSRs that are relative to the TSC (the
/// TSC deadline timer) are interpreted against the right clock.
const MSR_IA32_TSC: u32 = 0x10;

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// The MSRs worth saving: KVM's own list, TSC first.
pub fn msrs_to_save(kvm: &kvm_ioctls::Kvm) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(Error::kvm("reading the MSR list"))?;
    let mut msrs: Vec<u32> = list.as_slice().to_vec();
    msrs.sort_by_key(|&m| m != MSR_IA32_TSC);
    Ok(msrs)
}

/// Reads the state of a vCPU that is not running (its thread is parked
/// after completing any pending I/O, see `vcpu::pause`).
pub fn save(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState> {
    // The MP state first: reading it makes KVM process a pending INIT or
    // SIPI, which changes the registers read next.
    let mp_state = vcpu
        .get_mp_state()
        .map_err(Error::kvm("reading the MP state"))?;
    let regs = vcpu.get_regs().map_err(Error::kvm("reading registers"))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(Error::kvm("reading special registers"))?;
    let xsave = vcpu
        .get_xsave()
        .map_err(Error::kvm("reading the XSAVE area"))?;
    let xcrs = vcpu.get_xcrs().map_err(Error::kvm("reading XCRs"))?;
    let debugregs = vcpu
        .get_debug_regs()
        .map_err(Error::kvm("reading debug registers"))?;
    let lapic = vcpu.get_lapic().map_err(Error::kvm("reading the LAPIC"))?;
    let msrs = read_msrs(vcpu, msr_list)?;
    let events = vcpu
        .get_vcpu_events()
        .map_err(Error::kvm("reading pending events"))?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("reading CPUID"))?
        .as_slice()
        .to_vec();
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// Reads every MSR in `list` that this vCPU has. KVM_GET_MSRS stops at
/// the first one it refuses (a feature the vCPU lacks); skip it and go on.
fn read_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(Error::kvm("reading MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // Skip the refused one.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Loads `state` into a freshly created vCPU, in the order KVM needs:
/// CPUID before anything that depends on features, special registers
/// (APIC base) before the LAPIC, MSRs (TSC) before the pending events.
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|e| Error::Snapshot(format!("vCPU CPUID: {e:?}")))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(Error::kvm("restoring CPUID"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(Error::kvm("restoring the MP state"))?;
    vcpu.set_regs(&state.regs)
        .map_err(Error::kvm("restoring registers"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(Error::kvm("restoring special registers"))?;
    // SAFETY: `state.xsave` is a whole kvm_xsave (4 KiB), the size KVM
    // reads; larger XSAVE areas (AMX) are never enabled for our guests.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(Error::kvm("restoring the XSAVE area"))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(Error::kvm("restoring XCRs"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(Error::kvm("restoring debug registers"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(Error::kvm("restoring the LAPIC"))?;
    write_msrs(vcpu, &state.msrs)?;
    vcpu.set_vcpu_events(&state.events)
        .map_err(Error::kvm("restoring pending events"))?;
    Ok(())
}

fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<()> {
    if entries.len() > 4096 {
        return Err(Error::Snapshot(format!(
            "{} MSRs in one vCPU's state",
            entries.len()
        )));
    }
    let mut rest = entries;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|e| Error::Snapshot(format!("MSRs: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(Error::kvm("restoring MSRs"))?;
        if n < rest.len() {
            // This host's KVM saved an MSR it will not take back; the
            // guest survives without most, but say which.
            log::warn!("restore: KVM refused MSR {:#x}", rest[n].index);
        }
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(())
}
