//! Named sandboxes that outlive the command that started them.
//!
//! `capsule run --keep --name N` (or `capsule restore --keep`) starts a
//! detached `capsule` process, the *keeper*, that owns the VM and answers
//! on a control socket; later commands find it by name:
//!
//! ```text
//! $CAPSULE_HOME/sandboxes/<name>/
//!     control.sock   one JSON request per connection, one JSON reply
//!     runtime/       the VM's sockets (vsock.sock: the agent, for exec)
//!     console.log    the guest's console
//!     keeper.log     the keeper's own messages
//! ```
//!
//! This is the seed of the manager's "one VMM process per sandbox behind
//! a control socket": the daemon will start keepers the same way.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sandbox::{RestoreOptions, Sandbox};
use serde::{Deserialize, Serialize};

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
    Ok(())
}

/// How a keeper gets its VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Origin {
    Boot(BootSpec),
    Restore {
        snapshot: PathBuf,
        hostname: Option<String>,
        /// The raw images under the snapshot's disks, in order.
        #[serde(default)]
        disks: Vec<PathBuf>,
    },
}

/// Everything `capsule run` knows about the VM to boot.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
}

impl BootSpec {
    pub fn boot(&self, runtime_dir: Option<&Path>, console_log: Option<&Path>) -> Result<Sandbox> {
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
        if let Some(dir) = runtime_dir {
            builder = builder.runtime_dir(dir);
        }
        if let Some(log) = console_log {
            builder = builder.console_log(log);
        }
        let mut vm = builder.boot().context("cannot start the microVM")?;
        vm.wait_ready(Duration::from_millis(self.boot_timeout_ms))?;
        Ok(vm)
    }
}

/// Disks are recorded in snapshots by path: make them absolute so a
/// snapshot restores from any working directory.
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// A request to a keeper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Info,
    Snapshot {
        dir: PathBuf,
        #[serde(default)]
        diff: bool,
    },
    Stop,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Info {
        pid: u32,
        vsock: PathBuf,
        hostname: String,
    },
    Snapshot {
        memory_bytes_written: u64,
        memory_zero_bytes: u64,
        paused_ms: f64,
        /// The raw images a restore names again, in order.
        #[serde(default)]
        disks: Vec<PathBuf>,
    },
    Stopped,
    Error {
        message: String,
    },
}

/// Starts a keeper for `name` and waits until its VM is ready.
pub fn start(name: &str, origin: &Origin) -> Result<PathBuf> {
    let dir = dir(name)?;
    if dir.join("control.sock").exists() && request(name, &Request::Info).is_ok() {
        bail!("a sandbox named {name:?} is already running (capsule stop {name})");
    }
    let _ = std::fs::remove_dir_all(&dir);
    vmm::private::ensure_private_dir(&dir)?;
    let log = vmm::private::create_log(&dir.join("keeper.log"))?;
    let exe = std::env::current_exe().context("locating the capsule executable")?;
    let mut child = Command::new(exe);
    child
        .arg("__keeper")
        .arg(name)
        .arg(serde_json::to_string(origin)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // Its own session: the keeper must not die with our terminal.
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        child.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = child.spawn().context("starting the sandbox keeper")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    match line.trim().strip_prefix("ready") {
        Some(_) => Ok(dir),
        None => {
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("keeper.log")).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            Err(anyhow!(
                "the sandbox did not start: {}",
                log.trim()
                    .lines()
                    .last()
                    .unwrap_or("the keeper exited without a word")
            ))
        }
    }
}

/// Sends one request to the keeper of `name`.
pub fn request(name: &str, req: &Request) -> Result<Reply> {
    let sock = dir(name)?.join("control.sock");
    let mut stream = UnixStream::connect(&sock).map_err(|e| {
        anyhow!(
            "no sandbox named {name:?} is running ({}: {e})",
            sock.display()
        )
    })?;
    // What we send may be secret (and the reply names sockets we then
    // trust): only a keeper of ours, or root's, gets it.
    if !devices::host_socket::peer_is_trusted(&stream) {
        bail!(
            "{} is served by another user's process: refusing to talk to it",
            sock.display()
        );
    }
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let reply: Reply = serde_json::from_str(reply.trim())
        .with_context(|| format!("sandbox {name:?} gave an unreadable reply"))?;
    if let Reply::Error { message } = reply {
        bail!("sandbox {name:?}: {message}");
    }
    Ok(reply)
}

/// The keeper itself (`capsule __keeper NAME ORIGIN`): builds the VM,
/// says "ready" on stdout, then serves the control socket until told to
/// stop or the VM ends.
pub fn keep(name: &str, origin: &str) -> Result<u8> {
    let origin: Origin = serde_json::from_str(origin).context("bad keeper arguments")?;
    let dir = dir(name)?;
    let runtime = dir.join("runtime");
    let console = dir.join("console.log");
    let mut vm = match &origin {
        Origin::Boot(spec) => spec.boot(Some(&runtime), Some(&console))?,
        Origin::Restore {
            snapshot,
            hostname,
            disks,
        } => {
            let options = RestoreOptions {
                runtime_dir: Some(runtime.clone()),
                console_log: Some(console.clone()),
                identity: sandbox::Identity {
                    hostname: hostname.clone(),
                    ..Default::default()
                },
                // A kept sandbox is suspended again later: let that be a diff.
                track_dirty: true,
                disks: disks.clone(),
                ..Default::default()
            };
            Sandbox::restore(snapshot, options)
                .with_context(|| format!("restoring {}", snapshot.display()))?
        }
    };
    let sock = dir.join("control.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = devices::host_socket::bind_private(&sock)?;
    listener.set_nonblocking(true)?;
    println!("ready");
    // Nobody reads our stdout after this line.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: both descriptors are open; dup2 replaces fd 1 atomically.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    let result = serve(&mut vm, &listener);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn serve(vm: &mut Sandbox, listener: &UnixListener) -> Result<u8> {
    loop {
        if let Some(exit) = vm.exit_reason() {
            eprintln!("capsule keeper: the VM ended: {exit}");
            return Ok(0);
        }
        let mut conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                cap_own_log();
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if !devices::host_socket::peer_is_trusted(&conn) {
            eprintln!("capsule keeper: refusing a request from another user");
            continue;
        }
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = String::new();
        let _ = BufReader::new(&conn).read_line(&mut line);
        let (reply, stop) = match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => (
                Reply::Error {
                    message: format!("bad request: {e}"),
                },
                false,
            ),
            Ok(req) => answer(vm, req),
        };
        let _ = conn.write_all(serde_json::to_string(&reply)?.as_bytes());
        if stop {
            return Ok(0);
        }
    }
}

fn answer(vm: &mut Sandbox, req: Request) -> (Reply, bool) {
    match req {
        Request::Info => (
            Reply::Info {
                pid: std::process::id(),
                vsock: vm.vsock_path().to_path_buf(),
                hostname: vm.hostname().to_string(),
            },
            false,
        ),
        Request::Snapshot { dir, diff } => {
            let t = Instant::now();
            let taken = if diff {
                vm.snapshot_diff(&dir)
            } else {
                vm.snapshot(&dir)
            };
            match taken {
                Ok(stats) => (
                    Reply::Snapshot {
                        memory_bytes_written: stats.memory_bytes_written,
                        memory_zero_bytes: stats.memory_zero_bytes,
                        paused_ms: stats.paused_for.as_secs_f64() * 1e3,
                        disks: vm.vm().external_files().to_vec(),
                    },
                    false,
                ),
                Err(e) => (
                    Reply::Error {
                        message: format!("snapshot failed after {:?}: {e}", t.elapsed()),
                    },
                    false,
                ),
            }
        }
        Request::Stop => {
            let _ = vm.shutdown(Duration::from_secs(10));
            (Reply::Stopped, true)
        }
    }
}

/// Most bytes of `keeper.log` kept: the keeper's stderr, where the VMM's
/// (rate-limited) warnings about the guest go.
const KEEPER_LOG_MAX: u64 = 4 << 20;

/// Starts `keeper.log` (our stderr, opened for appending) over once it
/// passes its cap: the guest must not be able to fill the disk through it.
fn cap_own_log() {
    use std::os::fd::AsFd;
    let stderr = std::io::stderr();
    let fd = stderr.as_fd();
    if nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_size as u64 > KEEPER_LOG_MAX)
        && nix::unistd::ftruncate(fd, 0).is_ok()
    {
        eprintln!("capsule keeper: keeper.log passed {KEEPER_LOG_MAX} bytes and was started over");
    }
}

/// Names of the sandboxes whose keeper answers.
pub fn list() -> Result<Vec<(String, Reply)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(sandboxes()?) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(info) = request(&name, &Request::Info) {
            out.push((name, info));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
