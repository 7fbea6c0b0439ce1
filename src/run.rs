//! `capsule run`: boot, run one command with streamed output, tear down.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use vmm::{ExecEvent, ExecRequest, Vm};

use crate::artifacts;

/// Exit status when the sandbox, not the command, failed.
pub const SANDBOX_FAILURE: u8 = 125;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, default_value = "256M", value_parser = parse_size_mib)]
    memory: u64,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory for the command.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// User to run as: name, uid or uid:gid.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Boot from this ext4 root filesystem image (any image with a shell).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Attach the root filesystem read-only.
    #[arg(long, requires = "rootfs")]
    read_only: bool,
    /// Extra raw disk image, attached after the root disk (repeatable).
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// Guest kernel (vmlinux or bzImage).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs holding the guest agent.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
    /// Give up if the guest is not ready within this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    boot_timeout: f64,
    /// Guest hostname.
    #[arg(long, default_value = "capsule")]
    hostname: String,
    /// Show the guest's console (kernel messages) on stderr.
    #[arg(long)]
    console: bool,
    /// Print boot, command and teardown times on stderr.
    #[arg(long)]
    timings: bool,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

fn parse_size_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "M"),
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mib = match mult
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "M" => n,
        "G" => n * 1024,
        _ => return Err(format!("unknown unit in {s:?} (use M or G)")),
    };
    if mib < 32 {
        return Err("memory must be at least 32M".into());
    }
    Ok(mib)
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

pub fn run(args: RunArgs) -> Result<u8> {
    let kernel = artifacts::find(
        args.kernel.as_deref(),
        "CAPSULE_KERNEL",
        artifacts::KERNEL_FILE,
    )?;
    let initramfs = artifacts::find(
        args.initramfs.as_deref(),
        "CAPSULE_INITRAMFS",
        artifacts::INITRAMFS_FILE,
    )?;
    let mut builder = Vm::builder()
        .kernel(&kernel)
        .initramfs(&initramfs)
        .cpus(args.cpus)
        .memory_mib(args.memory)
        .hostname(&args.hostname)
        .console_to_stderr(args.console)
        .verbose_console(args.console);
    if let Some(rootfs) = &args.rootfs {
        if !rootfs.is_file() {
            bail!("root filesystem {} does not exist", rootfs.display());
        }
        builder = builder.rootfs(rootfs, args.read_only);
    }
    for disk in &args.disk {
        builder = builder.disk(disk, false);
    }

    let t0 = Instant::now();
    let mut vm = builder.boot().context("cannot start the microVM")?;
    let ready = vm.wait_ready(Duration::from_secs_f64(args.boot_timeout))?;

    let forward_stdin = !std::io::stdin().is_terminal();
    let request = ExecRequest {
        argv: args.command.clone(),
        env: args.env.clone(),
        cwd: args.workdir.clone(),
        user: args.user.clone(),
        stdin: forward_stdin,
        timeout_ms: args.timeout.map(|s| (s * 1000.0) as u64),
    };
    let t_exec = Instant::now();
    let mut handle = vm.agent()?.exec(request)?;
    if forward_stdin {
        let input = handle.input();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.write_stdin(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = input.close_stdin();
        });
    }
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let status = loop {
        let event = match handle.next_event() {
            Ok(event) => event,
            Err(e) => {
                let exit = vm
                    .wait(Some(Duration::from_secs(5)))
                    .map_or("is unresponsive".to_string(), |x| format!("stopped: {x}"));
                bail!(
                    "lost the command's stream ({e}); the microVM {exit}. Last console lines:\n{}",
                    vm.console_tail(20)
                );
            }
        };
        match event {
            Some(ExecEvent::Stdout(d)) => {
                stdout.write_all(&d).context("writing to stdout")?;
                stdout.flush()?;
            }
            Some(ExecEvent::Stderr(d)) => {
                let _ = stderr.write_all(&d);
            }
            Some(ExecEvent::Exit(status)) => break status,
            None => bail!("the command's stream ended without an exit status"),
        }
    };
    let exec_time = t_exec.elapsed();
    drop(handle);
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
    if status.timed_out {
        eprintln!("capsule: the command timed out and was killed");
    }
    Ok(status.shell_code().clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("300"), Ok(300));
        assert!(parse_size_mib("16M").is_err());
        assert!(parse_size_mib("lots").is_err());
        assert!(parse_size_mib("5T").is_err());
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=1"), Ok(("A".into(), "1".into())));
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=1").is_err());
        assert!(parse_env("A").is_err());
    }
}
