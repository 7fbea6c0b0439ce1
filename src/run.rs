//! `capsule run`: boot, run one command with streamed output, tear down
//! (or, with `--keep`, leave the sandbox running under a name).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;

use crate::args;
use crate::exec::{self, CommandArgs};
use crate::keeper::{self, BootSpec, Origin};

/// Exit status when the sandbox, not the command, failed.
pub const SANDBOX_FAILURE: u8 = crate::exit::FAILED;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = args::parse_cpus)]
    cpus: u8,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, default_value = "256M", value_parser = args::parse_size_mib)]
    memory: u64,
    #[command(flatten)]
    command_args: CommandArgs,
    /// Boot from this ext4 root filesystem image (any image with a shell).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Attach the root filesystem read-only.
    #[arg(long, requires = "rootfs")]
    read_only: bool,
    /// Extra raw disk image, attached after the root disk (repeatable).
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// What the guest's disk flushes do.
    #[arg(long, value_enum, default_value_t)]
    flush: args::Flush,
    /// Guest kernel (vmlinux or bzImage).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs holding the guest agent.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Give up if the guest is not ready within this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = args::parse_seconds)]
    boot_timeout: Duration,
    /// Guest hostname.
    #[arg(long, default_value = "capsule", value_parser = args::parse_hostname)]
    hostname: String,
    /// Show the guest's console (kernel messages) on stderr.
    #[arg(long)]
    console: bool,
    /// Print boot, command and teardown times on stderr.
    #[arg(long)]
    timings: bool,
    /// Keep the sandbox running after the command, under --name, for
    /// `capsule exec`, `snapshot` and `stop`.
    #[arg(long, requires = "name")]
    keep: bool,
    /// Name of the kept sandbox.
    #[arg(long, requires = "keep")]
    name: Option<String>,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

pub fn run(args: RunArgs) -> Result<u8> {
    let spec = BootSpec {
        kernel: args.kernel.clone(),
        initramfs: args.initramfs.clone(),
        cpus: args.cpus,
        memory_mib: args.memory,
        hostname: args.hostname.clone(),
        rootfs: args.rootfs.clone(),
        read_only: args.read_only,
        disks: args.disk.clone(),
        console: args.console,
        flush: args.flush.policy(),
        boot_timeout_ms: args.boot_timeout.as_millis() as u64,
    };
    if args.keep {
        let name = args.name.as_deref().unwrap_or_default();
        let t0 = Instant::now();
        keeper::start(name, &Origin::Boot(spec))?;
        let ready = t0.elapsed();
        let code = crate::commands::exec_in(name, &args.command, &args.command_args)?;
        if args.timings {
            eprintln!(
                "capsule: sandbox {name} ready in {:.1} ms",
                ready.as_secs_f64() * 1e3
            );
        }
        eprintln!("capsule: sandbox {name} keeps running (capsule exec|snapshot|stop {name})");
        return Ok(code);
    }
    // Validate paths before booting, for a clear error.
    if let Some(rootfs) = &args.rootfs {
        if !rootfs.is_file() {
            bail!("root filesystem {} does not exist", rootfs.display());
        }
    }
    let t0 = Instant::now();
    let mut vm = spec.boot()?;
    let ready = vm.ready_after().unwrap_or_default();
    let t_exec = Instant::now();
    let status = match exec::stream(vm.agent()?, &args.command, &args.command_args) {
        Ok(status) => status,
        Err(e) => {
            let exit = vm
                .wait(Some(Duration::from_secs(5)))
                .map_or("is unresponsive".to_string(), |x| format!("stopped: {x}"));
            bail!(
                "{e:#}; the microVM {exit}. Last console lines:\n{}",
                vm.console_tail(20)
            );
        }
    };
    let exec_time = t_exec.elapsed();
    let t_down = Instant::now();
    vm.shutdown(Duration::from_secs(10))?;
    if args.timings {
        eprintln!(
            "capsule: boot to ready {:.1} ms, command {:.1} ms, teardown {:.1} ms, total {:.1} ms",
            ready.as_secs_f64() * 1e3,
            exec_time.as_secs_f64() * 1e3,
            t_down.elapsed().as_secs_f64() * 1e3,
            t0.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(exec::exit_code(&status))
}
