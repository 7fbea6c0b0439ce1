//! `/v1/sandboxes/{id}/commands`: the commands running in a sandbox (each
//! started by an exec, whose stream carries its output), their signals and
//! their stdin.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{Json, Path};
use super::model::timestamp;
use super::sandboxes::blocking;
use crate::daemon::supervisor::RunningCommand;
use crate::daemon::AppState;

/// How long a stdin write waits for the command to take it.
const STDIN_PATIENCE: Duration = Duration::from_secs(30);
/// The most stdin one request carries, decoded.
const MAX_STDIN_BYTES: usize = 1 << 20;

/// A command running in a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandView {
    /// Its process id in the guest (the exec stream's `started` pid).
    pub pid: i32,
    pub cmd: Vec<String>,
    pub started_at: String,
    /// Its stdin takes writes (`keep_stdin_open` at exec).
    pub stdin_open: bool,
}

/// POST /v1/sandboxes/{id}/commands/{pid}/signal
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// A signal number, 1 to 64 (9 kills, 15 asks to stop); it reaches
    /// the command's whole process group.
    #[serde(deserialize_with = "crate::json_num::u32")]
    #[schema(minimum = 1, maximum = 64)]
    pub signal: u32,
}

/// POST /v1/sandboxes/{id}/commands/{pid}/stdin
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StdinBody {
    /// Bytes for its stdin, base64 (at most 1 MiB decoded).
    #[serde(default)]
    #[schema(max_length = 1398104)]
    pub data: String,
    /// Close its stdin after `data`: it reads end of file.
    #[serde(default)]
    pub eof: bool,
}

/// The running command `pid` of sandbox `id`.
fn command(state: &AppState, id: &str, pid: i32) -> Result<Arc<RunningCommand>, ApiError> {
    state.supervisor.store().sandbox(id)?;
    state
        .supervisor
        .live(id)
        .and_then(|live| live.commands.get(pid))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "command_not_found",
                format!("no command {pid} is running in sandbox {id}"),
            )
        })
}

/// The commands running in a sandbox now (none unless it is running).
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/commands", operation_id = "list_commands", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Its running commands", body = [CommandView]),
        (status = 404, description = "No such sandbox", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<CommandView>>, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let running = state
        .supervisor
        .live(&id)
        .map(|live| live.commands.list())
        .unwrap_or_default();
    Ok(axum::Json(
        running
            .into_iter()
            .map(|(pid, c)| CommandView {
                pid,
                cmd: c.cmd.clone(),
                started_at: timestamp(c.started_at),
                stdin_open: c.stdin_open,
            })
            .collect(),
    ))
}

/// Send a signal to a running command's process group.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/commands/{pid}/signal", operation_id = "signal_command",
    tag = "sandboxes",
    params(
        ("id" = String, Path, description = "Sandbox id"),
        ("pid" = i32, Path, description = "The command's process id"),
    ),
    request_body = SignalBody,
    responses(
        (status = 204, description = "Sent"),
        (status = 400, description = "Bad signal", body = ErrorBody),
        (status = 404, description = "No such sandbox or running command", body = ErrorBody),
    )
)]
pub async fn signal(
    State(state): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, i32)>,
    Json(body): Json<SignalBody>,
) -> Result<StatusCode, ApiError> {
    let command = command(&state, &id, pid)?;
    if !(1..=64).contains(&body.signal) {
        return Err(ApiError::bad_request("signal must be 1 to 64"));
    }
    command
        .input
        .signal(body.signal as i32)
        .map_err(|e| guest_error(&id, e))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Write to a running command's stdin (an exec with `keep_stdin_open`).
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/commands/{pid}/stdin", operation_id = "write_command_stdin",
    tag = "sandboxes",
    params(
        ("id" = String, Path, description = "Sandbox id"),
        ("pid" = i32, Path, description = "The command's process id"),
    ),
    request_body = StdinBody,
    responses(
        (status = 204, description = "Written (and closed, with eof)"),
        (status = 400, description = "Not base64, or too much", body = ErrorBody),
        (status = 404, description = "No such sandbox or running command", body = ErrorBody),
        (status = 409, description = "Its stdin is not open, or it did not read it within 30 s", body = ErrorBody),
    )
)]
pub async fn stdin(
    State(state): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, i32)>,
    Json(body): Json<StdinBody>,
) -> Result<StatusCode, ApiError> {
    let command = command(&state, &id, pid)?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(body.data.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("data is not base64: {e}")))?;
    if data.len() > MAX_STDIN_BYTES {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_STDIN_BYTES} bytes of stdin per request"
        )));
    }
    if !command.stdin_open {
        return Err(ApiError::conflict(format!(
            "command {pid}'s stdin is not open: run it with keep_stdin_open"
        )));
    }
    let sandbox = id.clone();
    blocking(move || {
        command.input.write_stdin_within(&data, STDIN_PATIENCE)?;
        if body.eof {
            command.input.close_stdin()?;
        }
        Ok::<_, sandbox::ClientError>(())
    })
    .await?
    .map_err(|e| match e {
        sandbox::ClientError::Timeout => ApiError::new(
            StatusCode::CONFLICT,
            "stdin_full",
            format!(
                "command {pid} did not read its stdin within {}s (part of it may have been written)",
                STDIN_PATIENCE.as_secs()
            ),
        ),
        sandbox::ClientError::StdinClosed | sandbox::ClientError::StreamEnded => {
            ApiError::conflict(format!("command {pid} has closed its stdin or ended"))
        }
        e => guest_error(&sandbox, e),
    })?;
    Ok(StatusCode::NO_CONTENT)
}

fn guest_error(id: &str, e: sandbox::ClientError) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "guest_unavailable",
        format!("sandbox {id}'s guest: {e}"),
    )
}
