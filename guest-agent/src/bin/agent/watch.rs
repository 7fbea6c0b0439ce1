//! Watching a directory with inotify: events in the order they happened,
//! one JSON object per Data frame, within the host's credit. A host that
//! does not read leaves events in the kernel's queue, which is bounded
//! (`max_queued_events`); past it the kernel drops them and the host gets
//! an `overflow` event, so the agent's memory never grows with them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use guest_agent::protocol::files::{GuestPath, WatchEvent, WatchKind};
use guest_agent::protocol::{channel, ErrorCode, Frame, Reply};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::files::{end, local, reply, Failure};
use crate::stream::ExecStream;

/// How often a quiet watch checks that the host still wants it.
const POLL: Duration = Duration::from_millis(20);

fn mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::MODIFY
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
        | WatchMask::DONT_FOLLOW
}

struct Watch {
    inotify: Inotify,
    root: PathBuf,
    recursive: bool,
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

impl Watch {
    fn add(&mut self, dir: &Path) -> std::io::Result<()> {
        let wd = self.inotify.watches().add(dir, mask())?;
        self.dirs.insert(wd, dir.to_path_buf());
        if self.recursive {
            for entry in std::fs::read_dir(dir)?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    // A directory gone meanwhile is no error.
                    let _ = self.add(&entry.path());
                }
            }
        }
        Ok(())
    }
}

fn event(kind: WatchKind, path: &Path, dir: bool) -> WatchEvent {
    WatchEvent {
        kind,
        path: GuestPath(path.as_os_str().to_owned().into_vec()),
        dir,
    }
}

/// Sends one event whole; false once the host is gone.
fn send(stream: &ExecStream, event: &WatchEvent) -> bool {
    let json = serde_json::to_vec(event).unwrap_or_default();
    if !stream.reserve_exact(json.len() + 1) {
        return false;
    }
    stream.send(&Frame::data(stream.id, channel::STDOUT, &json));
    // The channel byte counted too; give it back.
    stream.unreserve(1);
    true
}

pub fn watch(stream: Arc<ExecStream>, path: &GuestPath, recursive: bool) {
    let set = local(path).and_then(|root| {
        let inotify = Inotify::init().map_err(|e| Failure::io(&root, &e))?;
        let mut watch = Watch {
            inotify,
            root: root.clone(),
            recursive,
            dirs: HashMap::new(),
        };
        watch.add(&root).map_err(|e| Failure::io(&root, &e))?;
        Ok(watch)
    });
    let mut watch = match set {
        Ok(w) => w,
        Err(f) => return reply(&stream, &f.reply()),
    };
    reply(&stream, &Reply::Watching);
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    loop {
        if !stream.is_live() {
            return;
        }
        let events: Vec<_> = match watch.inotify.read_events(&mut buf) {
            Ok(events) => events
                .map(|e| (e.wd, e.mask, e.name.map(|n| n.to_owned())))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => return end(&stream, sent, Some(Failure::io(&watch.root, &e))),
        };
        let mut last_write: Option<PathBuf> = None;
        for (wd, mask, name) in events {
            if mask.contains(EventMask::Q_OVERFLOW) {
                last_write = None;
                if !send(&stream, &event(WatchKind::Overflow, &watch.root, true)) {
                    return;
                }
                sent += 1;
                continue;
            }
            let Some(dir) = watch.dirs.get(&wd).cloned() else {
                continue;
            };
            if mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED) {
                watch.dirs.remove(&wd);
                if dir == watch.root {
                    let gone = Failure {
                        code: ErrorCode::NotFound,
                        message: format!("{}: the watched directory is gone", dir.display()),
                    };
                    return end(&stream, sent, Some(gone));
                }
                continue;
            }
            let Some(name) = name else { continue };
            let path = dir.join(OsStr::from_bytes(name.as_bytes()));
            let is_dir = mask.contains(EventMask::ISDIR);
            let kind = if mask.contains(EventMask::CREATE) {
                WatchKind::Create
            } else if mask.contains(EventMask::MODIFY) {
                WatchKind::Write
            } else if mask.contains(EventMask::DELETE) {
                WatchKind::Remove
            } else if mask.contains(EventMask::MOVED_FROM) {
                WatchKind::RenameFrom
            } else if mask.contains(EventMask::MOVED_TO) {
                WatchKind::RenameTo
            } else if mask.contains(EventMask::ATTRIB) {
                WatchKind::Chmod
            } else {
                continue;
            };
            if kind == WatchKind::Write {
                // A burst of writes to one file is one event.
                if last_write.as_ref() == Some(&path) {
                    continue;
                }
                last_write = Some(path.clone());
            } else {
                last_write = None;
            }
            if recursive && is_dir && matches!(kind, WatchKind::Create | WatchKind::RenameTo) {
                // Watched from now on; what it already holds shows as it
                // changes.
                let _ = watch.add(&path);
            }
            if !send(&stream, &event(kind, &path, is_dir)) {
                return;
            }
            sent += 1;
        }
    }
}
