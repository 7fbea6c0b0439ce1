//! Host side of the agent protocol: a blocking client that multiplexes many
//! exec streams over one connection.
//!
//! A reader thread owns the receiving half and routes each frame to the
//! stream it belongs to; writers share the sending half behind a mutex and
//! write whole frames, so streams never interleave mid-frame.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::protocol::{
    ExecRequest, ExitStatus, Frame, FrameKind, Hello, Identity, ProtocolError, Reply, Request,
    Signal, MAX_PAYLOAD,
};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the agent connection closed")]
    Disconnected,
    #[error("the agent connection broke: {0}")]
    Lost(String),
    #[error("the agent refused the request: {0}")]
    Refused(String),
    #[error("timed out waiting for the agent")]
    Timeout,
    #[error(
        "the agent did not answer the connection's hello in time (the guest is not responding)"
    )]
    NoHello,
    #[error("unexpected reply from the agent: {0:?}")]
    UnexpectedReply(Reply),
}

impl ClientError {
    /// The guest did not answer in time: it is stalled or overloaded, not
    /// refusing. A manager may kill such a sandbox; a caller may retry.
    pub fn is_no_answer(&self) -> bool {
        matches!(self, ClientError::Timeout | ClientError::NoHello)
    }
}

type Routes = Arc<Mutex<HashMap<u32, SyncSender<Frame>>>>;
/// Why the reader stopped, if the connection broke rather than closed.
type LostReason = Arc<Mutex<Option<String>>>;

/// Frames buffered per stream before the reader stops reading the socket:
/// a consumer that falls behind pushes back on the guest (through vsock
/// credit) instead of growing host memory without bound.
const STREAM_BACKLOG: usize = 256;

/// A connection to a guest agent.
pub struct AgentClient {
    writer: Arc<Mutex<UnixStream>>,
    routes: Routes,
    lost: LostReason,
    next_stream: AtomicU32,
    reader: Option<JoinHandle<()>>,
    shutdown_handle: UnixStream,
    peer: Hello,
}

impl AgentClient {
    /// Performs the hello exchange on `stream` and starts routing frames.
    pub fn handshake(stream: UnixStream) -> Result<Self, ClientError> {
        let mut reader = stream.try_clone().map_err(ProtocolError::Io)?;
        let shutdown_handle = stream.try_clone().map_err(ProtocolError::Io)?;
        let mut writer = stream;
        Frame::json(FrameKind::Hello, 0, &Hello::ours()).write_to(&mut writer)?;
        let frame = match Frame::read_from(&mut reader) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(ClientError::Disconnected),
            // The caller's read timeout ran out.
            Err(ProtocolError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::NoHello)
            }
            Err(e) => return Err(e.into()),
        };
        if frame.kind != FrameKind::Hello {
            return Err(ProtocolError::Unexpected(frame.kind).into());
        }
        let peer: Hello = frame.parse()?;
        peer.check()?;
        // A read timeout the caller set for the handshake must not apply
        // to the long-lived routing thread.
        reader.set_read_timeout(None).map_err(ProtocolError::Io)?;

        let routes: Routes = Arc::default();
        let lost: LostReason = Arc::default();
        let (thread_routes, thread_lost) = (routes.clone(), lost.clone());
        let reader = std::thread::Builder::new()
            .name("agent-client".into())
            .spawn(move || route_frames(reader, thread_routes, thread_lost))
            .map_err(ProtocolError::Io)?;
        Ok(AgentClient {
            writer: Arc::new(Mutex::new(writer)),
            routes,
            lost,
            next_stream: AtomicU32::new(1),
            reader: Some(reader),
            shutdown_handle,
            peer,
        })
    }

    /// What the agent said about itself.
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    fn open_stream(&self, request: &Request) -> Result<(u32, Receiver<Frame>), ClientError> {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(STREAM_BACKLOG);
        lock(&self.routes).insert(id, tx);
        send(&self.writer, &Frame::json(FrameKind::Request, id, request))?;
        Ok((id, rx))
    }

    fn reply(
        &self,
        id: u32,
        rx: &Receiver<Frame>,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        let result = match rx.recv_timeout(timeout) {
            Ok(frame) if frame.kind == FrameKind::Reply => Ok(frame.parse()?),
            Ok(frame) => Err(ProtocolError::Unexpected(frame.kind).into()),
            Err(RecvTimeoutError::Timeout) => Err(ClientError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(disconnected(&self.lost)),
        };
        if result.is_err() {
            lock(&self.routes).remove(&id);
        }
        result
    }

    /// Checks the agent answers.
    pub fn ping(&self, timeout: Duration) -> Result<(), ClientError> {
        let (id, rx) = self.open_stream(&Request::Ping)?;
        let reply = self.reply(id, &rx, timeout)?;
        lock(&self.routes).remove(&id);
        match reply {
            Reply::Pong => Ok(()),
            other => Err(ClientError::UnexpectedReply(other)),
        }
    }

    /// Starts a process. Output arrives through the returned handle.
    pub fn exec(&self, request: ExecRequest) -> Result<ExecHandle, ClientError> {
        let (id, rx) = self.open_stream(&Request::Exec(request))?;
        match self.reply(id, &rx, Duration::from_secs(60))? {
            Reply::Started { pid } => Ok(ExecHandle {
                id,
                pid,
                rx,
                input: ExecInput {
                    id,
                    writer: self.writer.clone(),
                },
                routes: self.routes.clone(),
                lost: self.lost.clone(),
                finished: false,
            }),
            Reply::Error { message } => {
                lock(&self.routes).remove(&id);
                Err(ClientError::Refused(message))
            }
            other => Err(ClientError::UnexpectedReply(other)),
        }
    }

    /// Tells a restored guest its new identity, waiting up to `timeout`
    /// for the answer; returns what could not be applied.
    pub fn restored(
        &self,
        identity: Identity,
        timeout: Duration,
    ) -> Result<Vec<String>, ClientError> {
        let (id, rx) = self.open_stream(&Request::Restored(identity))?;
        let reply = self.reply(id, &rx, timeout)?;
        lock(&self.routes).remove(&id);
        match reply {
            Reply::Restored { problems } => Ok(problems),
            Reply::Error { message } => Err(ClientError::Refused(message)),
            other => Err(ClientError::UnexpectedReply(other)),
        }
    }

    /// Asks the agent to stop every process and power the VM off.
    pub fn shutdown(&self, reboot: bool) -> Result<(), ClientError> {
        let (id, rx) = self.open_stream(&Request::Shutdown { reboot })?;
        let reply = self.reply(id, &rx, Duration::from_secs(10));
        lock(&self.routes).remove(&id);
        match reply {
            Ok(Reply::ShuttingDown) | Err(ClientError::Disconnected | ClientError::Lost(_)) => {
                Ok(())
            }
            Ok(other) => Err(ClientError::UnexpectedReply(other)),
            Err(e) => Err(e),
        }
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        let _ = self.shutdown_handle.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn send(writer: &Mutex<UnixStream>, frame: &Frame) -> Result<(), ClientError> {
    frame.write_to(&mut *lock(writer))?;
    Ok(())
}

fn route_frames(mut reader: UnixStream, routes: Routes, lost: LostReason) {
    // Streams are unregistered by their handles; a frame for an unknown or
    // dropped stream just means nobody is listening.
    let broken = loop {
        match Frame::read_from(&mut reader) {
            Ok(Some(frame)) => {
                // Clone the sender so a full stream blocks only this
                // thread, not the handles that need the table to
                // unregister themselves.
                let tx = lock(&routes).get(&frame.stream).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(frame);
                }
            }
            Ok(None) => break None,
            Err(e) => break Some(e.to_string()),
        }
    };
    // The reason first: dropping every sender then wakes all waiters,
    // which read it.
    *lock(&lost) = broken;
    lock(&routes).clear();
}

fn disconnected(lost: &LostReason) -> ClientError {
    match lock(lost).clone() {
        Some(why) => ClientError::Lost(why),
        None => ClientError::Disconnected,
    }
}

/// One event from a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
}

/// Everything a finished process produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// A running process in the guest.
pub struct ExecHandle {
    id: u32,
    pid: i32,
    rx: Receiver<Frame>,
    input: ExecInput,
    routes: Routes,
    lost: LostReason,
    finished: bool,
}

impl ExecHandle {
    /// The process id inside the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends bytes to the process's stdin (the request must have asked for
    /// stdin). Large writes are split into frames.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        self.input.write_stdin(data)
    }

    /// Closes the process's stdin.
    pub fn close_stdin(&self) -> Result<(), ClientError> {
        self.input.close_stdin()
    }

    /// Sends a signal to the process group.
    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.input.signal(signal)
    }

    /// A cloneable handle for writing stdin and sending signals from
    /// another thread while this one reads output.
    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }

    /// The next event, or `None` once the exit status has been delivered.
    pub fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.finished {
            return Ok(None);
        }
        let frame = self.rx.recv().map_err(|_| disconnected(&self.lost))?;
        let event = match frame.kind {
            FrameKind::Stdout => ExecEvent::Stdout(frame.payload),
            FrameKind::Stderr => ExecEvent::Stderr(frame.payload),
            FrameKind::Exit => {
                self.finished = true;
                lock(&self.routes).remove(&self.id);
                ExecEvent::Exit(frame.parse()?)
            }
            other => return Err(ProtocolError::Unexpected(other).into()),
        };
        Ok(Some(event))
    }

    /// Waits for the process to finish, collecting its output.
    pub fn output(mut self) -> Result<Output, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        loop {
            match self.next_event()? {
                Some(ExecEvent::Stdout(d)) => stdout.extend_from_slice(&d),
                Some(ExecEvent::Stderr(d)) => stderr.extend_from_slice(&d),
                Some(ExecEvent::Exit(status)) => {
                    return Ok(Output {
                        stdout,
                        stderr,
                        status,
                    })
                }
                None => return Err(ClientError::Disconnected),
            }
        }
    }
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        lock(&self.routes).remove(&self.id);
    }
}

/// Writes stdin and sends signals for an [`ExecHandle`] from another thread.
#[derive(Clone)]
pub struct ExecInput {
    id: u32,
    writer: Arc<Mutex<UnixStream>>,
}

impl ExecInput {
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(MAX_PAYLOAD) {
            send(
                &self.writer,
                &Frame::new(FrameKind::Stdin, self.id, chunk.to_vec()),
            )?;
        }
        Ok(())
    }

    pub fn close_stdin(&self) -> Result<(), ClientError> {
        send(
            &self.writer,
            &Frame::new(FrameKind::Stdin, self.id, Vec::new()),
        )
    }

    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        send(
            &self.writer,
            &Frame::json(FrameKind::Signal, self.id, &Signal { signal }),
        )
    }
}

impl Write for ExecInput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_stdin(buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e.to_string()))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
