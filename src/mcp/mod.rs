//! `capsule mcp`: a Model Context Protocol server (rmcp) on stdio, or on
//! streamable HTTP with `--http`, whose tools drive sandboxes through the
//! daemon's HTTP API, so a model gets exactly what the CLI and the SDK
//! get, quotas and permissions included.
//!
//! A command's output is capped for the model ([`SHOWN_BYTES`] per stream);
//! the whole of it (up to [`KEPT_BYTES`]) is kept under an `output_id`
//! that `exec_output` pages through. Errors come back as tool results
//! marked as errors, with the API's stable code and what to do, so a model
//! can act on them; malformed calls are MCP errors; the server carries on.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use base64::Engine;
use hyper::Method;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use serde::Deserialize;
use serde_json::{json, Value};

mod files;
mod processes;

use crate::api::exec::ExecLine;
use crate::client::{encode as seg, ApiClient, ApiRefusal, DaemonUnreachable};

/// Output bytes per stream shown to the model in a tool result.
pub(crate) const SHOWN_BYTES: usize = 16 << 10;
/// Output bytes per stream kept for `exec_output`.
const KEPT_BYTES: usize = 4 << 20;
/// Outputs kept for `exec_output`, newest last: with [`KEPT_BYTES`], at
/// most 128 MiB held for a chatty model.
const KEPT_OUTPUTS: usize = 16;

#[derive(clap::Args, Debug)]
pub struct McpArgs {
    /// Serve MCP's streamable HTTP transport on this address, at `/mcp`,
    /// instead of stdio (e.g. 127.0.0.1:8765). Every request needs
    /// `Authorization: Bearer <token>`, the token read from --token-file.
    #[arg(long, requires = "token_file")]
    pub http: Option<SocketAddr>,
    /// File holding the bearer token for --http (made, 0600, with a fresh
    /// token if missing).
    #[arg(long, requires = "http")]
    pub token_file: Option<PathBuf>,
}

pub fn serve(args: McpArgs) -> Result<u8> {
    let token = args
        .token_file
        .as_deref()
        .map(crate::bearer::read_or_make)
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        match (args.http, token) {
            (Some(addr), Some(token)) => serve_http(addr, token).await,
            _ => {
                let service = CapsuleMcp::new()
                    .serve(rmcp::transport::stdio())
                    .await
                    .context("starting the MCP server on stdio")?;
                service.waiting().await.context("serving MCP")?;
                Ok(())
            }
        }
    })?;
    Ok(0)
}

/// Streamable HTTP at `/mcp` behind the bearer token. Every session (and,
/// in MCP's stateless protocol versions, every request) gets a handler
/// sharing one store of kept outputs, so an `output_id` holds across them.
async fn serve_http(addr: SocketAddr, token: String) -> Result<()> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let mut config = StreamableHttpServerConfig::default();
    // The Host header is checked against DNS rebinding: loopback names by
    // default, and the address served if it is not one.
    if !addr.ip().is_loopback() && !addr.ip().is_unspecified() {
        config.allowed_hosts.push(addr.ip().to_string());
        config.allowed_hosts.push(addr.to_string());
    }
    let shared = CapsuleMcp::new();
    let service = StreamableHttpService::new(
        move || Ok(shared.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let app = crate::bearer::guard(axum::Router::new().nest_service("/mcp", service), token);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let bound = listener.local_addr()?;
    // The address actually bound (port 0 picks one), for scripts and tests.
    eprintln!("capsule mcp: serving MCP on http://{bound}/mcp (bearer token required)");
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::daemon::shutdown_signal())
        .await
        .context("serving MCP over HTTP")
}

/// A command's whole output, kept for paging.
struct KeptOutput {
    id: String,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

#[derive(Clone)]
pub struct CapsuleMcp {
    tool_router: ToolRouter<Self>,
    outputs: Arc<Mutex<VecDeque<KeptOutput>>>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateParams {
    /// Restore from this template or snapshot (fast; it sets the root
    /// filesystem, vCPUs and memory). See template_list.
    pub template: Option<String>,
    /// Otherwise, boot from this ext4 image on the daemon's host.
    pub rootfs: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// The group whose quota it counts against (default `default`).
    pub group: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Seconds until it is destroyed (default 300; 0 for never).
    pub timeout_seconds: Option<u64>,
    /// Names of the group's secrets its commands get as environment.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Environment every command in it gets.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct IdParams {
    /// The sandbox id (`sb-...`).
    pub id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ListParams {
    /// Kubernetes-style label selector, e.g. `task=7,owner!=bob`.
    pub label_selector: Option<String>,
    /// Comma-separated states: creating, running, suspended, ended
    /// (default: all but ended).
    pub state: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ExecParams {
    /// The sandbox id.
    pub id: String,
    /// A shell command line, run with `sh -c`.
    pub command: Option<String>,
    /// Or the program and its arguments, run without a shell.
    pub argv: Option<Vec<String>>,
    /// Seconds before it is killed (default 60).
    pub timeout_seconds: Option<u64>,
    /// Working directory.
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Text for its stdin.
    pub stdin: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct OutputParams {
    /// The `output_id` a sandbox_exec result gave.
    pub output_id: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// Byte offset to read from.
    #[serde(default)]
    pub offset: usize,
    /// Bytes to read (default and most 16384).
    pub limit: Option<usize>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SnapshotParams {
    /// The sandbox id.
    pub id: String,
    /// The template name the snapshot gets.
    pub name: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ForkParams {
    /// The template or snapshot name.
    pub name: String,
    /// How many sandboxes, 1 to 100.
    pub count: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Seconds until each is destroyed (default 300; 0 for never).
    pub timeout_seconds: Option<u64>,
}

/// A tool's answer: JSON for the model, or an error it can act on.
fn answer(result: Result<Value>) -> Result<CallToolResult, ErrorData> {
    Ok(match result {
        Ok(value) => CallToolResult::success(vec![ContentBlock::text(
            serde_json::to_string_pretty(&value).unwrap_or_default(),
        )]),
        Err(e) => CallToolResult::error(vec![ContentBlock::text(explain(&e))]),
    })
}

/// An error with its code and a hint at what to do next.
fn explain(e: &anyhow::Error) -> String {
    if let Some(r) = e.downcast_ref::<ApiRefusal>() {
        let hint = match r.status.as_u16() {
            404 if r.code == "file_not_found" => "check the path (file_list shows a directory)",
            404 if r.code == "process_not_found" => "check the pid (process_list)",
            404 => "check the name or id (sandbox_list, template_list)",
            409 => "its state does not allow this now (see sandbox_info); retry if it was busy",
            429 => "a quota or the host's limit is reached: delete sandboxes you no longer need",
            400 => "fix the argument the message names",
            _ => "the sandbox or its VM failed: see the message",
        };
        return format!("error {}: {} ({hint})", r.code, r.message);
    }
    if e.downcast_ref::<DaemonUnreachable>().is_some() {
        return format!("error no_daemon: {e:#}");
    }
    format!("error: {e:#}")
}

/// Runs blocking API work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce(&ApiClient) -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || f(&ApiClient::new()?))
        .await
        .context("a worker failed")?
}

/// The first bytes of `data` that fit in `cap`, cut at a character.
fn shown(data: &[u8], cap: usize) -> &str {
    let head = &data[..data.len().min(cap)];
    match std::str::from_utf8(head) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default(),
    }
}

impl Default for CapsuleMcp {
    fn default() -> Self {
        Self::new()
    }
}

#[tool_router]
impl CapsuleMcp {
    pub fn new() -> Self {
        CapsuleMcp {
            tool_router: Self::tool_router() + Self::files_router() + Self::processes_router(),
            outputs: Arc::default(),
        }
    }

    fn keep(&self, stdout: Vec<u8>, stderr: Vec<u8>) -> Result<String> {
        let id = format!("out-{}", crate::daemon::supervisor::random_word(10)?);
        let mut outputs = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
        if outputs.len() >= KEPT_OUTPUTS {
            outputs.pop_front();
        }
        outputs.push_back(KeptOutput {
            id: id.clone(),
            stdout,
            stderr,
        });
        Ok(id)
    }

    #[tool(
        description = "Create an isolated sandbox (a KVM microVM) and wait until it takes commands. Returns the sandbox with its `id`. From a `template` it is a fast restore. Delete it with sandbox_delete when done."
    )]
    async fn sandbox_create(
        &self,
        Parameters(p): Parameters<CreateParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let body = json!({
            "template": p.template, "rootfs": p.rootfs, "cpus": p.cpus,
            "memory_mib": p.memory_mib, "group": p.group, "labels": p.labels,
            "timeout_seconds": p.timeout_seconds, "secrets": p.secrets, "env": p.env,
        });
        answer(blocking(move |api| api.call(Method::POST, "/v1/sandboxes", Some(body))).await)
    }

    #[tool(
        description = "List sandboxes (all but ended ones unless `state` says otherwise), optionally by label selector."
    )]
    async fn sandbox_list(
        &self,
        Parameters(p): Parameters<ListParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut query = Vec::new();
        if let Some(s) = &p.label_selector {
            query.push(format!("label_selector={}", seg(s)));
        }
        if let Some(s) = &p.state {
            query.push(format!("state={}", seg(s)));
        }
        let path = format!("/v1/sandboxes?{}", query.join("&"));
        answer(blocking(move |api| api.call(Method::GET, &path, None)).await)
    }

    #[tool(description = "A sandbox's state, labels, when it expires, and why it ended if it has.")]
    async fn sandbox_info(
        &self,
        Parameters(p): Parameters<IdParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}", seg(&p.id));
        answer(blocking(move |api| api.call(Method::GET, &path, None)).await)
    }

    #[tool(
        description = "Run a command in a sandbox and return its exit code, stdout and stderr. Give `command` (a shell line) or `argv`. Output past 16 KiB per stream is cut; the result then has an `output_id` for exec_output to read the rest. Killed after `timeout_seconds` (default 60)."
    )]
    async fn sandbox_exec(
        &self,
        Parameters(p): Parameters<ExecParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let cmd = match (&p.command, &p.argv) {
            (Some(line), None) => vec!["sh".to_string(), "-c".to_string(), line.clone()],
            (None, Some(argv)) if !argv.is_empty() => argv.clone(),
            _ => {
                return Err(ErrorData::invalid_params(
                    "give `command` (a shell line) or `argv` (a non-empty list), not both",
                    None,
                ))
            }
        };
        let body = json!({
            "cmd": cmd, "env": p.env, "cwd": p.cwd, "stdin": p.stdin,
            "timeout_seconds": p.timeout_seconds.unwrap_or(60),
        });
        let path = format!("/v1/sandboxes/{}/exec", seg(&p.id));
        let ran = blocking(move |api| collect_exec(api, &path, body)).await;
        let Collected {
            stdout,
            stderr,
            dropped,
            exit,
        } = match ran {
            Ok(r) => r,
            Err(e) => return answer(Err(e)),
        };
        let truncated = stdout.len() > SHOWN_BYTES || stderr.len() > SHOWN_BYTES;
        let mut result = json!({
            "exit_code": exit["exit_code"], "signal": exit["signal"],
            "timed_out": exit["timed_out"],
            "stdout": shown(&stdout, SHOWN_BYTES), "stderr": shown(&stderr, SHOWN_BYTES),
            "stdout_bytes": stdout.len(), "stderr_bytes": stderr.len(),
            "stdout_truncated": stdout.len() > SHOWN_BYTES,
            "stderr_truncated": stderr.len() > SHOWN_BYTES,
            // Past 4 MiB a stream's output is not kept: redirect it to a
            // file in the sandbox instead.
            "output_past_4_mib_dropped": dropped,
        });
        if truncated {
            match self.keep(stdout, stderr) {
                Ok(id) => result["output_id"] = Value::from(id),
                Err(e) => return answer(Err(e)),
            }
        }
        answer(Ok(result))
    }

    #[tool(
        description = "Read more of a command's output that sandbox_exec cut: `stream` stdout or stderr from byte `offset`."
    )]
    async fn exec_output(
        &self,
        Parameters(p): Parameters<OutputParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let outputs = self.outputs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(kept) = outputs.iter().find(|o| o.id == p.output_id) else {
            return answer(Err(anyhow::anyhow!(
                "no output {} (only the last {KEPT_OUTPUTS} are kept): run the command again",
                p.output_id
            )));
        };
        let data = match p.stream.as_str() {
            "stdout" => &kept.stdout,
            "stderr" => &kept.stderr,
            _ => {
                return Err(ErrorData::invalid_params(
                    "stream must be stdout or stderr",
                    None,
                ))
            }
        };
        let from = p.offset.min(data.len());
        let text = shown(
            &data[from..],
            p.limit.unwrap_or(SHOWN_BYTES).min(SHOWN_BYTES),
        );
        let next = from + text.len();
        answer(Ok(json!({
            "data": text, "offset": from, "next_offset": next,
            "total_bytes": data.len(), "more": next < data.len(),
        })))
    }

    #[tool(
        description = "Suspend a sandbox to disk (memory and files kept, no CPU or RAM used) until sandbox_resume."
    )]
    async fn sandbox_suspend(
        &self,
        Parameters(p): Parameters<IdParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/suspend", seg(&p.id));
        answer(blocking(move |api| api.call(Method::POST, &path, None)).await)
    }

    #[tool(description = "Resume a suspended sandbox exactly where it was.")]
    async fn sandbox_resume(
        &self,
        Parameters(p): Parameters<IdParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/resume", seg(&p.id));
        answer(blocking(move |api| api.call(Method::POST, &path, None)).await)
    }

    #[tool(
        description = "Snapshot a running sandbox (it carries on) as a template named `name`, to fork alternatives from with template_fork."
    )]
    async fn sandbox_snapshot(
        &self,
        Parameters(p): Parameters<SnapshotParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/snapshot", seg(&p.id));
        let body = json!({ "name": p.name });
        answer(blocking(move |api| api.call(Method::POST, &path, Some(body))).await)
    }

    #[tool(
        description = "Make `count` sandboxes at once from a template or snapshot, each with its own identity and its own copy of the files. Returns the sandboxes made (and why any failed)."
    )]
    async fn template_fork(
        &self,
        Parameters(p): Parameters<ForkParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/templates/{}/fork", seg(&p.name));
        let body = json!({
            "count": p.count, "labels": p.labels, "timeout_seconds": p.timeout_seconds,
        });
        answer(
            blocking(move |api| {
                let forks: Vec<Value> = api.call(Method::POST, &path, Some(body))?;
                // The sandboxes themselves, then any failure beside them.
                Ok(Value::Array(
                    forks
                        .into_iter()
                        .map(|f| match f.get("sandbox") {
                            Some(s) if !s.is_null() => s.clone(),
                            _ => json!({ "error": f["error"] }),
                        })
                        .collect(),
                ))
            })
            .await,
        )
    }

    #[tool(
        description = "List the templates and snapshots sandboxes can be created or forked from."
    )]
    async fn template_list(&self) -> Result<CallToolResult, ErrorData> {
        answer(blocking(|api| api.call(Method::GET, "/v1/templates", None)).await)
    }

    #[tool(
        description = "End a sandbox now; returns its final record. Always delete the sandboxes you made when done."
    )]
    async fn sandbox_delete(
        &self,
        Parameters(p): Parameters<IdParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}", seg(&p.id));
        answer(
            blocking(move |api| {
                api.delete(&path)?;
                api.call(Method::GET, &path, None)
            })
            .await,
        )
    }
}

/// Runs an exec, keeping up to [`KEPT_BYTES`] of each stream; the exit
/// line as JSON.
fn collect_exec(api: &ApiClient, path: &str, body: Value) -> Result<Collected> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), None);
    let mut dropped = false;
    api.stream_lines(Method::POST, path, Some(body), |line| {
        let event: ExecLine =
            serde_json::from_slice(line).context("the daemon sent a line that is not an event")?;
        match event {
            ExecLine::Stdout { data } => dropped |= append(&mut stdout, &b64.decode(data)?),
            ExecLine::Stderr { data } => dropped |= append(&mut stderr, &b64.decode(data)?),
            ExecLine::Exit { .. } => exit = Some(serde_json::to_value(&event)?),
            ExecLine::Error { message, .. } => {
                anyhow::bail!("the command's stream broke: {message}")
            }
            ExecLine::Started { .. } => {}
        }
        Ok(())
    })?;
    let exit = exit.context("the command's stream ended without its exit status")?;
    Ok(Collected {
        stdout,
        stderr,
        dropped,
        exit,
    })
}

/// A command's output as kept, and how it ended.
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Output past [`KEPT_BYTES`] was dropped.
    dropped: bool,
    exit: Value,
}

/// Appends what fits in [`KEPT_BYTES`]; whether any was dropped.
fn append(buf: &mut Vec<u8>, data: &[u8]) -> bool {
    let room = KEPT_BYTES.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
    data.len() > room
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for CapsuleMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(
                Implementation::new("capsule", env!("CARGO_PKG_VERSION"))
                    .with_title("Capsule sandboxes"),
            )
            .with_instructions(
                "Capsule runs untrusted code in isolated KVM microVM sandboxes. Create one \
                 (sandbox_create, from a template for speed), run commands in it \
                 (sandbox_exec), read and write its files (file_read, file_write, file_list), \
                 start servers and long jobs that run on between calls (process_start, \
                 process_logs, process_kill), \
                 snapshot and fork it to try alternatives, suspend it between \
                 turns, and always delete what you made (sandbox_delete)."
                    .to_string(),
            )
    }
}
