//! The JSON messages frames carry.

use serde::{Deserialize, Serialize};

use super::files::{FileInfo, GuestPath, WriteFile};
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
    /// What a path is, not following a final symlink: [`Reply::Stat`].
    Stat { path: GuestPath },
    /// A directory's entries in name order, after `after` if given, at
    /// most `limit` (and [`super::files::MAX_LIST_ENTRIES`]):
    /// [`Reply::Listing`].
    List {
        path: GuestPath,
        #[serde(default)]
        after: Option<GuestPath>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Make a directory (and its parents, with `parents`, where an
    /// existing directory is no error): [`Reply::Done`].
    Mkdir {
        path: GuestPath,
        #[serde(default)]
        parents: bool,
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Remove a file, a symlink or an empty directory (any directory with
    /// `recursive`): [`Reply::Done`].
    Remove {
        path: GuestPath,
        #[serde(default)]
        recursive: bool,
    },
    /// Rename within the guest, replacing a file at `to`: [`Reply::Done`].
    Rename { from: GuestPath, to: GuestPath },
    /// Read a file from `offset`, at most `limit` bytes: after
    /// [`Reply::Reading`] its bytes come as Data on channel 1 and the
    /// stream ends with a [`super::files::TransferEnd`].
    ReadFile {
        path: GuestPath,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        limit: Option<u64>,
    },
    /// Write a file: after [`Reply::Writing`] the host sends its bytes as
    /// Data on channel 0 and then Eof; the file appears whole at its path
    /// (written aside, then renamed), and the stream ends with a
    /// [`super::files::TransferEnd`].
    WriteFile(WriteFile),
    /// A directory tree as a tar stream (symlinks as symlinks; modes,
    /// owners and times kept): after [`Reply::Reading`] (size 0, not
    /// known ahead) the archive comes as Data on channel 1, then a
    /// [`super::files::TransferEnd`].
    ReadTree { path: GuestPath },
    /// Unpack a tar stream into a directory (made, with its parents, if
    /// missing): after [`Reply::Writing`] the host sends the archive as
    /// Data on channel 0, then Eof. Entries that would land outside the
    /// directory are refused. Unlike a file, a tree is not put in place
    /// at once: a transfer that fails leaves what was unpacked so far.
    WriteTree { path: GuestPath },
    /// Watch a directory (and, with `recursive`, every directory under
    /// it, including ones made later): after [`Reply::Watching`] each
    /// event comes as Data on channel 1, one JSON [`super::files::WatchEvent`] per
    /// frame, in the order they happened, until the host resets the
    /// stream; the stream ends with a [`super::files::TransferEnd`] if
    /// the directory goes.
    Watch {
        path: GuestPath,
        #[serde(default)]
        recursive: bool,
    },
    /// Start a process that belongs to the agent, not to this stream or
    /// connection: its stdin is `/dev/null`, its output is kept in a
    /// bounded log ([`DETACHED_LOG_BYTES`]) that any connection can read
    /// from an offset with [`Open::Attach`]. One reply:
    /// [`Reply::Spawned`]. `stdin` is ignored.
    Spawn(ExecRequest),
    /// Read a detached process's output from `offset` (bytes since it
    /// started, stdout and stderr together in the order written): after
    /// [`Reply::Attached`] the output comes as Data on channels 1 and 2;
    /// the stream ends with an [`AttachEnd`] once the process has exited
    /// and all its output is sent, or, without `follow`, once what there
    /// is now is sent.
    Attach {
        pid: i32,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        follow: bool,
    },
    /// The detached processes (running, and the latest that ended):
    /// [`Reply::Processes`].
    Processes,
    /// A signal for a detached process's group: [`Reply::Done`].
    SignalProcess { pid: i32, signal: i32 },
    /// Connect to a TCP port on the guest's loopback: after
    /// [`Reply::Connected`] the host's Data on channel 0 goes to the
    /// socket (its Eof shuts the socket's sending side), the socket's
    /// bytes come as Data on channel 1, and the stream ends with a
    /// [`super::files::TransferEnd`] (the bytes that reached the host)
    /// once the guest's side has closed. Needs no guest network device.
    Connect { port: u16 },
}

/// Most output bytes the agent keeps per detached process; older output
/// is dropped (an attach from before it is told where its data starts).
pub const DETACHED_LOG_BYTES: u64 = 4 << 20;

/// A detached process, as [`Reply::Processes`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: i32,
    pub argv: Vec<String>,
    /// How it ended; `None` while it runs.
    #[serde(default)]
    pub exit: Option<ExitStatus>,
    /// Output bytes it has written (the offset the next byte will have).
    pub output_bytes: u64,
    /// The first offset still kept.
    pub kept_from: u64,
    /// When it started, milliseconds since the Unix epoch (guest clock).
    #[serde(default)]
    pub started_at_ms: u64,
}

/// The last frame of an attach.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachEnd {
    /// Where to attach next to miss nothing.
    pub next_offset: u64,
    /// How the process ended; `None` if it still runs (an attach without
    /// `follow` that caught up).
    #[serde(default)]
    pub exit: Option<ExitStatus>,
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
    /// Run it on a terminal of this size: a new session whose controlling
    /// terminal is a PTY, its stdin, stdout and stderr all that terminal
    /// (so `stdin` is implied and all output comes on channel 1, as the
    /// terminal renders it). Job control works as on any terminal: the
    /// bytes the host sends are keystrokes (a 0x03 is Ctrl-C to the
    /// foreground job), [`Control::Resize`] changes the size. A terminal
    /// has no end of input: Eof on channel 0 is ignored (send 0x04, the
    /// terminal's end-of-file key, to a program that reads to the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<TerminalSize>,
}

/// A terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    pub cols: u16,
    pub rows: u16,
}

impl TerminalSize {
    /// Largest side the agent accepts: a terminal is drawn by someone.
    pub const MAX: u16 = 4096;

    /// Both sides within 1..=[`TerminalSize::MAX`].
    pub fn check(&self) -> Result<(), String> {
        let ok = |n: u16| (1..=Self::MAX).contains(&n);
        if ok(self.cols) && ok(self.rows) {
            Ok(())
        } else {
            Err(format!(
                "a terminal of {}x{} (columns x rows): each must be 1 to {}",
                self.cols,
                self.rows,
                Self::MAX
            ))
        }
    }
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
    /// A path does not exist.
    NotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    DirectoryNotEmpty,
    /// A name or path is longer than the guest's file system allows.
    NameTooLong,
    /// The guest's disk (or its quota) is full.
    NoSpace,
    /// No detached process has that pid.
    NoSuchProcess,
    /// Nothing in the guest listens on that port.
    ConnectionRefused,
    /// Anything else.
    #[serde(other)]
    Other,
}

/// The answer to an [`Open`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The process is running with this guest pid.
    Started {
        pid: i32,
    },
    /// The shutdown is under way; the VM will stop shortly.
    ShuttingDown,
    /// The identity was applied; `problems` lists any part that could not
    /// be (the rest was).
    Restored {
        #[serde(default)]
        problems: Vec<String>,
    },
    /// What a path is.
    Stat(FileInfo),
    /// Entries of a directory; `more` if the directory has entries after
    /// the last one here.
    Listing {
        entries: Vec<FileInfo>,
        more: bool,
    },
    /// The request was carried out.
    Done,
    /// The file is open; its bytes follow. `size` is its size when opened.
    Reading {
        size: u64,
    },
    /// The file is being written; send its bytes.
    Writing,
    /// The watch is set: events follow.
    Watching,
    /// The detached process runs with this guest pid.
    Spawned {
        pid: i32,
    },
    /// The attach is set. `from` is where its data starts: later than the
    /// offset asked for if older output was dropped.
    Attached {
        from: u64,
    },
    Processes {
        processes: Vec<ProcessInfo>,
    },
    /// The guest's port took the connection: bytes flow both ways.
    Connected,
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
    /// A terminal's new size (an exec on a PTY; ignored otherwise): its
    /// foreground job gets SIGWINCH.
    Resize(TerminalSize),
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
