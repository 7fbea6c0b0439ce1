//! `/v1/sandboxes/{id}/processes`: detached processes. They belong to the
//! guest's agent, not to a request: they run on when the client that
//! started them goes (and across a suspend and resume), and their output is
//! kept in the guest (the last 4 MiB of each), to be read from any offset,
//! as often as wanted, as newline-delimited JSON:
//!
//! ```text
//! {"type":"stdout","offset":0,"data":"aGVsbG8K"}
//! {"type":"end","next_offset":6,"running":false,"exit_code":0,"signal":null,"timed_out":false}
//! ```

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;
use guest_agent::protocol::{ErrorCode, ProcessInfo};
use guest_agent::LogEvent;
use sandbox::ClientError;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::commands::SignalBody;
use super::error::{ApiError, ErrorBody};
use super::exec::{acquire, guest_request, ndjson_line, ndjson_response, ExecBody};
use super::extract::{Json, Path, Query};
use super::model::timestamp;
use super::sandboxes::blocking;
use crate::daemon::AppState;

/// Lines buffered between the guest and a slow client.
const BUFFERED_LINES: usize = 64;

/// A detached process.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessView {
    /// Its process id in the guest.
    pub pid: i32,
    pub cmd: Vec<String>,
    pub running: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Output bytes written so far, stdout and stderr together: the offset
    /// the next byte will have.
    pub output_bytes: u64,
    /// The first offset still kept (older output was dropped).
    pub kept_from: u64,
    /// When it started, by the guest's clock.
    pub started_at: String,
}

impl From<ProcessInfo> for ProcessView {
    fn from(p: ProcessInfo) -> Self {
        ProcessView {
            pid: p.pid,
            cmd: p.argv,
            running: p.exit.is_none(),
            exit_code: p.exit.and_then(|e| e.code),
            signal: p.exit.and_then(|e| e.signal),
            timed_out: p.exit.is_some_and(|e| e.timed_out),
            output_bytes: p.output_bytes,
            kept_from: p.kept_from,
            started_at: timestamp(p.started_at_ms as i64),
        }
    }
}

/// One line of a process's log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LogLine {
    /// Output (base64) at `offset`, bytes since the process started.
    Stdout {
        offset: u64,
        data: String,
    },
    Stderr {
        offset: u64,
        data: String,
    },
    /// The last line: read on from `next_offset`; how it ended, if it has.
    End {
        next_offset: u64,
        running: bool,
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    /// The last line, if the stream broke.
    Error {
        code: String,
        message: String,
    },
}

fn guest_error(id: &str, pid: Option<i32>, e: ClientError) -> ApiError {
    match e {
        ClientError::Refused {
            code: ErrorCode::NoSuchProcess,
            message,
        } => ApiError::new(StatusCode::NOT_FOUND, "process_not_found", message),
        ClientError::Refused {
            code: ErrorCode::SpawnFailed | ErrorCode::BadRequest,
            message,
        } => ApiError::bad_request(message),
        ClientError::Refused {
            code: ErrorCode::TooManyStreams,
            message,
        } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_processes", message),
        e => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "guest_unavailable",
            match pid {
                Some(pid) => {
                    format!("sandbox {id}'s guest did not answer about process {pid}: {e}")
                }
                None => format!("sandbox {id}'s guest did not answer: {e}"),
            },
        ),
    }
}

/// Runs `f` with the running sandbox's agent, on a worker thread.
async fn with_agent<T: Send + 'static>(
    state: &Arc<AppState>,
    id: &str,
    pid: Option<i32>,
    f: impl FnOnce(&sandbox::AgentClient) -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ApiError> {
    let busy = acquire(state, id).await?;
    let id = id.to_string();
    blocking(move || f(&busy.live().agent).map_err(|e| guest_error(&id, pid, e))).await?
}

/// Start a detached process: it runs on whatever happens to this request.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/processes", operation_id = "start_process", tag = "processes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ExecBody,
    responses(
        (status = 201, description = "It runs", body = ProcessView),
        (status = 400, description = "Bad command, or it could not be started", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It is not running", body = ErrorBody),
        (status = 429, description = "The guest runs its most detached processes", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn start(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(body): Json<ExecBody>,
) -> Result<(StatusCode, axum::Json<ProcessView>), ApiError> {
    let request = guest_request(&state, &id, &body)?;
    if body.stdin.is_some() || body.keep_stdin_open {
        return Err(ApiError::bad_request(
            "a detached process has no stdin (its stdin is /dev/null)",
        ));
    }
    let info = with_agent(&state, &id, None, move |agent| {
        let pid = agent.spawn(request)?;
        let listed = agent.processes()?;
        listed
            .into_iter()
            .find(|p| p.pid == pid)
            .ok_or_else(|| ClientError::Lost(format!("process {pid} is not listed")))
    })
    .await?;
    Ok((StatusCode::CREATED, axum::Json(info.into())))
}

/// The detached processes: running, and the latest that ended.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/processes", operation_id = "list_processes", tag = "processes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Oldest first", body = Vec<ProcessView>),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<axum::Json<Vec<ProcessView>>, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let listed = with_agent(&state, &id, None, |agent| agent.processes()).await?;
    Ok(axum::Json(
        listed.into_iter().map(ProcessView::from).collect(),
    ))
}

/// One detached process.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/processes/{pid}", operation_id = "get_process", tag = "processes",
    params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Process id")),
    responses(
        (status = 200, description = "It", body = ProcessView),
        (status = 400, description = "Bad pid", body = ErrorBody),
        (status = 404, description = "No such sandbox or process", body = ErrorBody),
        (status = 409, description = "It is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, i32)>,
) -> Result<axum::Json<ProcessView>, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let listed = with_agent(&state, &id, Some(pid), |agent| agent.processes()).await?;
    listed
        .into_iter()
        .find(|p| p.pid == pid)
        .map(|p| axum::Json(p.into()))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "process_not_found",
                format!("no detached process {pid} in sandbox {id}"),
            )
        })
}

/// Send a signal to a detached process's group.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/processes/{pid}/signal", operation_id = "signal_process", tag = "processes",
    params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Process id")),
    request_body = SignalBody,
    responses(
        (status = 204, description = "Sent (or it had already ended)"),
        (status = 400, description = "Bad signal", body = ErrorBody),
        (status = 404, description = "No such sandbox or process", body = ErrorBody),
        (status = 409, description = "It is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn signal(
    State(state): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, i32)>,
    Json(body): Json<SignalBody>,
) -> Result<StatusCode, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    if !(1..=64).contains(&body.signal) {
        return Err(ApiError::bad_request("signal must be 1 to 64"));
    }
    let signal = body.signal as i32;
    with_agent(&state, &id, Some(pid), move |agent| {
        agent.signal_process(pid, signal)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Read from this offset (default 0: all that is kept).
    pub offset: Option<u64>,
    /// Stay until the process exits, streaming output as it comes
    /// (default: end once what there is now is sent).
    pub follow: Option<bool>,
}

/// A detached process's output from an offset, as newline-delimited JSON.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/processes/{pid}/logs", operation_id = "process_logs", tag = "processes",
    params(("id" = String, Path, description = "Sandbox id"), ("pid" = i32, Path, description = "Process id"), LogsQuery),
    responses(
        (status = 200, description = "Its output, one JSON object per line, then an end line",
         content_type = "application/x-ndjson", body = LogLine),
        (status = 400, description = "Bad pid or query", body = ErrorBody),
        (status = 404, description = "No such sandbox or process", body = ErrorBody),
        (status = 409, description = "It is not running", body = ErrorBody),
        (status = 502, description = "Its guest did not answer", body = ErrorBody),
    )
)]
pub async fn logs(
    State(state): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, i32)>,
    Query(query): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let (offset, follow) = (query.offset.unwrap_or(0), query.follow.unwrap_or(false));
    let busy = acquire(&state, &id).await?;
    let live = Arc::clone(busy.live());
    let id_for_error = id.clone();
    let mut attach = blocking(move || live.agent.attach(pid, offset, follow))
        .await?
        .map_err(|e| guest_error(&id_for_error, Some(pid), e))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(BUFFERED_LINES);
    std::thread::Builder::new()
        .name("process-logs".into())
        .spawn(move || {
            // A follower keeps the sandbox busy, as a running exec does.
            let _busy = busy;
            let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
            loop {
                let next = attach.next_event(Some(std::time::Duration::from_secs(1)));
                let out = match next {
                    // Quiet: is anyone still listening?
                    Err(ClientError::Timeout) if tx.is_closed() => return,
                    Err(ClientError::Timeout) => continue,
                    Ok(Some(LogEvent::Stdout { offset, bytes })) => LogLine::Stdout {
                        offset,
                        data: b64(&bytes),
                    },
                    Ok(Some(LogEvent::Stderr { offset, bytes })) => LogLine::Stderr {
                        offset,
                        data: b64(&bytes),
                    },
                    Ok(Some(LogEvent::End { next_offset, exit })) => {
                        let _ = tx.blocking_send(ndjson_line(&LogLine::End {
                            next_offset,
                            running: exit.is_none(),
                            exit_code: exit.and_then(|e| e.code),
                            signal: exit.and_then(|e| e.signal),
                            timed_out: exit.is_some_and(|e| e.timed_out),
                        }));
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.blocking_send(ndjson_line(&LogLine::Error {
                            code: "lost".into(),
                            message: e.to_string(),
                        }));
                        return;
                    }
                };
                if tx.blocking_send(ndjson_line(&out)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| ApiError::internal(format!("starting the stream: {e}")))?;
    Ok(ndjson_response(rx))
}
