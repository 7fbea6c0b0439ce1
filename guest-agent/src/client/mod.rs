//! Host side of the agent protocol: a blocking client that multiplexes many
//! streams over one connection, with every wait on the agent bounded.
//!
//! - A request (exec, identity) waits for its reply at most
//!   [`ClientOptions::request_timeout`].
//! - While anything waits on the agent, a quiet connection is pinged; an
//!   agent that leaves a ping, a write or a started frame unfinished for
//!   [`ClientOptions::keepalive_timeout`] loses the connection, and every
//!   waiter fails with [`ClientError::Unresponsive`].
//! - A command with a timeout that the guest lets run past it plus
//!   [`ClientOptions::exec_grace`] fails with [`ClientError::Overdue`].
//! - Host memory per stream is bounded by the window; [`ExecHandle::output`]
//!   by [`ClientOptions::output_limit`].
//! - Dropping a handle or the client never blocks.

mod connection;
mod exec;
mod files;
mod ports;
mod processes;
mod stream;

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use exec::{ExecEvent, ExecHandle, ExecInput, Output};
pub use files::{FileDownload, Listing, WatchHandle};
pub use ports::{PortStream, PortWriter};
pub use processes::{AttachHandle, LogEvent};

use crate::protocol::{
    is_timeout, ErrorCode, ExecRequest, Frame, FrameKind, FrameReader, Hello, Identity, Open,
    ProtocolError, Reply, DEFAULT_HOST_WINDOW, MAX_WINDOW, MIN_WINDOW,
};
use connection::{Connection, Lost, PeerLimits};
use stream::StreamKind;

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the agent closed the connection")]
    Disconnected,
    #[error("the agent connection was closed on this side")]
    Closed,
    #[error("the agent connection broke: {0}")]
    Lost(String),
    #[error("the guest is not responding: {0}")]
    Unresponsive(String),
    #[error("the agent refused the request: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("timed out waiting for the agent")]
    Timeout,
    #[error(
        "the agent did not answer the connection's hello in time (the guest is not responding)"
    )]
    NoHello,
    #[error(
        "the command is still running {grace:?} after its {timeout:?} timeout: the guest did not \
         stop it (it is not responding)"
    )]
    Overdue { timeout: Duration, grace: Duration },
    #[error(
        "the command wrote more than {limit} bytes of output; stream it with next_event() \
         instead, or raise the limit"
    )]
    OutputTooLarge { limit: usize },
    #[error("the agent reset the stream: {0}")]
    StreamReset(String),
    #[error("the stream has ended")]
    StreamEnded,
    #[error("the process closed its stdin")]
    StdinClosed,
    #[error("the connection already has {0} streams open, the most the agent serves at once")]
    TooManyStreams(u32),
    #[error("reading what was to be sent to the guest: {0}")]
    Source(#[source] std::io::Error),
    #[error("unexpected reply from the agent: {0:?}")]
    UnexpectedReply(Reply),
}

impl ClientError {
    /// The guest did not answer in time: it is stalled or overloaded, not
    /// refusing. A manager may kill such a sandbox; a caller may retry.
    pub fn is_no_answer(&self) -> bool {
        matches!(
            self,
            ClientError::Timeout
                | ClientError::NoHello
                | ClientError::Unresponsive(_)
                | ClientError::Overdue { .. }
        )
    }
}

/// How a client bounds its waits and buffers.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Data bytes this side buffers per stream for the agent (its window).
    pub window: u32,
    /// How long a connection someone waits on may be quiet before the
    /// client pings the agent.
    pub keepalive_interval: Duration,
    /// How long the agent may leave a ping unanswered, a frame half-sent
    /// or a write untaken before the connection is declared lost.
    pub keepalive_timeout: Duration,
    /// How long a request may wait for its reply.
    pub request_timeout: Duration,
    /// How long past a command's own timeout the host still waits for it.
    pub exec_grace: Duration,
    /// Most bytes [`ExecHandle::output`] collects.
    pub output_limit: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            window: DEFAULT_HOST_WINDOW,
            keepalive_interval: Duration::from_secs(5),
            // Generous: dozens of guests restoring at once on a busy host
            // (or a nested test host) are slow, not dead.
            keepalive_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            exec_grace: Duration::from_secs(10),
            output_limit: 64 << 20,
        }
    }
}

/// A connection to a guest agent.
pub struct AgentClient {
    conn: Arc<Connection>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    peer: Hello,
}

/// How long dropping a client lets the writer send what is queued (a
/// stream reset, say) before it shuts the connection.
const FLUSH_TIMEOUT: Duration = Duration::from_millis(500);
/// How long dropping a client waits for its threads, which the shut
/// socket wakes at once.
const JOIN_TIMEOUT: Duration = Duration::from_secs(2);

impl AgentClient {
    /// Performs the hello exchange on `stream`, all of it before
    /// `deadline`, and starts routing frames.
    pub fn connect(stream: UnixStream, deadline: Instant) -> Result<Self, ClientError> {
        Self::connect_with(stream, deadline, ClientOptions::default())
    }

    /// Like [`AgentClient::connect`] with explicit options.
    pub fn connect_with(
        stream: UnixStream,
        deadline: Instant,
        mut options: ClientOptions,
    ) -> Result<Self, ClientError> {
        options.window = options.window.clamp(MIN_WINDOW, MAX_WINDOW);
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let hello = Hello::new(
            concat!("capsule-host ", env!("CARGO_PKG_VERSION")),
            options.window,
            0,
        );
        let mut writer = stream.try_clone().map_err(ProtocolError::Io)?;
        writer
            .set_write_timeout(Some(left()))
            .map_err(ProtocolError::Io)?;
        connection::write_within(
            &mut writer,
            &Frame::json(FrameKind::Hello, 0, &hello).encode()?,
            left(),
        )
        .map_err(|e| {
            if is_timeout(&e) {
                ClientError::NoHello
            } else {
                ClientError::Protocol(e.into())
            }
        })?;
        let mut reader = FrameReader::new(stream.try_clone().map_err(ProtocolError::Io)?);
        let frame = match reader.read_by(deadline) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(ClientError::Disconnected),
            Err(e) if e.is_timeout() => return Err(ClientError::NoHello),
            Err(e) => return Err(e.into()),
        };
        if frame.kind != FrameKind::Hello {
            return Err(ProtocolError::Unexpected(frame.kind).into());
        }
        let peer: Hello = frame.parse()?;
        peer.check()?;
        let limits = PeerLimits {
            window: peer.usable_window(),
            max_streams: peer.max_streams,
        };

        let (tx, rx) = std::sync::mpsc::channel();
        let conn = Arc::new(Connection::new(stream, options, limits, tx));
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(ProtocolError::Io)
        };
        let (c1, c2) = (conn.clone(), conn.clone());
        let read = spawn(
            "agent-reader",
            Box::new(move || connection::read_frames(c1, reader)),
        );
        let write = read.and_then(|r| {
            spawn(
                "agent-writer",
                Box::new(move || connection::write_frames(c2, writer, rx)),
            )
            .map(|w| (r, w))
        });
        let (reader, writer) = match write {
            Ok(threads) => threads,
            Err(e) => {
                conn.lose(Lost::ClosedHere);
                return Err(e.into());
            }
        };
        Ok(AgentClient {
            conn,
            reader: Some(reader),
            writer: Some(writer),
            peer,
        })
    }

    /// What the agent said about itself.
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    /// Whether the connection still works; if not, why not.
    pub fn check_alive(&self) -> Result<(), ClientError> {
        match self.conn.lost() {
            None => Ok(()),
            Some(lost) => Err(lost.error()),
        }
    }

    /// Checks the agent answers, within `timeout`.
    pub fn ping(&self, timeout: Duration) -> Result<(), ClientError> {
        self.conn.ping(timeout)
    }

    fn request(&self, open: &Open, timeout: Duration) -> Result<Reply, ClientError> {
        let slot = self.conn.open(open, StreamKind::Request)?;
        let reply = slot.wait_reply(Instant::now() + timeout);
        self.conn.forget(slot.id);
        reply
    }

    /// Starts a process. Output arrives through the returned handle.
    pub fn exec(&self, request: ExecRequest) -> Result<ExecHandle, ClientError> {
        let timeout = request.timeout_ms.map(Duration::from_millis);
        let slot = self
            .conn
            .open(&Open::Exec(request), StreamKind::Streaming)?;
        let deadline = Instant::now() + self.conn.options.request_timeout;
        match slot.wait_reply(deadline) {
            Ok(Reply::Started { pid }) => {
                Ok(ExecHandle::new(self.conn.clone(), slot, pid, timeout))
            }
            other => {
                self.conn.forget(slot.id);
                match other? {
                    Reply::Error { code, message } => Err(ClientError::Refused { code, message }),
                    reply => Err(ClientError::UnexpectedReply(reply)),
                }
            }
        }
    }

    /// Tells a restored guest its new identity, waiting up to `timeout`
    /// for the answer; returns what could not be applied.
    pub fn restored(
        &self,
        identity: Identity,
        timeout: Duration,
    ) -> Result<Vec<String>, ClientError> {
        self.send_restored(identity)?.wait(timeout)
    }

    /// Tells a restored guest its new identity without waiting for the
    /// answer: the agent applies it before it reads anything sent after,
    /// so a command sent next runs with it. The answer is collected from
    /// the returned [`PendingRestored`].
    pub fn send_restored(&self, identity: Identity) -> Result<PendingRestored, ClientError> {
        let slot = self
            .conn
            .open(&Open::Restored(identity), StreamKind::Request)?;
        Ok(PendingRestored {
            conn: self.conn.clone(),
            slot,
        })
    }

    /// Asks the agent to stop every process and power the VM off, waiting
    /// up to `timeout` for it to say it will.
    pub fn shutdown(&self, reboot: bool, timeout: Duration) -> Result<(), ClientError> {
        match self.request(&Open::Shutdown { reboot }, timeout) {
            Ok(Reply::ShuttingDown) | Err(ClientError::Disconnected | ClientError::Lost(_)) => {
                Ok(())
            }
            Ok(other) => Err(ClientError::UnexpectedReply(other)),
            Err(e) => Err(e),
        }
    }
}

/// The answer to an identity sent with [`AgentClient::send_restored`].
pub struct PendingRestored {
    conn: Arc<Connection>,
    slot: Arc<stream::StreamSlot>,
}

fn restored_answer(reply: Reply) -> Result<Vec<String>, ClientError> {
    match reply {
        Reply::Restored { problems } => Ok(problems),
        Reply::Error { code, message } => Err(ClientError::Refused { code, message }),
        other => Err(ClientError::UnexpectedReply(other)),
    }
}

impl PendingRestored {
    /// What could not be applied, once the agent has answered; None while
    /// it has not.
    pub fn try_take(&self) -> Option<Result<Vec<String>, ClientError>> {
        self.slot.try_reply().map(|r| r.and_then(restored_answer))
    }

    /// Waits up to `timeout` for the answer.
    pub fn wait(&self, timeout: Duration) -> Result<Vec<String>, ClientError> {
        self.slot
            .wait_reply(Instant::now() + timeout)
            .and_then(restored_answer)
    }
}

impl Drop for PendingRestored {
    fn drop(&mut self) {
        self.conn.forget(self.slot.id);
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        // What is queued goes out first, briefly; then the socket shuts,
        // which wakes both threads wherever they are.
        self.conn.stop_sending();
        let writer = self
            .writer
            .take()
            .and_then(|w| join_within(w, FLUSH_TIMEOUT, false));
        self.conn.lose(Lost::ClosedHere);
        for thread in [writer, self.reader.take()].into_iter().flatten() {
            join_within(thread, JOIN_TIMEOUT, true);
        }
    }
}

/// Joins `thread` if it ends within `timeout`; otherwise hands it back
/// (or, with `give_up`, leaves it be and says so) rather than hang.
pub fn join_within(
    thread: JoinHandle<()>,
    timeout: Duration,
    give_up: bool,
) -> Option<JoinHandle<()>> {
    let deadline = Instant::now() + timeout;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            if !give_up {
                return Some(thread);
            }
            log::warn!(
                "thread {} did not stop within {timeout:?}; leaving it",
                thread.thread().name().unwrap_or("?")
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = thread.join();
    None
}
