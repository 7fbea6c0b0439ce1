//! The public face of the VMM: build a VM, boot it, talk to its agent,
//! stop it.
//!
//! ```no_run
//! # fn main() -> Result<(), vmm::Error> {
//! use std::time::Duration;
//! let mut vm = vmm::Vm::builder()
//!     .kernel("vmlinux")
//!     .initramfs("initramfs.cpio")
//!     .cpus(2)
//!     .memory_mib(256)
//!     .boot()?;
//! vm.wait_ready(Duration::from_secs(10))?;
//! let out = vm.exec(["uname", "-a"])?;
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//! vm.shutdown(Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{Serial, SerialSnapshot, I8042};
use devices::virtio::block::{Block, BlockState};
use devices::virtio::mmio::{MmioState, MmioTransport, MMIO_LEN, NOTIFY_OFFSET};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::{Vsock, VsockState};
use devices::virtio::{DeviceState, RingMap, VirtioDevice};
use devices::Bus;
use devices::GuestMemory;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use guest_agent::{AgentClient, ExecRequest, Identity, Output};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use linux_loader::loader::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::boot;
use crate::console::{ConsoleSink, ConsoleTail, RotatingLog};
use crate::cpu::state as cpu_state;
use crate::cpu::vcpu::{self, VcpuHandle};
use crate::cpu::{cpuid, regs};
use crate::error::{Error, Result, PVM_HINT};
use crate::exit::{ExitState, VmExit};
use crate::gate::PauseGate;
use crate::host::KvmFlavor;
use crate::layout::*;
use crate::memory;
use crate::persist::{
    self, DevicesState, SavedDisk, SavedRegion, Snapshot, SnapshotInfo, VirtioSnapshot, VmState,
};
use crate::ready::{connect_agent_by, connect_agent_with, AgentWait, ReadyListener};

/// How long connecting to the agent may take once it said it is ready.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The least time a guest that just announced its agent gets to answer
/// on the agent port, however late in the ready timeout it announced.
const AGENT_ANSWER_MIN: Duration = Duration::from_secs(5);
/// How long a restored guest may take, by default, to come back: take its
/// vsock reset, accept the agent connection and apply its identity.
/// Generous: dozens of forks resuming at once on a busy host all do this
/// first.
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

/// The guest's vsock context id.
pub const GUEST_CID: u64 = 3;

const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule tsc=reliable no_timer_check";

/// A disk attached as virtio-blk.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Everything needed to boot a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u64,
    /// Disks in order: the first is `/dev/vda`.
    pub disks: Vec<DiskConfig>,
    /// Boot into `/dev/vda` instead of staying in the initramfs.
    pub root_on_disk: bool,
    pub hostname: String,
    pub extra_cmdline: Vec<String>,
    /// Print the kernel's boot messages (slower: every byte is an exit).
    pub verbose_console: bool,
    /// Copy the console to this process's stderr.
    pub console_to_stderr: bool,
    /// Keep the console in this file (default: in the runtime directory).
    pub console_log: Option<PathBuf>,
    /// Where sockets live (default: a fresh directory under the system's
    /// temporary directory, removed when the VM is dropped).
    pub runtime_dir: Option<PathBuf>,
    /// Where the copy-on-write layer a snapshot puts over each writable
    /// disk lives (default: the runtime directory). After a snapshot the
    /// VM writes there, not to the disk it booted with: those writes are
    /// kept by a later snapshot (which links the layer into its own
    /// directory) and otherwise go when the VM does. Layers under it stay
    /// in the directories of the snapshots that froze them.
    pub layer_dir: Option<PathBuf>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: PathBuf::new(),
            initramfs: None,
            cpus: 1,
            memory_mib: 256,
            disks: Vec::new(),
            root_on_disk: false,
            hostname: "capsule".into(),
            extra_cmdline: Vec::new(),
            verbose_console: false,
            console_to_stderr: false,
            console_log: None,
            runtime_dir: None,
            layer_dir: None,
        }
    }
}

/// Builds a [`Vm`].
#[derive(Default)]
pub struct VmBuilder {
    config: VmConfig,
}

impl VmBuilder {
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.kernel = path.into();
        self
    }
    pub fn initramfs(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.initramfs = Some(path.into());
        self
    }
    pub fn cpus(mut self, cpus: u8) -> Self {
        self.config.cpus = cpus;
        self
    }
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.config.memory_mib = mib;
        self
    }
    /// Attaches a raw disk image.
    pub fn disk(mut self, path: impl Into<PathBuf>, read_only: bool) -> Self {
        self.config.disks.push(DiskConfig {
            path: path.into(),
            read_only,
        });
        self
    }
    /// Attaches `path` as `/dev/vda` and makes it the root filesystem.
    pub fn rootfs(mut self, path: impl Into<PathBuf>, read_only: bool) -> Self {
        self.config.disks.insert(
            0,
            DiskConfig {
                path: path.into(),
                read_only,
            },
        );
        self.config.root_on_disk = true;
        self
    }
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.config.hostname = name.into();
        self
    }
    pub fn cmdline_arg(mut self, arg: impl Into<String>) -> Self {
        self.config.extra_cmdline.push(arg.into());
        self
    }
    pub fn verbose_console(mut self, on: bool) -> Self {
        self.config.verbose_console = on;
        self
    }
    pub fn console_to_stderr(mut self, on: bool) -> Self {
        self.config.console_to_stderr = on;
        self
    }
    pub fn console_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.console_log = Some(path.into());
        self
    }
    pub fn runtime_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.runtime_dir = Some(path.into());
        self
    }
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Creates the VM and starts its vCPUs.
    pub fn boot(self) -> Result<Vm> {
        Vm::boot(self.config)
    }
}

/// A directory for the VM's sockets and logs, removed on drop if we made it.
struct RuntimeDir {
    path: PathBuf,
    owned: bool,
}

impl RuntimeDir {
    fn new(requested: Option<&Path>) -> Result<Self> {
        if let Some(p) = requested {
            crate::private::ensure_private_dir(p)?;
            return Ok(RuntimeDir {
                path: p.to_path_buf(),
                owned: false,
            });
        }
        Ok(RuntimeDir {
            path: crate::private::temp_dir("capsule-")?,
            owned: true,
        })
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Watches for the guest's i8042 reset and for the host's wake-up call.
struct Control {
    reset: EventFd,
    wake: EventFd,
    exit: Arc<ExitState>,
}

const RESET_TOKEN: u32 = 1;
const WAKE_TOKEN: u32 = 2;

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [(&self.reset, RESET_TOKEN), (&self.wake, WAKE_TOKEN)] {
            if let Err(e) = ops.add(Events::with_data(fd, token, EventSet::IN)) {
                log::error!("cannot watch a control event: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            RESET_TOKEN => {
                let _ = self.reset.read();
                self.exit.set(VmExit::GuestReset);
            }
            _ => {
                let _ = self.wake.read();
            }
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How a restored VM's memory is backed. The default is the one that
/// restores to a first command fastest (`benches/snapshot.rs`, see
/// docs/PERFORMANCE.md): the file mapping, which also lets forks share
/// memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryBackend {
    /// A private copy-on-write mapping of the memory file: pages come from
    /// the page cache on first touch, shared by every VM restored from the
    /// same file.
    #[default]
    File,
    /// Anonymous memory filled on first touch by a userfaultfd handler
    /// thread, a chunk at a time, from the memory file. Touched pages are
    /// the VM's own (not shared with other forks). With `prefetch`, the
    /// chunks recorded in the snapshot's working set
    /// ([`Vm::save_working_set`]) are copied in before the guest runs.
    Uffd { prefetch: bool },
}

/// How to restore a snapshot.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub memory: MemoryBackend,
    /// Where sockets live (default: a fresh temporary directory).
    pub runtime_dir: Option<PathBuf>,
    /// Keep the console in this file (default: in the runtime directory).
    pub console_log: Option<PathBuf>,
    /// Copy the console to this process's stderr.
    pub console_to_stderr: bool,
    /// Log the pages the guest writes from the start, so the restored VM's
    /// next snapshot can be a diff against this one ([`Vm::snapshot_diff`]).
    pub track_dirty: bool,
    /// Where each writable disk's own copy-on-write layer over the
    /// snapshot's frozen disk goes (default: the runtime directory, so a
    /// replica's writes vanish with it).
    pub layer_dir: Option<PathBuf>,
    /// The raw image under each of the snapshot's disks, in the order the
    /// VM had them (the root filesystem first). A snapshot never names a
    /// file outside its own directory, so these are named again here, and
    /// each is checked to be the image the snapshot was taken with (size
    /// and modification time).
    pub disks: Vec<PathBuf>,
    /// Hostname and machine id for the restored guest (a fork wants new
    /// ones, see [`fork_identity`]); left as they were if unset. The
    /// guest's wall clock is corrected and its kernel RNG reseeded from
    /// the host on every restore regardless.
    pub identity: Identity,
    /// How long the resumed guest may take to answer its agent and apply
    /// its identity (default [`DEFAULT_RESTORE_TIMEOUT`]); a guest that
    /// takes longer fails the restore and is stopped.
    pub timeout: Option<Duration>,
}

/// The snapshot a VM's dirty log counts from.
#[derive(Clone, Debug)]
struct SnapshotRef {
    dir: PathBuf,
    id: u64,
    /// Diffs between it and a full snapshot.
    depth: usize,
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut bytes)
    })?;
    Ok(bytes)
}

/// A new identity for one fork: `hostname` and a random machine id.
pub fn fork_identity(hostname: impl Into<String>) -> Result<Identity> {
    let id: [u8; 16] = random_bytes()?;
    Ok(Identity {
        hostname: Some(hostname.into()),
        machine_id: Some(id.iter().map(|b| format!("{b:02x}")).collect()),
        ..Identity::default()
    })
}

/// What taking a snapshot did.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotStats {
    /// Guest memory bytes written (non-zero pages).
    pub memory_bytes_written: u64,
    /// Guest memory bytes left as holes because they were zero.
    pub memory_zero_bytes: u64,
    /// How long the guest was paused for it.
    pub paused_for: Duration,
}

/// The parts of a VM that boot and restore set up the same way: the
/// runtime directory, the console and the devices on their buses.
struct Machine {
    runtime: RuntimeDir,
    wake: EventFd,
    exit: Arc<ExitState>,
    console: ConsoleTail,
    console_file: Option<RotatingLog>,
    console_to_stderr: bool,
    pio: Bus,
    mmio: Bus,
    subscribers: Vec<Subscriber>,
    serial: Option<Arc<Mutex<Serial>>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    blocks: Vec<Arc<Mutex<Block>>>,
    vsock: Option<Arc<Mutex<Vsock>>>,
    vsock_path: PathBuf,
    /// Every active virtqueue ring of the VM, shared by the transports.
    rings: Arc<RingMap>,
}

impl Machine {
    fn new(
        runtime_dir: Option<&Path>,
        console_log: Option<PathBuf>,
        console_to_stderr: bool,
    ) -> Result<Machine> {
        let runtime = RuntimeDir::new(runtime_dir)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let exit = Arc::new(ExitState::new(wake.try_clone()?));
        let console_file =
            RotatingLog::create(&console_log.unwrap_or_else(|| runtime.path.join("console.log")))?;
        let vsock_path = runtime.path.join("vsock.sock");
        Ok(Machine {
            runtime,
            wake,
            exit,
            console: ConsoleTail::default(),
            console_file: Some(console_file),
            console_to_stderr,
            pio: Bus::new(),
            mmio: Bus::new(),
            subscribers: Vec::new(),
            serial: None,
            transports: Vec::new(),
            blocks: Vec::new(),
            vsock: None,
            vsock_path,
            rings: RingMap::new(),
        })
    }

    /// The serial console at COM1 (from a snapshot's state if given) and
    /// the i8042 reset line.
    fn add_legacy(&mut self, vm_fd: &VmFd, serial_state: Option<&SerialSnapshot>) -> Result<()> {
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(Error::kvm("wiring the serial interrupt"))?;
        let sink = Box::new(ConsoleSink::new(
            self.console_file.take(),
            self.console_to_stderr,
            self.console.clone(),
        ));
        let serial = match serial_state {
            None => Serial::new(serial_irq, sink),
            Some(state) => Serial::restore(state, serial_irq, sink).map_err(Error::Snapshot)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        self.pio
            .insert(COM1_PORT, 8, serial.clone())
            .map_err(|e| Error::Device(e.to_string()))?;
        self.serial = Some(serial);

        let reset = EventFd::new(libc::EFD_NONBLOCK)?;
        self.pio
            .insert(
                I8042_PORT,
                5,
                Arc::new(Mutex::new(I8042::new(reset.try_clone()?))),
            )
            .map_err(|e| Error::Device(e.to_string()))?;
        self.subscribers.push(Arc::new(Mutex::new(Control {
            reset,
            wake: self.wake.try_clone()?,
            exit: self.exit.clone(),
        })));
        Ok(())
    }

    /// Puts a virtio device on the next MMIO slot with its interrupt and
    /// queue notifications wired into KVM; with `state`, the transport
    /// picks up where a snapshot left it. Returns the slot's address and
    /// interrupt for the kernel command line.
    fn add_virtio(
        &mut self,
        vm_fd: &VmFd,
        mem: &GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        subscriber: Subscriber,
        state: Option<&MmioState>,
    ) -> Result<(u64, u32)> {
        let i = self.transports.len();
        let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_LEN;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        if irq >= IOAPIC_PINS {
            return Err(Error::Config("too many devices".into()));
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        // Registered before a restored transport can re-raise a pending
        // interrupt through it.
        vm_fd
            .register_irqfd(&irqfd, irq)
            .map_err(Error::kvm("wiring a virtio interrupt"))?;
        let transport = match state {
            None => MmioTransport::new(device, mem.clone(), irqfd, self.rings.clone())?,
            Some(state) => {
                MmioTransport::restore(device, mem.clone(), irqfd, self.rings.clone(), state)
                    .map_err(|e| Error::Snapshot(format!("virtio device {i}: {e}")))?
            }
        };
        for (q, evt) in transport.queue_events().iter().enumerate() {
            vm_fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), q as u32)
                .map_err(Error::kvm("binding a queue notification"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(base, MMIO_LEN, transport.clone())
            .map_err(|e| Error::Device(e.to_string()))?;
        self.transports.push(transport);
        self.subscribers.push(subscriber);
        Ok((base, irq))
    }

    fn add_block(
        &mut self,
        vm_fd: &VmFd,
        mem: &GuestMemory,
        block: Block,
        state: Option<&MmioState>,
    ) -> Result<(u64, u32)> {
        let block = Arc::new(Mutex::new(block));
        self.blocks.push(block.clone());
        self.add_virtio(vm_fd, mem, block.clone(), block, state)
    }

    fn add_vsock(
        &mut self,
        vm_fd: &VmFd,
        mem: &GuestMemory,
        saved: Option<(&VsockState, &MmioState)>,
    ) -> Result<(u64, u32)> {
        let vsock = match saved {
            None => Vsock::new(GUEST_CID, &self.vsock_path)?,
            Some((state, _)) => Vsock::restore(state, &self.vsock_path)?,
        };
        let vsock = Arc::new(Mutex::new(vsock));
        self.vsock = Some(vsock.clone());
        self.add_virtio(vm_fd, mem, vsock.clone(), vsock, saved.map(|s| s.1))
    }
}

/// A running (or stopped) microVM.
pub struct Vm {
    config: VmConfig,
    flavor: KvmFlavor,
    kvm: Kvm,
    vm_fd: VmFd,
    mem: GuestMemory,
    vcpus: Vec<VcpuHandle>,
    event_loop: Option<JoinHandle<()>>,
    gate: Arc<PauseGate>,
    paused: bool,
    stop: Arc<AtomicBool>,
    wake: EventFd,
    exit: Arc<ExitState>,
    console: ConsoleTail,
    serial: Arc<Mutex<Serial>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    blocks: Vec<Arc<Mutex<Block>>>,
    /// Numbers the disk layers this VM's snapshots create.
    layer_seq: u64,
    /// Whether KVM logs the pages the guest writes.
    dirty_log: bool,
    /// The snapshot the dirty log counts from: a diff snapshot is against
    /// it.
    last_snapshot: Option<SnapshotRef>,
    /// Serves a lazily restored VM's memory (`MemoryBackend::Uffd`).
    uffd: Option<snapshot::uffd::UffdServer>,
    vsock_path: PathBuf,
    /// Open until the agent announced itself, then closed so the guest
    /// cannot pile connections onto a socket nobody accepts from.
    ready_listener: Option<ReadyListener>,
    started: Instant,
    ready_after: Option<Duration>,
    agent: Option<AgentClient>,
    vcpu_ctx: Arc<vcpu::VcpuContext>,
    /// False while a restored guest has yet to drop the vsock connections
    /// it had at the snapshot.
    vsock_reset_done: Arc<AtomicBool>,
    // Last: removes the sockets after everything using them is gone.
    runtime: RuntimeDir,
}

/// Creates a KVM VM with the in-kernel interrupt controllers and PIT.
fn create_vm() -> Result<(Kvm, VmFd)> {
    let kvm = open_kvm()?;
    let vm_fd = kvm.create_vm().map_err(Error::kvm("creating the VM"))?;
    vm_fd
        .set_tss_address(KVM_TSS as usize)
        .map_err(Error::kvm("setting the TSS address"))?;
    vm_fd
        .create_irq_chip()
        .map_err(Error::kvm("creating the interrupt controller"))?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(Error::kvm("creating the PIT"))?;
    Ok((kvm, vm_fd))
}

fn irqchip(vm_fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm_fd
        .get_irqchip(&mut chip)
        .map_err(Error::kvm("reading the interrupt controller"))?;
    Ok(chip)
}

impl Vm {
    pub fn builder() -> VmBuilder {
        VmBuilder::default()
    }

    fn boot(config: VmConfig) -> Result<Vm> {
        let started = Instant::now();
        if config.cpus == 0 || config.cpus > MAX_VCPUS {
            return Err(Error::Config(format!("cpus must be 1..={MAX_VCPUS}")));
        }
        if !(32..=MAX_MEMORY_MIB).contains(&config.memory_mib) {
            return Err(Error::Config(format!(
                "memory must be 32 MiB to {} GiB, not {} MiB",
                MAX_MEMORY_MIB >> 10,
                config.memory_mib
            )));
        }
        if !valid_hostname(&config.hostname) {
            return Err(Error::Config(format!(
                "invalid hostname {:?}: use letters, digits, '-' and '.', at most 64",
                config.hostname
            )));
        }
        // Each is one word of the kernel command line.
        if let Some(bad) = config
            .extra_cmdline
            .iter()
            .find(|a| a.is_empty() || a.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(Error::Config(format!(
                "kernel command line argument {bad:?} must be one word"
            )));
        }
        let Some(initramfs) = config.initramfs.clone() else {
            return Err(Error::Config(
                "an initramfs holding the guest agent is required".into(),
            ));
        };
        let (kvm, vm_fd) = create_vm()?;
        let mem = memory::create(config.memory_mib << 20)?;
        memory::register(&vm_fd, &mem, false)?;
        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        let initrd = boot::load_initramfs(&mem, &initramfs)?;

        let mut machine = Machine::new(
            config.runtime_dir.as_deref(),
            config.console_log.clone(),
            config.console_to_stderr,
        )?;
        machine.add_legacy(&vm_fd, None)?;

        let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Config(e.to_string()))?;
        let mut add = |s: &str| {
            cmdline
                .insert_str(s)
                .map_err(|e| Error::Config(format!("kernel command line: {e}")))
        };
        add(BASE_CMDLINE)?;
        if !config.verbose_console {
            add("quiet")?;
        }
        add(&format!("capsule.hostname={}", config.hostname))?;
        if config.root_on_disk {
            add("capsule.root=/dev/vda")?;
            if config.disks.first().is_some_and(|d| d.read_only) {
                add("capsule.ro")?;
            }
        }
        for arg in &config.extra_cmdline {
            add(arg)?;
        }

        let mut slots = Vec::new();
        for disk in &config.disks {
            let block = Block::open(&disk.path, disk.read_only)
                .map_err(|e| Error::Device(e.to_string()))?;
            slots.push(machine.add_block(&vm_fd, &mem, block, None)?);
        }
        let rng = Arc::new(Mutex::new(Rng::new()?));
        slots.push(machine.add_virtio(&vm_fd, &mem, rng.clone(), rng, None)?);
        slots.push(machine.add_vsock(&vm_fd, &mem, None)?);
        for (base, irq) in slots {
            cmdline
                .add_virtio_mmio_device(MMIO_LEN, GuestAddress(base), irq, None)
                .map_err(|e| Error::Config(format!("kernel command line: {e}")))?;
        }

        boot::write_cmdline(&mem, &cmdline)?;
        let cmdline_len = cmdline
            .as_cstring()
            .map(|c| c.as_bytes_with_nul().len())
            .unwrap_or(0);
        boot::write_boot_info(&mem, &kernel, cmdline_len, Some(initrd))?;
        boot::write_boot_tables(&mem)?;
        boot::mptable::write(&mem, config.cpus)?;

        // The agent announces readiness on this port.
        let ready_listener = ReadyListener::bind(&machine.vsock_path)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("reading supported CPUID"))?;
        let mut vm = Vm::start(config, kvm, vm_fd, mem, machine, started)?;
        vm.ready_listener = Some(ready_listener);

        let mut fds = Vec::new();
        for i in 0..vm.config.cpus {
            let fd = vm
                .vm_fd
                .create_vcpu(u64::from(i))
                .map_err(Error::kvm("creating a vCPU"))?;
            fd.set_cpuid2(&cpuid::for_vcpu(&supported, i, vm.config.cpus))
                .map_err(Error::kvm("setting CPUID"))?;
            regs::setup_msrs(&vm.kvm, &fd)?;
            regs::setup_lapic(&fd)?;
            if i == 0 {
                regs::setup_regs(&fd, kernel.entry)?;
                regs::setup_sregs(&fd, kernel.entry)?;
                regs::setup_fpu(&fd)?;
            }
            fds.push(fd);
        }
        vm.spawn_vcpus(fds, false)?;
        Ok(vm)
    }

    /// Starts the device event loop and assembles the `Vm`, without vCPUs.
    fn start(
        config: VmConfig,
        kvm: Kvm,
        vm_fd: VmFd,
        mem: GuestMemory,
        machine: Machine,
        started: Instant,
    ) -> Result<Vm> {
        let Machine {
            runtime,
            wake,
            exit,
            console,
            pio,
            mmio,
            subscribers,
            serial,
            transports,
            blocks,
            vsock,
            vsock_path,
            ..
        } = machine;
        let (Some(serial), Some(vsock)) = (serial, vsock) else {
            return Err(Error::Device(
                "the serial console and vsock are required".into(),
            ));
        };
        let vsock_reset_done = devices::bus::lock(&vsock).reset_done();
        let mut event_manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| Error::Device(format!("event loop: {e:?}")))?;
        for s in subscribers {
            event_manager.add_subscriber(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(PauseGate::default());
        let (loop_stop, loop_exit, loop_gate) = (stop.clone(), exit.clone(), gate.clone());
        let threads = Arc::new(crate::diagnose::Threads::default());
        let loop_threads = threads.clone();
        let event_loop = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                loop_threads.register_current("devices");
                while !loop_stop.load(Ordering::Acquire) && loop_exit.get().is_none() {
                    loop_gate.park_if_requested(&loop_stop);
                    if let Err(e) = event_manager.run() {
                        loop_exit.set(VmExit::Error(format!("device event loop: {e:?}")));
                    }
                }
                // The VM is over: host programs talking to the guest must
                // see the connection close, not wait forever.
                devices::bus::lock(&vsock).disconnect_host();
            })?;
        let flavor = KvmFlavor::detect();
        let vcpu_ctx = Arc::new(vcpu::VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
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
            transports,
            blocks,
            layer_seq: 0,
            dirty_log: false,
            last_snapshot: None,
            uffd: None,
            vsock_path,
            ready_listener: None,
            started,
            ready_after: None,
            agent: None,
            vcpu_ctx,
            vsock_reset_done,
            runtime,
        })
    }

    fn spawn_vcpus(&mut self, fds: Vec<VcpuFd>, paused: bool) -> Result<()> {
        for (i, fd) in fds.into_iter().enumerate() {
            self.vcpus
                .push(vcpu::spawn(fd, i as u8, self.vcpu_ctx.clone(), paused)?);
        }
        self.paused = paused;
        Ok(())
    }

    /// Restores a snapshot taken with [`Vm::snapshot`] into a new VM and
    /// resumes it. Everything in the snapshot is checked before a VM is
    /// created, and any failure drops what was built: no half-started VM
    /// is left behind.
    pub fn restore(dir: impl AsRef<Path>, options: RestoreOptions) -> Result<Vm> {
        let started = Instant::now();
        let dir = dir.as_ref();
        let (state_path, bytes) = persist::read_state_file(dir)?;
        let snap = Snapshot::from_bytes(&state_path, &bytes)?;
        if options.disks.len() != snap.info.disks.len() {
            return Err(Error::DisksNotNamed {
                expected: snap.info.disks.len(),
                given: options.disks.len(),
                list: snap
                    .info
                    .disks
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        let root = if i == 0 && snap.info.root_on_disk {
                            ", the root filesystem"
                        } else {
                            ""
                        };
                        format!(
                            "\n  disk {i}: {:?}, {} bytes{root}",
                            d.base.name, d.base.size
                        )
                    })
                    .collect(),
            });
        }
        let mut chain = persist::memory_chain(dir, &snap)?;
        let (snap_id, diff_depth) = (snap.info.id, chain.len() - 1);
        // The disks before anything else is built: the caller's images
        // must be the snapshot's, and its layers must fit over them.
        let mut disks = Vec::with_capacity(snap.info.disks.len());
        for (n, ((disk, state), base)) in snap
            .info
            .disks
            .iter()
            .zip(snap.block_states())
            .zip(&options.disks)
            .enumerate()
        {
            let block = open_snapshot_disk(disk, base, dir, state)
                .map_err(|e| Error::Snapshot(format!("disk {n}: {e}")))?;
            disks.push(block);
        }
        let mut disks = disks.into_iter();
        let (kvm, vm_fd) = create_vm()?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("reading supported CPUID"))?;
        snap.check_host(&persist::cpu_vendor(&supported), &supported)?;

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
        let root = chain.remove(0);
        if root.dirty.is_some() {
            return Err(Error::Snapshot(format!(
                "{}: the oldest snapshot of the chain is a diff",
                root.dir.display()
            )));
        }
        let mut uffd = None;
        let mem = match options.memory {
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
                        log::warn!("restore: userfaultfd not permitted ({e}); mapping the memory file instead");
                        let file = File::open(root.dir.join(persist::MEMORY_FILE))?;
                        memory::map_file(file, &regions)?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        // Diffs on top, oldest first: their pages become this VM's own.
        for diff in &chain {
            let dirty = diff.dirty.as_deref().unwrap_or_default();
            snapshot::memory::apply_diff(&mem, &diff.file, &layout, dirty).map_err(|e| {
                Error::Snapshot(format!("applying the diff in {}: {e}", diff.dir.display()))
            })?;
        }
        memory::clear_device_dirty(&mem);
        memory::register(&vm_fd, &mem, options.track_dirty)?;

        // Interrupt controllers before vCPUs and devices: a restored
        // device may raise its interrupt at once.
        let vm_state = &snap.vm;
        vm_fd
            .set_pit2(&vm_state.pit)
            .map_err(Error::kvm("restoring the PIT"))?;
        let mut clock = vm_state.clock;
        // Only KVM_CLOCK_REALTIME is meaningful to set; the other flags
        // describe the source host's clock.
        clock.flags = 0;
        vm_fd
            .set_clock(&clock)
            .map_err(Error::kvm("restoring the VM clock"))?;
        for chip in [&vm_state.pic_master, &vm_state.pic_slave, &vm_state.ioapic] {
            vm_fd
                .set_irqchip(chip)
                .map_err(Error::kvm("restoring the interrupt controller"))?;
        }

        // vCPUs before devices: an interrupt a restored device raises is
        // delivered into a LAPIC, and restoring the LAPIC afterwards would
        // erase it.
        let mut fds = Vec::new();
        for (i, state) in snap.vcpus.iter().enumerate() {
            let fd = vm_fd
                .create_vcpu(i as u64)
                .map_err(Error::kvm("creating a vCPU"))?;
            cpu_state::restore(&fd, state)?;
            fds.push(fd);
        }

        let info = &snap.info;
        let config = VmConfig {
            cpus: info.cpus,
            memory_mib: info.memory_mib,
            disks: info
                .disks
                .iter()
                .zip(&options.disks)
                .map(|(d, path)| DiskConfig {
                    path: path.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            root_on_disk: info.root_on_disk,
            hostname: info.hostname.clone(),
            console_to_stderr: options.console_to_stderr,
            console_log: options.console_log.clone(),
            runtime_dir: options.runtime_dir.clone(),
            layer_dir: options.layer_dir.clone(),
            ..VmConfig::default()
        };
        let mut machine = Machine::new(
            options.runtime_dir.as_deref(),
            options.console_log.clone(),
            options.console_to_stderr,
        )?;
        if let Some(dir) = &options.layer_dir {
            crate::private::ensure_private_dir(dir)?;
        }
        machine.add_legacy(&vm_fd, Some(&snap.devices.serial))?;
        for (i, saved) in snap.devices.virtio.iter().enumerate() {
            let transport = Some(&saved.transport);
            match &saved.device {
                DeviceState::Block(state) => {
                    let n = machine.blocks.len();
                    let layer_dir = options
                        .layer_dir
                        .as_deref()
                        .unwrap_or(&machine.runtime.path);
                    let mut block = disks.next().ok_or_else(|| {
                        Error::Snapshot(format!("virtio device {i}: more disk devices than disks"))
                    })?;
                    if !state.read_only {
                        // A name no other VM sharing `layer_dir` uses (the
                        // file is created new, never replaced).
                        static COUNTER: AtomicU64 = AtomicU64::new(0);
                        let seq = COUNTER.fetch_add(1, Ordering::Relaxed);
                        let top =
                            layer_dir.join(format!("disk{n}-{}-{seq}.layer", std::process::id()));
                        block = block
                            .writable_layer(&top)
                            .map_err(|e| Error::Snapshot(format!("disk {n}: {e}")))?;
                    }
                    machine.add_block(&vm_fd, &mem, block, transport)?;
                }
                DeviceState::Rng => {
                    let rng = Arc::new(Mutex::new(Rng::new()?));
                    machine.add_virtio(&vm_fd, &mem, rng.clone(), rng, transport)?;
                }
                DeviceState::Vsock(state) => {
                    if state.guest_cid != GUEST_CID || machine.vsock.is_some() {
                        return Err(Error::Snapshot(format!(
                            "virtio device {i}: unexpected vsock device"
                        )));
                    }
                    machine.add_vsock(&vm_fd, &mem, Some((state, &saved.transport)))?;
                }
            }
        }
        let ready_listener = if info.agent_ready {
            None
        } else {
            Some(ReadyListener::bind(&machine.vsock_path)?)
        };

        let agent_ready = info.agent_ready;
        let mut vm = Vm::start(config, kvm, vm_fd, mem, machine, started)?;
        vm.ready_listener = ready_listener;
        vm.uffd = uffd;
        if options.track_dirty {
            vm.dirty_log = true;
            vm.last_snapshot = Some(SnapshotRef {
                dir: std::path::absolute(dir)?,
                id: snap_id,
                depth: diff_depth,
            });
        }
        vm.spawn_vcpus(fds, true)?;
        vm.resume()?;
        if agent_ready {
            let deadline = Instant::now() + options.timeout.unwrap_or(DEFAULT_RESTORE_TIMEOUT);
            let answered = vm.wait_vsock_reset(deadline).and_then(|()| {
                vm.ready_after = Some(started.elapsed());
                vm.send_identity(options.identity, deadline)
            });
            if let Err(e) = answered {
                // A guest that dies while resuming closes its agent
                // connection: say how it ended, not that it closed.
                if let Some(exit) = vm.exit.wait(Some(Duration::from_millis(200))) {
                    return Err(vm.exit_error(exit));
                }
                if !e.is_guest_unresponsive() {
                    return Err(e);
                }
                log::warn!(
                    "restore: the resumed guest stopped answering ({e}); the VM:\n{}",
                    vm.stall_report()
                );
                // Said as for a boot that never got ready, with the
                // console, which tells a stalled guest from a crashed one.
                return Err(match e {
                    e @ Error::NotReady { .. } => e,
                    e => Error::NotReady {
                        seconds: started.elapsed().as_secs_f64(),
                        console: format!("({e})\n{}", vm.console_tail(20)),
                    },
                });
            }
        }
        Ok(vm)
    }

    /// Freezes every writable disk for a snapshot in `dir` and moves the
    /// VM onto a fresh copy-on-write layer over it; returns the frozen
    /// images to record. A layer Capsule made earlier (in a runtime
    /// directory that vanishes with its VM) is kept in `dir` first.
    fn freeze_disks(&mut self, dir: &Path) -> Result<Vec<SavedDisk>> {
        let layer_dir = self
            .config
            .layer_dir
            .clone()
            .unwrap_or_else(|| self.runtime.path.clone());
        if !self.blocks.is_empty() {
            crate::private::ensure_private_dir(&layer_dir)?;
        }
        let mut saved = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let mut block = devices::bus::lock(block);
            let disk_error = |e: devices::virtio::block::BlockError| {
                Error::Snapshot(format!("freezing disk {i}: {e}"))
            };
            let depth = block.disk().depth();
            if !block.read_only() && depth >= devices::disk::MAX_DEPTH {
                return Err(Error::Snapshot(format!(
                    "disk {i} is already {depth} layers deep, the most a restore opens"
                )));
            }
            if !block.read_only() {
                self.layer_seq += 1;
                let top = layer_dir.join(format!("disk{i}-{}.layer", self.layer_seq));
                block.freeze(&top).map_err(disk_error)?;
            }
            // Everything under the VM's own layer is frozen now: the
            // snapshot keeps it, by name.
            let layers = block.keep_frozen_layers(dir, i).map_err(disk_error)?;
            let base = block.disk().raw_base().path();
            let name = base
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let (size, mtime_ns) = block.disk().raw_fingerprint()?;
            saved.push(SavedDisk {
                base: persist::ExternalImage {
                    name: name.chars().take(255).collect(),
                    size,
                    mtime_ns,
                },
                layers,
                read_only: block.read_only(),
            });
        }
        Ok(saved)
    }

    /// Tells the restored guest's agent who it is now and what time it is,
    /// and has it reseed its kernel RNG with fresh host entropy.
    fn send_identity(&mut self, mut identity: Identity, deadline: Instant) -> Result<()> {
        let seed: [u8; 64] = random_bytes()?;
        identity.entropy_hex = seed.iter().map(|b| format!("{b:02x}")).collect();
        identity.unix_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_nanos()).ok());
        if let Some(name) = &identity.hostname {
            self.config.hostname = name.clone();
        }
        let left = || deadline.saturating_duration_since(Instant::now());
        if self.agent.is_none() {
            // A guest resuming among many on a busy host may take all of
            // the restore's time to answer anything: keepalives must not
            // give up on it sooner.
            let options = guest_agent::ClientOptions {
                keepalive_timeout: left()
                    .max(guest_agent::ClientOptions::default().keepalive_timeout),
                ..Default::default()
            };
            self.agent = Some(connect_agent_with(&self.vsock_path, deadline, options)?);
            log::debug!("restore: the agent answered");
        }
        let agent = self.agent.as_ref().expect("just connected");
        let problems = agent.restored(identity, left())?;
        log::debug!("restore: the guest took its identity");
        // The guest writes these: a few, each cut short.
        for p in problems.iter().take(4) {
            let p: String = p.chars().take(200).collect();
            devices::guest_warn!("restore: the guest could not apply its identity: {p}");
        }
        Ok(())
    }

    /// Records which memory chunks this VM, restored with
    /// `MemoryBackend::Uffd`, has touched so far into its snapshot
    /// directory `dir`, for later restores to prefetch. Returns how many.
    pub fn save_working_set(&self, dir: impl AsRef<Path>) -> Result<usize> {
        let Some(server) = &self.uffd else {
            return Err(Error::Config(
                "only a VM restored with MemoryBackend::Uffd records a working set".into(),
            ));
        };
        let offsets = server.touched();
        let n = offsets.len();
        persist::write_working_set(
            dir.as_ref(),
            &persist::WorkingSet {
                chunk: snapshot::uffd::DEFAULT_CHUNK as u32,
                offsets,
            },
        )?;
        Ok(n)
    }

    /// What the VM is doing, for a guest that stopped answering: every
    /// virtio queue's indices and pending interrupt (a queue whose avail
    /// index is ahead of what the device has seen lost a notification),
    /// where each vCPU is (sampled by pausing it for a moment), the vCPU
    /// and device threads' state and CPU time, and the console's last
    /// lines.
    pub fn stall_report(&self) -> String {
        let positions = if self.paused {
            String::new()
        } else {
            crate::diagnose::vcpu_positions(&self.vcpus, 3)
        };
        format!(
            "{}{positions}{}\nconsole:\n{}",
            crate::diagnose::queue_report(&self.mem, &self.transports),
            self.vcpu_ctx.threads.report(),
            self.console_tail(10)
        )
    }

    /// How the userfaultfd server of a lazily restored VM has done.
    pub fn uffd_stats(&self) -> Option<snapshot::uffd::ServeStats> {
        self.uffd.as_ref().map(|s| s.stats())
    }

    /// Waits for a restored guest to drop the vsock connections it had at
    /// the snapshot; a connection made before that would be dropped too.
    fn wait_vsock_reset(&self, deadline: Instant) -> Result<()> {
        let started = Instant::now();
        while !self.vsock_reset_done.load(Ordering::Acquire) {
            if let Some(exit) = self.exit.get() {
                return Err(self.exit_error(exit));
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    seconds: started.elapsed().as_secs_f64(),
                    console: format!(
                        "(the restored guest did not take the vsock transport reset)\n{}",
                        self.console_tail(20)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Stops every vCPU and the device event loop. The guest's clock does
    /// not advance while it is paused.
    pub fn pause(&mut self) -> Result<()> {
        if self.paused {
            return Ok(());
        }
        if let Some(exit) = self.exit.get() {
            return Err(Error::NotRunning(exit.to_string()));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if let Err(e) = v.pause() {
                // Do not leave the VM half paused: this vCPU's pause is
                // still queued, so it gets a resume too.
                for v in &self.vcpus[..=i] {
                    let _ = v.resume();
                }
                return Err(e);
            }
        }
        self.paused = true;
        self.gate.request();
        let _ = self.wake.write(1);
        if !self.gate.wait_parked(Duration::from_secs(5)) {
            let _ = self.resume();
            return Err(Error::NotRunning(
                "the device event loop did not pause".into(),
            ));
        }
        Ok(())
    }

    /// Runs a paused VM again.
    pub fn resume(&mut self) -> Result<()> {
        if !self.paused {
            return Ok(());
        }
        self.gate.release();
        for v in &self.vcpus {
            v.resume()?;
        }
        self.paused = false;
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Writes a snapshot of the VM into `dir` (created if needed): its
    /// state file and its memory file. A running VM is paused for the
    /// duration and resumed after; a paused one stays paused. Writable
    /// disks are frozen where they are (the VM carries on in a
    /// copy-on-write layer) and must not change before a restore.
    pub fn snapshot(&mut self, dir: impl AsRef<Path>) -> Result<SnapshotStats> {
        self.take_snapshot(dir.as_ref(), false)
    }

    /// Like [`Vm::snapshot`], but the memory file holds only the pages
    /// written since this VM's previous snapshot (or the snapshot it was
    /// restored from with `track_dirty`), which must be kept: restoring
    /// the diff reads it too.
    pub fn snapshot_diff(&mut self, dir: impl AsRef<Path>) -> Result<SnapshotStats> {
        self.take_snapshot(dir.as_ref(), true)
    }

    fn take_snapshot(&mut self, dir: &Path, diff: bool) -> Result<SnapshotStats> {
        let parent = match (&self.last_snapshot, diff) {
            (_, false) => None,
            (Some(parent), true) if self.dirty_log => {
                if parent.depth + 1 >= persist::MAX_DIFF_CHAIN {
                    return Err(Error::Snapshot(format!(
                        "{} diff snapshots in a row is the most a restore follows: take a full one",
                        parent.depth + 1
                    )));
                }
                Some(parent.clone())
            }
            _ => {
                return Err(Error::Snapshot(
                    "a diff snapshot needs an earlier snapshot of this VM to be a diff against"
                        .into(),
                ))
            }
        };
        let dir = std::path::absolute(dir)?;
        // Never over an existing snapshot: its layers may be other disks'
        // bases and its memory other diffs' parent.
        if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(Error::Snapshot(format!(
                "{} is not empty: snapshots go into a new directory",
                dir.display()
            )));
        }
        let id = u64::from_le_bytes(random_bytes()?);
        let was_paused = self.paused;
        let paused_at = Instant::now();
        self.pause()?;
        let written = self.write_snapshot(&dir, parent.as_ref(), id);
        // A diff is against what was just written; after a failure the dirty
        // log may have been consumed, so only a full snapshot is safe next.
        self.last_snapshot = written.as_ref().ok().map(|_| SnapshotRef {
            dir: dir.clone(),
            id,
            depth: parent.as_ref().map_or(0, |p| p.depth + 1),
        });
        if written.is_err() {
            for tmp in [persist::MEMORY_FILE, persist::STATE_FILE] {
                let _ = std::fs::remove_file(dir.join(format!("{tmp}.tmp")));
            }
        }
        let paused_for = paused_at.elapsed();
        if !was_paused {
            self.resume()?;
        }
        let (memory_bytes_written, memory_zero_bytes) = written?;
        Ok(SnapshotStats {
            memory_bytes_written,
            memory_zero_bytes,
            paused_for,
        })
    }

    fn write_snapshot(
        &mut self,
        dir: &Path,
        parent: Option<&SnapshotRef>,
        id: u64,
    ) -> Result<(u64, u64)> {
        let diff = parent.is_some();
        // Guest memory is in there: the user's alone.
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        // A diff keeps the snapshot it is against (links): it is whole on
        // its own, and its state file never exists without it.
        if let Some(parent) = parent {
            persist::keep_parent(&parent.dir, &dir.join(persist::PARENT_DIR))?;
        }
        let disks = self.freeze_disks(dir)?;
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuHandle::save_state)
            .collect::<Result<Vec<_>>>()?;
        let vm = VmState {
            pic_master: irqchip(&self.vm_fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(&self.vm_fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(&self.vm_fd, KVM_IRQCHIP_IOAPIC)?,
            pit: self
                .vm_fd
                .get_pit2()
                .map_err(Error::kvm("reading the PIT"))?,
            clock: self
                .vm_fd
                .get_clock()
                .map_err(Error::kvm("reading the VM clock"))?,
        };
        let devices = DevicesState {
            serial: devices::bus::lock(&self.serial).state(),
            virtio: self
                .transports
                .iter()
                .map(|t| {
                    let t = devices::bus::lock(t);
                    VirtioSnapshot {
                        transport: t.state(),
                        device: t.device_state(),
                    }
                })
                .collect(),
        };

        // The memory file first, under a temporary name: a state file
        // never points at a half-written memory file.
        let memory_tmp = dir.join(format!("{}.tmp", persist::MEMORY_FILE));
        let file = crate::private::create_file(&memory_tmp, false)?;
        // From the first snapshot on, KVM logs the guest's writes; what is
        // logged before this point is in this snapshot.
        if !self.dirty_log {
            memory::register(&self.vm_fd, &self.mem, true)?;
            self.dirty_log = true;
        }
        let dirty = memory::take_dirty(&self.vm_fd, &self.mem)?;
        let (layout, stats) = if diff {
            snapshot::memory::write_diff(&self.mem, &file, &dirty)
        } else {
            snapshot::memory::write_full(&self.mem, &file)
        }
        .map_err(|e| Error::Snapshot(e.to_string()))?;
        file.sync_data()?;
        drop(file);

        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("reading supported CPUID"))?;
        let info = SnapshotInfo {
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            cpu_vendor: persist::cpu_vendor(&supported),
            cpus: self.config.cpus,
            memory_mib: self.config.memory_mib,
            regions: layout
                .iter()
                .map(|r| SavedRegion {
                    guest_addr: r.guest_addr,
                    size: r.size,
                    file_offset: r.file_offset,
                })
                .collect(),
            hostname: self.config.hostname.clone(),
            disks,
            root_on_disk: self.config.root_on_disk,
            agent_ready: self.ready_after.is_some(),
            id,
            parent: parent.map(|p| p.id),
        };
        let bytes = Snapshot {
            info,
            vm,
            vcpus,
            devices,
            dirty: diff.then_some(dirty),
        }
        .to_bytes()?;
        let state_tmp = dir.join(format!("{}.tmp", persist::STATE_FILE));
        {
            use std::io::Write;
            let mut f = crate::private::create_file(&state_tmp, false)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
        }
        std::fs::rename(&memory_tmp, dir.join(persist::MEMORY_FILE))?;
        std::fs::rename(&state_tmp, dir.join(persist::STATE_FILE))?;
        Ok((stats.bytes_written, stats.zero_bytes_skipped))
    }

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

    /// Time from `boot()` to the agent's ready signal, once seen.
    pub fn ready_after(&self) -> Option<Duration> {
        self.ready_after
    }

    /// The last lines the guest printed on its console.
    pub fn console_tail(&self, lines: usize) -> String {
        self.console.last_lines(lines)
    }

    /// Why the VM stopped, if it has.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.exit.get()
    }

    fn exit_error(&self, exit: VmExit) -> Error {
        match exit {
            VmExit::Unsupported(message) => Error::Unsupported {
                flavor: self.flavor,
                hint: format!("{message}. {PVM_HINT}"),
            },
            other => Error::StoppedBeforeReady {
                exit: other.to_string(),
                console: self.console_tail(20),
            },
        }
    }

    /// Waits for the guest agent's ready signal.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        if let Some(d) = self.ready_after {
            return Ok(d);
        }
        let deadline = Instant::now() + timeout;
        let Some(listener) = self.ready_listener.as_ref() else {
            return Err(Error::Config(
                "the ready signal was already consumed".into(),
            ));
        };
        let exit = self.exit.clone();
        let waited = crate::ready::wait_for_agent(
            listener,
            &self.vsock_path,
            deadline,
            AGENT_ANSWER_MIN,
            || exit.get().is_some(),
        )?;
        let after = self.started.elapsed();
        match waited {
            AgentWait::Ready(agent) => self.agent = Some(agent),
            AgentWait::Stopped => {
                let exit = self.exit.get().unwrap_or(VmExit::Stopped);
                return Err(self.exit_error(exit));
            }
            AgentWait::TimedOut => {
                let hint = if self.flavor == KvmFlavor::Pvm {
                    format!("\n{PVM_HINT}")
                } else {
                    String::new()
                };
                return Err(Error::NotReady {
                    seconds: timeout.as_secs_f64(),
                    console: format!("{}{hint}", self.console_tail(20)),
                });
            }
            AgentWait::Silent(e) => {
                // The signal is spent either way: nothing more to wait for.
                self.ready_listener = None;
                if let Some(exit) = self.exit.get() {
                    return Err(self.exit_error(exit));
                }
                return Err(Error::NotReady {
                    seconds: self.started.elapsed().as_secs_f64(),
                    console: format!(
                        "(the guest said its agent was ready, then the agent did not answer: {e})\n{}",
                        self.console_tail(20)
                    ),
                });
            }
        }
        // Closed now, so the guest cannot pile connections onto a socket
        // nobody accepts from.
        self.ready_listener = None;
        self.ready_after = Some(after);
        Ok(after)
    }

    /// The connection to the guest agent (opened on first use, and again
    /// if the last one was lost).
    pub fn agent(&mut self) -> Result<&AgentClient> {
        if self
            .agent
            .as_ref()
            .is_some_and(|a| a.check_alive().is_err())
        {
            self.agent = None;
        }
        if self.agent.is_none() {
            self.agent = Some(connect_agent(&self.vsock_path)?);
        }
        Ok(self.agent.as_ref().expect("just connected"))
    }

    /// Runs a command to completion and collects its output.
    pub fn exec<I, S>(&mut self, argv: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Ok(self.agent()?.exec(ExecRequest::new(argv))?.output()?)
    }

    /// Waits for the VM to stop on its own.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<VmExit> {
        let exit = self.exit.wait(timeout);
        if exit.is_some() {
            self.stop_threads();
        }
        exit
    }

    /// Asks the agent to power off cleanly (flushing disks), waits up to
    /// `timeout`, then stops the VM regardless.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<VmExit> {
        // Only a guest whose agent announced itself can be asked; asking
        // one that never did would just wait for the connect timeout.
        if self.exit.get().is_none() && self.ready_after.is_some() {
            let asked = self
                .agent()
                .and_then(|a| Ok(a.shutdown(false, Duration::from_secs(10).min(timeout))?));
            if let Err(e) = asked {
                log::warn!("clean shutdown request failed: {e}");
            }
        }
        let exit = self.exit.wait(Some(timeout)).unwrap_or(VmExit::Stopped);
        self.exit.set(exit.clone());
        self.stop_threads();
        Ok(exit)
    }

    /// Stops the VM immediately.
    pub fn kill(&mut self) -> VmExit {
        self.exit.set(VmExit::Stopped);
        self.stop_threads();
        self.exit.get().unwrap_or(VmExit::Stopped)
    }

    fn stop_threads(&mut self) {
        self.agent = None;
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

impl Drop for Vm {
    fn drop(&mut self) {
        self.exit.set(VmExit::Stopped);
        self.stop_threads();
    }
}

/// Opens a connection to the guest agent of a VM whose vsock device
/// listens on `vsock_path` ([`Vm::vsock_path`]), possibly from another
/// process than the one running the VM.
pub fn connect_agent(vsock_path: &Path) -> Result<AgentClient> {
    connect_agent_by(vsock_path, Instant::now() + AGENT_CONNECT_TIMEOUT)
}

fn open_kvm() -> Result<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Ok(kvm),
        Err(e) if e.errno() == libc::ENOENT => Err(Error::NoKvm),
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            Err(Error::KvmPermission)
        }
        Err(e) => Err(Error::KvmOpen(e)),
    }
}

/// Opens a snapshot's disk again, read-only: the raw image the caller
/// named at `base` (checked to be the one the snapshot was taken with)
/// and the snapshot's layers over it from `dir`.
fn open_snapshot_disk(
    disk: &SavedDisk,
    base: &Path,
    dir: &Path,
    state: &BlockState,
) -> std::result::Result<Block, String> {
    let now = devices::disk::fingerprint(base).map_err(|e| format!("{}: {e}", base.display()))?;
    if now != (disk.base.size, disk.base.mtime_ns) {
        return Err(format!(
            "{} is not the image the snapshot was taken with ({:?}, {} bytes): it is another \
             file, or it changed since",
            base.display(),
            disk.base.name,
            disk.base.size
        ));
    }
    let layers: Vec<PathBuf> = disk.layers.iter().map(|name| dir.join(name)).collect();
    let image = devices::disk::DiskImage::open_chain(base, &layers, false)
        .map_err(|e| format!("opening its layers: {e}"))?;
    let block = Block::from_image(image, true).map_err(|e| e.to_string())?;
    if block.capacity_sectors() != state.capacity_sectors {
        return Err(format!(
            "it has {} sectors, the snapshot {}",
            block.capacity_sectors(),
            state.capacity_sectors
        ));
    }
    Ok(block)
}

/// Whether `name` is a hostname the guest will take: letters, digits,
/// '-' and '.', at most 64 (it goes on the kernel command line at boot).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
}
