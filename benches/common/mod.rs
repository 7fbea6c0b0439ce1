//! What every benchmark needs: a VM builder with the guest artifacts, on
//! hardware KVM.

use sandbox::{Sandbox, SandboxBuilder, VmSettings};
use vmm::KvmFlavor;

/// A builder for a 256 MiB guest from `CAPSULE_KERNEL` and
/// `CAPSULE_INITRAMFS`; panics with what to do when either is missing or
/// this host's KVM cannot run a Linux guest.
pub fn builder() -> SandboxBuilder {
    // The VMM's warnings (a guest that stopped answering) on stderr.
    vmm::logging::log_to_stderr("", "CAPSULE_LOG");
    let flavor = KvmFlavor::detect();
    assert!(
        flavor.is_hardware(),
        "benchmarks need hardware KVM, this host has {flavor:?}: run them with `make bench`"
    );
    let var = |name: &str| {
        std::env::var_os(name).unwrap_or_else(|| panic!("{name} is not set: run with `make bench`"))
    };
    Sandbox::builder()
        .kernel(var("CAPSULE_KERNEL"))
        .initramfs(var("CAPSULE_INITRAMFS"))
        .memory_mib(256)
}
