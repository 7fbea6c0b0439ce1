//! A process running in the guest, seen from the host.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::{
    channel, Control, ExitStatus, Frame, FrameKind, Reset, TerminalSize, DATA_CHUNK,
};

use super::connection::Connection;
use super::stream::{Incoming, StreamSlot};
use super::ClientError;

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

/// A running process in the guest. Dropping the handle before the
/// process's exit status arrived detaches it, as dropping a
/// `std::process::Child` does: it runs on in the guest with its output
/// discarded. [`ExecHandle::kill`] it first to stop it.
pub struct ExecHandle {
    conn: Arc<Connection>,
    slot: Arc<StreamSlot>,
    pid: i32,
    input: ExecInput,
    /// The command's own timeout plus the grace period, if it has one:
    /// past it the guest failed to enforce the timeout.
    overdue_at: Option<(Instant, Duration)>,
    finished: bool,
}

impl ExecHandle {
    pub(crate) fn new(
        conn: Arc<Connection>,
        slot: Arc<StreamSlot>,
        pid: i32,
        timeout: Option<Duration>,
    ) -> Self {
        let grace = conn.options.exec_grace;
        ExecHandle {
            input: ExecInput {
                conn: conn.clone(),
                slot: slot.clone(),
            },
            overdue_at: timeout.map(|t| (Instant::now() + t + grace, t)),
            conn,
            slot,
            pid,
            finished: false,
        }
    }

    /// The process id inside the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends bytes to the process's stdin (the request must have asked for
    /// stdin), as fast as the process takes them: this waits while the
    /// agent's buffer for the stream is full.
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

    /// A terminal's new size (an exec started with `pty`; ignored
    /// otherwise).
    pub fn resize(&self, size: TerminalSize) -> Result<(), ClientError> {
        self.input.resize(size)
    }

    /// Kills the process group (SIGKILL); its exit status follows.
    pub fn kill(&self) -> Result<(), ClientError> {
        self.input.signal(libc::SIGKILL)
    }

    /// A cloneable handle for writing stdin and sending signals from
    /// another thread while this one reads output.
    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }

    /// The next event, or `None` once the exit status has been delivered.
    /// Waits as long as the process runs and the agent answers; fails if
    /// the agent stops answering, or if the command had a timeout and the
    /// guest let it run well past it.
    pub fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        self.next_event_until(None)
    }

    /// Like [`ExecHandle::next_event`], waiting at most `timeout`:
    /// [`ClientError::Timeout`] then, with the process still running and
    /// the handle still usable.
    pub fn next_event_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ExecEvent>, ClientError> {
        self.next_event_until(Some(Instant::now() + timeout))
    }

    fn next_event_until(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<ExecEvent>, ClientError> {
        if self.finished {
            return Ok(None);
        }
        let overdue = self.overdue_at.map(|(at, _)| at);
        let wait_until = match (deadline, overdue) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (incoming, grant) = match self.slot.next(wait_until) {
            Ok(next) => next,
            Err(ClientError::Timeout) if overdue.is_some_and(|at| Instant::now() >= at) => {
                let (_, timeout) = self.overdue_at.expect("checked");
                return Err(ClientError::Overdue {
                    timeout,
                    grace: self.conn.options.exec_grace,
                });
            }
            Err(e) => return Err(e),
        };
        if grant > 0 {
            // A lost connection shows on the next wait.
            let _ = self.conn.send(&Frame::window(self.slot.id, grant));
        }
        match incoming {
            Incoming::Data { channel, bytes } if channel == channel::STDERR => {
                Ok(Some(ExecEvent::Stderr(bytes)))
            }
            Incoming::Data { bytes, .. } => Ok(Some(ExecEvent::Stdout(bytes))),
            Incoming::End(frame) => {
                self.finished = true;
                Ok(Some(ExecEvent::Exit(frame.parse()?)))
            }
            Incoming::Reset(message) => {
                self.finished = true;
                Err(ClientError::StreamReset(message))
            }
        }
    }

    /// Waits for the process to finish, collecting its output, at most the
    /// client's output limit (64 MiB by default) of stdout and stderr
    /// together: a command that writes more fails with
    /// [`ClientError::OutputTooLarge`] and is killed.
    pub fn output(self) -> Result<Output, ClientError> {
        let limit = self.conn.options.output_limit;
        self.output_with_limit(limit)
    }

    /// Like [`ExecHandle::output`] with a limit of `limit` bytes.
    pub fn output_with_limit(mut self, limit: usize) -> Result<Output, ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut total = 0;
        loop {
            let (buf, d) = match self.next_event()? {
                Some(ExecEvent::Stdout(d)) => (&mut stdout, d),
                Some(ExecEvent::Stderr(d)) => (&mut stderr, d),
                Some(ExecEvent::Exit(status)) => {
                    return Ok(Output {
                        stdout,
                        stderr,
                        status,
                    })
                }
                None => return Err(ClientError::StreamEnded),
            };
            if total + d.len() > limit {
                // Killed, then dropped: nothing is left running for output
                // nobody takes.
                let _ = self.kill();
                return Err(ClientError::OutputTooLarge { limit });
            }
            buf.extend_from_slice(&d);
            total += d.len();
        }
    }
}

impl std::fmt::Debug for ExecHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecHandle")
            .field("stream", &self.slot.id)
            .field("pid", &self.pid)
            .field("finished", &self.finished)
            .finish()
    }
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        if !self.finished && !self.slot.is_finished() {
            let reset = Reset {
                message: "the host detached from the stream".into(),
            };
            let _ = self
                .conn
                .send(&Frame::json(FrameKind::Reset, self.slot.id, &reset));
        }
        self.conn.forget(self.slot.id);
    }
}

/// Writes stdin and sends signals for an [`ExecHandle`] from another thread.
#[derive(Clone)]
pub struct ExecInput {
    conn: Arc<Connection>,
    slot: Arc<StreamSlot>,
}

impl ExecInput {
    /// See [`ExecHandle::write_stdin`].
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        self.write_stdin_until(data, None)
    }

    /// Like [`ExecInput::write_stdin`], waiting at most `timeout` for the
    /// process to take it: [`ClientError::Timeout`] then, with part of
    /// `data` perhaps sent.
    pub fn write_stdin_within(&self, data: &[u8], timeout: Duration) -> Result<(), ClientError> {
        self.write_stdin_until(data, Some(Instant::now() + timeout))
    }

    fn write_stdin_until(
        &self,
        mut data: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), ClientError> {
        while !data.is_empty() {
            let n = self
                .slot
                .take_credit(data.len().min(DATA_CHUNK), deadline)?;
            self.conn
                .send(&Frame::data(self.slot.id, channel::STDIN, &data[..n]))?;
            data = &data[n..];
        }
        Ok(())
    }

    pub fn close_stdin(&self) -> Result<(), ClientError> {
        self.conn.send(&Frame::eof(self.slot.id, channel::STDIN))
    }

    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.conn.send(&Frame::json(
            FrameKind::Control,
            self.slot.id,
            &Control::Signal { signal },
        ))
    }

    /// See [`ExecHandle::resize`].
    pub fn resize(&self, size: TerminalSize) -> Result<(), ClientError> {
        size.check().map_err(|message| ClientError::Refused {
            code: crate::protocol::ErrorCode::BadRequest,
            message,
        })?;
        self.conn.send(&Frame::json(
            FrameKind::Control,
            self.slot.id,
            &Control::Resize(size),
        ))
    }
}

impl std::io::Write for ExecInput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_stdin(buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::BrokenPipe, e.to_string()))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
