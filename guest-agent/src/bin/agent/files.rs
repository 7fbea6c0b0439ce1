//! File requests: stat, list, mkdir, remove, rename, and streamed reads
//! and writes. Paths are bytes, resolved in the guest as the agent (root)
//! sees them. A write goes to a temporary file beside its target, created
//! exclusively and never through a symlink, and is renamed over the target
//! only once every byte is on disk: a reader never sees half a file, and a
//! transfer that fails or is abandoned leaves the old file as it was.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use guest_agent::protocol::files::{
    FileInfo, FileKind, GuestPath, TransferEnd, TransferError, WriteFile, LIST_REPLY_BYTES,
    MAX_LIST_ENTRIES,
};
use guest_agent::protocol::{channel, ErrorCode, Frame, FrameKind, Reply, DATA_CHUNK};

use crate::stream::ExecStream;

/// Why a request failed, with the path in the message.
#[derive(Debug)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    fn bad(message: String) -> Self {
        Failure {
            code: ErrorCode::BadRequest,
            message,
        }
    }

    pub fn io(path: &Path, e: &io::Error) -> Self {
        Failure {
            code: code_of(e),
            message: format!("{}: {e}", path.display()),
        }
    }

    pub fn reply(self) -> Reply {
        Reply::Error {
            code: self.code,
            message: self.message,
        }
    }
}

fn code_of(e: &io::Error) -> ErrorCode {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorCode::NotFound,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorCode::PermissionDenied,
        Some(libc::EEXIST) => ErrorCode::AlreadyExists,
        Some(libc::ENOTDIR) => ErrorCode::NotADirectory,
        Some(libc::EISDIR) => ErrorCode::IsADirectory,
        Some(libc::ENOTEMPTY) => ErrorCode::DirectoryNotEmpty,
        Some(libc::ENAMETOOLONG) => ErrorCode::NameTooLong,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::NoSpace,
        _ => ErrorCode::Other,
    }
}

/// The checked host path as one the system calls take.
pub fn local(path: &GuestPath) -> Result<PathBuf, Failure> {
    path.check().map_err(Failure::bad)?;
    Ok(PathBuf::from(OsStr::from_bytes(path.as_bytes())))
}

fn info(path: &Path, name: &[u8]) -> Result<FileInfo, Failure> {
    let meta = fs::symlink_metadata(path).map_err(|e| Failure::io(path, &e))?;
    let kind = if meta.file_type().is_symlink() {
        FileKind::Symlink
    } else if meta.is_dir() {
        FileKind::Dir
    } else if meta.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let target = (kind == FileKind::Symlink)
        .then(|| fs::read_link(path).ok())
        .flatten()
        .map(|t| GuestPath(t.into_os_string().into_vec()));
    Ok(FileInfo {
        name: GuestPath(name.to_vec()),
        kind,
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        target,
    })
}

pub fn stat(path: &GuestPath) -> Result<Reply, Failure> {
    let local = local(path)?;
    let name = local
        .file_name()
        .map_or(path.as_bytes(), |n| n.as_bytes())
        .to_vec();
    info(&local, &name).map(Reply::Stat)
}

pub fn list(
    path: &GuestPath,
    after: Option<&GuestPath>,
    limit: Option<u32>,
) -> Result<Reply, Failure> {
    let dir = local(path)?;
    let limit = limit.unwrap_or(MAX_LIST_ENTRIES).clamp(1, MAX_LIST_ENTRIES) as usize;
    let mut names: Vec<Vec<u8>> = fs::read_dir(&dir)
        .map_err(|e| Failure::io(&dir, &e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().into_vec())
        .filter(|n| after.is_none_or(|a| n.as_slice() > a.as_bytes()))
        .collect();
    names.sort_unstable();
    let mut entries = Vec::new();
    let mut bytes = 0;
    let mut taken = 0;
    for name in &names {
        if entries.len() == limit || bytes >= LIST_REPLY_BYTES {
            break;
        }
        taken += 1;
        match info(&dir.join(OsStr::from_bytes(name)), name) {
            Ok(entry) => {
                bytes += serde_json::to_vec(&entry).map_or(0, |v| v.len()) + 1;
                entries.push(entry);
            }
            // Gone since the directory was read: not an entry any more.
            Err(f) if f.code == ErrorCode::NotFound => {}
            Err(f) => return Err(f),
        }
    }
    Ok(Reply::Listing {
        entries,
        more: taken < names.len(),
    })
}

pub fn mkdir(path: &GuestPath, parents: bool, mode: Option<u32>) -> Result<Reply, Failure> {
    let dir = local(path)?;
    fs::DirBuilder::new()
        .recursive(parents)
        .mode(mode.unwrap_or(0o755) & 0o7777)
        .create(&dir)
        .map_err(|e| Failure::io(&dir, &e))?;
    Ok(Reply::Done)
}

pub fn remove(path: &GuestPath, recursive: bool) -> Result<Reply, Failure> {
    let target = local(path)?;
    if target == Path::new("/") {
        return Err(Failure::bad("refusing to remove /".into()));
    }
    let meta = fs::symlink_metadata(&target).map_err(|e| Failure::io(&target, &e))?;
    let removed = match (meta.is_dir(), recursive) {
        // Never follows symlinks inside the tree.
        (true, true) => fs::remove_dir_all(&target),
        (true, false) => fs::remove_dir(&target),
        (false, _) => fs::remove_file(&target),
    };
    removed.map_err(|e| Failure::io(&target, &e))?;
    Ok(Reply::Done)
}

pub fn rename(from: &GuestPath, to: &GuestPath) -> Result<Reply, Failure> {
    let (from, to) = (local(from)?, local(to)?);
    fs::rename(&from, &to).map_err(|e| Failure {
        code: code_of(&e),
        message: format!("{} -> {}: {e}", from.display(), to.display()),
    })?;
    Ok(Reply::Done)
}

pub fn end(stream: &ExecStream, bytes: u64, error: Option<Failure>) {
    let end = TransferEnd {
        bytes,
        error: error.map(|f| TransferError {
            code: f.code,
            message: f.message,
        }),
    };
    stream.send(&Frame::json(FrameKind::End, stream.id, &end));
}

pub fn reply(stream: &ExecStream, reply: &Reply) {
    stream.send(&Frame::json(FrameKind::Reply, stream.id, reply));
}

/// Serves a read: the reply, then the file's bytes within the host's
/// credit, then the end.
pub fn read(stream: Arc<ExecStream>, path: &GuestPath, offset: u64, limit: Option<u64>) {
    let opened = (|| {
        let file_path = local(path)?;
        let mut file = File::open(&file_path).map_err(|e| Failure::io(&file_path, &e))?;
        let meta = file.metadata().map_err(|e| Failure::io(&file_path, &e))?;
        if meta.is_dir() {
            return Err(Failure {
                code: ErrorCode::IsADirectory,
                message: format!("{}: is a directory", file_path.display()),
            });
        }
        if offset > 0 {
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| Failure::io(&file_path, &e))?;
        }
        Ok((file, file_path, meta.len()))
    })();
    let (mut file, file_path, size) = match opened {
        Ok(opened) => opened,
        Err(f) => return reply(&stream, &f.reply()),
    };
    reply(&stream, &Reply::Reading { size });
    let mut left = limit.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    let mut buf = vec![0u8; DATA_CHUNK];
    while left > 0 {
        let Some(credit) = stream.reserve(DATA_CHUNK.min(left.try_into().unwrap_or(usize::MAX)))
        else {
            // The host went away: nobody to tell.
            return;
        };
        let read = loop {
            match file.read(&mut buf[..credit]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other,
            }
        };
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                stream.unreserve(credit);
                return end(&stream, sent, Some(Failure::io(&file_path, &e)));
            }
        };
        stream.unreserve(credit - n);
        if n == 0 {
            break;
        }
        stream.send(&Frame::data(stream.id, channel::STDOUT, &buf[..n]));
        sent += n as u64;
        left -= n as u64;
    }
    end(&stream, sent, None);
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where a file is written before it is renamed into place: beside it (so
/// the rename stays on one file system), under a name nobody predicts.
fn temp_path(target: &Path) -> Result<PathBuf, Failure> {
    let dir = target
        .parent()
        .ok_or_else(|| Failure::bad(format!("{} has no parent", target.display())))?;
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    Ok(dir.join(format!(
        ".capsule-write-{}-{n}-{nanos:08x}.tmp",
        std::process::id()
    )))
}

/// A write's temporary file, open, and what it will replace.
struct Opened {
    target: PathBuf,
    temp: PathBuf,
    file: File,
    /// The regular file at the target, if there is one.
    existing: Option<fs::Metadata>,
}

/// Opens the temporary file for a write: what the reply promises.
fn open_for_write(req: &WriteFile) -> Result<Opened, Failure> {
    let target = local(&req.path)?;
    if target.file_name().is_none() {
        return Err(Failure::bad(format!("{} names no file", target.display())));
    }
    if req.parents {
        if let Some(parent) = target.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(|e| Failure::io(parent, &e))?;
        }
    }
    let existing = match fs::symlink_metadata(&target) {
        Ok(meta) if meta.is_dir() => {
            return Err(Failure {
                code: ErrorCode::IsADirectory,
                message: format!("{}: is a directory", target.display()),
            })
        }
        Ok(meta) => meta.is_file().then_some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Failure::io(&target, &e)),
    };
    let temp = temp_path(&target)?;
    let parent = temp.parent().unwrap_or(Path::new("/")).to_path_buf();
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(&temp)
        // A missing or unwritable directory: name it, not the temporary.
        .map_err(|e| Failure::io(&parent, &e))?;
    Ok(Opened {
        target,
        temp,
        file,
        existing,
    })
}

/// Gives the written file its owner, mode and time, and puts it in place.
fn finish_write(
    req: &WriteFile,
    target: &Path,
    temp: &Path,
    file: &File,
    existing: Option<&fs::Metadata>,
) -> Result<(), Failure> {
    let at = |e: io::Error| Failure::io(target, &e);
    let uid = req.uid.or(existing.map(|m| m.uid())).unwrap_or(0);
    let gid = req.gid.or(existing.map(|m| m.gid())).unwrap_or(0);
    // Owner before mode: a change of owner clears setuid and setgid.
    std::os::unix::fs::fchown(file, Some(uid), Some(gid)).map_err(at)?;
    let mode = req.mode.or(existing.map(|m| m.mode())).unwrap_or(0o644) & 0o7777;
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(at)?;
    if let Some(ns) = req.mtime_ns {
        let t = if ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(ns as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
        };
        file.set_times(fs::FileTimes::new().set_modified(t))
            .map_err(at)?;
    }
    // On disk before it replaces the old file, so a crash leaves one or
    // the other, never an empty file.
    file.sync_data().map_err(at)?;
    fs::rename(temp, target).map_err(at)
}

/// Serves a write: the reply, then the host's bytes into a temporary file
/// as fast as the disk takes them (the host's credit is granted back only
/// as they are written), then the rename and the end.
pub fn write(stream: Arc<ExecStream>, req: &WriteFile) {
    let Opened {
        target,
        temp,
        mut file,
        existing,
    } = match open_for_write(req) {
        Ok(opened) => opened,
        Err(f) => return reply(&stream, &f.reply()),
    };
    reply(&stream, &Reply::Writing);
    let mut written = 0u64;
    let mut failure = None;
    while let Some(chunk) = stream.next_stdin() {
        let result = file.write_all(&chunk);
        stream.stdin_taken(chunk.len());
        if let Err(e) = result {
            failure = Some(Failure::io(&target, &e));
            // The rest is dropped as it comes; the host is told to stop.
            stream.stdin_gone();
            break;
        }
        written += chunk.len() as u64;
    }
    if failure.is_none() && !stream.is_live() {
        // The host went away before the end of the file: not written.
        let _ = fs::remove_file(&temp);
        return;
    }
    if failure.is_none() {
        failure = finish_write(req, &target, &temp, &file, existing.as_ref()).err();
    }
    if failure.is_some() {
        let _ = fs::remove_file(&temp);
    }
    end(&stream, written, failure);
}
