//! What a sandbox needs of the machine under it: a VM in this process
//! ([`vmm::Vm`]) or in a `capsule-vmm` child ([`crate::ChildVm`]).

use std::path::Path;
use std::time::{Duration, Instant};

use vmm::{KvmFlavor, SnapshotStats, Vm, VmExit};

use crate::error::{Error, Result};

pub trait Machine {
    /// The host side of the VM's vsock device: the agent is reached
    /// through it.
    fn vsock_path(&self) -> &Path;
    /// When the machine's boot or restore began.
    fn started_at(&self) -> Instant;
    fn kvm_flavor(&self) -> KvmFlavor;
    fn resume(&mut self) -> Result<()>;
    fn pause(&mut self) -> Result<()>;
    /// How the VM ended, if it has (without waiting).
    fn exit_reason(&self) -> Option<VmExit>;
    /// Waits up to `timeout` (forever with None) for the VM to end.
    fn wait(&mut self, timeout: Option<Duration>) -> Option<VmExit>;
    /// Stops the VM now; how it ended.
    fn kill(&mut self) -> VmExit;
    fn console_tail(&self, lines: usize) -> String;
    fn stall_report(&self) -> String;
    /// Bytes kept with the VM's later snapshots.
    fn set_annotation(&mut self, bytes: Vec<u8>) -> Result<()>;
    fn snapshot(&mut self, dir: &Path, diff: bool) -> Result<SnapshotStats>;
    /// The error that says how the VM ended, with its console.
    fn exit_error(&self, exit: VmExit) -> Error;
}

impl Machine for Vm {
    fn vsock_path(&self) -> &Path {
        Vm::vsock_path(self)
    }
    fn started_at(&self) -> Instant {
        Vm::started_at(self)
    }
    fn kvm_flavor(&self) -> KvmFlavor {
        Vm::kvm_flavor(self)
    }
    fn resume(&mut self) -> Result<()> {
        Ok(Vm::resume(self)?)
    }
    fn pause(&mut self) -> Result<()> {
        Ok(Vm::pause(self)?)
    }
    fn exit_reason(&self) -> Option<VmExit> {
        Vm::exit_reason(self)
    }
    fn wait(&mut self, timeout: Option<Duration>) -> Option<VmExit> {
        Vm::wait(self, timeout)
    }
    fn kill(&mut self) -> VmExit {
        Vm::kill(self)
    }
    fn console_tail(&self, lines: usize) -> String {
        Vm::console_tail(self, lines)
    }
    fn stall_report(&self) -> String {
        Vm::stall_report(self)
    }
    fn set_annotation(&mut self, bytes: Vec<u8>) -> Result<()> {
        Ok(Vm::set_annotation(self, bytes)?)
    }
    fn snapshot(&mut self, dir: &Path, diff: bool) -> Result<SnapshotStats> {
        Ok(if diff {
            Vm::snapshot_diff(self, dir)?
        } else {
            Vm::snapshot(self, dir)?
        })
    }
    fn exit_error(&self, exit: VmExit) -> Error {
        Vm::exit_error(self, exit).into()
    }
}
