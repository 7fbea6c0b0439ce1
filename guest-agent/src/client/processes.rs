//! Detached processes, seen from the host: they run in the guest whatever
//! happens to this connection, and their output is read from an offset,
//! as often as wanted, by any connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::{channel, AttachEnd, ExecRequest, ExitStatus, Open, ProcessInfo, Reply};

use super::connection::Connection;
use super::files::{refused, release};
use super::stream::{Incoming, StreamSlot};
use super::{AgentClient, ClientError};

/// Something read from a detached process's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// Output at `offset` (bytes since the process started, both streams).
    Stdout {
        offset: u64,
        bytes: Vec<u8>,
    },
    Stderr {
        offset: u64,
        bytes: Vec<u8>,
    },
    /// The attach is over: `next_offset` is where to read on from; `exit`
    /// how the process ended (`None` if it runs on).
    End {
        next_offset: u64,
        exit: Option<ExitStatus>,
    },
}

impl AgentClient {
    fn process_request(&self, open: Open) -> Result<Reply, ClientError> {
        let timeout = self.conn.options.request_timeout;
        match self.request(&open, timeout)? {
            reply @ Reply::Error { .. } => Err(refused(reply)),
            reply => Ok(reply),
        }
    }

    /// Starts a detached process (stdin `/dev/null`); returns its pid.
    pub fn spawn(&self, request: ExecRequest) -> Result<i32, ClientError> {
        match self.process_request(Open::Spawn(request))? {
            Reply::Spawned { pid } => Ok(pid),
            other => Err(refused(other)),
        }
    }

    /// The detached processes: running, and the latest that ended.
    pub fn processes(&self) -> Result<Vec<ProcessInfo>, ClientError> {
        match self.process_request(Open::Processes)? {
            Reply::Processes { processes } => Ok(processes),
            other => Err(refused(other)),
        }
    }

    /// Sends `signal` to a detached process's group.
    pub fn signal_process(&self, pid: i32, signal: i32) -> Result<(), ClientError> {
        self.process_request(Open::SignalProcess { pid, signal })
            .map(drop)
    }

    /// Reads a detached process's output from `offset`; with `follow`,
    /// until it exits, else until what there is now has been read.
    pub fn attach(&self, pid: i32, offset: u64, follow: bool) -> Result<AttachHandle, ClientError> {
        let open = Open::Attach {
            pid,
            offset,
            follow,
        };
        let (slot, from) = self.open_streaming(&open, |reply| match reply {
            Reply::Attached { from } => Ok(from),
            other => Err(other),
        })?;
        Ok(AttachHandle {
            conn: self.conn.clone(),
            slot,
            from,
            offset: from,
            ended: false,
        })
    }
}

/// A detached process's log being read. Dropping it stops the reading,
/// never the process.
pub struct AttachHandle {
    conn: Arc<Connection>,
    slot: Arc<StreamSlot>,
    from: u64,
    offset: u64,
    ended: bool,
}

impl AttachHandle {
    /// Where the data starts: later than the offset asked for if the
    /// agent had dropped older output.
    pub fn from(&self) -> u64 {
        self.from
    }

    /// The next event, waiting at most `timeout` ([`ClientError::Timeout`]
    /// then, still attached) or, with `None`, as long as the agent
    /// answers. `Ok(None)` after the end.
    pub fn next_event(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<LogEvent>, ClientError> {
        if self.ended {
            return Ok(None);
        }
        let incoming = self
            .slot
            .next_granting(&self.conn, timeout.map(|t| Instant::now() + t))?;
        match incoming {
            Incoming::Data { channel: ch, bytes } => {
                let offset = self.offset;
                self.offset += bytes.len() as u64;
                Ok(Some(if ch == channel::STDERR {
                    LogEvent::Stderr { offset, bytes }
                } else {
                    LogEvent::Stdout { offset, bytes }
                }))
            }
            Incoming::End(frame) => {
                self.ended = true;
                let end: AttachEnd = frame.parse()?;
                Ok(Some(LogEvent::End {
                    next_offset: end.next_offset,
                    exit: end.exit,
                }))
            }
            Incoming::Reset(message) => {
                self.ended = true;
                Err(ClientError::StreamReset(message))
            }
        }
    }
}

impl std::fmt::Debug for AttachHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachHandle")
            .field("stream", &self.slot.id)
            .field("offset", &self.offset)
            .finish()
    }
}

impl Drop for AttachHandle {
    fn drop(&mut self) {
        release(
            &self.conn,
            &self.slot,
            self.ended,
            "the host stopped reading",
        );
    }
}
