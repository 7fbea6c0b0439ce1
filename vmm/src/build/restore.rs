//! A machine from a snapshot: everything in it is read and checked, and
//! every device built, before a VM is created; any failure drops what was
//! built, so no half-started VM is left behind.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use devices::virtio::persist::{self as device_persist, RestoreContext, SharedDevice};
use devices::GuestMemory;

use super::{assemble, ConsoleOptions, Foundation};
use crate::config::{MemoryBackend, RestoreOptions, VmConfig};
use crate::cpu::state as cpu_state;
use crate::error::{Error, Result};
use crate::memory;
use crate::persist::{self, MemoryLayer, Snapshot};
use crate::vm::{SnapshotRef, Vm};
use crate::vstate;

/// Where a restore's time went, phase by phase, in order.
#[derive(Clone, Debug, Default)]
pub struct RestoreTimings {
    /// (phase, time); names are the VMM's own, or a child's, as it said.
    pub phases: Vec<(std::borrow::Cow<'static, str>, Duration)>,
}

impl RestoreTimings {
    pub fn total(&self) -> Duration {
        self.phases.iter().map(|(_, d)| *d).sum()
    }
}

impl std::fmt::Display for RestoreTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (phase, d) in &self.phases {
            writeln!(f, "  {phase:<28} {:>9.3} ms", d.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

struct Stopwatch {
    timings: RestoreTimings,
    at: Instant,
}

impl Stopwatch {
    fn lap(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.timings.phases.push((phase.into(), now - self.at));
        self.at = now;
    }
}

/// Restores the snapshot in `dir` into a new VM and resumes it (unless
/// asked to leave it paused).
pub fn restore(dir: &Path, options: RestoreOptions) -> Result<Vm> {
    let started = Instant::now();
    let mut clock = Stopwatch {
        timings: RestoreTimings::default(),
        at: started,
    };
    let (state_path, bytes) = persist::read_state_file(dir)?;
    let snap = Snapshot::from_bytes(&state_path, &bytes)?;
    let externals = snap.external_files();
    if options.disks.len() != externals.len() {
        return Err(Error::DisksNotNamed {
            expected: externals.len(),
            given: options.disks.len(),
            list: externals
                .iter()
                .enumerate()
                .map(|(i, f)| format!("\n  disk {i}: {:?}, {} bytes", f.name, f.size))
                .collect(),
        });
    }
    let mut chain = persist::memory_chain(dir, &snap)?;
    clock.lap("read and check the state");

    let runtime = crate::runtime_dir::RuntimeDir::new(options.runtime_dir.as_deref())?;
    let work_dir = options
        .layer_dir
        .clone()
        .unwrap_or_else(|| runtime.path.clone());
    crate::private::ensure_private_dir(&work_dir)?;
    let devices = restore_devices(dir, &snap, &options, &work_dir, &runtime.path)?;
    clock.lap("open disks and devices");

    let (kvm, vm_fd) = vstate::create_vm()?;
    let supported = vstate::supported_cpuid(&kvm)?;
    let mut fds = Vec::new();
    for i in 0..snap.vcpus.len() {
        let fd = vm_fd
            .create_vcpu(i as u64)
            .map_err(Error::kvm("creating a vCPU"))?;
        fds.push(fd);
    }
    // What a guest booted here would be shown, as KVM reports it back
    // (PVM adjusts CPUID to the host's: its guests' user code runs
    // natively).
    let here = vstate::cpuid_shown(&fds[0], &supported, snap.info.cpus)?;
    snap.check_host(&persist::cpu_vendor(&supported), &here)?;
    clock.lap("create the KVM VM and vCPUs");

    let root = chain.remove(0);
    let (mem, uffd) = map_memory(dir, &snap, root, &chain, options.memory)?;
    memory::register(&vm_fd, &mem, options.track_dirty)?;
    clock.lap("map guest memory");

    // Interrupt controllers, then vCPUs, then devices: an interrupt a
    // restored device raises is delivered into a LAPIC, and restoring the
    // LAPIC afterwards would erase it.
    vstate::restore(&vm_fd, &snap.vm)?;
    for (fd, state) in fds.iter().zip(&snap.vcpus) {
        cpu_state::restore(fd, state)?;
    }
    clock.lap("restore vCPU and VM state");

    let mut foundation = Foundation::new(
        &vm_fd,
        runtime,
        ConsoleOptions {
            log: options.console_log.as_deref(),
            to_stderr: options.console_to_stderr,
        },
        Some(&snap.devices.serial),
    )?;
    for (device, saved) in devices.into_iter().zip(&snap.devices.virtio) {
        foundation
            .devices
            .add_virtio(&vm_fd, &mem, device, Some(&saved.transport))?;
    }
    let info = &snap.info;
    let config = VmConfig {
        cpus: info.cpus,
        memory_mib: info.memory_mib,
        console_to_stderr: options.console_to_stderr,
        console_log: options.console_log.clone(),
        runtime_dir: options.runtime_dir.clone(),
        layer_dir: options.layer_dir.clone(),
        start_paused: options.start_paused,
        ..VmConfig::default()
    };
    let mut vm = assemble(config, kvm, vm_fd, mem, foundation, started)?;
    vm.uffd = uffd;
    vm.external_files = options
        .disks
        .iter()
        .map(|d| d.name().to_path_buf())
        .collect();
    vm.annotation = info.annotation.clone();
    if options.track_dirty {
        vm.dirty.on = true;
        vm.dirty.last_snapshot = Some(SnapshotRef {
            dir: std::path::absolute(dir)?,
            id: info.id,
            depth: chain.len(),
        });
    }
    vm.spawn_vcpus(fds, true)?;
    clock.lap("attach devices, start threads");
    if !options.start_paused {
        vm.resume()?;
        clock.lap("resume");
    }
    vm.restore_timings = Some(clock.timings);
    Ok(vm)
}

/// Builds every device of the snapshot, each from its own state, over the
/// files the caller named for those that have one.
fn restore_devices(
    dir: &Path,
    snap: &Snapshot,
    options: &RestoreOptions,
    work_dir: &Path,
    runtime_dir: &Path,
) -> Result<Vec<SharedDevice>> {
    let vsock_path = runtime_dir.join("vsock.sock");
    let mut named = options.disks.iter();
    let mut kinds: Vec<u32> = Vec::new();
    let mut built = Vec::with_capacity(snap.devices.virtio.len());
    for (n, saved) in snap.devices.virtio.iter().enumerate() {
        let saved = &saved.device;
        let index = kinds.iter().filter(|k| **k == saved.kind).count();
        kinds.push(saved.kind);
        let external = match saved.external {
            Some(_) => named.next(),
            None => None,
        };
        let ctx = RestoreContext {
            snapshot_dir: dir,
            work_dir,
            index,
            external,
            vsock_path: &vsock_path,
            flush: options.flush,
        };
        let device = device_persist::restore(saved, &ctx)
            .map_err(|e| Error::Snapshot(format!("virtio device {n}: {e}")))?;
        built.push(device);
    }
    Ok(built)
}

/// Guest memory for the snapshot: the full snapshot at the bottom of the
/// chain as the backend says, then each diff on top, oldest first (their
/// pages become this VM's own).
fn map_memory(
    dir: &Path,
    snap: &Snapshot,
    root: MemoryLayer,
    diffs: &[MemoryLayer],
    backend: MemoryBackend,
) -> Result<(GuestMemory, Option<snapshot::uffd::UffdServer>)> {
    if root.dirty.is_some() {
        return Err(Error::Snapshot(format!(
            "{}: the oldest snapshot of the chain is a diff",
            root.dir.display()
        )));
    }
    let layout: Vec<_> = snap
        .info
        .regions
        .iter()
        .map(|r| snapshot::memory::RegionLayout {
            guest_addr: r.guest_addr,
            size: r.size,
            file_offset: r.file_offset,
        })
        .collect();
    let regions: Vec<_> = layout
        .iter()
        .map(|r| (r.guest_addr, r.size, r.file_offset))
        .collect();
    let mut uffd = None;
    let mem = match backend {
        MemoryBackend::File => memory::map_file(root.file, &regions)?,
        MemoryBackend::Uffd { prefetch } => {
            let mem = memory::create(snap.info.memory_mib << 20)?;
            let ranges = memory::host_ranges(&mem, &layout)?;
            let working_set = if prefetch {
                persist::read_working_set(dir, &snap.info)
                    .filter(|w| w.chunk as usize == snapshot::uffd::DEFAULT_CHUNK)
                    .map(|w| w.offsets)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            // SAFETY: `mem` is freshly mapped anonymous memory, not yet
            // touched, and the VM keeps it mapped until the server is
            // stopped (`stop_threads`, before `mem` is dropped).
            let started = unsafe {
                snapshot::uffd::UffdServer::start(
                    root.file,
                    ranges,
                    snapshot::uffd::DEFAULT_CHUNK,
                    &working_set,
                )
            };
            match started {
                Ok(server) => {
                    uffd = Some(server);
                    mem
                }
                // userfaultfd for kernel-mode faults needs privilege
                // (root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd):
                // fall back to the file mapping rather than fail.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    log::warn!(
                        "restore: userfaultfd not permitted ({e}); mapping the memory file instead"
                    );
                    let file = File::open(root.dir.join(persist::MEMORY_FILE))?;
                    memory::map_file(file, &regions)?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    for diff in diffs {
        let dirty = diff.dirty.as_deref().unwrap_or_default();
        snapshot::memory::apply_diff(&mem, &diff.file, &layout, dirty).map_err(|e| {
            Error::Snapshot(format!("applying the diff in {}: {e}", diff.dir.display()))
        })?;
    }
    memory::clear_device_dirty(&mem);
    Ok((mem, uffd))
}
