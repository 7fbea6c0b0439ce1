//! `capsule shell ID [-- CMD...]`: an interactive terminal in a daemon
//! sandbox, over the API's `/pty` WebSocket. The local terminal is put in
//! raw mode (every key, Ctrl-C included, goes to the sandbox) and its
//! size follows the local window; it is restored on every way out: the
//! program's exit, a lost connection, a signal, a panic.

use std::io::{IsTerminal, Read, Write};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::Message;

use crate::api::terminal::{PtyControl, PtyEvent, PtyStart};
use crate::client::{encode, ApiClient};
use crate::exec::CommandArgs;

#[derive(Args, Debug)]
pub struct ShellArgs {
    /// The daemon sandbox's id.
    pub id: String,
    #[command(flatten)]
    pub command: CommandArgs,
    /// What to run (default: a login shell, bash if the sandbox has it).
    #[arg(last = true)]
    pub argv: Vec<String>,
}

/// The local terminal in raw mode until dropped (or a panic, which
/// aborts without unwinding).
struct RawMode;

impl RawMode {
    fn enter() -> Result<RawMode> {
        crossterm::terminal::enable_raw_mode().context("putting the terminal in raw mode")?;
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = crossterm::terminal::disable_raw_mode();
            previous(info);
        }));
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// The local terminal's size, or 80x24 when there is none.
fn local_size(interactive: bool) -> (u16, u16) {
    interactive
        .then(|| crossterm::terminal::size().ok())
        .flatten()
        .unwrap_or((80, 24))
}

fn text(value: &impl serde::Serialize) -> Message {
    Message::Text(serde_json::to_string(value).unwrap_or_default().into())
}

/// How the session ended.
enum Ending {
    Exited(i32),
    Failed(String),
}

pub fn shell(args: ShellArgs) -> Result<u8> {
    let client = ApiClient::new()?;
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let (cols, rows) = local_size(interactive);
    let start = PtyStart {
        cmd: (!args.argv.is_empty()).then(|| args.argv.clone()),
        cols: Some(cols),
        rows: Some(rows),
        env: args.command.env.iter().cloned().collect(),
        cwd: args.command.workdir.clone(),
        user: args.command.user.clone(),
        timeout_seconds: args.command.timeout.map(|d| d.as_secs().max(1)),
    };
    let path = format!("/v1/sandboxes/{}/pty", encode(&args.id));
    let ending = client.block_on(async {
        let mut socket = client.websocket(&path).await?;
        socket.send(text(&start)).await?;
        // Raw only once the sandbox took the session: errors before it
        // print as usual.
        let _raw = if interactive {
            Some(RawMode::enter()?)
        } else {
            None
        };
        session(socket, interactive).await
    })?;
    match ending {
        Ending::Exited(code) => Ok(code.clamp(0, 255) as u8),
        Ending::Failed(message) => bail!("the terminal session in {}: {message}", args.id),
    }
}

async fn session(
    socket: tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>,
    interactive: bool,
) -> Result<Ending> {
    // Keystrokes come from a thread: reading a terminal blocks.
    let (keys_tx, mut keys) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::Builder::new()
        .name("keys".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if keys_tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        })?;
    let (mut sink, mut stream) = socket.split();
    // Keystrokes and resizes go out from a task of their own: a send that
    // waits (a program slow to read a paste) never stops the output
    // being read, which is what lets the program go on.
    let mut resized = signal(SignalKind::window_change())?;
    let writer = tokio::spawn(async move {
        let mut keys_open = true;
        loop {
            let message = tokio::select! {
                typed = keys.recv(), if keys_open => match typed {
                    Some(bytes) => Message::Binary(bytes.into()),
                    // A terminal has no end of input: piped keystrokes ran
                    // out, and the program goes on until it exits.
                    None => {
                        keys_open = false;
                        continue;
                    }
                },
                _ = resized.recv() => {
                    let (cols, rows) = local_size(interactive);
                    text(&PtyControl::Resize { cols, rows })
                }
            };
            if sink.send(message).await.is_err() {
                return sink;
            }
        }
    });
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut stdout = std::io::stdout();
    let mut ending = None;
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    stdout.write_all(&bytes)?;
                    stdout.flush()?;
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<PtyEvent>(t.as_str()) {
                    Ok(PtyEvent::Started { .. }) => {}
                    Ok(PtyEvent::Exit { exit_code, signal, .. }) => {
                        let code = exit_code.unwrap_or_else(|| 128 + signal.unwrap_or(127));
                        ending = Some(Ending::Exited(code));
                    }
                    Ok(PtyEvent::Error { code, message }) => {
                        ending = Some(Ending::Failed(format!("{message} ({code})")));
                    }
                    Err(e) => ending = Some(Ending::Failed(format!("the daemon sent {t:?}: {e}"))),
                },
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    ending.get_or_insert(Ending::Failed(format!("the connection broke: {e}")));
                    break;
                }
            },
            _ = hangup.recv() => {
                ending = Some(Ending::Failed("hung up".into()));
                break;
            }
            _ = terminate.recv() => {
                ending = Some(Ending::Failed("terminated".into()));
                break;
            }
        }
    }
    writer.abort();
    if let Ok(mut sink) = writer.await {
        let _ = sink.close().await;
    }
    Ok(ending.unwrap_or_else(|| Ending::Failed("the daemon closed the session".into())))
}
