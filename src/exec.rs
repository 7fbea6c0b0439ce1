//! Running one command in a guest with its output streamed to ours: the
//! part `run`, `exec`, `restore` and `fork` share.

use std::io::{IsTerminal, Read, Write};

use anyhow::{bail, Context, Result};
use clap::Args;
use sandbox::{AgentClient, ExecEvent, ExecRequest, ExitStatus};

/// How to run the command.
#[derive(Args, Debug, Clone, Default)]
pub struct CommandArgs {
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory for the command.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// User to run as: name, uid or uid:gid.
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = crate::args::parse_seconds)]
    pub timeout: Option<std::time::Duration>,
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

impl CommandArgs {
    pub fn request(&self, argv: &[String], stdin: bool) -> ExecRequest {
        ExecRequest {
            argv: argv.to_vec(),
            env: self.env.clone(),
            cwd: self.workdir.clone(),
            user: self.user.clone(),
            stdin,
            // At most 30 days (parse_seconds): fits.
            timeout_ms: self.timeout.map(|d| d.as_millis() as u64),
            pty: None,
        }
    }
}

/// Runs `argv` through `agent`, forwarding our stdin (unless it is a
/// terminal) and streaming stdout and stderr.
pub fn stream(agent: &AgentClient, argv: &[String], args: &CommandArgs) -> Result<ExitStatus> {
    let forward_stdin = !std::io::stdin().is_terminal();
    let mut handle = agent.exec(args.request(argv, forward_stdin))?;
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
            Err(e) => bail!("lost the command's stream ({e})"),
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
    if status.timed_out {
        eprintln!("capsule: the command timed out and was killed");
    }
    Ok(status)
}

/// The process exit status for a command's status: its own, 128+N if a
/// signal N ended it, [`crate::exit::TIMED_OUT`] if its timeout did.
pub fn exit_code(status: &ExitStatus) -> u8 {
    if status.timed_out {
        return crate::exit::TIMED_OUT;
    }
    status.shell_code().clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=1"), Ok(("A".into(), "1".into())));
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=1").is_err());
        assert!(parse_env("A").is_err());
    }
}
