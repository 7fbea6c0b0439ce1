//! Building a machine, for a boot ([`boot`]) or from a snapshot
//! ([`restore`]): both set up the same foundation (runtime directory,
//! console, legacy devices) and assemble the same [`Vm`].

mod boot;
mod restore;

pub use boot::boot;
pub use restore::{restore, RestoreTimings};

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::SerialSnapshot;
use devices::GuestMemory;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::console::{ConsoleSink, ConsoleTail, RotatingLog};
use crate::cpu::state as cpu_state;
use crate::cpu::vcpu;
use crate::device_manager::{self, DeviceManager};
use crate::error::{Error, Result};
use crate::event_loop::{self, Control, LoopShared};
use crate::exit::ExitState;
use crate::gate::PauseGate;
use crate::host::KvmFlavor;
use crate::runtime_dir::RuntimeDir;
use crate::vm::{DirtyLog, Vm};

/// The guest's vsock context id.
pub const GUEST_CID: u64 = 3;

/// What every VM has before its own devices: a runtime directory, the
/// console and the legacy devices on the I/O bus.
pub(crate) struct Foundation {
    pub runtime: RuntimeDir,
    pub wake: EventFd,
    pub exit: Arc<ExitState>,
    pub console: ConsoleTail,
    pub devices: DeviceManager,
    pub vsock_path: PathBuf,
}

/// Where the console goes.
pub(crate) struct ConsoleOptions<'a> {
    pub log: Option<&'a Path>,
    pub to_stderr: bool,
}

impl Foundation {
    pub fn new(
        vm_fd: &VmFd,
        runtime: RuntimeDir,
        console: ConsoleOptions,
        serial_state: Option<&SerialSnapshot>,
    ) -> Result<Foundation> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let exit = Arc::new(ExitState::new(wake.try_clone()?));
        let log_path = console
            .log
            .map_or_else(|| runtime.path.join("console.log"), Path::to_path_buf);
        let tail = ConsoleTail::default();
        let sink = Box::new(ConsoleSink::new(
            Some(RotatingLog::create(&log_path)?),
            console.to_stderr,
            tail.clone(),
        ));
        let mut devices = DeviceManager::new()?;
        let reset = EventFd::new(libc::EFD_NONBLOCK)?;
        devices.add_legacy(vm_fd, sink, serial_state, reset.try_clone()?)?;
        devices.add_subscriber(Box::new(Mutex::new(Control {
            reset,
            wake: wake.try_clone()?,
            exit: exit.clone(),
        })));
        let vsock_path = runtime.path.join("vsock.sock");
        Ok(Foundation {
            runtime,
            wake,
            exit,
            console: tail,
            devices,
            vsock_path,
        })
    }
}

/// Starts the device event loop and assembles the `Vm`, without vCPUs.
pub(crate) fn assemble(
    config: VmConfig,
    kvm: Kvm,
    vm_fd: VmFd,
    mem: GuestMemory,
    foundation: Foundation,
    started: Instant,
) -> Result<Vm> {
    let Foundation {
        runtime,
        wake,
        exit,
        console,
        mut devices,
        vsock_path,
    } = foundation;
    let Some(serial) = devices.serial.take() else {
        return Err(Error::Device("the serial console is required".into()));
    };
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(PauseGate::default());
    let threads = Arc::new(crate::diagnose::Threads::default());
    let event_loop = event_loop::spawn(
        devices.take_subscribers(),
        device_manager::virtio_devices(&devices.transports),
        LoopShared {
            stop: stop.clone(),
            exit: exit.clone(),
            gate: gate.clone(),
            threads: threads.clone(),
        },
    )?;
    let flavor = KvmFlavor::detect();
    let vcpu_ctx = Arc::new(vcpu::VcpuContext {
        pio: Arc::new(devices.pio),
        mmio: Arc::new(devices.mmio),
        exit: exit.clone(),
        stop: stop.clone(),
        flavor,
        msrs_to_save: cpu_state::msrs_to_save(&kvm)?,
        threads,
    });
    Ok(Vm {
        config,
        flavor,
        kvm,
        vm_fd,
        mem,
        vcpus: Vec::new(),
        event_loop: Some(event_loop),
        gate,
        paused: false,
        stop,
        wake,
        exit,
        console,
        serial,
        transports: devices.transports,
        dirty: DirtyLog::default(),
        uffd: None,
        external_files: Vec::new(),
        vsock_path,
        started,
        annotation: Vec::new(),
        restore_timings: None,
        vcpu_ctx,
        runtime,
    })
}

impl Vm {
    pub(crate) fn spawn_vcpus(&mut self, fds: Vec<VcpuFd>, paused: bool) -> Result<()> {
        for (i, fd) in fds.into_iter().enumerate() {
            self.vcpus
                .push(vcpu::spawn(fd, i as u8, self.vcpu_ctx.clone(), paused)?);
        }
        if paused {
            // Devices rest too until the VM runs.
            self.gate.request();
            let _ = self.wake.write(1);
            if !self.gate.wait_parked(std::time::Duration::from_secs(5)) {
                return Err(Error::NotRunning(
                    "the device event loop did not pause".into(),
                ));
            }
        }
        self.paused = paused;
        Ok(())
    }
}
