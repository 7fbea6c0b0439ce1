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
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{Serial, I8042};
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, MMIO_LEN, NOTIFY_OFFSET};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::{connect_to_guest, Vsock};
use devices::virtio::VirtioDevice;
use devices::Bus;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use guest_agent::protocol::{Frame, FrameKind, Hello, AGENT_PORT, READY_PORT};
use guest_agent::{AgentClient, ExecRequest, Output};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use linux_loader::loader::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::boot;
use crate::console::{ConsoleSink, ConsoleTail};
use crate::cpu::{cpuid, regs, vcpu};
use crate::error::{Error, Result, PVM_HINT};
use crate::exit::{ExitState, VmExit};
use crate::host::KvmFlavor;
use crate::layout::*;
use crate::memory;

/// How long connecting to the agent may take once it said it is ready.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

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
            std::fs::create_dir_all(p)?;
            return Ok(RuntimeDir {
                path: p.to_path_buf(),
                owned: false,
            });
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("capsule-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        Ok(RuntimeDir { path, owned: true })
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

/// A running (or stopped) microVM.
pub struct Vm {
    config: VmConfig,
    flavor: KvmFlavor,
    // Kept alive for the VM's lifetime; dropped after the threads stop.
    _kvm: Kvm,
    _vm_fd: VmFd,
    _mem: GuestMemoryMmap,
    vcpus: Vec<JoinHandle<()>>,
    event_loop: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    wake: EventFd,
    exit: Arc<ExitState>,
    console: ConsoleTail,
    vsock_path: PathBuf,
    /// Open until the agent announced itself, then closed so the guest
    /// cannot pile connections onto a socket nobody accepts from.
    ready_listener: Option<UnixListener>,
    started: Instant,
    ready_after: Option<Duration>,
    agent: Option<AgentClient>,
    // Last: removes the sockets after everything using them is gone.
    runtime: RuntimeDir,
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
        if config.memory_mib < 32 {
            return Err(Error::Config("memory must be at least 32 MiB".into()));
        }
        let Some(initramfs) = config.initramfs.clone() else {
            return Err(Error::Config(
                "an initramfs holding the guest agent is required".into(),
            ));
        };
        let flavor = KvmFlavor::detect();
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

        let mem = memory::create(config.memory_mib << 20)?;
        memory::register(&vm_fd, &mem)?;
        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        let initrd = boot::load_initramfs(&mem, &initramfs)?;

        let runtime = RuntimeDir::new(config.runtime_dir.as_deref())?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let exit = Arc::new(ExitState::new(wake.try_clone()?));
        let console = ConsoleTail::default();
        let console_file = File::create(
            config
                .console_log
                .clone()
                .unwrap_or_else(|| runtime.path.join("console.log")),
        )?;

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let mut subscribers: Vec<Subscriber> = Vec::new();

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(Error::kvm("wiring the serial interrupt"))?;
        let sink = ConsoleSink::new(
            Some(console_file),
            config.console_to_stderr,
            console.clone(),
        );
        let serial = Serial::new(serial_irq, Box::new(sink));
        pio.insert(COM1_PORT, 8, Arc::new(Mutex::new(serial)))
            .map_err(|e| Error::Device(e.to_string()))?;

        let reset = EventFd::new(libc::EFD_NONBLOCK)?;
        pio.insert(
            I8042_PORT,
            5,
            Arc::new(Mutex::new(I8042::new(reset.try_clone()?))),
        )
        .map_err(|e| Error::Device(e.to_string()))?;
        subscribers.push(Arc::new(Mutex::new(Control {
            reset,
            wake: wake.try_clone()?,
            exit: exit.clone(),
        })));

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

        let mut virtio: Vec<(Arc<Mutex<dyn VirtioDevice>>, Subscriber)> = Vec::new();
        for disk in &config.disks {
            let block = Block::open(&disk.path, disk.read_only)
                .map_err(|e| Error::Device(e.to_string()))?;
            let block = Arc::new(Mutex::new(block));
            virtio.push((block.clone(), block));
        }
        let rng = Arc::new(Mutex::new(Rng::new()?));
        virtio.push((rng.clone(), rng));
        let vsock_path = runtime.path.join("vsock.sock");
        let vsock = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &vsock_path)?));
        virtio.push((vsock.clone(), vsock.clone()));
        // The agent announces readiness on this port.
        let ready_listener = UnixListener::bind(format!("{}_{READY_PORT}", vsock_path.display()))?;
        ready_listener.set_nonblocking(true)?;

        for (i, (device, subscriber)) in virtio.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_LEN;
            let irq = VIRTIO_IRQ_BASE + i as u32;
            if irq >= IOAPIC_PINS {
                return Err(Error::Config("too many devices".into()));
            }
            let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
            vm_fd
                .register_irqfd(&irqfd, irq)
                .map_err(Error::kvm("wiring a virtio interrupt"))?;
            let transport = MmioTransport::new(device, mem.clone(), irqfd)?;
            for (q, evt) in transport.queue_events().iter().enumerate() {
                vm_fd
                    .register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), q as u32)
                    .map_err(Error::kvm("binding a queue notification"))?;
            }
            mmio.insert(base, MMIO_LEN, Arc::new(Mutex::new(transport)))
                .map_err(|e| Error::Device(e.to_string()))?;
            cmdline
                .add_virtio_mmio_device(MMIO_LEN, GuestAddress(base), irq, None)
                .map_err(|e| Error::Config(format!("kernel command line: {e}")))?;
            subscribers.push(subscriber);
        }

        boot::write_cmdline(&mem, &cmdline)?;
        let cmdline_len = cmdline
            .as_cstring()
            .map(|c| c.as_bytes_with_nul().len())
            .unwrap_or(0);
        boot::write_boot_info(&mem, &kernel, cmdline_len, Some(initrd))?;
        boot::write_boot_tables(&mem)?;
        boot::mptable::write(&mem, config.cpus)?;

        // Device event loop.
        let mut event_manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| Error::Device(format!("event loop: {e:?}")))?;
        for s in subscribers {
            event_manager.add_subscriber(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let loop_stop = stop.clone();
        let loop_exit = exit.clone();
        let event_loop = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                while !loop_stop.load(Ordering::Acquire) && loop_exit.get().is_none() {
                    if let Err(e) = event_manager.run() {
                        loop_exit.set(VmExit::Error(format!("device event loop: {e:?}")));
                    }
                }
                // The VM is over: host programs talking to the guest must
                // see the connection close, not wait forever.
                devices::bus::lock(&vsock).disconnect_host();
            })?;

        let mut vm = Vm {
            config,
            flavor,
            _kvm: kvm,
            _vm_fd: vm_fd,
            _mem: mem,
            vcpus: Vec::new(),
            event_loop: Some(event_loop),
            stop,
            wake,
            exit,
            console,
            vsock_path,
            ready_listener: Some(ready_listener),
            started,
            ready_after: None,
            agent: None,
            runtime,
        };

        // vCPUs.
        let supported = vm
            ._kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("reading supported CPUID"))?;
        let ctx = Arc::new(vcpu::VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit: vm.exit.clone(),
            stop: vm.stop.clone(),
            flavor,
        });
        let mut fds = Vec::new();
        for i in 0..vm.config.cpus {
            let fd = vm
                ._vm_fd
                .create_vcpu(u64::from(i))
                .map_err(Error::kvm("creating a vCPU"))?;
            fd.set_cpuid2(&cpuid::for_vcpu(&supported, i, vm.config.cpus))
                .map_err(Error::kvm("setting CPUID"))?;
            regs::setup_msrs(&vm._kvm, &fd)?;
            regs::setup_lapic(&fd)?;
            if i == 0 {
                regs::setup_regs(&fd, kernel.entry)?;
                regs::setup_sregs(&fd, kernel.entry)?;
                regs::setup_fpu(&fd)?;
            }
            fds.push(fd);
        }
        for (i, fd) in fds.into_iter().enumerate() {
            vm.vcpus.push(vcpu::spawn(fd, i as u8, ctx.clone())?);
        }
        Ok(vm)
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
        let after = self.accept_ready(timeout)?;
        self.ready_after = Some(after);
        self.ready_listener = None;
        let _ = std::fs::remove_file(format!("{}_{READY_PORT}", self.vsock_path.display()));
        Ok(after)
    }

    fn accept_ready(&self, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        let Some(listener) = self.ready_listener.as_ref() else {
            return Err(Error::Config(
                "the ready signal was already consumed".into(),
            ));
        };
        loop {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false)?;
                    // The hello follows the connection at once; a guest
                    // that connects and stalls must not outlast the
                    // deadline.
                    let left = deadline.saturating_duration_since(Instant::now());
                    conn.set_read_timeout(Some(
                        left.clamp(Duration::from_millis(100), Duration::from_secs(5)),
                    ))?;
                    match Frame::read_from(&mut conn) {
                        Ok(Some(f)) if f.kind == FrameKind::Hello => {
                            let hello: Hello = f.parse().map_err(guest_agent::ClientError::from)?;
                            hello.check().map_err(guest_agent::ClientError::from)?;
                            return Ok(self.started.elapsed());
                        }
                        other => log::warn!("unexpected ready message: {other:?}"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(exit) = self.exit.get() {
                return Err(self.exit_error(exit));
            }
            if Instant::now() >= deadline {
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
            wait_readable(listener, Duration::from_millis(10));
        }
    }

    /// The connection to the guest agent (opened on first use).
    pub fn agent(&mut self) -> Result<&AgentClient> {
        if self.agent.is_none() {
            let stream = connect_to_guest(&self.vsock_path, AGENT_PORT, AGENT_CONNECT_TIMEOUT)?;
            stream.set_read_timeout(Some(AGENT_CONNECT_TIMEOUT))?;
            let client = AgentClient::handshake(stream)?;
            self.agent = Some(client);
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
            let asked = self.agent().and_then(|a| Ok(a.shutdown(false)?));
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
        let _ = self.wake.write(1);
        // A kick can land just before a vCPU enters KVM_RUN; repeat until
        // every thread has noticed.
        for handle in self.vcpus.drain(..) {
            while !handle.is_finished() {
                vcpu::kick(&handle);
                std::thread::sleep(Duration::from_micros(200));
            }
            let _ = handle.join();
        }
        if let Some(handle) = self.event_loop.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.exit.set(VmExit::Stopped);
        self.stop_threads();
    }
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

/// Sleeps until `listener` has a connection waiting or `timeout` passes:
/// the ready signal is seen as soon as it arrives without spinning, and
/// the caller still rechecks the VM's state every `timeout`.
fn wait_readable(listener: &UnixListener, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd for the duration of the call; an
    // error or EINTR just means the caller polls again.
    unsafe { libc::poll(&mut pfd, 1, millis) };
}
