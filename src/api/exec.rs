//! `POST /v1/sandboxes/{id}/exec`: a command whose output streams back as
//! newline-delimited JSON (`application/x-ndjson`), one event per line, as
//! the guest produces it. The same framing will carry PTYs and files.
//!
//! ```text
//! {"type":"started","pid":42}
//! {"type":"stdout","data":"aGVsbG8K"}           base64: output is bytes
//! {"type":"exit","exit_code":0,"signal":null,"timed_out":false}
//! {"type":"error","code":"lost","message":"..."}  the last line, if the stream broke
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sandbox::{ExecEvent, ExecRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{Json, Path};
use crate::daemon::supervisor::{Busy, LifecycleError, RunningCommand};
use crate::daemon::AppState;
use crate::store::{SandboxState, StoreError};

/// Longest command timeout: 30 days.
const MAX_TIMEOUT_SECONDS: u64 = 30 * 24 * 3600;
/// Events buffered between the guest and a slow client; past this the
/// guest is held back by the agent's flow control, never the daemon's
/// memory.
const BUFFERED_EVENTS: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments; the program is looked up in `PATH`.
    #[schema(min_items = 1)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the user's home).
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid` (default: root).
    pub user: Option<String>,
    /// Kill the command after this many seconds (at most 30 days).
    #[serde(default, deserialize_with = "crate::json_num::opt_u64")]
    #[schema(minimum = 1, maximum = 2592000)]
    pub timeout_seconds: Option<u64>,
    /// Text given to the command's stdin, then end of file (default: none).
    pub stdin: Option<String>,
    /// Keep its stdin open (after `stdin`, if given) for
    /// `POST /v1/sandboxes/{id}/commands/{pid}/stdin`, until a write there
    /// says `eof`.
    #[serde(default)]
    pub keep_stdin_open: bool,
}

/// The most environment variables a sandbox or a command may set.
const MAX_ENV: usize = 256;
/// The longest environment value, in characters.
const MAX_ENV_VALUE: usize = 32 << 10;

/// Checks environment variables a request sets: names without `=` or
/// NUL, values without NUL, both bounded.
pub(super) fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if env.len() > MAX_ENV {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_ENV} environment variables"
        )));
    }
    if let Some(bad) = env
        .keys()
        .find(|k| k.is_empty() || k.chars().count() > 256 || k.contains(['=', '\0']))
    {
        return Err(ApiError::bad_request(format!(
            "env name {bad:?} is not valid"
        )));
    }
    if let Some((name, _)) = env
        .iter()
        .find(|(_, v)| v.chars().count() > MAX_ENV_VALUE || v.contains('\0'))
    {
        return Err(ApiError::bad_request(format!(
            "env {name}: a value may not hold NUL or pass {MAX_ENV_VALUE} characters"
        )));
    }
    Ok(())
}

/// One line of an exec's output stream.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecLine {
    Started {
        pid: i32,
    },
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    Error {
        code: String,
        message: String,
    },
}

impl ExecBody {
    fn request(&self) -> Result<ExecRequest, ApiError> {
        if self.cmd.is_empty() {
            return Err(ApiError::bad_request("cmd must name a program"));
        }
        if self.cmd.iter().any(|a| a.contains('\0')) {
            return Err(ApiError::bad_request("cmd arguments may not contain NUL"));
        }
        check_env(&self.env)?;
        if let Some(t) = self.timeout_seconds {
            if t == 0 || t > MAX_TIMEOUT_SECONDS {
                return Err(ApiError::bad_request(format!(
                    "timeout_seconds must be 1 to {MAX_TIMEOUT_SECONDS}"
                )));
            }
        }
        Ok(ExecRequest {
            argv: self.cmd.clone(),
            env: self.env.clone().into_iter().collect(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            stdin: self.stdin.is_some() || self.keep_stdin_open,
            timeout_ms: self.timeout_seconds.map(|t| t * 1000),
            pty: None,
        })
    }
}

/// The most commands the daemon streams at once (each holds a thread).
const MAX_RUNNING: usize = 1024;
static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the commands the daemon streams; refused past [`MAX_RUNNING`].
struct Running;

impl Running {
    fn start() -> Result<Running, ApiError> {
        use std::sync::atomic::Ordering;
        if RUNNING.fetch_add(1, Ordering::SeqCst) >= MAX_RUNNING {
            RUNNING.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_commands",
                format!("the daemon streams at most {MAX_RUNNING} commands at once"),
            ));
        }
        Ok(Running)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The running sandbox `id`, marked busy so idle suspend leaves it be. A
/// sandbox that idle suspend put to sleep is resumed first (the caller
/// sees latency, never an error); one suspended or ended otherwise is a
/// conflict.
pub(super) async fn acquire(state: &Arc<AppState>, id: &str) -> Result<Busy, ApiError> {
    // Long enough for a suspend or a resume under way to finish.
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(100));
    while tokio::time::Instant::now() < end {
        let record = state.supervisor.store().sandbox(id)?;
        match (record.state, state.supervisor.live(id)) {
            (SandboxState::Running, Some(live)) => {
                let busy = live.busy();
                // Still the live one: a suspend that took it out of the
                // map before we marked it busy has not been missed.
                if state
                    .supervisor
                    .live(id)
                    .is_some_and(|l| Arc::ptr_eq(&l, &live))
                {
                    return Ok(busy);
                }
                pause().await;
            }
            (SandboxState::Suspended, _) if record.idle_suspend_ms.is_some() => {
                let supervisor = Arc::clone(&state.supervisor);
                let id = id.to_string();
                match super::sandboxes::blocking(move || supervisor.resume(&id)).await? {
                    Ok(_) => {}
                    // Another request is resuming it (or did).
                    Err(LifecycleError::Store(StoreError::Conflict(_))) => pause().await,
                    Err(e) => {
                        return Err(ApiError::new(
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "resume_failed",
                            e.to_string(),
                        ))
                    }
                }
            }
            // Being suspended or adopted right now: wait for it to finish.
            (SandboxState::Running, None) => pause().await,
            (s, _) => {
                return Err(ApiError::conflict(format!(
                    "sandbox {id} is {s}, not running"
                )))
            }
        }
    }
    Err(ApiError::conflict(format!(
        "sandbox {id} is being suspended or resumed; try again"
    )))
}

fn line(event: &ExecLine) -> Bytes {
    ndjson_line(event)
}

/// One line of a newline-delimited JSON stream.
pub(super) fn ndjson_line(value: &impl Serialize) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// A response whose body is the lines `rx` yields, as they come.
pub(super) fn ndjson_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let body = Body::from_stream(tokio_stream::StreamExt::map(
        stream,
        Ok::<_, std::convert::Infallible>,
    ));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// The command `body` asks for in sandbox `id`, as the guest runs it: its
/// environment is the sandbox's, then its secrets, then what the request
/// sets itself, each winning over the one before. An unknown sandbox is a
/// 404 whatever the body.
pub(super) fn guest_request(
    state: &AppState,
    id: &str,
    body: &ExecBody,
) -> Result<ExecRequest, ApiError> {
    let record = state.supervisor.store().sandbox(id)?;
    let mut request = body.request()?;
    let secrets = super::secrets::environment(state, &record.group, &record.secrets)?;
    let mut env: Vec<(String, String)> = record.env.clone().into_iter().collect();
    env.extend(secrets.iter().map(|(k, v)| (k.clone(), v.to_string())));
    env.append(&mut request.env);
    request.env = env;
    Ok(request)
}

/// Run a command in a sandbox, its output streamed.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/exec", operation_id = "exec", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ExecBody,
    responses(
        (status = 200, description = "The command's events, one JSON object per line",
         content_type = "application/x-ndjson", body = ExecLine),
        (status = 400, description = "Bad command", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It is not running", body = ErrorBody),
        (status = 429, description = "The daemon streams its most commands", body = ErrorBody),
        (status = 502, description = "Its guest did not take the command", body = ErrorBody),
    )
)]
pub async fn exec(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Json(body): Json<ExecBody>,
) -> Result<Response, ApiError> {
    // What it is run in is looked up before the command is checked: an
    // unknown sandbox is a 404 whatever the body.
    let request = guest_request(&state, &id, &body)?;
    let cmd = request.argv.clone();
    let running = Running::start()?;
    let busy = acquire(&state, &id).await?;
    let (stdin, keep_stdin_open) = (body.stdin.clone(), body.keep_stdin_open);
    let agent_busy = busy.live().clone();
    let mut handle = super::sandboxes::blocking(move || agent_busy.agent.exec(request))
        .await?
        .map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "guest_unavailable",
                format!("sandbox {id}'s guest did not take the command: {e}"),
            )
        })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(BUFFERED_EVENTS);
    let pid = handle.pid();
    let id_for_log = id.clone();
    std::thread::Builder::new()
        .name("exec-stream".into())
        .spawn(move || {
            // The sandbox counts as busy until the command ends, and
            // the command takes signals and stdin through the API.
            let live = Arc::clone(busy.live());
            let (_busy, _running) = (busy, running);
            let registered = live.commands.register(
                pid,
                RunningCommand {
                    input: handle.input(),
                    cmd,
                    started_at: crate::store::now_ms(),
                    stdin_open: keep_stdin_open,
                },
            );
            if let Some(text) = stdin {
                let input = handle.input();
                std::thread::spawn(move || {
                    let _ = input.write_stdin(text.as_bytes());
                    if !keep_stdin_open {
                        let _ = input.close_stdin();
                    }
                });
            }
            let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
            if tx.blocking_send(line(&ExecLine::Started { pid })).is_err() {
                let _ = handle.kill();
                return;
            }
            loop {
                // A wait with a deadline, so a client that left is noticed
                // while the command is quiet, and the command killed.
                let next = match handle.next_event_timeout(std::time::Duration::from_secs(1)) {
                    Err(sandbox::ClientError::Timeout) if tx.is_closed() => {
                        let _ = handle.kill();
                        return;
                    }
                    Err(sandbox::ClientError::Timeout) => continue,
                    other => other,
                };
                let event = match next {
                    Ok(Some(ExecEvent::Stdout(d))) => ExecLine::Stdout { data: b64(&d) },
                    Ok(Some(ExecEvent::Stderr(d))) => ExecLine::Stderr { data: b64(&d) },
                    Ok(Some(ExecEvent::Exit(status))) => {
                        // Gone from the list before the client hears it ended.
                        drop(registered);
                        let _ = tx.blocking_send(line(&ExecLine::Exit {
                            exit_code: status.code,
                            signal: status.signal,
                            timed_out: status.timed_out,
                        }));
                        return;
                    }
                    broken => {
                        let message = match broken {
                            Err(e) => e.to_string(),
                            _ => "the command's stream ended without an exit status".into(),
                        };
                        // What the guest said last tells a crash from a
                        // stall or a reset: for the daemon's log.
                        let console = {
                            use sandbox::Machine;
                            let child = live.child.lock().unwrap_or_else(|p| p.into_inner());
                            child.console_tail(20)
                        };
                        tracing::warn!(
                            sandbox = %id_for_log,
                            "a command's stream broke ({message}); the guest's console:\n{console}"
                        );
                        let _ = tx.blocking_send(line(&ExecLine::Error {
                            code: "lost".into(),
                            message,
                        }));
                        return;
                    }
                };
                // A client that went away: the command goes too.
                if tx.blocking_send(line(&event)).is_err() {
                    let _ = handle.kill();
                    return;
                }
            }
        })
        .map_err(|e| ApiError::internal(format!("starting the stream: {e}")))?;
    Ok(ndjson_response(rx))
}
