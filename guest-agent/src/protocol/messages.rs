//! The JSON messages frames carry.

use serde::{Deserialize, Serialize};

use super::{ProtocolError, MAX_WINDOW, MIN_WINDOW, PROTOCOL_VERSION};

/// First frame on every connection, both directions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// The sender's software version, for diagnostics.
    #[serde(default)]
    pub software: String,
    /// Data bytes per stream the sender buffers for the peer: the peer's
    /// initial send credit on every stream.
    #[serde(default)]
    pub window: u32,
    /// Streams the sender serves at once on this connection (0: no
    /// limit of its own).
    #[serde(default)]
    pub max_streams: u32,
}

impl Hello {
    pub fn new(software: &str, window: u32, max_streams: u32) -> Self {
        Hello {
            protocol: PROTOCOL_VERSION,
            software: software.to_string(),
            window,
            max_streams,
        }
    }

    /// Checks the version and the window the peer offers. A peer on
    /// another version is refused with a message saying so (its hello is
    /// read for exactly that).
    pub fn check(&self) -> Result<(), ProtocolError> {
        if self.protocol != PROTOCOL_VERSION {
            return Err(ProtocolError::VersionMismatch {
                peer: self.protocol,
            });
        }
        Ok(())
    }

    /// The peer's window, within what this side accepts.
    pub fn usable_window(&self) -> u32 {
        self.window.clamp(MIN_WINDOW, MAX_WINDOW)
    }
}

/// A request that opens a new stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Open {
    /// Run a process; after [`Reply::Started`] the stream carries stdin
    /// (channel 0), stdout (1), stderr (2) and ends with an [`ExitStatus`].
    Exec(ExecRequest),
    /// Sync, stop every process and power the VM off (or reboot it, which
    /// the VMM also treats as the end of the VM). One reply, then the
    /// connection goes.
    Shutdown { reboot: bool },
    /// The VM was just restored from a snapshot (possibly as one of many
    /// forks): take on this identity. One reply: [`Reply::Restored`].
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
    /// Whether the host will send stdin. If false, stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process group after this many milliseconds. The host
    /// gives up on the stream a grace period after that, whatever the
    /// guest does.
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

/// Why a request failed, for programs to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is malformed or names nothing usable.
    BadRequest,
    /// The program could not be started (not found, not executable, a
    /// missing working directory or user).
    SpawnFailed,
    /// The connection already serves as many streams as it can.
    TooManyStreams,
    /// The stream id is already open.
    StreamInUse,
    /// Anything else.
    #[serde(other)]
    Other,
}

/// The answer to an [`Open`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The process is running with this guest pid.
    Started { pid: i32 },
    /// The shutdown is under way; the VM will stop shortly.
    ShuttingDown,
    /// The identity was applied; `problems` lists any part that could not
    /// be (the rest was).
    Restored {
        #[serde(default)]
        problems: Vec<String>,
    },
    /// The request failed; nothing is running and the stream is closed.
    Error {
        #[serde(default = "other_code")]
        code: ErrorCode,
        message: String,
    },
}

fn other_code() -> ErrorCode {
    ErrorCode::Other
}

/// Something to do to a running stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// Deliver a signal to the exec's process group.
    Signal { signal: i32 },
}

/// Why a stream was aborted. From the host, resetting an exec stream
/// detaches from it: the process runs on, its output read and dropped,
/// its stdin closed (what a lost connection does too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    #[serde(default)]
    pub message: String,
}

/// How a process ended: the End of an exec stream.
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
