//! Reading frames incrementally: a read that times out keeps what it had,
//! so a caller can check its own deadlines between reads and carry on,
//! and can tell "idle between frames" from "stuck in the middle of one".

use std::io::{self, Read};

use super::{is_timeout, Frame, FrameKind, ProtocolError, HEADER_LEN, MAX_FRAME_LEN};

/// Read-ahead for a buffered reader: many small frames per syscall.
const READ_AHEAD: usize = 64 * 1024;

/// What one [`FrameReader::poll`] produced.
#[derive(Debug)]
pub enum Poll {
    Frame(Frame),
    /// The source had nothing more for now (a read timeout, or a
    /// non-blocking source); any partial frame is kept.
    Pending,
    /// Clean end of stream at a frame boundary.
    Closed,
}

enum Filled {
    Bytes(usize),
    Eof,
    Pending,
}

/// Decodes frames from a byte source. The length prefix is checked before
/// the payload is allocated, so a hostile length costs nothing.
pub struct FrameReader<R> {
    source: Source<R>,
    head: [u8; HEADER_LEN],
    head_filled: usize,
    /// The frame being read, once its header is known.
    body: Option<Body>,
}

/// Where bytes come from: the source, through an optional read-ahead.
struct Source<R> {
    inner: R,
    ahead: Vec<u8>,
    ahead_pos: usize,
    ahead_len: usize,
    /// Source reads the current poll may still make (`None`: any).
    read_budget: Option<usize>,
}

struct Body {
    kind: FrameKind,
    stream: u32,
    payload: Vec<u8>,
    filled: usize,
}

impl<R: Read> FrameReader<R> {
    /// A reader that reads ahead of the current frame: for a connection
    /// that carries nothing but frames.
    pub fn new(inner: R) -> Self {
        Self::with_read_ahead(inner, READ_AHEAD)
    }

    /// A reader that never reads past the frame it is decoding: the
    /// source may carry something else afterwards.
    pub fn unbuffered(inner: R) -> Self {
        Self::with_read_ahead(inner, 0)
    }

    fn with_read_ahead(inner: R, ahead: usize) -> Self {
        FrameReader {
            source: Source {
                inner,
                ahead: vec![0; ahead],
                ahead_pos: 0,
                ahead_len: 0,
                read_budget: None,
            },
            head: [0; HEADER_LEN],
            head_filled: 0,
            body: None,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.source.inner
    }

    /// Whether part of a frame has arrived and the rest has not.
    pub fn in_frame(&self) -> bool {
        self.head_filled > 0 || self.body.is_some()
    }

    /// Reads until a whole frame, the end of the stream, or nothing more
    /// for now (a read timed out). After an error the reader must not be
    /// used again.
    pub fn poll(&mut self) -> Result<Poll, ProtocolError> {
        self.source.read_budget = None;
        self.decode()
    }

    /// Like [`FrameReader::poll`], but reads the source at most once, so
    /// that a peer dripping a byte before each read would time out cannot
    /// keep the caller from its own deadlines: `Pending` then means "not
    /// a whole frame yet".
    pub fn poll_once(&mut self) -> Result<Poll, ProtocolError> {
        self.source.read_budget = Some(1);
        self.decode()
    }

    fn decode(&mut self) -> Result<Poll, ProtocolError> {
        if self.body.is_none() {
            while self.head_filled < HEADER_LEN {
                match self.source.fill(&mut self.head[self.head_filled..])? {
                    Filled::Bytes(n) => self.head_filled += n,
                    Filled::Eof if self.head_filled == 0 => return Ok(Poll::Closed),
                    Filled::Eof => return Err(ProtocolError::Truncated),
                    Filled::Pending => return Ok(Poll::Pending),
                }
            }
            let len = u32::from_le_bytes([self.head[0], self.head[1], self.head[2], self.head[3]])
                as usize;
            if !(5..=MAX_FRAME_LEN).contains(&len) {
                return Err(ProtocolError::BadLength(len));
            }
            let kind = FrameKind::try_from(self.head[4])?;
            let stream =
                u32::from_le_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]);
            self.body = Some(Body {
                kind,
                stream,
                payload: vec![0; len - 5],
                filled: 0,
            });
        }
        let body = self.body.as_mut().expect("a body was set above");
        while body.filled < body.payload.len() {
            match self.source.fill(&mut body.payload[body.filled..])? {
                Filled::Bytes(n) => body.filled += n,
                Filled::Eof => return Err(ProtocolError::Truncated),
                Filled::Pending => return Ok(Poll::Pending),
            }
        }
        let body = self.body.take().expect("checked above");
        self.head_filled = 0;
        Ok(Poll::Frame(Frame {
            kind: body.kind,
            stream: body.stream,
            payload: body.payload,
        }))
    }
}

impl FrameReader<std::os::unix::net::UnixStream> {
    /// The next whole frame, all of it before `deadline` however the peer
    /// spaces its bytes: `Ok(None)` on a clean end of stream, a timeout
    /// error ([`ProtocolError::is_timeout`]) once the deadline passes.
    pub fn read_by(
        &mut self,
        deadline: std::time::Instant,
    ) -> Result<Option<Frame>, ProtocolError> {
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(ProtocolError::Io(io::ErrorKind::TimedOut.into()));
            }
            self.get_ref().set_read_timeout(Some(left))?;
            match self.poll_once()? {
                Poll::Frame(frame) => return Ok(Some(frame)),
                Poll::Closed => return Ok(None),
                Poll::Pending => {}
            }
        }
    }
}

impl<R: Read> Source<R> {
    /// Copies bytes into `dst` from the read-ahead or the source.
    fn fill(&mut self, dst: &mut [u8]) -> Result<Filled, ProtocolError> {
        if self.ahead.is_empty() {
            return read_budgeted(&mut self.inner, &mut self.read_budget, dst);
        }
        if self.ahead_pos == self.ahead_len {
            match read_budgeted(&mut self.inner, &mut self.read_budget, &mut self.ahead)? {
                Filled::Bytes(n) => {
                    self.ahead_pos = 0;
                    self.ahead_len = n;
                }
                other => return Ok(other),
            }
        }
        let n = dst.len().min(self.ahead_len - self.ahead_pos);
        dst[..n].copy_from_slice(&self.ahead[self.ahead_pos..self.ahead_pos + n]);
        self.ahead_pos += n;
        Ok(Filled::Bytes(n))
    }
}

/// One read of `inner`, if the budget allows one.
fn read_budgeted<R: Read>(
    inner: &mut R,
    budget: &mut Option<usize>,
    dst: &mut [u8],
) -> Result<Filled, ProtocolError> {
    match budget {
        Some(0) => return Ok(Filled::Pending),
        Some(n) => *n -= 1,
        None => {}
    }
    loop {
        match inner.read(dst) {
            Ok(0) => return Ok(Filled::Eof),
            Ok(n) => return Ok(Filled::Bytes(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Ok(Filled::Pending),
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
}
