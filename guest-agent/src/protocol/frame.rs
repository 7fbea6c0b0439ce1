//! One frame: its kind, its stream and its payload, and how it is encoded.

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::{FrameReader, Poll, ProtocolError, HEADER_LEN, MAX_PAYLOAD};

/// What a frame carries (see the table in [`super`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    Open = 2,
    Reply = 3,
    Data = 4,
    Eof = 5,
    Window = 6,
    Control = 7,
    End = 8,
    Reset = 9,
    Ping = 10,
    Pong = 11,
}

impl TryFrom<u8> for FrameKind {
    type Error = ProtocolError;
    fn try_from(value: u8) -> Result<Self, ProtocolError> {
        Ok(match value {
            1 => FrameKind::Hello,
            2 => FrameKind::Open,
            3 => FrameKind::Reply,
            4 => FrameKind::Data,
            5 => FrameKind::Eof,
            6 => FrameKind::Window,
            7 => FrameKind::Control,
            8 => FrameKind::End,
            9 => FrameKind::Reset,
            10 => FrameKind::Ping,
            11 => FrameKind::Pong,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: FrameKind, stream: u32, payload: Vec<u8>) -> Self {
        Frame {
            kind,
            stream,
            payload,
        }
    }

    /// A frame whose payload is `value` as JSON.
    pub fn json<T: Serialize>(kind: FrameKind, stream: u32, value: &T) -> Self {
        // Serializing our own plain structs cannot fail.
        let payload = serde_json::to_vec(value).unwrap_or_default();
        Frame::new(kind, stream, payload)
    }

    /// Data on `channel`: at most [`super::DATA_CHUNK`] bytes by
    /// convention, at most [`MAX_PAYLOAD`] - 1 on the wire.
    pub fn data(stream: u32, channel: u8, bytes: &[u8]) -> Self {
        let mut payload = Vec::with_capacity(1 + bytes.len());
        payload.push(channel);
        payload.extend_from_slice(bytes);
        Frame::new(FrameKind::Data, stream, payload)
    }

    pub fn eof(stream: u32, channel: u8) -> Self {
        Frame::new(FrameKind::Eof, stream, vec![channel])
    }

    /// Grants the peer `bytes` more of this stream's window.
    pub fn window(stream: u32, bytes: u32) -> Self {
        Frame::new(FrameKind::Window, stream, bytes.to_le_bytes().to_vec())
    }

    pub fn ping(nonce: u64) -> Self {
        Frame::new(FrameKind::Ping, 0, nonce.to_le_bytes().to_vec())
    }

    pub fn pong(nonce: u64) -> Self {
        Frame::new(FrameKind::Pong, 0, nonce.to_le_bytes().to_vec())
    }

    /// Decodes the JSON payload.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|source| ProtocolError::BadPayload {
            kind: self.kind,
            source,
        })
    }

    fn fixed<const N: usize>(&self, expected: &'static str) -> Result<[u8; N], ProtocolError> {
        self.payload
            .as_slice()
            .try_into()
            .map_err(|_| ProtocolError::BadFixedPayload {
                kind: self.kind,
                expected,
                len: self.payload.len(),
            })
    }

    /// The channel of a Data or Eof frame.
    pub fn channel(&self) -> Result<u8, ProtocolError> {
        match (self.kind, self.payload.first()) {
            (FrameKind::Eof, Some(&c)) if self.payload.len() == 1 => Ok(c),
            (FrameKind::Data, Some(&c)) => Ok(c),
            _ => Err(ProtocolError::BadFixedPayload {
                kind: self.kind,
                expected: "a channel byte",
                len: self.payload.len(),
            }),
        }
    }

    /// The bytes of a Data frame (after its channel byte).
    pub fn data_bytes(&self) -> &[u8] {
        self.payload.get(1..).unwrap_or_default()
    }

    /// Takes the bytes of a Data frame out of it (after its channel byte).
    pub fn into_data_bytes(mut self) -> Vec<u8> {
        if self.payload.is_empty() {
            return self.payload;
        }
        self.payload.remove(0);
        self.payload
    }

    /// The grant of a Window frame.
    pub fn window_bytes(&self) -> Result<u32, ProtocolError> {
        self.fixed::<4>("a u32 window grant")
            .map(u32::from_le_bytes)
    }

    /// The nonce of a Ping or Pong frame.
    pub fn nonce(&self) -> Result<u64, ProtocolError> {
        self.fixed::<8>("a u64 nonce").map(u64::from_le_bytes)
    }

    /// Encodes the frame into `out` (appending).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(ProtocolError::PayloadTooLarge(self.payload.len()));
        }
        let len = (5 + self.payload.len()) as u32;
        out.reserve(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&len.to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// The frame's bytes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut out = Vec::new();
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Writes the frame with a single `write_all`, so frames from several
    /// threads sharing a locked writer never interleave.
    pub fn write_to<W: Write>(&self, w: &mut W) -> Result<(), ProtocolError> {
        w.write_all(&self.encode()?)?;
        Ok(())
    }

    /// Reads one frame, blocking. Returns `Ok(None)` on a clean end of
    /// stream at a frame boundary. A read timeout set on `r` surfaces as
    /// an I/O error ([`ProtocolError::is_timeout`]), with any partial
    /// frame lost: use a [`FrameReader`] to keep it across timeouts.
    pub fn read_from<R: std::io::Read>(r: &mut R) -> Result<Option<Frame>, ProtocolError> {
        match FrameReader::unbuffered(r).poll()? {
            Poll::Frame(frame) => Ok(Some(frame)),
            Poll::Closed => Ok(None),
            Poll::Pending => Err(ProtocolError::Io(std::io::ErrorKind::TimedOut.into())),
        }
    }
}
