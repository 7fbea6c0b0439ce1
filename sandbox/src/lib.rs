//! A Capsule sandbox: a microVM from the `vmm` crate with the guest agent
//! inside it, ready, identified and taking commands.
//!
//! The VMM knows nothing of the agent; this crate composes the two. It
//! knows the agent's conventions (its kernel command line words, its
//! ready signal on vsock port 1025, its identity after a restore) and
//! keeps what it knows of the guest with the VM's snapshots.
//!
//! ```no_run
//! # fn main() -> Result<(), sandbox::Error> {
//! use std::time::Duration;
//! use sandbox::VmSettings; // kernel, cpus, memory and the rest
//! let mut sb = sandbox::Sandbox::builder()
//!     .kernel("vmlinux")
//!     .initramfs("initramfs.cpio")
//!     .cpus(2)
//!     .memory_mib(256)
//!     .boot()?;
//! sb.wait_ready(Duration::from_secs(10))?;
//! let out = sb.exec(["uname", "-a"])?;
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//! sb.shutdown(Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

mod builder;
mod child;
mod error;
mod guest;
mod identity;
mod machine;
mod ready;
mod restore;
mod sandbox;

pub use builder::SandboxBuilder;
pub use child::{ChildOptions, ChildVm};
pub use error::{Error, Result};
pub use guest::{valid_hostname, GuestInfo};
pub use guest_agent::{
    AgentClient, ClientError, ClientOptions, ExecEvent, ExecHandle, ExecInput, ExecRequest,
    ExitStatus, Identity, Output, PortStream, PortWriter, TerminalSize,
};
pub use identity::fork_identity;
pub use machine::Machine;
pub use restore::{RestoreOptions, DEFAULT_RESTORE_TIMEOUT};
pub use sandbox::{connect_agent, Sandbox};
pub use vmm::{MemoryBackend, SnapshotStats, Vm, VmExit, VmSettings};
