//! A TCP connection to a port inside the guest, carried by the agent: the
//! host side of a port forward or an HTTP preview.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use crate::protocol::files::TransferEnd;
use crate::protocol::{channel, Frame, Open, Reply, DATA_CHUNK};

use super::connection::Connection;
use super::files::release;
use super::stream::{Incoming, StreamSlot};
use super::{AgentClient, ClientError};

impl AgentClient {
    /// Connects to `port` on the guest's loopback. Read the guest's bytes
    /// from the returned stream; write with [`PortStream::writer`].
    pub fn connect_port(&self, port: u16) -> Result<PortStream, ClientError> {
        let (slot, ()) = self.open_streaming(&Open::Connect { port }, |reply| match reply {
            Reply::Connected => Ok(()),
            other => Err(other),
        })?;
        Ok(PortStream {
            conn: self.conn.clone(),
            slot,
            pending: Vec::new(),
            at: 0,
            ended: false,
        })
    }
}

/// The guest side's bytes, as they come; `Ok(0)` once it has closed.
/// Dropping it closes the connection.
pub struct PortStream {
    conn: Arc<Connection>,
    slot: Arc<StreamSlot>,
    pending: Vec<u8>,
    at: usize,
    ended: bool,
}

impl PortStream {
    /// The sending half, for another thread.
    pub fn writer(&self) -> PortWriter {
        PortWriter {
            conn: self.conn.clone(),
            slot: self.slot.clone(),
        }
    }
}

impl Read for PortStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.pending.len() {
            if self.ended {
                return Ok(0);
            }
            // As long as the agent answers: a quiet connection is normal.
            let next = self.slot.next_granting(&self.conn, None);
            match next.map_err(io::Error::other)? {
                Incoming::Data { bytes, .. } => {
                    self.pending = bytes;
                    self.at = 0;
                }
                Incoming::End(frame) => {
                    self.ended = true;
                    let end: TransferEnd = frame.parse().map_err(io::Error::other)?;
                    if let Some(e) = end.error {
                        return Err(io::Error::other(e.message));
                    }
                }
                Incoming::Reset(message) => {
                    self.ended = true;
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, message));
                }
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl std::fmt::Debug for PortStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortStream")
            .field("stream", &self.slot.id)
            .finish()
    }
}

impl Drop for PortStream {
    fn drop(&mut self) {
        release(
            &self.conn,
            &self.slot,
            self.ended,
            "the host closed the connection",
        );
    }
}

/// Writes to the guest's side of a [`PortStream`], as fast as the guest's
/// program reads.
#[derive(Clone)]
pub struct PortWriter {
    conn: Arc<Connection>,
    slot: Arc<StreamSlot>,
}

impl PortWriter {
    /// No more bytes to the guest: its program reads end of file.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.conn.send(&Frame::eof(self.slot.id, channel::STDIN))
    }
}

impl Write for PortWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // A guest program that reads nothing for this long is stuck.
        let deadline = Instant::now() + self.conn.options.request_timeout;
        let n = self
            .slot
            .take_credit(buf.len().min(DATA_CHUNK), Some(deadline))
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        self.conn
            .send(&Frame::data(self.slot.id, channel::STDIN, &buf[..n]))
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
