//! The sandbox and snapshot commands: `exec`, `snapshot`, `restore`,
//! `fork`, `stop` and `ls`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use sandbox::{MemoryBackend, RestoreOptions, Sandbox};

use crate::exec::{self, CommandArgs};
use crate::keeper::{self, Origin};
use sandbox::Machine;

/// Runs a command in the kept sandbox `name`.
pub fn exec_in(name: &str, argv: &[String], args: &CommandArgs) -> Result<u8> {
    // Its child must be there: a stale socket would just time out.
    drop(keeper::connect(name)?);
    let vsock = keeper::vsock_path(name)?;
    let agent = sandbox::connect_agent(&vsock)
        .with_context(|| format!("connecting to sandbox {name:?}"))?;
    let status = exec::stream(&agent, argv, args).with_context(|| format!("sandbox {name:?}"))?;
    Ok(exec::exit_code(&status))
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// The kept sandbox's name, or a daemon sandbox's id (`sb-...`).
    name: String,
    #[command(flatten)]
    command_args: CommandArgs,
    /// Start it detached in a daemon sandbox and print its pid at once:
    /// it runs on, its output kept (`capsule logs`, `capsule ps`,
    /// `capsule kill`).
    #[arg(long)]
    detach: bool,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

pub fn exec(args: ExecArgs) -> Result<u8> {
    let daemon = args.name.starts_with(crate::manage::DAEMON_ID_PREFIX);
    if args.detach && !daemon {
        anyhow::bail!("--detach works in daemon sandboxes (ids starting sb-)");
    }
    if args.detach {
        return crate::processes::start(&args.name, &args.command, &args.command_args);
    }
    if daemon {
        return crate::manage::exec(&args.name, &args.command, &args.command_args);
    }
    exec_in(&args.name, &args.command, &args.command_args)
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The sandbox's name.
    name: String,
    /// Directory to write the snapshot into (created if needed).
    #[arg(long)]
    to: PathBuf,
    /// Write only the memory changed since the sandbox's previous snapshot
    /// (or the one it was restored from), which must be kept.
    #[arg(long)]
    diff: bool,
}

pub fn snapshot(args: SnapshotArgs) -> Result<u8> {
    let dir = keeper::absolute(&args.to)?;
    let mut child = keeper::connect(&args.name)?;
    let stats = child
        .snapshot(&dir, args.diff)
        .with_context(|| format!("sandbox {:?}: snapshot failed", args.name))?;
    eprintln!(
        "capsule: snapshot of {} in {}: {:.1} MiB of memory written ({:.1} MiB of zero pages skipped), guest paused {:.1} ms",
        args.name,
        dir.display(),
        stats.memory_bytes_written as f64 / (1 << 20) as f64,
        stats.memory_zero_bytes as f64 / (1 << 20) as f64,
        stats.paused_for.as_secs_f64() * 1e3,
    );
    let disks: String = child
        .info()?
        .external_files
        .iter()
        .map(|d| format!(" --disk {}", d.display()))
        .collect();
    eprintln!(
        "capsule: restore it with: capsule restore {}{disks} [-- COMMAND]",
        dir.display()
    );
    // The child keeps running: this was only a connection to it.
    child.detach();
    Ok(0)
}

/// How a restored guest's memory is backed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Map the memory file privately: replicas share its page cache.
    File,
    /// Copy memory in on first touch (userfaultfd), prefetching the
    /// snapshot's recorded working set; the first such restore records it.
    Uffd,
}

impl Backend {
    fn memory(self) -> MemoryBackend {
        match self {
            Backend::File => MemoryBackend::File,
            Backend::Uffd => MemoryBackend::Uffd { prefetch: true },
        }
    }
}

/// The disks of a snapshot, named again.
#[derive(Args, Debug, Clone)]
pub struct SnapshotDisks {
    /// The raw image under each of the snapshot's disks, in the order the
    /// sandbox had them (its --rootfs first, then each --disk; repeat the
    /// option). A snapshot never names files outside its own directory:
    /// each is checked to be the image the snapshot was taken with.
    #[arg(long = "disk", value_name = "IMAGE")]
    pub disks: Vec<PathBuf>,
    /// What the guest's disk flushes do.
    #[arg(long, value_enum, default_value_t)]
    pub flush: crate::args::Flush,
}

impl SnapshotDisks {
    pub fn absolute(&self) -> Result<Vec<PathBuf>> {
        self.disks.iter().map(|d| keeper::absolute(d)).collect()
    }

    /// The VM's restore options: these disks and flush policy, memory
    /// backed as `memory` says.
    fn vm_options(&self, memory: Backend) -> Result<vmm::RestoreOptions> {
        Ok(vmm::RestoreOptions {
            memory: memory.memory(),
            disks: self.absolute()?.into_iter().map(Into::into).collect(),
            flush: self.flush.policy(),
            ..Default::default()
        })
    }
}

/// Adds what the CLI user should do to a snapshot's disk error.
fn restore_error(e: sandbox::Error, snapshot: &std::path::Path) -> anyhow::Error {
    let hint = matches!(e, sandbox::Error::Vm(vmm::Error::DisksNotNamed { .. }))
        .then_some("\n(name each with --disk IMAGE, in that order)")
        .unwrap_or_default();
    anyhow::anyhow!("cannot restore {}: {e}{hint}", snapshot.display())
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The snapshot directory.
    snapshot: PathBuf,
    #[command(flatten)]
    disks: SnapshotDisks,
    /// New hostname for the restored guest (default: the snapshot's).
    #[arg(long, value_parser = crate::args::parse_hostname)]
    hostname: Option<String>,
    /// Keep the restored sandbox running under --name.
    #[arg(long, requires = "name")]
    keep: bool,
    /// Name of the kept sandbox.
    #[arg(long, requires = "keep")]
    name: Option<String>,
    /// Print restore and command times on stderr.
    #[arg(long)]
    timings: bool,
    /// How the guest's memory is brought back.
    #[arg(long, value_enum, default_value_t = Backend::File)]
    memory_backend: Backend,
    #[command(flatten)]
    command_args: CommandArgs,
    /// The command to run once restored (optional with --keep).
    #[arg(last = true)]
    command: Vec<String>,
}

pub fn restore(args: RestoreArgs) -> Result<u8> {
    if args.keep {
        let name = args.name.as_deref().unwrap_or_default();
        let origin = Origin::Restore {
            snapshot: keeper::absolute(&args.snapshot)?,
            hostname: args.hostname.clone(),
            disks: args.disks.absolute()?,
            flush: args.disks.flush.policy(),
        };
        keeper::start(name, &origin)?;
        let code = if args.command.is_empty() {
            0
        } else {
            exec_in(name, &args.command, &args.command_args)?
        };
        eprintln!("capsule: sandbox {name} keeps running (capsule exec|snapshot|stop {name})");
        return Ok(code);
    }
    if args.command.is_empty() {
        bail!("give a command to run in the restored guest, or --keep --name NAME");
    }
    let t0 = Instant::now();
    let options = RestoreOptions {
        vm: args.disks.vm_options(args.memory_backend)?,
        identity: sandbox::Identity {
            hostname: args.hostname.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut vm =
        Sandbox::restore(&args.snapshot, options).map_err(|e| restore_error(e, &args.snapshot))?;
    let restored = t0.elapsed();
    let t_exec = Instant::now();
    let status = exec::stream(vm.agent()?, &args.command, &args.command_args)?;
    let exec_time = t_exec.elapsed();
    // The first lazy restore of a snapshot records what the guest needed,
    // for the next ones to prefetch (a read-only snapshot just goes
    // without).
    if args.memory_backend == Backend::Uffd
        && !args.snapshot.join(vmm::persist::WORKING_SET_FILE).exists()
    {
        let _ = vm.vm().save_working_set(&args.snapshot);
    }
    // The restored VM's disk writes live in a layer in its runtime
    // directory, which goes with it: nothing is worth a clean power-off.
    vm.kill();
    if args.timings {
        if let Some(phases) = vm.restore_timings() {
            eprint!("capsule: where the restore went:\n{phases}");
        }
        eprintln!(
            "capsule: restore to ready {:.1} ms, command {:.1} ms",
            restored.as_secs_f64() * 1e3,
            exec_time.as_secs_f64() * 1e3
        );
    }
    Ok(exec::exit_code(&status))
}

#[derive(Args, Debug)]
pub struct ForkArgs {
    /// The snapshot directory.
    snapshot: PathBuf,
    #[command(flatten)]
    disks: SnapshotDisks,
    /// How many replicas to start (1 to 256).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    count: u16,
    /// Print restore and command times on stderr.
    #[arg(long)]
    timings: bool,
    /// How the replicas' memory is brought back (`file` shares one page
    /// cache copy between them).
    #[arg(long, value_enum, default_value_t = Backend::File)]
    memory_backend: Backend,
    #[command(flatten)]
    command_args: CommandArgs,
    /// The command each replica runs. Its output is shown once every
    /// replica is done; together they may keep 256 MiB of it (at least
    /// 1 MiB each).
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

/// Restores `count` replicas of one snapshot at once, each with its own
/// hostname (`fork-<i>`), machine id and randomness; runs the command in
/// each and prints every replica's output prefixed with its name. The
/// replicas are discarded afterwards, their disk writes with them.
pub fn fork(args: ForkArgs) -> Result<u8> {
    let t0 = Instant::now();
    let results: Vec<Result<ForkResult>> = std::thread::scope(|scope| {
        let forks: Vec<_> = (0..usize::from(args.count))
            .map(|i| {
                let args = &args;
                scope.spawn(move || run_fork(i, args))
            })
            .collect();
        forks
            .into_iter()
            .map(|f| {
                f.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the fork's thread panicked")))
            })
            .collect()
    });
    let wall = t0.elapsed();
    let mut worst = 0u8;
    let mut slowest = Duration::ZERO;
    let mut all_ran = Duration::ZERO;
    let mut ran_count = 0;
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Ok(ForkResult { out, ready, ran }) => {
                ran_count += 1;
                slowest = slowest.max(ready);
                all_ran = all_ran.max(ran.duration_since(t0));
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    println!("[fork-{i}] {line}");
                }
                for line in String::from_utf8_lossy(&out.stderr).lines() {
                    eprintln!("[fork-{i}] {line}");
                }
                worst = worst.max(exec::exit_code(&out.status));
            }
            Err(e) => {
                eprintln!("[fork-{i}] capsule: error: {e:#}");
                worst = crate::run::SANDBOX_FAILURE;
            }
        }
    }
    if args.timings && ran_count == 0 {
        eprintln!(
            "capsule: no fork ran its command; all stopped after {:.1} ms",
            wall.as_secs_f64() * 1e3
        );
    } else if args.timings {
        eprintln!(
            "capsule: {ran_count} of {} forks restored and ran their command in {:.1} ms \
             (slowest restore {:.1} ms); all stopped after {:.1} ms",
            args.count,
            all_ran.as_secs_f64() * 1e3,
            slowest.as_secs_f64() * 1e3,
            wall.as_secs_f64() * 1e3
        );
    }
    Ok(worst)
}

/// Output all replicas of one `capsule fork` may hold between them.
const FORK_OUTPUT_BUDGET: usize = 256 << 20;

/// What one fork did.
struct ForkResult {
    out: sandbox::Output,
    /// How long its restore took.
    ready: Duration,
    /// When its command had finished.
    ran: Instant,
}

fn run_fork(i: usize, args: &ForkArgs) -> Result<ForkResult> {
    let t0 = Instant::now();
    let options = RestoreOptions {
        vm: args.disks.vm_options(args.memory_backend)?,
        identity: sandbox::fork_identity(format!("fork-{i}"))?,
        ..Default::default()
    };
    let mut vm =
        Sandbox::restore(&args.snapshot, options).map_err(|e| restore_error(e, &args.snapshot))?;
    let ready = t0.elapsed();
    let request = args.command_args.request(&args.command, false);
    // Every replica's output is held until all are done: share a budget.
    let limit = (FORK_OUTPUT_BUDGET / usize::from(args.count)).max(1 << 20);
    let out = match vm
        .agent()
        .and_then(|a| Ok(a.exec(request)?.output_with_limit(limit)?))
    {
        Ok(out) => out,
        // A guest that dies mid-command closes the agent connection: say
        // how the VM ended rather than just that.
        Err(e) => match vm.wait(Some(Duration::from_millis(200))) {
            Some(exit) => bail!("the VM ended while running the command: {exit} ({e})"),
            None => return Err(e.into()),
        },
    };
    let ran = Instant::now();
    // A fork's disk writes live in a layer in its runtime directory, which
    // goes with it: nothing is worth a clean power-off.
    vm.kill();
    Ok(ForkResult { out, ready, ran })
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// The sandbox's name.
    name: String,
}

pub fn stop(args: StopArgs) -> Result<u8> {
    keeper::stop(&args.name)?;
    Ok(0)
}

pub fn ls() -> Result<u8> {
    for s in keeper::list()? {
        println!("{}\tpid {}\thostname {}", s.name, s.pid, s.hostname);
    }
    Ok(0)
}
