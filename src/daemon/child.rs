//! Starting, finding and stopping a sandbox's `capsule-vmm` child.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use sandbox::{AgentClient, ChildOptions, ChildVm, Sandbox, VmSettings};

use super::pidfd::PidFd;
use super::supervisor::{Activity, Live};

/// Stops a child this daemon detached and reaps it (it is ours), when
/// what follows its start fails.
pub(super) fn kill_detached(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    if let Ok(pidfd) = PidFd::open(pid) {
        pidfd.wait_for(Duration::from_secs(5));
        let _ = pidfd.reap();
    }
}

/// The file name of a sandbox's (or template's) own root filesystem.
pub(super) const ROOTFS: &str = "rootfs.ext4";

/// Starts a child in `dir` booting `kernel` and `initramfs`, with its own
/// copy of `rootfs` (sandboxes made from one image never share writes);
/// its agent is not waited for yet.
pub(super) fn boot_in(
    dir: &Path,
    kernel: &Path,
    initramfs: &Path,
    rootfs: Option<&Path>,
    cpus: u8,
    memory_mib: u32,
) -> Result<Sandbox<ChildVm>> {
    let mut builder = Sandbox::builder()
        .kernel(kernel)
        .initramfs(initramfs)
        .cpus(cpus)
        .memory_mib(u64::from(memory_mib))
        .hostname("capsule");
    if let Some(rootfs) = rootfs {
        let copy = dir.join(ROOTFS);
        std::fs::copy(rootfs, &copy)
            .with_context(|| format!("copying the root filesystem {}", rootfs.display()))?;
        builder = builder.rootfs(copy, false);
    }
    let config = builder.vm_config()?;
    let child = ChildVm::boot(&config, child_options(dir)?).context("cannot start the microVM")?;
    Ok(Sandbox::adopt_booted(child, builder.guest_info())?)
}

/// How a sandbox's child is started: in `dir/runtime`, in a process group
/// of its own (a signal to the daemon's group, a Ctrl-C, must not reach
/// the sandboxes), its messages appended to `dir/vmm.log`.
pub(super) fn child_options(dir: &Path) -> Result<ChildOptions> {
    let log = vmm::private::create_log(&dir.join("vmm.log"))?;
    let mut options = ChildOptions::new(dir.join("runtime"));
    options.customize = Box::new(move |cmd| {
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        cmd.stderr(log);
    });
    Ok(options)
}

/// SIGKILLs every process whose working directory is `dir` (a child's
/// runtime directory), waiting up to a few seconds for them to go.
pub(super) fn kill_processes_in(dir: &Path) {
    let find = || -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .parse::<i32>()
                    .ok()
                    .map(|pid| (pid, e.path()))
            })
            .filter(|(_, path)| std::fs::read_link(path.join("cwd")).is_ok_and(|cwd| cwd == dir))
            .map(|(pid, _)| pid)
            .collect()
    };
    for pid in find() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while !find().is_empty() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a child may take to answer a new connection: it answers
/// between requests, and may be in the middle of one.
pub(super) const ANSWER_PATIENCE: Duration = Duration::from_secs(10);

/// Connects to a child's control socket and its guest's agent.
pub(super) fn connect(runtime: &Path, pid_hint: u32) -> Result<Arc<Live>> {
    connect_within(runtime, pid_hint, ANSWER_PATIENCE)
}

/// [`connect`], waiting up to `patience` for the child to answer (one a
/// killed daemon left writing a snapshot answers when it is done).
pub(super) fn connect_within(
    runtime: &Path,
    pid_hint: u32,
    patience: Duration,
) -> Result<Arc<Live>> {
    connect_with(runtime, pid_hint, patience, None)
}

/// A child just restored: its control socket, and the agent connection
/// its restore gave the guest its identity on (see
/// [`sandbox::Sandbox::into_parts`]), so no command runs before that.
pub(super) fn connect_restored(restored: Sandbox<ChildVm>, runtime: &Path) -> Result<Arc<Live>> {
    let (child, agent) = restored.into_parts();
    let pid = child.detach();
    connect_with(runtime, pid, ANSWER_PATIENCE, agent).inspect_err(|_| kill_detached(pid))
}

fn connect_with(
    runtime: &Path,
    pid_hint: u32,
    patience: Duration,
    agent: Option<AgentClient>,
) -> Result<Arc<Live>> {
    let child = ChildVm::connect_within(runtime, patience)?;
    let pid = child.pid();
    if pid_hint != 0 && pid != pid_hint {
        return Err(anyhow!(
            "its control socket answers for process {pid}, not {pid_hint}"
        ));
    }
    let agent = match agent {
        Some(agent) => agent,
        None => sandbox::connect_agent(&runtime.join(capsule_vmm::protocol::VSOCK_SOCKET))?,
    };
    // Idle is counted from now: a sandbox just started or adopted.
    let activity = Activity::idle_from_now();
    Ok(Arc::new(Live {
        child: Mutex::new(child),
        agent,
        pid,
        activity,
        commands: Default::default(),
        ports: Default::default(),
    }))
}
