//! One stream's state on the host: what the agent sent and the consumer
//! has not taken yet, and both directions' flow-control credit.
//!
//! The connection's reader thread delivers frames here and never waits:
//! the agent may have at most our window of data unacknowledged on the
//! stream, so the buffer is bounded by construction, and an agent that
//! sends more breaks the connection instead of growing it.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::protocol::{channel, Frame, FrameKind, Reply, Reset};

use super::connection::Lost;
use super::ClientError;

/// What kind of stream, for what the agent may send on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamKind {
    /// One request, one reply.
    Request,
    /// An exec or a file transfer: a reply, then data, then an end.
    Streaming,
}

/// Something the agent sent on a stream, for its consumer.
#[derive(Debug)]
pub(crate) enum Incoming {
    Data {
        channel: u8,
        bytes: Vec<u8>,
    },
    /// The stream's last frame, as sent (JSON).
    End(Frame),
    Reset(String),
}

pub(crate) struct StreamSlot {
    pub id: u32,
    kind: StreamKind,
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    reply: Option<Reply>,
    /// The reply has arrived (and may have been taken).
    replied: bool,
    events: VecDeque<Incoming>,
    /// Data bytes received and not yet granted back: at most `window`.
    outstanding: u64,
    /// Of those, bytes the consumer has taken (to be granted back).
    consumed: u64,
    window: u64,
    /// Bytes this side may still send.
    send_credit: u64,
    /// The agent sent its last frame (End, Reset, or a refusing Reply).
    finished: bool,
    /// The process closed its stdin.
    stdin_closed: bool,
    lost: Option<Lost>,
}

/// What `deliver` made of a frame.
pub(crate) enum Delivered {
    Open,
    /// The stream is over from the agent's side; the connection forgets it.
    Finished,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StreamSlot {
    pub fn new(id: u32, kind: StreamKind, window: u32, send_credit: u32) -> Self {
        StreamSlot {
            id,
            kind,
            state: Mutex::new(State {
                reply: None,
                replied: false,
                events: VecDeque::new(),
                outstanding: 0,
                consumed: 0,
                window: u64::from(window),
                send_credit: u64::from(send_credit),
                finished: false,
                stdin_closed: false,
                lost: None,
            }),
            changed: Condvar::new(),
        }
    }

    /// Takes a frame the agent sent on this stream. An error is the
    /// agent breaking the protocol: the caller drops the connection.
    pub fn deliver(&self, frame: Frame) -> Result<Delivered, String> {
        let id = self.id;
        let mut s = lock(&self.state);
        let violation = |what: &str| format!("stream {id}: {what}");
        if s.finished {
            return Err(violation(&format!(
                "{:?} after the stream ended",
                frame.kind
            )));
        }
        let delivered = match frame.kind {
            FrameKind::Reply => {
                if s.replied {
                    return Err(violation("a second reply"));
                }
                let reply: Reply = frame.parse().map_err(|e| violation(&e.to_string()))?;
                let done = self.kind == StreamKind::Request || matches!(reply, Reply::Error { .. });
                s.reply = Some(reply);
                s.replied = true;
                s.finished = done;
                if done {
                    Delivered::Finished
                } else {
                    Delivered::Open
                }
            }
            FrameKind::Window => {
                let grant = frame
                    .window_bytes()
                    .map_err(|e| violation(&e.to_string()))?;
                s.send_credit = s.send_credit.saturating_add(u64::from(grant));
                Delivered::Open
            }
            FrameKind::Data | FrameKind::Eof | FrameKind::End | FrameKind::Reset
                if self.kind == StreamKind::Request || !s.replied =>
            {
                return Err(violation(&format!("{:?} before the reply", frame.kind)));
            }
            FrameKind::Data => {
                let ch = frame.channel().map_err(|e| violation(&e.to_string()))?;
                if ch != channel::STDOUT && ch != channel::STDERR {
                    return Err(violation(&format!("data on channel {ch}")));
                }
                let n = frame.data_bytes().len() as u64;
                if s.outstanding + n > s.window {
                    return Err(violation(&format!(
                        "{} bytes unacknowledged, beyond the {}-byte window",
                        s.outstanding + n,
                        s.window
                    )));
                }
                s.outstanding += n;
                s.events.push_back(Incoming::Data {
                    channel: ch,
                    bytes: frame.into_data_bytes(),
                });
                Delivered::Open
            }
            FrameKind::Eof => {
                // End follows all output: the end of stdout or stderr
                // alone tells the consumer nothing.
                if frame.channel().map_err(|e| violation(&e.to_string()))? == channel::STDIN {
                    s.stdin_closed = true;
                }
                Delivered::Open
            }
            FrameKind::End => {
                s.finished = true;
                s.events.push_back(Incoming::End(frame));
                Delivered::Finished
            }
            FrameKind::Reset => {
                let reset: Reset = frame.parse().unwrap_or(Reset {
                    message: "(no reason given)".into(),
                });
                s.finished = true;
                s.events.push_back(Incoming::Reset(reset.message));
                Delivered::Finished
            }
            other => return Err(violation(&format!("unexpected {other:?} frame"))),
        };
        drop(s);
        self.changed.notify_all();
        Ok(delivered)
    }

    /// The connection is gone: wake everyone waiting on this stream.
    pub fn lose(&self, why: Lost) {
        lock(&self.state).lost.get_or_insert(why);
        self.changed.notify_all();
    }

    /// The reply to the stream's Open if it has come (or why it never
    /// will), without waiting.
    pub fn try_reply(&self) -> Option<Result<Reply, ClientError>> {
        let mut s = lock(&self.state);
        if let Some(reply) = s.reply.take() {
            return Some(Ok(reply));
        }
        s.lost.as_ref().map(|lost| Err(lost.error()))
    }

    /// Waits for the reply to the stream's Open.
    pub fn wait_reply(&self, deadline: Instant) -> Result<Reply, ClientError> {
        let mut s = lock(&self.state);
        loop {
            if let Some(reply) = s.reply.take() {
                return Ok(reply);
            }
            if let Some(lost) = &s.lost {
                return Err(lost.error());
            }
            s = self.wait(s, Some(deadline))?;
        }
    }

    /// The next thing the agent sent, waiting until `deadline` (forever if
    /// none). Returns the bytes to grant back to the agent alongside: the
    /// caller sends that Window frame.
    pub fn next(&self, deadline: Option<Instant>) -> Result<(Incoming, u32), ClientError> {
        let mut s = lock(&self.state);
        loop {
            if let Some(event) = s.events.pop_front() {
                let mut grant = 0;
                if let Incoming::Data { bytes, .. } = &event {
                    s.consumed += bytes.len() as u64;
                    // Grant back in quarters of the window: few Window
                    // frames, and the agent is never starved while the
                    // consumer has data to take.
                    if s.consumed >= (s.window / 4).max(1) && !s.finished && s.lost.is_none() {
                        grant = s.consumed as u32;
                        s.outstanding -= s.consumed;
                        s.consumed = 0;
                    }
                }
                return Ok((event, grant));
            }
            if let Some(lost) = &s.lost {
                return Err(lost.error());
            }
            s = self.wait(s, deadline)?;
        }
    }

    /// Like [`StreamSlot::next`], sending the agent the credit the consumer
    /// gave back (a lost connection shows on the next wait).
    pub fn next_granting(
        &self,
        conn: &super::connection::Connection,
        deadline: Option<Instant>,
    ) -> Result<Incoming, ClientError> {
        let (incoming, grant) = self.next(deadline)?;
        if grant > 0 {
            let _ = conn.send(&Frame::window(self.id, grant));
        }
        Ok(incoming)
    }

    /// Waits for credit to send up to `want` bytes, and takes it.
    pub fn take_credit(
        &self,
        want: usize,
        deadline: Option<Instant>,
    ) -> Result<usize, ClientError> {
        let mut s = lock(&self.state);
        loop {
            if let Some(lost) = &s.lost {
                return Err(lost.error());
            }
            if s.finished {
                return Err(ClientError::StreamEnded);
            }
            if s.stdin_closed {
                return Err(ClientError::StdinClosed);
            }
            if s.send_credit > 0 {
                let n = (want as u64).min(s.send_credit) as usize;
                s.send_credit -= n as u64;
                return Ok(n);
            }
            s = self.wait(s, deadline)?;
        }
    }

    pub fn is_finished(&self) -> bool {
        lock(&self.state).finished
    }

    fn wait<'a>(
        &self,
        s: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> Result<MutexGuard<'a, State>, ClientError> {
        match deadline {
            None => Ok(self.changed.wait(s).unwrap_or_else(|p| p.into_inner())),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ClientError::Timeout);
                }
                Ok(self
                    .changed
                    .wait_timeout(s, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0)
            }
        }
    }
}
