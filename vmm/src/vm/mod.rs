//! A running (or stopped) microVM: its parts, what can be asked of it,
//! and its end.
//!
//! ```no_run
//! # fn main() -> Result<(), vmm::Error> {
//! let mut vm = vmm::Vm::builder()
//!     .kernel("vmlinux")
//!     .initramfs("initramfs.cpio")
//!     .cpus(2)
//!     .memory_mib(256)
//!     .boot()?;
//! // Talk to the guest over vm.vsock_path() (the `sandbox` crate's agent
//! // client does), then:
//! println!("{:?}", vm.wait(Some(std::time::Duration::from_secs(5))));
//! vm.kill();
//! # Ok(()) }
//! ```

mod control;
mod snapshot;

pub use snapshot::SnapshotStats;
pub(crate) use snapshot::{DirtyLog, SnapshotRef};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::Serial;
use devices::virtio::mmio::MmioTransport;
use devices::GuestMemory;
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::build::RestoreTimings;
use crate::config::{RestoreOptions, VmBuilder, VmConfig};
use crate::console::ConsoleTail;
use crate::cpu::vcpu::{VcpuContext, VcpuHandle};
use crate::error::{Error, Result, PVM_HINT};
use crate::exit::{ExitState, VmExit};
use crate::gate::PauseGate;
use crate::host::KvmFlavor;
use crate::runtime_dir::RuntimeDir;

/// How a [`Vm::stall_report`] line naming a sign of the VMM's fault starts.
pub const VMM_AT_FAULT: &str = "VMM at fault: ";

/// Most bytes of annotation a VM carries into its snapshots.
pub const MAX_ANNOTATION: usize = 64 << 10;

pub struct Vm {
    pub(crate) config: VmConfig,
    pub(crate) flavor: KvmFlavor,
    pub(crate) kvm: Kvm,
    pub(crate) vm_fd: VmFd,
    pub(crate) mem: GuestMemory,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) event_loop: Option<JoinHandle<()>>,
    pub(crate) gate: Arc<PauseGate>,
    pub(crate) paused: bool,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) wake: EventFd,
    pub(crate) exit: Arc<ExitState>,
    pub(crate) console: ConsoleTail,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) dirty: DirtyLog,
    /// Serves a lazily restored VM's memory (`MemoryBackend::Uffd`).
    pub(crate) uffd: Option<snapshot_crate::uffd::UffdServer>,
    /// The files outside any snapshot this VM's devices are built over
    /// (the raw disk images), in device order.
    pub(crate) external_files: Vec<PathBuf>,
    pub(crate) vsock_path: PathBuf,
    pub(crate) started: Instant,
    /// What the embedding program keeps with this VM's snapshots.
    pub(crate) annotation: Vec<u8>,
    pub(crate) restore_timings: Option<RestoreTimings>,
    pub(crate) vcpu_ctx: Arc<VcpuContext>,
    // Last: removes the sockets after everything using them is gone.
    pub(crate) runtime: RuntimeDir,
}

use ::snapshot as snapshot_crate;

impl Vm {
    pub fn builder() -> VmBuilder {
        VmBuilder::default()
    }

    /// Restores a snapshot taken with [`Vm::snapshot`] into a new VM and
    /// resumes it (see [`crate::build::restore`]).
    pub fn restore(dir: impl AsRef<Path>, options: RestoreOptions) -> Result<Vm> {
        crate::build::restore(dir.as_ref(), options)
    }

    /// The configuration it booted with; for a restored VM, its vCPUs and
    /// memory and the options of the restore.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The host's KVM flavour, as detected at boot.
    pub fn kvm_flavor(&self) -> KvmFlavor {
        self.flavor
    }

    /// The host side of the VM's vsock device (see
    /// [`devices::virtio::vsock::muxer`]).
    pub fn vsock_path(&self) -> &Path {
        &self.vsock_path
    }

    pub fn runtime_dir(&self) -> &Path {
        &self.runtime.path
    }

    /// The raw images under the VM's disks, in order: what a restore of
    /// its snapshots names again.
    pub fn external_files(&self) -> &[PathBuf] {
        &self.external_files
    }

    /// When `boot()` or `restore()` began.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// Where a restore's time went, for a restored VM.
    pub fn restore_timings(&self) -> Option<&RestoreTimings> {
        self.restore_timings.as_ref()
    }

    /// The annotation a restored VM's snapshot carried (empty otherwise).
    pub fn annotation(&self) -> &[u8] {
        &self.annotation
    }

    /// Bytes kept with every later snapshot of this VM, opaque to the VMM
    /// (the sandbox layer records what it knows of the guest there).
    pub fn set_annotation(&mut self, bytes: Vec<u8>) -> Result<()> {
        if bytes.len() > MAX_ANNOTATION {
            return Err(Error::Config(format!(
                "an annotation holds at most {MAX_ANNOTATION} bytes"
            )));
        }
        self.annotation = bytes;
        Ok(())
    }

    /// The last lines the guest printed on its console.
    pub fn console_tail(&self, lines: usize) -> String {
        self.console.last_lines(lines)
    }

    /// Why the VM stopped, if it has.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.exit.get()
    }

    /// The error that says how the VM ended, with its console; for a
    /// guest this host's KVM cannot run, what is needed instead.
    pub fn exit_error(&self, exit: VmExit) -> Error {
        match exit {
            VmExit::Unsupported(message) => Error::Unsupported {
                flavor: self.flavor,
                hint: format!("{message}. {PVM_HINT}"),
            },
            other => Error::Stopped {
                exit: other.to_string(),
                console: self.console_tail(20),
            },
        }
    }

    /// What the VM is doing, for a guest that stopped answering: every
    /// virtio queue's indices and pending interrupt (a queue whose avail
    /// index is ahead of what the device has seen lost a notification),
    /// where each vCPU is (sampled by pausing it for a moment), the vCPU
    /// and device threads' state and CPU time, and the console's last
    /// lines.
    ///
    /// First come the signs, watched for half a second, that the VMM is at
    /// fault (each line starting with [`VMM_AT_FAULT`]); none means the
    /// guest stopped by itself.
    pub fn stall_report(&self) -> String {
        let positions = if self.paused {
            String::new()
        } else {
            crate::diagnose::vcpu_positions(&self.vcpus, 3)
        };
        // A vCPU that does not answer a pause is stuck outside the guest.
        let mut faults =
            crate::diagnose::vmm_at_fault(&self.mem, &self.transports, &self.vcpu_ctx.threads);
        if positions.contains(" ? (") {
            faults.push("a vCPU thread did not answer a pause".into());
        }
        let faults: String = faults
            .iter()
            .map(|f| format!("{VMM_AT_FAULT}{f}\n"))
            .collect();
        format!(
            "{faults}{}{positions}{}\nconsole:\n{}",
            crate::diagnose::queue_report(&self.mem, &self.transports),
            self.vcpu_ctx.threads.report(),
            self.console_tail(10)
        )
    }

    /// How the userfaultfd server of a lazily restored VM has done.
    pub fn uffd_stats(&self) -> Option<snapshot_crate::uffd::ServeStats> {
        self.uffd.as_ref().map(|s| s.stats())
    }

    /// Waits up to `timeout` (forever with `None`) for the VM to stop on
    /// its own; once it has, its threads are stopped too.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<VmExit> {
        let exit = self.exit.wait(timeout);
        if exit.is_some() {
            self.stop_threads();
        }
        exit
    }

    /// A handle that waits for the VM's end from another thread.
    pub fn exit_watch(&self) -> ExitWatch {
        ExitWatch(self.exit.clone())
    }

    /// Stops the VM immediately; returns how it ended (`Stopped` unless it
    /// had ended already).
    pub fn kill(&mut self) -> VmExit {
        self.exit.set(VmExit::Stopped);
        self.stop_threads();
        self.exit.get().unwrap_or(VmExit::Stopped)
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.gate.release();
        let _ = self.wake.write(1);
        let deadline = Instant::now() + crate::threads::STOP_TIMEOUT;
        let mut all_stopped = true;
        // A kick can land just before a vCPU enters KVM_RUN; repeat until
        // every thread has noticed.
        for handle in self.vcpus.drain(..) {
            all_stopped &= handle.join_by(deadline);
        }
        if let Some(handle) = self.event_loop.take() {
            let wake = &self.wake;
            all_stopped &= crate::threads::join_by(handle, deadline, |_| {
                let _ = wake.write(1);
            });
        }
        if let Some(mut server) = self.uffd.take() {
            if all_stopped {
                // Nothing touches guest memory any more.
                server.stop();
            } else {
                // A thread left running may still fault on guest memory:
                // keep serving it rather than leave it waiting forever.
                std::mem::forget(server);
            }
        }
    }
}

/// Waits for a VM's end without holding the VM (see [`Vm::exit_watch`]).
#[derive(Clone)]
pub struct ExitWatch(Arc<ExitState>);

impl ExitWatch {
    pub fn get(&self) -> Option<VmExit> {
        self.0.get()
    }
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmExit> {
        self.0.wait(timeout)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.exit.set(VmExit::Stopped);
        self.stop_threads();
    }
}
