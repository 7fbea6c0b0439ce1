//! Capsule's virtual machine monitor, as a library: the machine only.
//!
//! Boots a Linux kernel in a KVM microVM with a serial console and
//! virtio-mmio block, entropy and vsock devices; pauses, snapshots and
//! restores it. It knows nothing of what runs inside: the `sandbox` crate
//! composes it with the guest agent. The API is [`Vm`], its
//! [`VmBuilder`] and [`RestoreOptions`].
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | what a VM is made of, checked |
//! | `build` | building a machine for a boot or from a snapshot |
//! | `device_manager` | buses, MMIO windows and IRQs, ioeventfd/irqfd wiring |
//! | `event_loop` | the device thread |
//! | `vm` | the running machine: control, snapshot writing, teardown |
//! | `vstate` | the KVM VM and its interrupt controllers |
//! | [`persist`] | the snapshot format |

pub mod boot;
mod build;
pub mod config;
mod console;
pub mod cpu;
mod device_manager;
mod diagnose;
mod error;
mod event_loop;
mod exit;
mod gate;
pub mod host;
pub mod layout;
pub mod logging;
pub mod memory;
pub mod persist;
pub mod private;
mod runtime_dir;
mod threads;
mod vm;
mod vstate;

pub use build::{RestoreTimings, GUEST_CID};
pub use config::{
    DiskConfig, FlushPolicy, HostFile, MemoryBackend, RestoreOptions, VmBuilder, VmConfig,
    VmSettings,
};
pub use diagnose::console_shows_guest_failure;
pub use error::{Error, Result, PVM_HINT};
pub use exit::VmExit;
pub use host::KvmFlavor;
pub use vm::{ExitWatch, SnapshotStats, Vm, MAX_ANNOTATION, VMM_AT_FAULT};
