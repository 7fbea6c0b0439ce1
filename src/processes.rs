//! `capsule exec --detach`, `capsule ps`, `capsule logs` and `capsule
//! kill`: detached processes in a daemon sandbox, through the API's
//! `/processes` endpoints. A detached process runs on after the command
//! that started it; its output is kept in the guest (the last 4 MiB) and
//! read from any offset.

use std::io::Write;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Args;
use hyper::Method;
use serde_json::json;

use crate::api::processes::{LogLine, ProcessView};
use crate::client::{encode, ApiClient};
use crate::exec::CommandArgs;

/// Starts `argv` detached in daemon sandbox `id` and prints its pid.
pub fn start(id: &str, argv: &[String], args: &CommandArgs) -> Result<u8> {
    let body = json!({
        "cmd": argv,
        "env": args.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "cwd": args.workdir,
        "user": args.user,
        "timeout_seconds": args.timeout.map(|d| d.as_secs().max(1)),
    });
    let view: ProcessView = ApiClient::new()?.call(
        Method::POST,
        &format!("/v1/sandboxes/{}/processes", encode(id)),
        Some(body),
    )?;
    println!("{}", view.pid);
    Ok(0)
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// The daemon sandbox's id.
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

pub fn ps(args: PsArgs) -> Result<u8> {
    let listed: Vec<ProcessView> = ApiClient::new()?.call(
        Method::GET,
        &format!("/v1/sandboxes/{}/processes", encode(&args.id)),
        None,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
        return Ok(0);
    }
    println!(
        "{:>7}  {:<12} {:>10}  {:<24}  COMMAND",
        "PID", "STATE", "OUTPUT", "STARTED"
    );
    for p in listed {
        let state = match (p.running, p.exit_code, p.signal) {
            (true, _, _) => "running".to_string(),
            (false, Some(code), _) => format!("exited {code}"),
            (false, None, Some(signal)) => format!("signal {signal}"),
            (false, None, None) => "ended".to_string(),
        };
        println!(
            "{:>7}  {:<12} {:>10}  {:<24}  {}",
            p.pid,
            state,
            p.output_bytes,
            p.started_at,
            p.cmd.join(" ")
        );
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// The daemon sandbox's id.
    pub id: String,
    /// The detached process's pid (as `capsule exec --detach` printed it).
    pub pid: i32,
    /// Stay until it exits, printing output as it comes.
    #[arg(short, long)]
    pub follow: bool,
    /// Start at this byte offset of its output (default 0: all that is kept).
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
    /// Print the API's lines as they come (base64 data, offsets, the end).
    #[arg(long)]
    pub json: bool,
}

pub fn logs(args: LogsArgs) -> Result<u8> {
    let api = ApiClient::new()?;
    let path = format!(
        "/v1/sandboxes/{}/processes/{}/logs?offset={}&follow={}",
        encode(&args.id),
        args.pid,
        args.offset,
        args.follow
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
    let mut first = true;
    let mut broke = None;
    api.stream_lines(Method::GET, &path, None, |line| {
        if args.json {
            out.write_all(line)?;
            out.write_all(b"\n")?;
            return Ok(out.flush()?);
        }
        let event: LogLine =
            serde_json::from_slice(line).context("the daemon sent a line that is not an event")?;
        if first {
            first = false;
            if let LogLine::Stdout { offset, .. } | LogLine::Stderr { offset, .. } = &event {
                if *offset > args.offset {
                    eprintln!(
                        "capsule: output before offset {offset} was dropped (the guest keeps \
                         the last 4 MiB)"
                    );
                }
            }
        }
        match event {
            LogLine::Stdout { data, .. } => {
                out.write_all(&b64.decode(data)?)?;
                out.flush()?;
            }
            LogLine::Stderr { data, .. } => err.write_all(&b64.decode(data)?)?,
            LogLine::End { .. } => {}
            LogLine::Error { message, .. } => broke = Some(message),
        }
        Ok(())
    })?;
    if let Some(message) = broke {
        bail!("sandbox {}: {message}", args.id);
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct KillArgs {
    /// The daemon sandbox's id.
    pub id: String,
    /// The detached process's pid.
    pub pid: i32,
    /// A signal name (TERM, KILL, INT, HUP, ...) or number; KILL by default.
    #[arg(short, long, default_value = "KILL", value_parser = parse_signal)]
    pub signal: u32,
}

/// A signal by name (with or without `SIG`) or number.
pub fn parse_signal(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("signal {n} is not 1 to 64"))
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.trim_start_matches("SIG");
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        _ => {
            return Err(format!(
                "unknown signal {s:?} (a name like TERM, or a number)"
            ))
        }
    };
    Ok(n as u32)
}

pub fn kill(args: KillArgs) -> Result<u8> {
    let () = ApiClient::new()?.call(
        Method::POST,
        &format!(
            "/v1/sandboxes/{}/processes/{}/signal",
            encode(&args.id),
            args.pid
        ),
        Some(json!({ "signal": args.signal })),
    )?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn signals_are_named_or_numbered() {
        use super::parse_signal;
        assert_eq!(parse_signal("TERM"), Ok(15));
        assert_eq!(parse_signal("sigkill"), Ok(9));
        assert_eq!(parse_signal("2"), Ok(2));
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("BOGUS").is_err());
    }
}
