//! A machine in a `capsule-vmm` child process: the VM runs there, this
//! side holds the control connection (and, for the child it started, the
//! process).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use capsule_vmm::client::{self, ChildClient};
use capsule_vmm::protocol::{
    from_hex, to_hex, Answer, BootSpec, DiskSpec, Info, MemorySpec, Op, RestoreSpec, CONSOLE_LOG,
    VSOCK_SOCKET,
};
use vmm::{KvmFlavor, MemoryBackend, RestoreTimings, SnapshotStats, VmConfig, VmExit};

use crate::error::{Error, Result};
use crate::machine::Machine;
use crate::restore::RestoreOptions;
use crate::sandbox::Sandbox;

/// A request's reply must come within this (a snapshot writes all of
/// guest memory; a restore of a big guest maps it).
const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Short requests.
const QUICK: Duration = Duration::from_secs(10);
/// How long a child gets to stop its VM before it is killed outright.
const KILL_PATIENCE: Duration = Duration::from_secs(3);

pub struct ChildVm {
    client: Mutex<ChildClient>,
    /// The process, for a child this side started and has not let go.
    process: Option<std::process::Child>,
    runtime_dir: PathBuf,
    vsock_path: PathBuf,
    started: Instant,
    flavor: KvmFlavor,
    exit: Mutex<Option<VmExit>>,
}

/// How to start a child: its executable, its runtime directory (private,
/// ours) and whatever else the caller sets on the command (stderr, a
/// session of its own).
pub struct ChildOptions {
    pub exe: PathBuf,
    pub runtime_dir: PathBuf,
    pub customize: Box<dyn FnOnce(&mut Command)>,
}

impl ChildOptions {
    pub fn new(runtime_dir: impl Into<PathBuf>) -> ChildOptions {
        ChildOptions {
            exe: client::executable(),
            runtime_dir: runtime_dir.into(),
            customize: Box::new(|_| {}),
        }
    }
}

fn open_all(files: &[&vmm::HostFile], writable: &[bool]) -> Result<Vec<OwnedFd>> {
    files
        .iter()
        .zip(writable)
        .map(|(f, w)| {
            f.open(*w).map(OwnedFd::from).map_err(|source| {
                Error::Config(format!("cannot open {}: {source}", f.name().display()))
            })
        })
        .collect()
}

impl ChildVm {
    fn start(options: ChildOptions) -> Result<ChildVm> {
        vmm::private::ensure_private_dir(&options.runtime_dir).map_err(vmm::Error::from)?;
        let (mut cmd, channel) = client::command(&options.exe, &options.runtime_dir)?;
        (options.customize)(&mut cmd);
        let (process, client) = client::spawn(cmd, channel)?;
        Ok(ChildVm {
            client: Mutex::new(client),
            process: Some(process),
            vsock_path: options.runtime_dir.join(VSOCK_SOCKET),
            runtime_dir: options.runtime_dir,
            started: Instant::now(),
            flavor: KvmFlavor::detect(),
            exit: Mutex::new(None),
        })
    }

    /// Starts a child and boots `config` in it, paused (see
    /// [`Sandbox::adopt_booted`]).
    pub fn boot(config: &VmConfig, options: ChildOptions) -> Result<ChildVm> {
        config.check()?;
        let mut files = vec![&config.kernel];
        files.extend(config.initramfs.as_ref());
        files.extend(config.disks.iter().map(|d| &d.file));
        let mut writable = vec![false; 1 + usize::from(config.initramfs.is_some())];
        writable.extend(config.disks.iter().map(|d| !d.read_only));
        let fds = open_all(&files, &writable)?;
        let spec = BootSpec {
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            initramfs: config.initramfs.is_some(),
            disks: config
                .disks
                .iter()
                .map(|d| DiskSpec {
                    name: d.file.name().to_path_buf(),
                    read_only: d.read_only,
                    flush: d.flush,
                })
                .collect(),
            cmdline: config.cmdline.clone(),
            verbose_console: config.verbose_console,
        };
        let child = ChildVm::start(options)?;
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        child.call(Op::Boot(spec), &borrowed, CALL_TIMEOUT)?;
        Ok(child)
    }

    /// Starts a child and restores the snapshot in `dir` in it, then
    /// adopts it as a sandbox (see [`Sandbox::restore`]).
    pub fn restore(
        dir: &Path,
        options: &RestoreOptions,
        child: ChildOptions,
    ) -> Result<Sandbox<ChildVm>> {
        let started = Instant::now();
        let disks = &options.vm.disks;
        let fds = open_all(&disks.iter().collect::<Vec<_>>(), &vec![false; disks.len()])?;
        let spec = RestoreSpec {
            snapshot: std::path::absolute(dir)?,
            disks: disks.iter().map(|d| d.name().to_path_buf()).collect(),
            track_dirty: options.vm.track_dirty,
            memory: match options.vm.memory {
                MemoryBackend::Uffd { prefetch } => MemorySpec::Uffd { prefetch },
                _ => MemorySpec::File,
            },
            flush: options.vm.flush,
        };
        let vm = ChildVm::start(child)?;
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let answer = vm.call(Op::Restore(spec), &borrowed, CALL_TIMEOUT)?;
        let Answer::Built {
            annotation_hex,
            timings,
        } = answer
        else {
            return Err(Error::ChildAnswer(format!(
                "an unexpected answer to a restore: {answer:?}"
            )));
        };
        let annotation = from_hex(&annotation_hex)
            .ok_or_else(|| Error::ChildAnswer("the restored annotation is not hex".into()))?;
        let timings = RestoreTimings {
            phases: timings
                .iter()
                .take(32)
                .map(|(phase, ms)| {
                    let phase: String = phase.chars().take(64).collect();
                    let ms = if ms.is_finite() {
                        ms.clamp(0.0, 1e9)
                    } else {
                        0.0
                    };
                    (phase.into(), Duration::from_secs_f64(ms / 1e3))
                })
                .collect(),
        };
        Sandbox::adopt_restored(vm, &annotation, timings, options, started)
    }

    /// Reaches the child already running in `runtime_dir` (started by
    /// another process).
    pub fn connect(runtime_dir: &Path) -> Result<ChildVm> {
        Self::connect_within(runtime_dir, QUICK)
    }

    /// [`ChildVm::connect`], waiting up to `patience` for the child to
    /// answer: one busy writing a snapshot answers once it is written.
    pub fn connect_within(runtime_dir: &Path, patience: Duration) -> Result<ChildVm> {
        let client = ChildClient::connect(runtime_dir, patience)?;
        Ok(ChildVm {
            client: Mutex::new(client),
            process: None,
            runtime_dir: runtime_dir.to_path_buf(),
            vsock_path: runtime_dir.join(VSOCK_SOCKET),
            started: Instant::now(),
            flavor: KvmFlavor::detect(),
            exit: Mutex::new(None),
        })
    }

    /// Lets the child run on after this handle goes (a kept sandbox).
    pub fn detach(mut self) -> u32 {
        // Dropping the handle neither kills nor waits: the process runs on.
        self.process = None;
        self.pid()
    }

    pub fn pid(&self) -> u32 {
        self.lock().pid()
    }

    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    pub fn info(&self) -> Result<Info> {
        match self.call(Op::Info, &[], QUICK)? {
            Answer::Info(info) => Ok(info),
            other => Err(Error::ChildAnswer(format!(
                "an unexpected answer: {other:?}"
            ))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ChildClient> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn call(&self, op: Op, fds: &[std::os::fd::BorrowedFd], timeout: Duration) -> Result<Answer> {
        let mut client = self.lock();
        let answer = client.call(op, fds, timeout);
        if let Some(reason) = client.exited() {
            self.record(reason.clone().into());
        }
        Ok(answer?)
    }

    fn record(&self, exit: VmExit) {
        let mut slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(exit);
    }

    fn text(&self, op: Op) -> String {
        match self.call(op, &[], QUICK) {
            Ok(Answer::Text { text }) => text,
            Ok(other) => format!("(an unexpected answer: {other:?})"),
            Err(e) => format!("({e})"),
        }
    }

    /// Once the VM has ended, the child exits too: reap it.
    fn reap(&mut self) {
        if let Some(mut process) = self.process.take() {
            let deadline = Instant::now() + QUICK;
            while Instant::now() < deadline {
                if process.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

impl Machine for ChildVm {
    fn vsock_path(&self) -> &Path {
        &self.vsock_path
    }
    fn started_at(&self) -> Instant {
        self.started
    }
    fn kvm_flavor(&self) -> KvmFlavor {
        self.flavor
    }
    fn resume(&mut self) -> Result<()> {
        self.call(Op::Resume, &[], QUICK).map(drop)
    }
    fn pause(&mut self) -> Result<()> {
        self.call(Op::Pause, &[], QUICK).map(drop)
    }
    fn exit_reason(&self) -> Option<VmExit> {
        if let Some(exit) = self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(exit);
        }
        // Whatever the child has said by now, without waiting.
        let mut client = self.lock();
        let _ = client.wait_exit(Duration::from_millis(1));
        let reason = client.exited().cloned();
        drop(client);
        reason.map(|r| {
            self.record(r.clone().into());
            r.into()
        })
    }
    fn wait(&mut self, timeout: Option<Duration>) -> Option<VmExit> {
        let timeout = timeout.unwrap_or(Duration::from_secs(u64::from(u32::MAX)));
        let reason = self.lock().wait_exit(timeout);
        let exit = match reason {
            Ok(Some(reason)) => Some(reason.into()),
            Ok(None) => None,
            Err(e) => Some(VmExit::Error(format!("the capsule-vmm child: {e}"))),
        };
        if let Some(exit) = &exit {
            self.record(exit.clone());
            self.reap();
        }
        exit
    }
    fn kill(&mut self) -> VmExit {
        let _ = self.call(Op::Kill, &[], KILL_PATIENCE);
        match self.wait(Some(KILL_PATIENCE)) {
            Some(exit) => exit,
            None => {
                // A child that does not answer is stopped the hard way:
                // ours by its handle, another's by the pid its connection
                // still holds (the child cannot be gone and its pid reused
                // while that connection is open).
                match self.process.as_mut() {
                    Some(process) => {
                        let _ = process.kill();
                    }
                    None => {
                        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    }
                }
                self.reap();
                self.record(VmExit::Stopped);
                VmExit::Stopped
            }
        }
    }
    fn console_tail(&self, lines: usize) -> String {
        let text = self.text(Op::ConsoleTail {
            lines: u32::try_from(lines).unwrap_or(u32::MAX),
        });
        if text.starts_with('(') {
            // The child is gone: its log is still in the runtime directory.
            return read_tail(&self.runtime_dir.join(CONSOLE_LOG), lines);
        }
        text
    }
    fn stall_report(&self) -> String {
        self.text(Op::StallReport)
    }
    fn set_annotation(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.call(
            Op::SetAnnotation {
                hex: to_hex(&bytes),
            },
            &[],
            QUICK,
        )
        .map(drop)
    }
    fn snapshot(&mut self, dir: &Path, diff: bool) -> Result<SnapshotStats> {
        let dir = std::path::absolute(dir)?;
        match self.call(Op::Snapshot { dir, diff }, &[], CALL_TIMEOUT)? {
            Answer::Snapshot {
                memory_bytes_written,
                memory_zero_bytes,
                paused_ms,
                ..
            } => Ok(SnapshotStats {
                memory_bytes_written,
                memory_zero_bytes,
                paused_for: Duration::from_secs_f64(paused_ms.max(0.0) / 1e3),
            }),
            other => Err(Error::ChildAnswer(format!(
                "an unexpected answer: {other:?}"
            ))),
        }
    }
    fn exit_error(&self, exit: VmExit) -> Error {
        let console = self.console_tail(20);
        match exit {
            VmExit::Unsupported(message) => vmm::Error::Unsupported {
                flavor: self.flavor,
                hint: format!("{message}. {}", vmm::PVM_HINT),
            }
            .into(),
            other => vmm::Error::Stopped {
                exit: other.to_string(),
                console,
            }
            .into(),
        }
    }
}

/// The last `lines` lines of a (capped) log file.
fn read_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for ChildVm {
    /// A child this side started and did not let go of stops with it.
    fn drop(&mut self) {
        if self.process.is_some() {
            self.kill();
        }
    }
}
