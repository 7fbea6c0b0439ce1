//! File requests: paths, what a file is, and how a transfer ends.
//!
//! Guest paths are bytes (Linux names need not be UTF-8). On the wire a
//! path is a JSON string when it is valid UTF-8, else `{"b64": "..."}`,
//! so the common case stays readable and no name is unrepresentable.

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ErrorCode;

/// Longest path the protocol carries, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;

/// Most entries one listing reply carries.
pub const MAX_LIST_ENTRIES: u32 = 4096;

/// Most JSON bytes of entries one listing reply carries, well inside one
/// frame whatever the names and symlink targets; a longer directory is
/// read in pages (`after`).
pub const LIST_REPLY_BYTES: usize = 192 * 1024;

/// A path in the guest, as bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestPath(pub Vec<u8>);

impl GuestPath {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path as text, with anything that is not UTF-8 replaced: for
    /// messages only.
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// Checks what the agent requires of a path it is given: absolute,
    /// no NUL, at most [`MAX_PATH`] bytes.
    pub fn check(&self) -> Result<(), String> {
        if self.0.len() > MAX_PATH {
            return Err(format!(
                "a path may be at most {MAX_PATH} bytes, this one is {}",
                self.0.len()
            ));
        }
        if self.0.contains(&0) {
            return Err(format!("path {:?} contains NUL", self.display()));
        }
        if self.0.first() != Some(&b'/') {
            return Err(format!("path {:?} is not absolute", self.display()));
        }
        Ok(())
    }
}

impl std::fmt::Debug for GuestPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

impl From<&str> for GuestPath {
    fn from(s: &str) -> Self {
        GuestPath(s.as_bytes().to_vec())
    }
}

impl From<Vec<u8>> for GuestPath {
    fn from(b: Vec<u8>) -> Self {
        GuestPath(b)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PathRepr {
    Text(String),
    Bytes { b64: String },
}

impl Serialize for GuestPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => PathRepr::Text(text.to_string()),
            Err(_) => PathRepr::Bytes {
                b64: base64::engine::general_purpose::STANDARD.encode(&self.0),
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for GuestPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match PathRepr::deserialize(d)? {
            PathRepr::Text(t) => Ok(GuestPath(t.into_bytes())),
            PathRepr::Bytes { b64 } => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(GuestPath)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// What kind of thing a path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// What `stat` says about a path (not following a final symlink).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The final component (the whole path for `/`).
    pub name: GuestPath,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits, with setuid, setgid and sticky (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Last modification, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Where a symlink points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<GuestPath>,
}

/// How to write a file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    pub path: GuestPath,
    /// Permission bits; an existing file's are kept if unset, a new file
    /// gets `0o644`.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Owner; an existing file's is kept if unset, a new file is root's.
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// Modification time to set once written (nanoseconds since the Unix
    /// epoch); now if unset.
    #[serde(default)]
    pub mtime_ns: Option<i64>,
    /// Create missing parent directories (`0o755`, root's).
    #[serde(default)]
    pub parents: bool,
}

/// The last frame of a file transfer: how many bytes moved and, if it
/// failed part way, why (a write that fails leaves the old file as it was).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferEnd {
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TransferError>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferError {
    pub code: ErrorCode,
    pub message: String,
}

/// What happened to a path under a watched directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchKind {
    Create,
    /// Written to (consecutive writes to one file come as one).
    Write,
    Remove,
    /// Moved away (a `rename_to` with the new name follows if it stays
    /// under the watch).
    RenameFrom,
    RenameTo,
    /// Its mode, owner or times changed.
    Chmod,
    /// Events were lost: the guest's queue overflowed while the host was
    /// not reading.
    Overflow,
}

/// One event of a watch: a Data frame on channel 1 carries one, as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: WatchKind,
    /// The full path (the watched directory for `overflow`).
    pub path: GuestPath,
    /// The path is a directory.
    #[serde(default)]
    pub dir: bool,
}
