//! The CLI commands that go through the daemon's API: `sandbox`, `group`,
//! `events`, `rm`, and `exec` on a daemon sandbox (an id starting `sb-`).
//! Each prints a human table, or with `--json` exactly what the API sent.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

use crate::api::model::Sandbox;
use crate::api::stats::SandboxStats;
use crate::client::{encode, ApiClient};
use crate::exec::CommandArgs;
use crate::progress::while_waiting;

/// Daemon sandbox ids start so; kept sandboxes may not be named so.
pub const DAEMON_ID_PREFIX: &str = "sb-";

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// What a delete prints with `--json` (nothing without): what went.
fn print_deleted(json: bool, what: Value) -> Result<u8> {
    if json {
        print_json(&json!({ "deleted": what }))?;
    }
    Ok(0)
}

#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Create a sandbox and wait until it takes commands; prints its id.
    Create(CreateArgs),
    /// List sandboxes (all but ended ones, unless --state says otherwise).
    Ls(ListArgs),
    /// Show one sandbox.
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// What a sandbox uses of the host now: CPU time, memory, disk, uptime.
    Stats {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// End a sandbox now (with --json, prints its final record).
    Rm {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Replace a sandbox's labels.
    Label {
        id: String,
        /// key=value (repeatable; none clears them)
        #[arg(value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long)]
        json: bool,
    },
    /// Suspend a sandbox to disk (memory and disks kept, no VMM process).
    Suspend {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume a suspended sandbox where it was.
    Resume {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Snapshot a running sandbox into a template named NAME (it carries
    /// on); `capsule template fork NAME` makes sandboxes from it.
    Snapshot {
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Set when a sandbox expires, from now (0 for never).
    Timeout {
        id: String,
        #[arg(value_parser = parse_timeout)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    crate::labels::parse_label(s).map_err(|e| e.to_string())
}

/// Seconds, with a unit (`30m`, `2h`) or `0` for never.
fn parse_timeout(s: &str) -> Result<u64, String> {
    if s == "0" {
        return Ok(0);
    }
    crate::args::parse_seconds(s).map(|d| d.as_secs().max(1))
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Restore it from this template (which sets its root filesystem,
    /// vCPUs and memory).
    #[arg(long, conflicts_with_all = ["rootfs", "cpus", "memory"])]
    template: Option<String>,
    /// Boot from this ext4 root filesystem image (the sandbox gets its own copy).
    #[arg(long)]
    rootfs: Option<std::path::PathBuf>,
    #[arg(long, value_parser = crate::args::parse_cpus)]
    cpus: Option<u8>,
    /// Guest memory, e.g. 256M or 1G (default 256M).
    #[arg(long, value_parser = crate::args::parse_size_mib)]
    memory: Option<u64>,
    #[command(flatten)]
    placement: Placement,
    /// Suspend it to disk after this long without a command (e.g. 5m);
    /// the next command resumes it.
    #[arg(long, value_parser = parse_timeout)]
    idle_suspend: Option<u64>,
    #[arg(long)]
    json: bool,
}

/// Where new sandboxes go and what they carry: for create and fork alike.
#[derive(Args, Debug)]
pub struct Placement {
    /// The group whose quota it counts against.
    #[arg(long, default_value = "default")]
    group: String,
    /// key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Destroy it after this long (e.g. 30m; 0 for never).
    #[arg(long, default_value = "5m", value_parser = parse_timeout)]
    timeout: u64,
    /// A secret of its group that every command gets as an environment
    /// variable of the same name (repeatable).
    #[arg(long = "secret")]
    secrets: Vec<String>,
}

impl Placement {
    /// Its fields of a create or fork body.
    fn fields(&self) -> serde_json::Map<String, Value> {
        let labels: std::collections::BTreeMap<_, _> = self.labels.iter().cloned().collect();
        let body = json!({
            "group": self.group,
            "labels": labels,
            "timeout_seconds": self.timeout,
            "secrets": self.secrets,
        });
        match body {
            Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Label selector: `owner=alice,job!=7,tier in (a,b),!debug`.
    #[arg(long = "label", short = 'l')]
    selector: Option<String>,
    /// States, comma-separated: creating, running, suspended, ended.
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    json: bool,
}

fn labels_text(s: &Sandbox) -> String {
    let parts: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.join(",")
}

fn show(s: &Sandbox) {
    println!("id:       {}", s.id);
    println!("state:    {}", s.state);
    println!("group:    {}", s.group);
    println!("size:     {} vCPU, {} MiB", s.cpus, s.memory_mib);
    println!("labels:   {}", labels_text(s));
    println!("created:  {}", s.created_at);
    println!("ends:     {}", s.end_at.as_deref().unwrap_or("never"));
    if let Some(e) = &s.ended {
        println!(
            "ended:    {} ({}{})",
            e.at,
            e.reason,
            if e.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", e.detail)
            }
        );
    }
}

/// `bytes` in the largest binary unit that keeps it at least 1.
fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn show_stats(s: &SandboxStats) {
    let or_none = |v: Option<String>| v.unwrap_or_else(|| format!("- ({})", s.state));
    println!("id:       {}", s.id);
    println!("state:    {}", s.state);
    println!(
        "uptime:   {}",
        or_none(s.uptime_seconds.map(|t| {
            humantime::format_duration(std::time::Duration::from_secs(t as u64)).to_string()
        }))
    );
    println!(
        "cpu:      {}",
        or_none(
            s.cpu_seconds
                .map(|t| format!("{t:.2} s on {} vCPU", s.cpus))
        )
    );
    println!(
        "memory:   {}",
        or_none(s.memory_bytes.map(|m| format!(
            "{} resident ({} its share) of {}",
            size_text(m),
            size_text(s.memory_pss_bytes.unwrap_or(m)),
            size_text(s.memory_limit_bytes)
        )))
    );
    println!("disk:     {}", size_text(s.disk_bytes));
}

fn print_sandbox(s: &Sandbox, json: bool) -> Result<()> {
    if json {
        print_json(s)
    } else {
        show(s);
        Ok(())
    }
}

pub fn sandbox(command: SandboxCommand) -> Result<u8> {
    let api = ApiClient::new()?;
    match command {
        SandboxCommand::Create(a) => {
            let rootfs = a
                .rootfs
                .as_deref()
                .map(crate::keeper::absolute)
                .transpose()?
                .map(|p| p.to_string_lossy().into_owned());
            let mut body = a.placement.fields();
            body.extend([
                ("template".to_string(), json!(a.template)),
                ("rootfs".to_string(), json!(rootfs)),
                ("cpus".to_string(), json!(a.cpus)),
                ("memory_mib".to_string(), json!(a.memory)),
                (
                    "idle_suspend_seconds".to_string(),
                    json!(a.idle_suspend.filter(|s| *s > 0)),
                ),
            ]);
            let body = Value::Object(body);
            let s: Sandbox = while_waiting("creating a sandbox", a.json, || {
                api.call(Method::POST, "/v1/sandboxes", Some(body))
            })?;
            if a.json {
                print_json(&s)?;
            } else {
                println!("{}", s.id);
            }
        }
        SandboxCommand::Ls(a) => {
            let mut query = Vec::new();
            if let Some(sel) = &a.selector {
                query.push(format!("label_selector={}", encode(sel)));
            }
            if let Some(state) = &a.state {
                query.push(format!("state={}", encode(state)));
            }
            let path = format!("/v1/sandboxes?{}", query.join("&"));
            let list: Vec<Sandbox> = api.call(Method::GET, &path, None)?;
            if a.json {
                return print_json(&list).map(|_| 0);
            }
            println!(
                "{:<22} {:<10} {:<10} {:>4} {:>7}  {:<24} LABELS",
                "ID", "STATE", "GROUP", "CPUS", "MEMORY", "ENDS"
            );
            for s in &list {
                println!(
                    "{:<22} {:<10} {:<10} {:>4} {:>6}M  {:<24} {}",
                    s.id,
                    s.state.to_string(),
                    s.group,
                    s.cpus,
                    s.memory_mib,
                    s.end_at.as_deref().unwrap_or("never"),
                    labels_text(s)
                );
            }
        }
        SandboxCommand::Get { id, json } => {
            let s: Sandbox =
                api.call(Method::GET, &format!("/v1/sandboxes/{}", encode(&id)), None)?;
            print_sandbox(&s, json)?;
        }
        SandboxCommand::Stats { id, json } => {
            let s: SandboxStats = api.call(
                Method::GET,
                &format!("/v1/sandboxes/{}/stats", encode(&id)),
                None,
            )?;
            if json {
                print_json(&s)?;
            } else {
                show_stats(&s);
            }
        }
        SandboxCommand::Rm { id, json } => {
            api.delete(&format!("/v1/sandboxes/{}", encode(&id)))?;
            if json {
                let s: Sandbox =
                    api.call(Method::GET, &format!("/v1/sandboxes/{}", encode(&id)), None)?;
                print_json(&s)?;
            }
        }
        SandboxCommand::Label { id, labels, json } => {
            let body = json!({ "labels": labels.into_iter().collect::<std::collections::BTreeMap<_, _>>() });
            let s: Sandbox = api.call(
                Method::PATCH,
                &format!("/v1/sandboxes/{}", encode(&id)),
                Some(body),
            )?;
            print_sandbox(&s, json)?;
        }
        SandboxCommand::Suspend { id, json } => {
            let s: Sandbox = while_waiting(&format!("suspending {id}"), json, || {
                api.call(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/suspend", encode(&id)),
                    None,
                )
            })?;
            print_sandbox(&s, json)?;
        }
        SandboxCommand::Resume { id, json } => {
            let s: Sandbox = while_waiting(&format!("resuming {id}"), json, || {
                api.call(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/resume", encode(&id)),
                    None,
                )
            })?;
            print_sandbox(&s, json)?;
        }
        SandboxCommand::Snapshot { id, name, json } => {
            let t: Value = while_waiting(&format!("snapshotting {id} as {name}"), json, || {
                api.call(
                    Method::POST,
                    &format!("/v1/sandboxes/{}/snapshot", encode(&id)),
                    Some(json!({ "name": name })),
                )
            })?;
            print_template(&t, json)?;
        }
        SandboxCommand::Timeout { id, timeout, json } => {
            let body = json!({ "timeout_seconds": timeout });
            let s: Sandbox = api.call(
                Method::POST,
                &format!("/v1/sandboxes/{}/timeout", encode(&id)),
                Some(body),
            )?;
            print_sandbox(&s, json)?;
        }
    }
    Ok(0)
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a group with a quota.
    Create {
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
        #[arg(long)]
        json: bool,
    },
    /// List groups with their quotas and use.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Replace a group's quota.
    Quota {
        name: String,
        #[command(flatten)]
        quota: QuotaArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete a group that has no live sandboxes.
    Rm {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct QuotaArgs {
    #[arg(long)]
    max_sandboxes: Option<u32>,
    #[arg(long)]
    max_vcpus: Option<u32>,
    /// e.g. 64G
    #[arg(long, value_parser = parse_quota_memory)]
    max_memory: Option<u64>,
}

/// A memory quota may be far above this host's memory (it caps a group,
/// it is not one guest), so it is parsed without that bound.
fn parse_quota_memory(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a size like 64G, got {s:?}"))?;
    let mib = match unit {
        "" | "M" | "m" | "MiB" => Some(n),
        "G" | "g" | "GiB" => n.checked_mul(1024),
        "T" | "t" | "TiB" => n.checked_mul(1024 * 1024),
        _ => return Err(format!("unknown unit in {s:?}: use M, G or T")),
    };
    mib.filter(|m| *m <= u64::from(u32::MAX))
        .ok_or_else(|| format!("{s} is too large"))
}

impl QuotaArgs {
    fn body(&self) -> Value {
        json!({
            "max_sandboxes": self.max_sandboxes,
            "max_vcpus": self.max_vcpus,
            "max_memory_mib": self.max_memory,
        })
    }
}

pub fn group(command: GroupCommand) -> Result<u8> {
    let api = ApiClient::new()?;
    let (value, json): (Value, bool) = match command {
        GroupCommand::Create { name, quota, json } => (
            api.call(
                Method::POST,
                "/v1/groups",
                Some(json!({ "name": name, "quota": quota.body() })),
            )?,
            json,
        ),
        GroupCommand::Quota { name, quota, json } => (
            api.call(
                Method::PUT,
                &format!("/v1/groups/{}/quota", encode(&name)),
                Some(quota.body()),
            )?,
            json,
        ),
        GroupCommand::Ls { json } => (api.call(Method::GET, "/v1/groups", None)?, json),
        GroupCommand::Rm { name, json } => {
            api.delete(&format!("/v1/groups/{}", encode(&name)))?;
            return print_deleted(json, json!({ "group": name }));
        }
    };
    if json {
        print_json(&value)?;
        return Ok(0);
    }
    let groups = match value {
        Value::Array(a) => a,
        one => vec![one],
    };
    let limit = |v: &Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
    println!(
        "{:<16} {:>14} {:>12} {:>18}",
        "GROUP", "SANDBOXES", "VCPUS", "MEMORY (MiB)"
    );
    for g in &groups {
        let (q, u) = (&g["quota"], &g["usage"]);
        println!(
            "{:<16} {:>14} {:>12} {:>18}",
            g["name"].as_str().unwrap_or("?"),
            format!("{}/{}", u["sandboxes"], limit(&q["max_sandboxes"])),
            format!("{}/{}", u["vcpus"], limit(&q["max_vcpus"])),
            format!("{}/{}", u["memory_mib"], limit(&q["max_memory_mib"])),
        );
    }
    Ok(0)
}

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Build a template: boot, run COMMAND (it must exit 0), snapshot.
    /// Creating a sandbox from it is then a restore.
    Create {
        name: String,
        /// Boot from this ext4 root filesystem image (copied).
        #[arg(long)]
        rootfs: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 1, value_parser = crate::args::parse_cpus)]
        cpus: u8,
        #[arg(long, default_value = "256M", value_parser = crate::args::parse_size_mib)]
        memory: u64,
        /// How long COMMAND may run.
        #[arg(long, default_value = "10m", value_parser = parse_timeout)]
        timeout: u64,
        #[arg(long)]
        json: bool,
        /// The priming command and its arguments.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List templates and snapshots.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Delete a template (its sandboxes carry on).
    Rm {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Make COUNT sandboxes from a template at once; prints their ids.
    Fork {
        name: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[command(flatten)]
        placement: Placement,
        #[arg(long)]
        json: bool,
    },
}

fn print_template(t: &Value, json: bool) -> Result<()> {
    if json {
        return print_json(t);
    }
    println!(
        "{:<24} {:<9} {:>4} {:>7}  {}",
        t["name"].as_str().unwrap_or("?"),
        t["kind"].as_str().unwrap_or("?"),
        t["cpus"],
        format!("{}M", t["memory_mib"]),
        t["created_at"].as_str().unwrap_or("?")
    );
    Ok(())
}

pub fn template(command: TemplateCommand) -> Result<u8> {
    let api = ApiClient::new()?;
    match command {
        TemplateCommand::Create {
            name,
            rootfs,
            cpus,
            memory,
            timeout,
            json,
            command,
        } => {
            let rootfs = rootfs
                .as_deref()
                .map(crate::keeper::absolute)
                .transpose()?
                .map(|p| p.to_string_lossy().into_owned());
            let building = format!("building template {name} (boot, run the command, snapshot)");
            let t: Value = while_waiting(&building, json, || {
                api.call(
                    Method::POST,
                    "/v1/templates",
                    Some(json!({
                        "name": name, "rootfs": rootfs, "cpus": cpus, "memory_mib": memory,
                        "cmd": command, "timeout_seconds": timeout,
                    })),
                )
            })?;
            print_template(&t, json)?;
        }
        TemplateCommand::Ls { json } => {
            let list: Vec<Value> = api.call(Method::GET, "/v1/templates", None)?;
            if json {
                return print_json(&list).map(|_| 0);
            }
            println!(
                "{:<24} {:<9} {:>4} {:>7}  CREATED",
                "NAME", "KIND", "CPUS", "MEMORY"
            );
            for t in &list {
                print_template(t, false)?;
            }
        }
        TemplateCommand::Rm { name, json } => {
            api.delete(&format!("/v1/templates/{}", encode(&name)))?;
            return print_deleted(json, json!({ "template": name }));
        }
        TemplateCommand::Fork {
            name,
            count,
            placement,
            json,
        } => {
            let mut body = placement.fields();
            body.insert("count".into(), json!(count));
            let forks: Vec<Value> =
                while_waiting(&format!("forking {count} from {name}"), json, || {
                    api.call(
                        Method::POST,
                        &format!("/v1/templates/{}/fork", encode(&name)),
                        Some(Value::Object(body)),
                    )
                })?;
            if json {
                return print_json(&forks).map(|_| 0);
            }
            let mut failed = 0;
            for f in &forks {
                match f["sandbox"]["id"].as_str() {
                    Some(id) => println!("{id}"),
                    None => {
                        failed += 1;
                        eprintln!("capsule: a fork failed: {}", f["error"]["message"]);
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {count} forks failed");
            }
        }
    }
    Ok(0)
}

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// Keep WARM restored sandboxes of a template ready.
    Set {
        template: String,
        #[arg(long)]
        warm: u32,
        #[arg(long)]
        json: bool,
    },
    /// The pools, with how many are ready.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Stop keeping a template's sandboxes ready.
    Rm {
        template: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn pool(command: PoolCommand) -> Result<u8> {
    let api = ApiClient::new()?;
    let (pools, json): (Vec<Value>, bool) = match command {
        PoolCommand::Set {
            template,
            warm,
            json,
        } => (
            vec![api.call(
                Method::PUT,
                &format!("/v1/pools/{}", encode(&template)),
                Some(json!({ "warm": warm })),
            )?],
            json,
        ),
        PoolCommand::Ls { json } => (api.call(Method::GET, "/v1/pools", None)?, json),
        PoolCommand::Rm { template, json } => {
            api.delete(&format!("/v1/pools/{}", encode(&template)))?;
            return print_deleted(json, json!({ "pool": template }));
        }
    };
    if json {
        return print_json(&pools).map(|_| 0);
    }
    println!("{:<24} {:>5} {:>5}", "TEMPLATE", "READY", "WARM");
    for p in &pools {
        println!(
            "{:<24} {:>5} {:>5}",
            p["template"].as_str().unwrap_or("?"),
            p["ready"],
            p["warm"]
        );
    }
    Ok(0)
}

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Set a group's secret; the value is read from stdin, or asked for
    /// without echo on a terminal. It is never shown again.
    Set {
        group: String,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List a group's secrets (names and dates only).
    Ls {
        group: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a group's secret.
    Rm {
        group: String,
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn secret(command: SecretCommand) -> Result<u8> {
    let api = ApiClient::new()?;
    match command {
        SecretCommand::Set { group, name, json } => {
            let value = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                rpassword::prompt_password(format!("value of {name}: "))
                    .context("reading the value")?
            } else {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .context("reading the value from stdin")?;
                // A value piped with `echo` ends in a newline it did not mean.
                text.strip_suffix('\n').map(str::to_string).unwrap_or(text)
            };
            let value = zeroize::Zeroizing::new(value);
            let () = api.call(
                Method::PUT,
                &format!("/v1/groups/{}/secrets/{}", encode(&group), encode(&name)),
                Some(json!({ "value": value.as_str() })),
            )?;
            if json {
                print_json(&json!({ "group": group, "secret": name, "set": true }))?;
            } else {
                eprintln!("capsule: secret {name} set in group {group}");
            }
        }
        SecretCommand::Ls { group, json } => {
            let list: Vec<Value> = api.call(
                Method::GET,
                &format!("/v1/groups/{}/secrets", encode(&group)),
                None,
            )?;
            if json {
                return print_json(&list).map(|_| 0);
            }
            println!("{:<32} {:<26} UPDATED", "NAME", "CREATED");
            for s in &list {
                println!(
                    "{:<32} {:<26} {}",
                    s["name"].as_str().unwrap_or("?"),
                    s["created_at"].as_str().unwrap_or("?"),
                    s["updated_at"].as_str().unwrap_or("?")
                );
            }
        }
        SecretCommand::Rm { group, name, json } => {
            api.delete(&format!(
                "/v1/groups/{}/secrets/{}",
                encode(&group),
                encode(&name)
            ))?;
            return print_deleted(json, json!({ "group": group, "secret": name }));
        }
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Keep following new events as they happen.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Start after this sequence number.
    #[arg(long, default_value_t = 0)]
    after: i64,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

fn print_event(e: &Value, json: bool) {
    if json {
        println!("{e}");
        return;
    }
    let at = e["at"]
        .as_i64()
        .map(crate::api::model::timestamp)
        .unwrap_or_default();
    println!(
        "{:>6} {} {:<10} {:<22} {}",
        e["seq"],
        at,
        e["kind"].as_str().unwrap_or("?"),
        e["sandbox_id"].as_str().unwrap_or("-"),
        e["detail"]
    );
}

pub fn events(args: EventsArgs) -> Result<u8> {
    let api = ApiClient::new()?;
    if !args.follow {
        let events: Vec<Value> = api.call(
            Method::GET,
            &format!("/v1/events?after={}", args.after),
            None,
        )?;
        for e in &events {
            print_event(e, args.json);
        }
        return Ok(0);
    }
    api.stream_lines(
        Method::GET,
        &format!("/v1/events/stream?after={}", args.after),
        None,
        |line| {
            if let Some(data) = line.strip_prefix(b"data: ") {
                let e: Value = serde_json::from_slice(data).context("a bad event")?;
                print_event(&e, args.json);
                std::io::stdout().flush()?;
            }
            Ok(())
        },
    )?;
    Ok(0)
}

/// `capsule exec sb-... -- cmd`: through the API, output streamed, exit
/// status as the command's.
pub fn exec(id: &str, argv: &[String], args: &CommandArgs) -> Result<u8> {
    let api = ApiClient::new()?;
    let mut stdin = None;
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("reading stdin (the API takes it as text)")?;
        stdin = Some(text);
    }
    let body = json!({
        "cmd": argv,
        "env": args.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "cwd": args.workdir,
        "user": args.user,
        "timeout_seconds": args.timeout.map(|d: Duration| d.as_secs().max(1)),
        "stdin": stdin,
    });
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut code = None;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
    api.stream_lines(
        Method::POST,
        &format!("/v1/sandboxes/{}/exec", encode(id)),
        Some(body),
        |line| {
            let event: crate::api::exec::ExecLine = serde_json::from_slice(line)
                .context("the daemon sent a line that is not an event")?;
            use crate::api::exec::ExecLine;
            match event {
                ExecLine::Started { .. } => {}
                ExecLine::Stdout { data } => {
                    out.write_all(&b64.decode(data)?)?;
                    out.flush()?;
                }
                ExecLine::Stderr { data } => err.write_all(&b64.decode(data)?)?,
                ExecLine::Exit {
                    exit_code,
                    signal,
                    timed_out,
                } => {
                    code = Some(crate::exec::exit_code(&sandbox::ExitStatus {
                        code: exit_code,
                        signal,
                        timed_out,
                    }))
                }
                ExecLine::Error { message, .. } => bail!("sandbox {id}: {message}"),
            }
            Ok(())
        },
    )?;
    code.with_context(|| {
        format!("sandbox {id}: the command's stream ended without its exit status")
    })
}
