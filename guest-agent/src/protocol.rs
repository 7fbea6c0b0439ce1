//! The wire protocol between the host and the guest agent.
//!
//! One vsock connection carries many concurrent streams. Every frame is
//!
//! ```text
//! +----------------+--------+----------------+-----------------+
//! | len: u32 LE    | kind u8| stream: u32 LE | payload         |
//! +----------------+--------+----------------+-----------------+
//!   len = 1 + 4 + payload.len(), at most MAX_FRAME_LEN
//! ```
//!
//! Control payloads (requests, replies, exit statuses) are JSON so the
//! protocol can grow fields without breaking older peers; bulk data (stdin,
//! stdout, stderr) is raw bytes. Both sides treat the other as hostile: a
//! frame over the size limit, a truncated frame or an unknown kind is an
//! error, never a panic or an unbounded allocation.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change. Peers exchange it in [`Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// vsock port the agent listens on for host connections.
pub const AGENT_PORT: u32 = 1024;

/// vsock port on the host the agent connects to once, at boot, to say it
/// is ready to take commands.
pub const READY_PORT: u32 = 1025;

/// Largest payload in one frame. Bulk data is split into chunks of at most
/// this size; anything bigger on the wire is refused.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Largest value of the length prefix (kind + stream + payload).
pub const MAX_FRAME_LEN: usize = 5 + MAX_PAYLOAD;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// JSON [`Hello`]: first frame in each direction.
    Hello = 1,
    /// JSON [`Request`] opening a stream (host -> guest).
    Request = 2,
    /// JSON [`Reply`] to a request (guest -> host).
    Reply = 3,
    /// Raw bytes for a process's stdin; an empty payload closes stdin.
    Stdin = 16,
    /// Raw bytes a process wrote to stdout.
    Stdout = 17,
    /// Raw bytes a process wrote to stderr.
    Stderr = 18,
    /// JSON [`ExitStatus`]: the last frame of an exec stream.
    Exit = 19,
    /// JSON [`Signal`] to deliver to a running process (host -> guest).
    Signal = 20,
}

impl TryFrom<u8> for FrameKind {
    type Error = ProtocolError;
    fn try_from(value: u8) -> Result<Self, ProtocolError> {
        Ok(match value {
            1 => FrameKind::Hello,
            2 => FrameKind::Request,
            3 => FrameKind::Reply,
            16 => FrameKind::Stdin,
            17 => FrameKind::Stdout,
            18 => FrameKind::Stderr,
            19 => FrameKind::Exit,
            20 => FrameKind::Signal,
            other => return Err(ProtocolError::UnknownKind(other)),
        })
    }
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
    #[error("peer speaks protocol version {0}, this side speaks {PROTOCOL_VERSION}")]
    VersionMismatch(u32),
    #[error("unexpected {0:?} frame")]
    Unexpected(FrameKind),
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

    /// Decodes the JSON payload.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|source| ProtocolError::BadPayload {
            kind: self.kind,
            source,
        })
    }

    /// Encodes the frame into `out` (appending).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(ProtocolError::PayloadTooLarge(self.payload.len()));
        }
        let len = (5 + self.payload.len()) as u32;
        out.extend_from_slice(&len.to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// Writes the frame with a single `write_all`, so frames from several
    /// threads sharing a locked writer never interleave.
    pub fn write_to<W: Write>(&self, w: &mut W) -> Result<(), ProtocolError> {
        let mut buf = Vec::with_capacity(9 + self.payload.len());
        self.encode_into(&mut buf)?;
        w.write_all(&buf)?;
        Ok(())
    }

    /// Reads one frame. Returns `Ok(None)` on a clean end of stream at a
    /// frame boundary.
    pub fn read_from<R: Read>(r: &mut R) -> Result<Option<Frame>, ProtocolError> {
        let mut len_buf = [0u8; 4];
        match read_full(r, &mut len_buf)? {
            0 => return Ok(None),
            4 => {}
            _ => return Err(ProtocolError::Truncated),
        }
        let len = u32::from_le_bytes(len_buf) as usize;
        if !(5..=MAX_FRAME_LEN).contains(&len) {
            return Err(ProtocolError::BadLength(len));
        }
        let mut head = [0u8; 5];
        if read_full(r, &mut head)? != 5 {
            return Err(ProtocolError::Truncated);
        }
        let kind = FrameKind::try_from(head[0])?;
        let stream = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        let mut payload = vec![0u8; len - 5];
        if read_full(r, &mut payload)? != payload.len() {
            return Err(ProtocolError::Truncated);
        }
        Ok(Some(Frame {
            kind,
            stream,
            payload,
        }))
    }
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// First frame on every connection, both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// The sender's software version, for diagnostics.
    #[serde(default)]
    pub software: String,
}

impl Hello {
    pub fn ours() -> Self {
        Hello {
            protocol: PROTOCOL_VERSION,
            software: concat!("capsule-agent ", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }

    pub fn check(&self) -> Result<(), ProtocolError> {
        if self.protocol != PROTOCOL_VERSION {
            return Err(ProtocolError::VersionMismatch(self.protocol));
        }
        Ok(())
    }
}

/// A request that opens a new stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Run a process; the stream then carries stdin/stdout/stderr/exit.
    Exec(ExecRequest),
    /// Liveness check; answered with [`Reply::Pong`].
    Ping,
    /// Sync, stop every process and power the VM off (or reboot it, which
    /// the VMM also treats as the end of the VM).
    Shutdown { reboot: bool },
    /// The VM was just restored from a snapshot (possibly as one of many
    /// forks): take on this identity. Answered with [`Reply::Restored`].
    Restored(Identity),
}

/// What makes one restored VM distinct from every other restored from
/// the same snapshot, and true to the present.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// New hostname; kept if unset.
    #[serde(default)]
    pub hostname: Option<String>,
    /// New /etc/machine-id (32 lowercase hex digits); kept if unset.
    #[serde(default)]
    pub machine_id: Option<String>,
    /// Fresh randomness from the host, hex-encoded, mixed into the
    /// kernel's pool before its random number generator is reseeded:
    /// every fork would otherwise produce the same "random" bytes.
    #[serde(default)]
    pub entropy_hex: String,
    /// The host's wall clock (nanoseconds since the Unix epoch) when the
    /// notice was sent: the guest's clock stood still while it was saved.
    #[serde(default)]
    pub unix_time_ns: Option<u64>,
}

/// How to run a process in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment, applied over the agent's base environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the user's home (or `/`) if unset.
    #[serde(default)]
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid`; root if unset.
    #[serde(default)]
    pub user: Option<String>,
    /// Whether the host will send stdin frames. If false, stdin is
    /// `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl ExecRequest {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The process is running with this guest pid.
    Started {
        pid: i32,
    },
    Pong,
    /// The shutdown is under way; the VM will stop shortly.
    ShuttingDown,
    /// The identity was applied; `problems` lists any part that could not
    /// be (the rest was).
    Restored {
        #[serde(default)]
        problems: Vec<String>,
    },
    /// The request failed; nothing is running.
    Error {
        message: String,
    },
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if it exited normally.
    pub code: Option<i32>,
    /// Signal number, if it was killed by a signal.
    pub signal: Option<i32>,
    /// True if the agent killed it because the timeout expired.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    /// The shell convention: the exit code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => s.saturating_add(128),
            (None, None) => 255,
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A signal to deliver to an exec stream's process group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub signal: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn roundtrip(frame: &Frame) -> Frame {
        let mut buf = Vec::new();
        frame.write_to(&mut buf).unwrap();
        Frame::read_from(&mut Cursor::new(buf)).unwrap().unwrap()
    }

    #[test]
    fn frames_roundtrip() {
        let f = Frame::new(FrameKind::Stdout, 7, b"hello".to_vec());
        assert_eq!(roundtrip(&f), f);
        let req = Request::Exec(ExecRequest::new(["echo", "hi"]));
        let f = Frame::json(FrameKind::Request, 1, &req);
        assert_eq!(roundtrip(&f).parse::<Request>().unwrap(), req);
        let empty = Frame::new(FrameKind::Stdin, 0, Vec::new());
        assert_eq!(roundtrip(&empty), empty);
    }

    #[test]
    fn eof_at_boundary_is_clean() {
        assert!(Frame::read_from(&mut Cursor::new(Vec::new()))
            .unwrap()
            .is_none());
    }

    #[test]
    fn oversized_length_is_refused_without_allocating() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        buf.push(FrameKind::Stdout as u8);
        buf.extend_from_slice(&0u32.to_le_bytes());
        let err = Frame::read_from(&mut Cursor::new(buf)).unwrap_err();
        assert!(matches!(err, ProtocolError::BadLength(n) if n == u32::MAX as usize));

        let mut buf = Vec::new();
        buf.extend_from_slice(&((MAX_FRAME_LEN + 1) as u32).to_le_bytes());
        let err = Frame::read_from(&mut Cursor::new(buf)).unwrap_err();
        assert!(matches!(err, ProtocolError::BadLength(_)));
    }

    #[test]
    fn undersized_length_is_refused() {
        for len in 0..5u32 {
            let mut buf = len.to_le_bytes().to_vec();
            buf.extend_from_slice(&[0; 16]);
            let err = Frame::read_from(&mut Cursor::new(buf)).unwrap_err();
            assert!(matches!(err, ProtocolError::BadLength(_)), "len {len}");
        }
    }

    #[test]
    fn oversized_payload_is_not_encoded() {
        let f = Frame::new(FrameKind::Stdout, 1, vec![0; MAX_PAYLOAD + 1]);
        let mut buf = Vec::new();
        assert!(matches!(
            f.write_to(&mut buf),
            Err(ProtocolError::PayloadTooLarge(_))
        ));
        assert!(buf.is_empty(), "nothing written for a refused frame");
        let max = Frame::new(FrameKind::Stdout, 1, vec![7; MAX_PAYLOAD]);
        assert_eq!(roundtrip(&max), max);
    }

    #[test]
    fn truncated_frames_are_refused_at_every_cut() {
        let mut buf = Vec::new();
        Frame::new(FrameKind::Stderr, 3, b"0123456789".to_vec())
            .write_to(&mut buf)
            .unwrap();
        for cut in 1..buf.len() {
            let err = Frame::read_from(&mut Cursor::new(&buf[..cut])).unwrap_err();
            assert!(matches!(err, ProtocolError::Truncated), "cut at {cut}");
        }
    }

    #[test]
    fn unknown_kind_is_refused() {
        let mut buf = 5u32.to_le_bytes().to_vec();
        buf.push(99);
        buf.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Frame::read_from(&mut Cursor::new(buf)),
            Err(ProtocolError::UnknownKind(99))
        ));
    }

    #[test]
    fn malformed_json_is_an_error() {
        let f = Frame::new(FrameKind::Request, 1, b"{not json".to_vec());
        assert!(matches!(
            f.parse::<Request>(),
            Err(ProtocolError::BadPayload { .. })
        ));
        let f = Frame::new(FrameKind::Request, 1, br#"{"op":"format_disk"}"#.to_vec());
        assert!(f.parse::<Request>().is_err());
    }

    #[test]
    fn version_mismatch_is_reported() {
        let hello = Hello {
            protocol: PROTOCOL_VERSION + 1,
            software: "future".into(),
        };
        assert!(matches!(
            hello.check(),
            Err(ProtocolError::VersionMismatch(_))
        ));
        Hello::ours().check().unwrap();
    }

    #[test]
    fn shell_code_convention() {
        let st = |code, signal| ExitStatus {
            code,
            signal,
            timed_out: false,
        };
        assert_eq!(st(Some(3), None).shell_code(), 3);
        assert_eq!(st(None, Some(9)).shell_code(), 137);
    }
}
