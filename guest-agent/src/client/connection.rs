//! The connection under an [`super::AgentClient`]: a reader thread that
//! routes frames to their streams and keeps the connection alive, a writer
//! thread that owns the socket's sending side, and the table of streams.
//!
//! Nothing here waits on the agent without a bound. The reader never
//! blocks on a consumer (each stream's buffer is bounded by its window);
//! callers hand frames to the writer without blocking; a write the agent
//! does not take within the keepalive timeout, a ping it does not answer
//! within it, or a frame it starts and does not finish within it, loses
//! the connection, which wakes every waiter with the reason.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::protocol::{is_timeout, Frame, FrameKind, FrameReader, Open, Poll};

use super::stream::{Delivered, StreamKind, StreamSlot};
use super::{ClientError, ClientOptions};

/// How often the reader wakes to check its deadlines when the agent is
/// quiet.
const TICK: Duration = Duration::from_millis(250);

/// Why a connection ended.
#[derive(Clone, Debug)]
pub(crate) enum Lost {
    /// The agent closed it.
    Closed,
    /// This side closed it.
    ClosedHere,
    /// The agent broke the protocol, or the socket failed.
    Broken(String),
    /// The agent stopped answering.
    Unresponsive(String),
}

impl Lost {
    pub fn error(&self) -> ClientError {
        match self {
            Lost::Closed => ClientError::Disconnected,
            Lost::ClosedHere => ClientError::Closed,
            Lost::Broken(why) => ClientError::Lost(why.clone()),
            Lost::Unresponsive(why) => ClientError::Unresponsive(why.clone()),
        }
    }
}

/// What the agent said about itself in its hello, as this side uses it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerLimits {
    /// Stdin bytes we may send per stream before it grants more.
    pub window: u32,
    pub max_streams: u32,
}

pub(crate) struct Connection {
    pub options: ClientOptions,
    peer: PeerLimits,
    socket: UnixStream,
    outgoing: Mutex<Option<Sender<Vec<u8>>>>,
    state: Mutex<State>,
    /// Signalled when a ping is answered or the connection is lost.
    pinged: Condvar,
}

struct State {
    streams: HashMap<u32, Arc<StreamSlot>>,
    next_stream: u32,
    lost: Option<Lost>,
    /// Pings sent and not yet answered, by nonce.
    pings: HashMap<u64, bool>,
    next_nonce: u64,
}

impl Connection {
    pub fn new(
        socket: UnixStream,
        options: ClientOptions,
        peer: PeerLimits,
        outgoing: Sender<Vec<u8>>,
    ) -> Self {
        Connection {
            options,
            peer,
            socket,
            outgoing: Mutex::new(Some(outgoing)),
            state: Mutex::new(State {
                streams: HashMap::new(),
                next_stream: 1,
                lost: None,
                pings: HashMap::new(),
                next_nonce: 1,
            }),
            pinged: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn lost(&self) -> Option<Lost> {
        self.state().lost.clone()
    }

    /// Queues a frame for the writer thread; never blocks.
    pub fn send(&self, frame: &Frame) -> Result<(), ClientError> {
        let bytes = frame.encode()?;
        let sent = match &*self.outgoing.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(bytes).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            Err(self.lost().unwrap_or(Lost::ClosedHere).error())
        }
    }

    /// Opens a stream with `open` as its request.
    pub fn open(&self, open: &Open, kind: StreamKind) -> Result<Arc<StreamSlot>, ClientError> {
        let slot = {
            let mut s = self.state();
            if let Some(lost) = &s.lost {
                return Err(lost.error());
            }
            let max = self.peer.max_streams;
            if max > 0 && s.streams.len() >= max as usize {
                return Err(ClientError::TooManyStreams(max));
            }
            let id = s.next_stream;
            s.next_stream = id
                .checked_add(1)
                .ok_or_else(|| ClientError::Lost("the connection ran out of stream ids".into()))?;
            let slot = Arc::new(StreamSlot::new(
                id,
                kind,
                self.options.window,
                self.peer.window,
            ));
            s.streams.insert(id, slot.clone());
            slot
        };
        if let Err(e) = self.send(&Frame::json(FrameKind::Open, slot.id, open)) {
            self.forget(slot.id);
            return Err(e);
        }
        Ok(slot)
    }

    /// Drops a stream from the table: frames that still arrive for it
    /// are discarded.
    pub fn forget(&self, id: u32) {
        self.state().streams.remove(&id);
    }

    /// Sends a ping and waits for its answer.
    pub fn ping(&self, timeout: Duration) -> Result<(), ClientError> {
        let nonce = self.next_nonce();
        self.state().pings.insert(nonce, false);
        let deadline = Instant::now() + timeout;
        let result = self.send(&Frame::ping(nonce)).and_then(|()| {
            let mut s = self.state();
            loop {
                if s.pings.get(&nonce) == Some(&true) {
                    return Ok(());
                }
                if let Some(lost) = &s.lost {
                    return Err(lost.error());
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ClientError::Timeout);
                }
                s = self
                    .pinged
                    .wait_timeout(s, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        });
        self.state().pings.remove(&nonce);
        result
    }

    /// Stops taking frames to send; the writer sends what is queued and
    /// ends.
    pub fn stop_sending(&self) {
        self.outgoing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Ends the connection (once): every waiter wakes with `why`, the
    /// writer stops, the socket is shut so a blocked read or write returns.
    pub fn lose(&self, why: Lost) {
        let slots: Vec<Arc<StreamSlot>> = {
            let mut s = self.state();
            if s.lost.is_some() {
                return;
            }
            match &why {
                Lost::Broken(m) | Lost::Unresponsive(m) => {
                    log::debug!("agent connection lost: {m}")
                }
                _ => {}
            }
            s.lost = Some(why.clone());
            s.streams.drain().map(|(_, slot)| slot).collect()
        };
        self.stop_sending();
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        for slot in slots {
            slot.lose(why.clone());
        }
        self.pinged.notify_all();
    }

    /// Whether anyone waits on the agent: only then is a quiet agent a
    /// problem worth a keepalive.
    fn has_waiters(&self) -> bool {
        let s = self.state();
        !s.streams.is_empty() || !s.pings.is_empty()
    }

    fn next_nonce(&self) -> u64 {
        let mut s = self.state();
        let nonce = s.next_nonce;
        s.next_nonce += 1;
        nonce
    }

    /// Routes one frame from the agent. An error is a protocol violation.
    fn deliver(&self, frame: Frame, keepalive: &mut Option<(u64, Instant)>) -> Result<(), Lost> {
        match frame.kind {
            FrameKind::Ping => {
                let nonce = frame.nonce().map_err(|e| Lost::Broken(e.to_string()))?;
                // Lost or not, the reader notices on its own.
                let _ = self.send(&Frame::pong(nonce));
                Ok(())
            }
            FrameKind::Pong => {
                let nonce = frame.nonce().map_err(|e| Lost::Broken(e.to_string()))?;
                if keepalive.is_some_and(|(n, _)| n == nonce) {
                    *keepalive = None;
                } else if let Some(answered) = self.state().pings.get_mut(&nonce) {
                    *answered = true;
                    self.pinged.notify_all();
                }
                Ok(())
            }
            FrameKind::Reply
            | FrameKind::Data
            | FrameKind::Eof
            | FrameKind::Window
            | FrameKind::End
            | FrameKind::Reset => {
                let id = frame.stream;
                let kind = frame.kind;
                let slot = {
                    let s = self.state();
                    if id == 0 || id >= s.next_stream {
                        return Err(Lost::Broken(format!(
                            "the agent sent a {kind:?} frame on stream {id}, which was never opened"
                        )));
                    }
                    s.streams.get(&id).cloned()
                };
                // A stream this side already dropped: the agent had not
                // heard yet. Its frames are nobody's.
                let Some(slot) = slot else {
                    return Ok(());
                };
                match slot.deliver(frame) {
                    Ok(Delivered::Open) => Ok(()),
                    Ok(Delivered::Finished) => {
                        self.forget(id);
                        Ok(())
                    }
                    Err(why) => Err(Lost::Broken(format!("the agent broke the protocol: {why}"))),
                }
            }
            FrameKind::Hello | FrameKind::Open | FrameKind::Control => Err(Lost::Broken(format!(
                "the agent sent an unexpected {:?} frame",
                frame.kind
            ))),
        }
    }
}

/// The writer thread: writes queued frames in order. A write the agent
/// does not take within the keepalive timeout loses the connection.
pub(crate) fn write_frames(
    conn: Arc<Connection>,
    mut socket: UnixStream,
    queue: Receiver<Vec<u8>>,
) {
    let timeout = conn.options.keepalive_timeout;
    if let Err(e) = socket.set_write_timeout(Some(timeout.max(Duration::from_millis(1)))) {
        conn.lose(Lost::Broken(format!("cannot set a write timeout: {e}")));
        return;
    }
    while let Ok(bytes) = queue.recv() {
        if let Err(e) = write_within(&mut socket, &bytes, timeout) {
            let why = if is_timeout(&e) {
                Lost::Unresponsive(format!(
                    "the agent stopped reading its connection (a write did not complete within {timeout:?})"
                ))
            } else {
                Lost::Broken(format!("writing to the agent: {e}"))
            };
            conn.lose(why);
            return;
        }
    }
}

/// Writes all of `bytes` within `timeout` on a socket whose write timeout
/// is already set (to at most `timeout`): a peer that takes a byte now and
/// then cannot stretch one write past it.
pub(crate) fn write_within(
    socket: &mut UnixStream,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut done = 0;
    while done < bytes.len() {
        if Instant::now() >= deadline {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        match socket.write(&bytes[done..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The reader thread: routes frames until the connection ends, and keeps
/// an eye on the agent meanwhile.
pub(crate) fn read_frames(conn: Arc<Connection>, mut reader: FrameReader<UnixStream>) {
    if let Err(e) = reader.get_ref().set_read_timeout(Some(TICK)) {
        conn.lose(Lost::Broken(format!("cannot set a read timeout: {e}")));
        return;
    }
    let options = conn.options.clone();
    let mut last_heard = Instant::now();
    let mut frame_started: Option<Instant> = None;
    let mut keepalive: Option<(u64, Instant)> = None;
    loop {
        match reader.poll_once() {
            Ok(Poll::Frame(frame)) => {
                last_heard = Instant::now();
                frame_started = None;
                if let Err(why) = conn.deliver(frame, &mut keepalive) {
                    conn.lose(why);
                    return;
                }
                continue;
            }
            Ok(Poll::Pending) => {}
            Ok(Poll::Closed) => {
                conn.lose(Lost::Closed);
                return;
            }
            Err(e) => {
                // After this side shut the socket, that is all it is.
                conn.lose(Lost::Broken(e.to_string()));
                return;
            }
        }
        if conn.lost().is_some() {
            return;
        }
        let now = Instant::now();
        if reader.in_frame() {
            let started = *frame_started.get_or_insert(now);
            if now - started > options.keepalive_timeout {
                conn.lose(Lost::Unresponsive(format!(
                    "the agent stopped in the middle of a frame for {:?}",
                    options.keepalive_timeout
                )));
                return;
            }
        }
        match keepalive {
            Some((_, sent)) if now - sent > options.keepalive_timeout => {
                conn.lose(Lost::Unresponsive(format!(
                    "the agent did not answer a keepalive ping within {:?}",
                    options.keepalive_timeout
                )));
                return;
            }
            Some(_) => {}
            None if now - last_heard > options.keepalive_interval && conn.has_waiters() => {
                let nonce = conn.next_nonce();
                if conn.send(&Frame::ping(nonce)).is_ok() {
                    keepalive = Some((nonce, now));
                }
            }
            None => {}
        }
    }
}
