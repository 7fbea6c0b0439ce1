//! CPUID for a vCPU: what KVM supports, with the topology filled in for
//! this VM and the features a guest cannot use safely masked off. KVM's own
//! hypervisor leaves (0x4000_0000..) pass through unchanged: paravirtual
//! guests, PVM ones included, look for the KVM signature there.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXTENDED_FEATURES: u32 = 0x7;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const ECX_VMX: u32 = 1 << 5;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EXT_ECX_SVM: u32 = 1 << 2;
/// AMX-BF16, AMX-TILE, AMX-INT8 (leaf 7, EDX).
const EDX_AMX: u32 = (1 << 22) | (1 << 24) | (1 << 25);
/// XTILECFG and XTILEDATA state components (XCR0 bits 17 and 18).
const XSAVE_AMX: u32 = (1 << 17) | (1 << 18);

/// Adjusts KVM's supported CPUID for vCPU `index` of `count`.
pub fn for_vcpu(supported: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let entries = cpuid.as_mut_slice();
    // Bits needed to number the cores: ceil(log2(count)).
    let core_bits = (u32::from(count)).next_power_of_two().trailing_zeros();
    for entry in entries.iter_mut() {
        adjust(entry, index, count, core_bits);
    }
    cpuid
}

fn adjust(e: &mut kvm_cpuid_entry2, index: u8, count: u8, core_bits: u32) {
    let apic_id = u32::from(index);
    match e.function {
        LEAF_FEATURES => {
            // APIC id, logical processor count, CLFLUSH size kept.
            e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(count) << 16);
            e.ecx |= ECX_HYPERVISOR;
            // No nested virtualization inside a sandbox.
            e.ecx &= !ECX_VMX;
            if count > 1 {
                e.edx |= 1 << 28; // HTT: the count above is meaningful
            }
        }
        LEAF_CACHE_PARAMS => {
            // Cores per package - 1, one thread per cache.
            e.eax = (e.eax & 0x03ff_c0ff) | ((u32::from(count) - 1) << 26);
        }
        LEAF_EXTENDED_FEATURES if e.index == 0 => {
            e.edx &= !EDX_AMX;
        }
        LEAF_TOPOLOGY => {
            e.edx = apic_id;
            match e.index {
                0 => {
                    // SMT level: one thread per core.
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (1 << 8) | e.index;
                }
                1 => {
                    // Core level: every vCPU is a core of one package.
                    e.eax = core_bits;
                    e.ebx = u32::from(count);
                    e.ecx = (2 << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        LEAF_XSAVE => match e.index {
            0 => e.eax &= !XSAVE_AMX,
            17 | 18 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        },
        LEAF_EXT_FEATURES => e.ecx &= !EXT_ECX_SVM,
        LEAF_AMD_SIZES => e.ecx = (e.ecx & !0xff) | (u32::from(count) - 1),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn topology_identity_and_masks() {
        let supported = CpuId::from_entries(&[
            entry(1, 0),
            entry(7, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xd, 0),
            entry(0xd, 18),
            entry(0x4000_0000, 0),
            entry(0x8000_0001, 0),
        ])
        .unwrap();
        let c = for_vcpu(&supported, 3, 4);
        let leaf1 = find(&c, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3, "APIC id");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical count");
        assert_eq!(leaf1.ecx & ECX_VMX, 0);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(find(&c, 7, 0).edx & EDX_AMX, 0);
        assert_eq!(find(&c, 0xd, 0).eax & XSAVE_AMX, 0);
        assert_eq!(find(&c, 0xd, 18).eax, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 3));
        assert_eq!(find(&c, 0x8000_0001, 0).ecx & EXT_ECX_SVM, 0);
        // KVM's leaves are untouched.
        assert_eq!(find(&c, 0x4000_0000, 0), entry(0x4000_0000, 0));
    }
}
