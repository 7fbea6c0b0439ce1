//! MCP tools for detached processes: start one (a server, a long job) that
//! runs on between tool calls, page through its output, list, signal, and
//! expose a server's port on the host.

use base64::Engine;
use hyper::Method;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{schemars, tool, tool_router, ErrorData};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

use super::{answer, blocking, seg, CapsuleMcp, SHOWN_BYTES};
use crate::api::processes::{LogLine, ProcessView};

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct StartParams {
    /// The sandbox id.
    pub id: String,
    /// A shell command line, run with `sh -c`.
    pub command: Option<String>,
    /// Or the program and its arguments, run without a shell.
    pub argv: Option<Vec<String>>,
    /// Working directory.
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct LogsParams {
    /// The sandbox id.
    pub id: String,
    /// The process id process_start returned.
    pub pid: i32,
    /// Byte offset to read from (default 0); pass the last call's
    /// `next_offset` to read on.
    #[serde(default)]
    pub offset: u64,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ProcessParams {
    /// The sandbox id.
    pub id: String,
    /// The process id.
    pub pid: i32,
    /// Signal number (default 9, SIGKILL; 15 asks it to stop).
    pub signal: Option<u32>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ListParams {
    /// The sandbox id.
    pub id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PortParams {
    /// The sandbox id.
    pub id: String,
    /// The TCP port a server in the sandbox listens on (its loopback is
    /// enough).
    pub port: u16,
}

#[tool_router(router = processes_router, vis = "pub(super)")]
impl CapsuleMcp {
    #[tool(
        description = "Start a long-running process in a sandbox (a server, a build) and return its `pid` at once. It keeps running between tool calls; read its output with process_logs, stop it with process_kill."
    )]
    async fn process_start(
        &self,
        Parameters(p): Parameters<StartParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let cmd = match (p.command, p.argv) {
            (Some(line), None) => vec!["sh".into(), "-c".into(), line],
            (None, Some(argv)) => argv,
            _ => return answer(Err(anyhow::anyhow!("give exactly one of command and argv"))),
        };
        let path = format!("/v1/sandboxes/{}/processes", seg(&p.id));
        let body = json!({ "cmd": cmd, "cwd": p.cwd, "env": p.env });
        answer(
            blocking(move |api| {
                let view: ProcessView = api.call(Method::POST, &path, Some(body))?;
                Ok(serde_json::to_value(view)?)
            })
            .await,
        )
    }

    #[tool(
        description = "A started process's output from `offset`, at most 16 KiB per call: `stdout`, `stderr`, `next_offset` to read on from, and `running` / `exit_code`. Call again with `next_offset` for more; it does not wait for new output."
    )]
    async fn process_logs(
        &self,
        Parameters(p): Parameters<LogsParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!(
            "/v1/sandboxes/{}/processes/{}/logs?offset={}&follow=false",
            seg(&p.id),
            p.pid,
            p.offset
        );
        answer(blocking(move |api| page(api, &path, p.offset)).await)
    }

    #[tool(
        description = "The processes started with process_start in a sandbox, running or ended."
    )]
    async fn process_list(
        &self,
        Parameters(p): Parameters<ListParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/processes", seg(&p.id));
        answer(blocking(move |api| api.call(Method::GET, &path, None)).await)
    }

    #[tool(
        description = "Expose a TCP port of a sandbox (a server started with process_start) on the host: returns the `address` (127.0.0.1:N) on the host that reaches it. It stays exposed until the sandbox ends."
    )]
    async fn port_expose(
        &self,
        Parameters(p): Parameters<PortParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/ports", seg(&p.id));
        let body = json!({ "port": p.port });
        answer(blocking(move |api| api.call::<Value>(Method::POST, &path, Some(body))).await)
    }

    #[tool(
        description = "Send a signal to a started process (SIGKILL unless `signal` says otherwise)."
    )]
    async fn process_kill(
        &self,
        Parameters(p): Parameters<ProcessParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/processes/{}", seg(&p.id), p.pid);
        let signal = p.signal.unwrap_or(9);
        answer(
            blocking(move |api| {
                let () = api.call(
                    Method::POST,
                    &format!("{path}/signal"),
                    Some(json!({ "signal": signal })),
                )?;
                api.call::<Value>(Method::GET, &path, None)
            })
            .await,
        )
    }
}

/// One page of a process's log: up to [`SHOWN_BYTES`] from `offset`, cut
/// at a character, and where to read on.
fn page(api: &crate::client::ApiClient, path: &str, offset: u64) -> anyhow::Result<Value> {
    let b64 = base64::engine::general_purpose::STANDARD;
    // stdout, stderr
    let mut bufs: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut next = offset;
    let mut end = None;
    let mut full = false;
    api.stream_lines(Method::GET, path, None, |line| {
        let event: LogLine = serde_json::from_slice(line)?;
        let (which, at, data) = match event {
            LogLine::Stdout { offset, data } => (0, offset, data),
            LogLine::Stderr { offset, data } => (1, offset, data),
            LogLine::End {
                next_offset,
                running,
                exit_code,
                signal,
                ..
            } => {
                end = Some((next_offset, running, exit_code, signal));
                return Ok(());
            }
            LogLine::Error { message, .. } => anyhow::bail!("the log's stream broke: {message}"),
        };
        if full {
            return Ok(());
        }
        let bytes = b64.decode(data)?;
        let room = SHOWN_BYTES.saturating_sub(bufs[0].len() + bufs[1].len());
        let mut take = bytes.len().min(room);
        if take < bytes.len() {
            // Whole characters only: the rest comes on the next page.
            if let Err(e) = std::str::from_utf8(&bytes[..take]) {
                take = e.valid_up_to();
            }
            full = true;
        }
        bufs[which].extend_from_slice(&bytes[..take]);
        next = at + take as u64;
        Ok(())
    })?;
    let [stdout, stderr] = bufs;
    let (last, running, exit_code, signal) = end.unwrap_or((next, true, None, None));
    if !full {
        next = last;
    }
    Ok(json!({
        "stdout": String::from_utf8_lossy(&stdout),
        "stderr": String::from_utf8_lossy(&stderr),
        "next_offset": next,
        "more": next < last,
        "running": running,
        "exit_code": exit_code,
        "signal": signal,
    }))
}
