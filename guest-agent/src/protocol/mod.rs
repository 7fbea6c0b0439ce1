//! The wire protocol between the host and the guest agent, version 2.
//!
//! One vsock connection carries many concurrent streams (an exec, and
//! later a PTY, a file transfer, a forwarded port). Every frame is
//!
//! ```text
//! +----------------+--------+----------------+-----------------+
//! | len: u32 LE    | kind u8| stream: u32 LE | payload         |
//! +----------------+--------+----------------+-----------------+
//!   len = 1 + 4 + payload.len(), at most MAX_FRAME_LEN
//! ```
//!
//! | kind | name | direction | payload |
//! |---|---|---|---|
//! | 1 | Hello | both, stream 0, first frame | JSON [`Hello`] |
//! | 2 | Open | host to agent, new stream | JSON [`Open`] |
//! | 3 | Reply | agent to host | JSON [`Reply`]: the answer to Open |
//! | 4 | Data | both | channel byte, then bytes; counts against the receiver's window |
//! | 5 | Eof | both | channel byte: nothing more on that channel |
//! | 6 | Window | both | u32 LE: the receiver took this many more bytes |
//! | 7 | Control | host to agent | JSON [`Control`] (a signal, a terminal's size) |
//! | 8 | End | agent to host | JSON: the stream's last frame ([`ExitStatus`] for an exec, [`files::TransferEnd`] for a file) |
//! | 9 | Reset | both | JSON [`Reset`]: the stream is aborted (from the host: detached) |
//! | 10 | Ping | both, stream 0 | u64 LE nonce, answered by Pong |
//! | 11 | Pong | both, stream 0 | the Ping's nonce |
//!
//! **Flow control.** Each side says in its hello how many Data bytes it
//! will buffer per stream (its window). A sender may have at most that
//! many bytes unacknowledged on a stream; the receiver sends Window as its
//! consumer takes data. So a stream whose consumer is slow or stuck stops
//! only its own sender, never the connection: the reading side of each
//! peer always has room for what may arrive, and never blocks. A peer that
//! sends beyond the window has broken the protocol and loses the
//! connection. Why credit windows on one connection rather than a vsock
//! connection per stream: opening a stream costs no guest round trip
//! beyond the request itself, the number of vsock connections (bounded per
//! device) and host descriptors does not grow with streams, and every
//! bound lives in this one codec, shared by host and guest.
//!
//! Control payloads are JSON so the protocol can grow fields without
//! breaking older peers; bulk data is raw. Both sides treat the other as
//! hostile: a frame over the size limit, a truncated frame or an unknown
//! kind is an error, never a panic or an unbounded allocation.

pub mod files;
mod frame;
mod messages;
mod reader;

pub use frame::{Frame, FrameKind};
pub use messages::{
    AttachEnd, Control, ErrorCode, ExecRequest, ExitStatus, Hello, Identity, Open, ProcessInfo,
    Reply, Reset, TerminalSize, DETACHED_LOG_BYTES,
};
pub use reader::{FrameReader, Poll};

use std::io;

/// Bumped on any incompatible change. Peers exchange it in [`Hello`].
pub const PROTOCOL_VERSION: u32 = 2;

/// vsock port the agent listens on for host connections.
pub const AGENT_PORT: u32 = 1024;

/// vsock port on the host the agent connects to once, at boot, to say it
/// is ready to take commands.
pub const READY_PORT: u32 = 1025;

/// Largest payload in one frame; anything bigger on the wire is refused
/// before a byte of it is allocated.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Largest value of the length prefix (kind + stream + payload).
pub const MAX_FRAME_LEN: usize = 5 + MAX_PAYLOAD;

/// Bytes before the payload: length, kind, stream.
pub const HEADER_LEN: usize = 9;

/// Most data bytes a sender puts in one Data frame: a stream's bulk never
/// holds the connection for long, so other streams interleave.
pub const DATA_CHUNK: usize = 64 * 1024;

/// Largest window a peer may announce; larger ones are taken as this.
pub const MAX_WINDOW: u32 = 4 << 20;

/// Smallest window a peer may announce: one full Data frame.
pub const MIN_WINDOW: u32 = DATA_CHUNK as u32;

/// The host's window by default: output a command may have in flight per
/// stream.
pub const DEFAULT_HOST_WINDOW: u32 = 1 << 20;

/// The agent's window: stdin it buffers per stream for a process that
/// has not read it yet.
pub const AGENT_WINDOW: u32 = 256 << 10;

/// Streams the agent serves at once on one connection.
pub const AGENT_MAX_STREAMS: u32 = 256;

/// Streams: stdin from the host; stdout and stderr from the agent.
pub mod channel {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("i/o error on the agent connection: {0}")]
    Io(#[from] io::Error),
    #[error("frame length {0} is outside 5..={MAX_FRAME_LEN}")]
    BadLength(usize),
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLarge(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("malformed {kind:?} payload: {source}")]
    BadPayload {
        kind: FrameKind,
        source: serde_json::Error,
    },
    #[error("a {kind:?} frame must carry {expected}, it has {len} bytes")]
    BadFixedPayload {
        kind: FrameKind,
        expected: &'static str,
        len: usize,
    },
    #[error(
        "the peer speaks agent protocol version {peer} and this side version {PROTOCOL_VERSION}: \
         host and guest agent come from different Capsule versions (rebuild the guest \
         initramfs with `make artifacts`, or restore a snapshot taken by this version)"
    )]
    VersionMismatch { peer: u32 },
    #[error("unexpected {0:?} frame")]
    Unexpected(FrameKind),
}

impl ProtocolError {
    /// The read gave up waiting (a socket timeout), not a broken peer.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProtocolError::Io(e) if is_timeout(e))
    }
}

/// Whether an I/O error is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`)
/// or a non-blocking descriptor with nothing to do.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests;
