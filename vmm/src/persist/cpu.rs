//! Whether a snapshot's vCPUs can run on this host.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Feature leaves compared between a snapshot's guest CPUID and a host's
/// supported CPUID: (leaf, subleaf, register, bits that may differ).
/// Bits that mirror guest-controlled state (OSXSAVE, OSPKE) or that the
/// VMM sets itself (the hypervisor bit) are left out.
const FEATURE_WORDS: [(u32, u32, usize, u32); 7] = [
    (1, 0, ECX, (1 << 27) | (1 << 31)),
    (1, 0, EDX, 0),
    (7, 0, EBX, 0),
    (7, 0, ECX, 1 << 4),
    (7, 0, EDX, 0),
    (0x8000_0001, 0, ECX, 0),
    (0x8000_0001, 0, EDX, 0),
];
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;

pub(super) fn missing_features(
    guest: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> std::result::Result<(), String> {
    let find = |entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32| {
        entries
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0))
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
    };
    for (leaf, sub, reg, ignore) in FEATURE_WORDS {
        let Some(g) = find(guest, leaf, sub) else {
            continue;
        };
        let h = find(host, leaf, sub).unwrap_or([0; 4]);
        let lacking = g[reg] & !h[reg] & !ignore;
        if lacking != 0 {
            let name = ["eax", "ebx", "ecx", "edx"][reg];
            return Err(format!("CPUID {leaf:#x}.{sub} {name} bits {lacking:#010x}"));
        }
    }
    Ok(())
}

/// The CPU vendor string from CPUID leaf 0 in KVM's supported list.
pub fn cpu_vendor(supported: &CpuId) -> String {
    let Some(e) = supported.as_slice().iter().find(|e| e.function == 0) else {
        return "unknown".into();
    };
    let mut bytes = Vec::with_capacity(12);
    for r in [e.ebx, e.edx, e.ecx] {
        bytes.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
