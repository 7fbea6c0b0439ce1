//! Directory trees as tar streams: read one out of the guest, or unpack
//! one into it. Symlinks travel as symlinks, never followed; modes, owners
//! and times are kept; an entry whose path would land outside the target
//! directory is refused (the tar crate checks every parent it creates).

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

use guest_agent::protocol::files::GuestPath;
use guest_agent::protocol::{channel, ErrorCode, Reply};

use crate::files::{end, local, reply, Failure};
use crate::stream::{ExecStream, StdinReader, StreamWriter};

fn failed(dir: &std::path::Path, e: &std::io::Error) -> Failure {
    let mut failure = Failure::io(dir, e);
    if failure.code == ErrorCode::Other {
        // The tar crate's errors say which entry; keep its message whole.
        failure.message = format!("{}: {e}", dir.display());
    }
    failure
}

/// Serves a tree read: the reply, then the archive as it is made, within
/// the host's credit, then the end.
pub fn read_tree(stream: Arc<ExecStream>, path: &GuestPath) {
    let dir = match local(path).and_then(|dir| {
        let meta = fs::metadata(&dir).map_err(|e| Failure::io(&dir, &e))?;
        if meta.is_dir() {
            Ok(dir)
        } else {
            Err(Failure {
                code: ErrorCode::NotADirectory,
                message: format!("{}: not a directory", dir.display()),
            })
        }
    }) {
        Ok(dir) => dir,
        Err(f) => return reply(&stream, &f.reply()),
    };
    reply(&stream, &Reply::Reading { size: 0 });
    let mut writer = StreamWriter {
        stream: &stream,
        channel: channel::STDOUT,
        sent: 0,
    };
    let built = {
        let mut builder = tar::Builder::new(&mut writer);
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        builder
            .append_dir_all(".", &dir)
            .and_then(|()| builder.finish())
    };
    let sent = writer.sent;
    match built {
        Ok(()) => end(&stream, sent, None),
        // The host went away: nobody to tell.
        Err(_) if !stream.is_live() => {}
        Err(e) => end(&stream, sent, Some(failed(&dir, &e))),
    }
}

/// Serves a tree write: the reply, then the host's archive unpacked as it
/// arrives, then the end.
pub fn write_tree(stream: Arc<ExecStream>, path: &GuestPath) {
    let dir = match local(path).and_then(|dir| {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|e| Failure::io(&dir, &e))?;
        Ok(dir)
    }) {
        Ok(dir) => dir,
        Err(f) => return reply(&stream, &f.reply()),
    };
    reply(&stream, &Reply::Writing);
    let mut reader = StdinReader::new(&stream);
    let unpacked = {
        let mut archive = tar::Archive::new(&mut reader);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.set_overwrite(true);
        archive.unpack(&dir)
    };
    let result = unpacked.and_then(|()| {
        // The archive's end may come before the host's: take the rest
        // (padding) so its Eof arrives.
        std::io::copy(&mut reader, &mut std::io::sink()).map(drop)
    });
    let received = reader.received;
    drop(reader);
    match result {
        Ok(()) if !stream.is_live() => {}
        Ok(()) => end(&stream, received, None),
        Err(e) => {
            stream.stdin_gone();
            end(&stream, received, Some(failed(&dir, &e)));
        }
    }
}
