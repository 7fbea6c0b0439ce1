//! Named sandboxes that outlive the command that started them.
//!
//! `capsule run --keep --name N` (or `capsule restore --keep`) starts a
//! `capsule-vmm` child in its own process group that owns the VM; later
//! commands find it by name:
//!
//! ```text
//! $CAPSULE_HOME/sandboxes/<name>/
//!     runtime/       the child's working directory: control.sock (its
//!                    control protocol), vsock.sock (the agent, for
//!                    exec), console.log (the guest's console)
//!     keeper.log     the child's own messages
//! ```
//!
//! The daemon will start and supervise children the same way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sandbox::{
    ChildOptions, ChildVm, GuestInfo, Machine, RestoreOptions, Sandbox, SandboxBuilder, VmSettings,
};

use crate::artifacts;

/// Where named sandboxes live: `$CAPSULE_HOME`, else
/// `$XDG_RUNTIME_DIR/capsule`, else `/run/capsule` for root and
/// `/tmp/capsule-<uid>` for anyone else. It is made 0700 if missing, and
/// refused if it is a symlink, someone else's, or writable by others: it
/// holds the sockets that reach every sandbox's guest.
pub fn home() -> Result<PathBuf> {
    let home = if let Some(h) = std::env::var_os("CAPSULE_HOME") {
        PathBuf::from(h)
    } else if let Some(r) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(r).join("capsule")
    } else {
        let uid = nix::unistd::Uid::effective();
        if uid.is_root() {
            PathBuf::from("/run/capsule")
        } else {
            PathBuf::from(format!("/tmp/capsule-{uid}"))
        }
    };
    vmm::private::ensure_private_dir(&home)
        .context("the sandbox home (set CAPSULE_HOME to use another)")?;
    Ok(home)
}

fn sandboxes() -> Result<PathBuf> {
    let dir = home()?.join("sandboxes");
    vmm::private::ensure_private_dir(&dir)?;
    Ok(dir)
}

pub fn dir(name: &str) -> Result<PathBuf> {
    check_name(name)?;
    Ok(sandboxes()?.join(name))
}

/// The kept sandbox's runtime directory: its child's working directory.
fn runtime(name: &str) -> Result<PathBuf> {
    Ok(dir(name)?.join("runtime"))
}

/// The agent's socket of the kept sandbox `name`.
pub fn vsock_path(name: &str) -> Result<PathBuf> {
    Ok(runtime(name)?.join(capsule_vmm::protocol::VSOCK_SOCKET))
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.');
    if !ok {
        bail!("invalid sandbox name {name:?}: use letters, digits, '-', '_' and '.', at most 64");
    }
    if name.starts_with(crate::manage::DAEMON_ID_PREFIX) {
        bail!(
            "invalid sandbox name {name:?}: names starting {:?} are the daemon's sandbox ids",
            crate::manage::DAEMON_ID_PREFIX
        );
    }
    Ok(())
}

/// Everything `capsule run` knows about the VM to boot.
#[derive(Clone, Debug)]
pub struct BootSpec {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u64,
    pub hostname: String,
    pub rootfs: Option<PathBuf>,
    pub read_only: bool,
    pub disks: Vec<PathBuf>,
    pub console: bool,
    pub boot_timeout_ms: u64,
    pub flush: vmm::FlushPolicy,
}

impl BootSpec {
    /// The sandbox to boot.
    pub fn builder(&self) -> Result<SandboxBuilder> {
        let kernel = artifacts::find(
            self.kernel.as_deref(),
            "CAPSULE_KERNEL",
            artifacts::KERNEL_FILE,
        )?;
        let initramfs = artifacts::find(
            self.initramfs.as_deref(),
            "CAPSULE_INITRAMFS",
            artifacts::INITRAMFS_FILE,
        )?;
        let mut builder = Sandbox::builder()
            .kernel(&kernel)
            .initramfs(&initramfs)
            .cpus(self.cpus)
            .memory_mib(self.memory_mib)
            .hostname(&self.hostname)
            .flush(self.flush)
            .console_to_stderr(self.console)
            .verbose_console(self.console);
        if let Some(rootfs) = &self.rootfs {
            if !rootfs.is_file() {
                bail!("root filesystem {} does not exist", rootfs.display());
            }
            builder = builder.rootfs(absolute(rootfs)?, self.read_only);
        }
        for disk in &self.disks {
            builder = builder.disk(absolute(disk)?, false);
        }
        Ok(builder)
    }

    /// Boots it in this process and waits for its agent.
    pub fn boot(&self) -> Result<Sandbox> {
        let mut vm = self.builder()?.boot().context("cannot start the microVM")?;
        vm.wait_ready(self.boot_timeout())?;
        Ok(vm)
    }

    fn boot_timeout(&self) -> Duration {
        Duration::from_millis(self.boot_timeout_ms)
    }
}

/// Disks are recorded in snapshots by path: make them absolute so a
/// snapshot restores from any working directory.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// How a kept sandbox gets its VM.
pub enum Origin {
    Boot(BootSpec),
    Restore {
        snapshot: PathBuf,
        hostname: Option<String>,
        /// The raw images under the snapshot's disks, in order.
        disks: Vec<PathBuf>,
        flush: vmm::FlushPolicy,
    },
}

/// Starts a `capsule-vmm` child for `name`, has its VM booted or restored
/// and its agent ready, and leaves it running.
pub fn start(name: &str, origin: &Origin) -> Result<PathBuf> {
    let dir = dir(name)?;
    let runtime = runtime(name)?;
    // Only a sandbox that is certainly gone (no socket, or nobody on it)
    // is replaced: one that does not answer may still be running.
    match ChildVm::connect(&runtime) {
        Ok(_) => bail!("a sandbox named {name:?} is already running (capsule stop {name})"),
        Err(sandbox::Error::Child(capsule_vmm::client::ClientError::Channel(
            capsule_vmm::channel::ChannelError::Io(e),
        ))) if matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ) => {}
        Err(e) => bail!(
            "a sandbox named {name:?} exists and does not answer ({e}); capsule stop {name} \
             stops it"
        ),
    }
    let _ = std::fs::remove_dir_all(&dir);
    vmm::private::ensure_private_dir(&dir)?;
    vmm::private::ensure_private_dir(&runtime)?;
    let log = vmm::private::create_log(&dir.join("keeper.log"))?;
    let mut options = ChildOptions::new(&runtime);
    options.customize = Box::new(move |cmd| {
        // Its own process group: the child must not die with our
        // terminal or our Ctrl-C.
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        cmd.stderr(log);
    });
    let started = match origin {
        Origin::Boot(spec) => start_boot(spec, options),
        Origin::Restore {
            snapshot,
            hostname,
            disks,
            flush,
        } => {
            let restore = RestoreOptions {
                vm: vmm::RestoreOptions {
                    // A kept sandbox is suspended again later: let that
                    // be a diff.
                    track_dirty: true,
                    disks: disks.iter().map(Into::into).collect(),
                    flush: *flush,
                    ..Default::default()
                },
                identity: sandbox::Identity {
                    hostname: hostname.clone(),
                    ..Default::default()
                },
                ..Default::default()
            };
            ChildVm::restore(snapshot, &restore, options)
                .with_context(|| format!("restoring {}", snapshot.display()))
        }
    };
    match started {
        Ok(sb) => {
            sb.into_machine().detach();
            Ok(dir)
        }
        Err(e) => {
            let log = std::fs::read_to_string(dir.join("keeper.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            let said = log.trim().lines().last().map(|l| format!(" ({l})"));
            Err(anyhow!(
                "the sandbox did not start: {e:#}{}",
                said.unwrap_or_default()
            ))
        }
    }
}

fn start_boot(spec: &BootSpec, options: ChildOptions) -> Result<Sandbox<ChildVm>> {
    let builder = spec.builder()?;
    let config = builder.vm_config()?;
    let child = ChildVm::boot(&config, options).context("cannot start the microVM")?;
    let mut sb = Sandbox::adopt_booted(child, builder.guest_info())?;
    sb.wait_ready(spec.boot_timeout())?;
    Ok(sb)
}

/// The child of the kept sandbox `name`.
pub fn connect(name: &str) -> Result<ChildVm> {
    ChildVm::connect(&runtime(name)?)
        .map_err(|e| anyhow!("no sandbox named {name:?} is running ({e})"))
}

/// What `capsule ls` shows of a kept sandbox.
pub struct Listed {
    pub name: String,
    pub pid: u32,
    pub hostname: String,
}

/// The kept sandboxes whose child answers.
pub fn list() -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(sandboxes()?) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(child) = connect(&name) else {
            continue;
        };
        let Ok(info) = child.info() else {
            continue;
        };
        let hostname = capsule_vmm::protocol::from_hex(&info.annotation_hex)
            .and_then(|a| GuestInfo::decode(&a).ok())
            .map_or_else(|| "?".into(), |g| g.hostname);
        out.push(Listed {
            name,
            pid: info.pid,
            hostname,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Stops the kept sandbox `name`: a clean power-off if its agent answers,
/// else at once; its directory goes.
pub fn stop(name: &str) -> Result<()> {
    let mut child = connect(name)?;
    if let Ok(agent) = sandbox::connect_agent(&vsock_path(name)?) {
        let _ = agent.shutdown(false, Duration::from_secs(10));
    }
    if child.wait(Some(Duration::from_secs(10))).is_none() {
        child.kill();
    }
    let _ = std::fs::remove_dir_all(dir(name)?);
    Ok(())
}
