//! `GET /v1/sandboxes/{id}/pty`: an interactive terminal session over a
//! WebSocket. The client's first message says what to run and the
//! terminal's size; then keystrokes and output flow as binary messages,
//! resizes and signals as small JSON texts, and the session ends with the
//! program's exit status.
//!
//! ```text
//! client: {"cols":120,"rows":40}                     (text; every field optional)
//! server: {"type":"started","pid":42}                (text)
//! both:   <bytes>                                    (binary: keystrokes in, the terminal out)
//! client: {"type":"resize","cols":100,"rows":30}     (text)
//! client: {"type":"signal","signal":15}              (text)
//! server: {"type":"exit","exit_code":0,"signal":null,"timed_out":false}, then a close
//! server: {"type":"error","code":"...","message":"..."}, then a close (it could not run, or broke)
//! ```
//!
//! Closing the socket hangs the session up (SIGHUP to the program's
//! group, as closing a terminal window does). Output waits for a slow
//! client, which holds the program back through the agent's flow control,
//! never the daemon's memory; keystrokes wait (up to 1 MiB) for a program
//! slow to read them without holding output up.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use sandbox::{ExecEvent, ExecInput, TerminalSize};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::exec::{acquire, guest_request, ExecBody};
use super::extract::Path;
use crate::daemon::supervisor::Busy;
use crate::daemon::AppState;

/// How long the client may take to say what to run.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the client may take to answer the daemon's Close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message the daemon takes from a client: keystrokes and
/// pastes, not files.
const MAX_MESSAGE: usize = 1 << 20;
/// Output messages buffered between the guest and the client.
const BUFFERED: usize = 64;
/// Keystroke messages handed to the writer at once.
const KEY_MESSAGES: usize = 4;
/// Keystroke bytes the daemon holds for a program that is slow to read
/// them before it stops reading the client.
const MAX_PENDING_KEYS: usize = 1 << 20;
/// What runs when the client names nothing: a login shell, bash where
/// the image has it.
const DEFAULT_SHELL: &str = "if command -v bash >/dev/null 2>&1; then exec bash -l; fi; exec sh -l";

/// The first message of a terminal session: what to run, on a terminal
/// of what size.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PtyStart {
    /// Program and arguments (default: a login shell, bash if there is
    /// one, else sh).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Columns (default 80).
    #[schema(minimum = 1, maximum = 4096)]
    pub cols: Option<u16>,
    /// Rows (default 24).
    #[schema(minimum = 1, maximum = 4096)]
    pub rows: Option<u16>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid` (default: root).
    pub user: Option<String>,
    /// Kill the program after this many seconds.
    pub timeout_seconds: Option<u64>,
}

/// A text message from the client once the session runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PtyControl {
    Resize { cols: u16, rows: u16 },
    Signal { signal: i32 },
}

/// A text message from the daemon.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PtyEvent {
    Started {
        pid: i32,
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

/// Open an interactive terminal session (a WebSocket; see the module's
/// documentation for its messages).
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/pty", operation_id = "pty", tag = "sandboxes",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 101, description = "The WebSocket session: first a PtyStart from the client, then PtyEvent texts and terminal bytes"),
        (status = 400, description = "Not a WebSocket request", body = ErrorBody),
        (status = 404, description = "No such sandbox", body = ErrorBody),
        (status = 409, description = "It is not running", body = ErrorBody),
    )
)]
pub async fn pty(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    state.supervisor.store().sandbox(&id)?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(format!(
            "a terminal session is a WebSocket (GET with Upgrade: websocket): {e}"
        ))
    })?;
    let busy = acquire(&state, &id).await?;
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            serve(state, id, busy, socket).await;
        }))
}

fn text(event: &PtyEvent) -> Message {
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(event).unwrap_or_default(),
    ))
}

async fn fail(mut socket: WebSocket, code: &str, message: String) {
    let _ = socket
        .send(text(&PtyEvent::Error {
            code: code.into(),
            message,
        }))
        .await;
    if socket.send(Message::Close(None)).await.is_ok() {
        closing_handshake(&mut socket).await;
    }
}

/// After the daemon's Close, waits (briefly) for the client's before the
/// connection goes: dropping it at once can make a client lose the
/// messages just before the Close (Python's websockets does).
async fn closing_handshake(
    stream: &mut (impl futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin),
) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(m)) = stream.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// The first message: what to run.
async fn start_message(socket: &mut WebSocket) -> Result<PtyStart, String> {
    let first = tokio::time::timeout(START_TIMEOUT, socket.recv())
        .await
        .map_err(|_| format!("no start message within {START_TIMEOUT:?}"))?;
    match first {
        Some(Ok(Message::Text(t))) => serde_json::from_str(t.as_str())
            .map_err(|e| format!("the start message is not a PtyStart: {e}")),
        Some(Ok(_)) => Err("the first message must be a JSON text (PtyStart)".into()),
        Some(Err(e)) => Err(format!("reading the start message: {e}")),
        None => Err("the client left before saying what to run".into()),
    }
}

async fn serve(state: Arc<AppState>, id: String, busy: Busy, mut socket: WebSocket) {
    let start = match start_message(&mut socket).await {
        Ok(start) => start,
        Err(message) => return fail(socket, "bad_request", message).await,
    };
    let size = TerminalSize {
        cols: start.cols.unwrap_or(80),
        rows: start.rows.unwrap_or(24),
    };
    let body = ExecBody {
        cmd: start
            .cmd
            .unwrap_or_else(|| vec!["sh".into(), "-c".into(), DEFAULT_SHELL.into()]),
        env: start.env,
        cwd: start.cwd,
        user: start.user,
        timeout_seconds: start.timeout_seconds,
        stdin: None,
        keep_stdin_open: false,
    };
    let request = match (guest_request(&state, &id, &body), size.check()) {
        (Ok(request), Ok(())) => sandbox::ExecRequest {
            pty: Some(size),
            ..request
        },
        (Err(e), _) => return fail(socket, e.code, e.message).await,
        (_, Err(message)) => return fail(socket, "bad_request", message).await,
    };
    let live = Arc::clone(busy.live());
    let handle = match super::sandboxes::blocking(move || live.agent.exec(request)).await {
        Ok(Ok(handle)) => handle,
        Ok(Err(e)) => {
            let message = format!("sandbox {id}'s guest did not start the terminal: {e}");
            return fail(socket, "guest_unavailable", message).await;
        }
        Err(e) => return fail(socket, e.code, e.message).await,
    };
    let pid = handle.pid();
    if socket.send(text(&PtyEvent::Started { pid })).await.is_err() {
        return;
    }
    let input = handle.input();
    let (output_tx, mut output_rx) = tokio::sync::mpsc::channel::<Message>(BUFFERED);
    let reader = std::thread::Builder::new()
        .name("pty-output".into())
        .spawn(move || pump_output(handle, output_tx, busy));
    if reader.is_err() {
        return fail(socket, "internal", "cannot start a thread".into()).await;
    }
    let (keys_tx, keys_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(KEY_MESSAGES);
    let keys_input = input.clone();
    let _ = std::thread::Builder::new()
        .name("pty-keys".into())
        .spawn(move || feed_keys(keys_input, keys_rx));

    let (mut sink, mut stream) = socket.split();
    // Keystrokes the program has not taken yet wait here, bounded: the
    // loop never waits on them, so output keeps flowing to the client
    // while a program is slow to read (a big paste into an editor that
    // echoes it would otherwise stall both directions for good).
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
    let mut pending_bytes = 0usize;
    let why = loop {
        tokio::select! {
            permit = keys_tx.reserve(), if !pending.is_empty() => match permit {
                Ok(permit) => {
                    let keys = pending.pop_front().unwrap_or_default();
                    pending_bytes -= keys.len();
                    permit.send(keys);
                }
                Err(_) => break "its program no longer takes keystrokes".to_string(),
            },
            out = output_rx.recv() => match out {
                Some(message) => {
                    let last = matches!(message, Message::Close(_));
                    if let Err(e) = sink.send(message).await {
                        break format!("sending to the client failed: {e}");
                    }
                    if last {
                        closing_handshake(&mut stream).await;
                        break "it ended".to_string();
                    }
                }
                None => break "the guest's side ended".to_string(),
            },
            incoming = stream.next(), if pending_bytes < MAX_PENDING_KEYS => match incoming {
                Some(Ok(Message::Binary(keys))) => {
                    pending_bytes += keys.len();
                    pending.push_back(keys.to_vec());
                }
                Some(Ok(Message::Text(t))) => {
                    let control = serde_json::from_str::<PtyControl>(t.as_str());
                    let sent = match control {
                        Ok(PtyControl::Resize { cols, rows }) => {
                            input.resize(TerminalSize { cols, rows }).map_err(|e| e.to_string())
                        }
                        Ok(PtyControl::Signal { signal }) if (1..=64).contains(&signal) => {
                            input.signal(signal).map_err(|e| e.to_string())
                        }
                        Ok(PtyControl::Signal { signal }) => Err(format!("no signal {signal}")),
                        Err(e) => Err(format!("not a PtyControl: {e}")),
                    };
                    // A bad control message is answered, never fatal.
                    if let Err(message) = sent {
                        let event = PtyEvent::Error { code: "bad_request".into(), message };
                        if let Err(e) = sink.send(text(&event)).await {
                            break format!("sending to the client failed: {e}");
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => break "the client closed it".to_string(),
                Some(Err(e)) => break format!("reading from the client failed: {e}"),
                Some(Ok(_)) => {}
            },
        }
    };
    tracing::info!(sandbox = %id, pid, "terminal session over: {why}");
    // Dropping the output receiver stops the pump, which drops the exec
    // handle: the agent hangs the session up.
}

/// Guest to client: terminal output as binary messages, then the exit
/// status and a close. Holds the sandbox busy while it runs.
fn pump_output(
    mut handle: sandbox::ExecHandle,
    tx: tokio::sync::mpsc::Sender<Message>,
    _busy: Busy,
) {
    loop {
        let next = match handle.next_event_timeout(Duration::from_secs(1)) {
            // Quiet: notice a client that left.
            Err(sandbox::ClientError::Timeout) if tx.is_closed() => return,
            Err(sandbox::ClientError::Timeout) => continue,
            other => other,
        };
        let message = match next {
            Ok(Some(ExecEvent::Stdout(d) | ExecEvent::Stderr(d))) => Message::Binary(d.into()),
            Ok(Some(ExecEvent::Exit(status))) => {
                let exit = PtyEvent::Exit {
                    exit_code: status.code,
                    signal: status.signal,
                    timed_out: status.timed_out,
                };
                let _ = tx.blocking_send(text(&exit));
                let _ = tx.blocking_send(Message::Close(Some(CloseFrame {
                    code: 1000,
                    reason: Utf8Bytes::from_static("exited"),
                })));
                return;
            }
            broken => {
                let message = match broken {
                    Err(e) => e.to_string(),
                    _ => "the terminal's stream ended without an exit status".into(),
                };
                let error = PtyEvent::Error {
                    code: "lost".into(),
                    message,
                };
                let _ = tx.blocking_send(text(&error));
                let _ = tx.blocking_send(Message::Close(None));
                return;
            }
        };
        if tx.blocking_send(message).is_err() {
            return;
        }
    }
}

/// Client to guest: keystrokes in order, as fast as the program takes
/// them.
fn feed_keys(input: ExecInput, mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>) {
    while let Some(keys) = rx.blocking_recv() {
        if let Err(e) = input.write_stdin(&keys) {
            tracing::info!("a terminal takes no more keystrokes: {e}");
            return;
        }
    }
}
