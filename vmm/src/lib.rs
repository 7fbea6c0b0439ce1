//! Capsule's virtual machine monitor, as a library.
//!
//! Boots a Linux kernel in a KVM microVM with a serial console, virtio-mmio
//! block, entropy and vsock devices, and talks to the guest agent over
//! vsock. The whole API is [`Vm`] and its [`VmBuilder`]; see
//! `examples/boot_and_exec.rs`.

pub mod boot;
mod console;
pub mod cpu;
mod diagnose;
mod error;
mod exit;
mod gate;
pub mod host;
pub mod layout;
pub mod logging;
pub mod memory;
pub mod persist;
pub mod private;
mod ready;
mod threads;
mod vm;

pub use diagnose::console_shows_guest_failure;
pub use error::{Error, Result, PVM_HINT};
pub use exit::VmExit;
pub use guest_agent::{
    AgentClient, ClientError, ExecEvent, ExecHandle, ExecInput, ExecRequest, ExitStatus, Identity,
    Output,
};
pub use host::KvmFlavor;
pub use vm::{
    connect_agent, fork_identity, valid_hostname, DiskConfig, MemoryBackend, RestoreOptions,
    SnapshotStats, Vm, VmBuilder, VmConfig, DEFAULT_RESTORE_TIMEOUT, GUEST_CID,
};
