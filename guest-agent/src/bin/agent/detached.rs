//! Detached processes: they belong to the agent, not to a stream or a
//! connection, so they outlive the client that started them (and a
//! suspend, a resume, a fork). Their stdout and stderr go into one log per
//! process, in the order written, bounded at [`DETACHED_LOG_BYTES`]: the
//! oldest output is dropped, never the process held up, and a reader that
//! attaches from an offset gets everything from there that is still kept.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use guest_agent::protocol::{
    channel, AttachEnd, ErrorCode, ExecRequest, ExitStatus, Frame, FrameKind, ProcessInfo, Reply,
    DATA_CHUNK, DETACHED_LOG_BYTES,
};

use crate::exec::{command, spawn_thread, wait};
use crate::files::Failure;
use crate::reaper::Reaper;
use crate::stream::ExecStream;
use crate::sys;

/// Detached processes kept, running or ended; past it the oldest ended
/// one is forgotten, and a spawn with all of them running is refused.
const MAX_PROCESSES: usize = 256;
/// How often an attach that waits for output checks its host is there.
const POLL: Duration = Duration::from_millis(100);

struct Log {
    /// (offset of its first byte, channel, bytes), oldest first.
    records: VecDeque<(u64, u8, Vec<u8>)>,
    /// Offset of the first byte kept.
    start: u64,
    /// Offset the next byte will get.
    end: u64,
    exit: Option<ExitStatus>,
}

impl Log {
    fn append(&mut self, channel: u8, bytes: &[u8]) {
        self.records.push_back((self.end, channel, bytes.to_vec()));
        self.end += bytes.len() as u64;
        while self.end - self.start > DETACHED_LOG_BYTES {
            let Some((_, _, dropped)) = self.records.pop_front() else {
                break;
            };
            self.start += dropped.len() as u64;
        }
    }

    /// Up to `max` bytes from `offset` (or the oldest kept, if later), all
    /// on one channel: (where they start, channel, bytes).
    fn read(&self, offset: u64, max: usize) -> Option<(u64, u8, Vec<u8>)> {
        let from = offset.max(self.start);
        let (at, channel, bytes) = self
            .records
            .iter()
            .find(|(at, _, bytes)| at + bytes.len() as u64 > from)?;
        let skip = (from - at) as usize;
        let take = (bytes.len() - skip).min(max);
        Some((from, *channel, bytes[skip..skip + take].to_vec()))
    }
}

struct Process {
    pid: i32,
    argv: Vec<String>,
    started_at_ms: u64,
    log: Mutex<Log>,
    changed: Condvar,
}

impl Process {
    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn info(&self) -> ProcessInfo {
        let log = self.log();
        ProcessInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            exit: log.exit,
            output_bytes: log.end,
            kept_from: log.start,
            started_at_ms: self.started_at_ms,
        }
    }
}

fn table() -> MutexGuard<'static, BTreeMap<i32, Arc<Process>>> {
    static TABLE: OnceLock<Mutex<BTreeMap<i32, Arc<Process>>>> = OnceLock::new();
    TABLE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn no_such(pid: i32) -> Failure {
    Failure {
        code: ErrorCode::NoSuchProcess,
        message: format!("no detached process {pid}"),
    }
}

/// Makes room for one more: forgets the oldest ended process if the table
/// is full; refuses if every one still runs.
fn make_room() -> Result<(), Failure> {
    let mut table = table();
    if table.len() < MAX_PROCESSES {
        return Ok(());
    }
    let oldest_ended = table
        .values()
        .filter(|p| p.log().exit.is_some())
        .min_by_key(|p| p.started_at_ms)
        .map(|p| p.pid);
    match oldest_ended {
        Some(pid) => {
            table.remove(&pid);
            Ok(())
        }
        None => Err(Failure {
            code: ErrorCode::TooManyStreams,
            message: format!("{MAX_PROCESSES} detached processes are already running"),
        }),
    }
}

pub fn spawn(req: &ExecRequest) -> Result<Reply, Failure> {
    make_room()?;
    let failed = |message| Failure {
        code: ErrorCode::SpawnFailed,
        message,
    };
    if req.pty.is_some() {
        return Err(Failure {
            code: ErrorCode::BadRequest,
            message: "a detached process has no terminal (its output is a log)".into(),
        });
    }
    let (mut cmd, cwd) = command(req).map_err(failed)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = &req.argv[0];
    let (mut child, exited) = Reaper::global()
        .spawn(|| {
            cmd.spawn()
                .map(|c| (c.id() as i32, c))
                .map_err(|e| format!("cannot run {program:?} in {cwd:?}: {e}"))
        })
        .map_err(failed)?;
    let pid = child.id() as i32;
    let process = Arc::new(Process {
        pid,
        argv: req.argv.clone(),
        started_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        log: Mutex::new(Log {
            records: VecDeque::new(),
            start: 0,
            end: 0,
            exit: None,
        }),
        changed: Condvar::new(),
    });
    table().insert(pid, process.clone());
    let pumps = [
        child
            .stdout
            .take()
            .map(|p| pump(p, process.clone(), channel::STDOUT)),
        child
            .stderr
            .take()
            .map(|p| pump(p, process.clone(), channel::STDERR)),
    ];
    let timeout = req.timeout_ms.map(Duration::from_millis);
    spawn_thread("detached-wait", move || {
        let status = wait(pid, &exited, timeout);
        for p in pumps.into_iter().flatten() {
            let _ = p.join();
        }
        process.log().exit = Some(status);
        process.changed.notify_all();
    });
    Ok(Reply::Spawned { pid })
}

/// Copies one pipe into the log as fast as the process writes: nothing
/// here waits for a reader.
fn pump(
    mut pipe: impl Read + Send + 'static,
    process: Arc<Process>,
    channel: u8,
) -> std::thread::JoinHandle<()> {
    spawn_thread("detached-pump", move || {
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    process.log().append(channel, &buf[..n]);
                    process.changed.notify_all();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

pub fn list() -> Result<Reply, Failure> {
    let processes = table().values().map(|p| p.info()).collect();
    Ok(Reply::Processes { processes })
}

pub fn signal(pid: i32, signal: i32) -> Result<Reply, Failure> {
    let process = table().get(&pid).cloned().ok_or_else(|| no_such(pid))?;
    if process.log().exit.is_none() {
        sys::kill(-pid, signal).map_err(|e| Failure {
            code: ErrorCode::Other,
            message: format!("signalling process {pid}: {e}"),
        })?;
    }
    Ok(Reply::Done)
}

/// Serves an attach: the reply, the log from `offset` within the host's
/// credit, then the end (at the process's exit, or at once without
/// `follow` when caught up).
pub fn attach(stream: Arc<ExecStream>, pid: i32, offset: u64, follow: bool) {
    let Some(process) = table().get(&pid).cloned() else {
        let reply = no_such(pid).reply();
        stream.send(&Frame::json(FrameKind::Reply, stream.id, &reply));
        return;
    };
    let mut at = offset.max(process.log().start);
    stream.send(&Frame::json(
        FrameKind::Reply,
        stream.id,
        &Reply::Attached { from: at },
    ));
    loop {
        let next = {
            let mut log = process.log();
            loop {
                if let Some(chunk) = log.read(at, DATA_CHUNK) {
                    break Some(chunk);
                }
                if log.exit.is_some() || !follow {
                    break None;
                }
                if !stream.is_live() {
                    return;
                }
                log = process
                    .changed
                    .wait_timeout(log, POLL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        let Some((from, channel, bytes)) = next else {
            let end = AttachEnd {
                next_offset: at,
                exit: process.log().exit,
            };
            stream.send(&Frame::json(FrameKind::End, stream.id, &end));
            return;
        };
        let Some(credit) = stream.reserve(bytes.len()) else {
            return;
        };
        stream.send(&Frame::data(stream.id, channel, &bytes[..credit]));
        at = from + credit as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_newest_bytes_and_reads_from_any_offset() {
        let mut log = Log {
            records: VecDeque::new(),
            start: 0,
            end: 0,
            exit: None,
        };
        log.append(channel::STDOUT, b"hello ");
        log.append(channel::STDERR, b"world");
        assert_eq!(
            log.read(0, 100),
            Some((0, channel::STDOUT, b"hello ".to_vec()))
        );
        assert_eq!(log.read(3, 2), Some((3, channel::STDOUT, b"lo".to_vec())));
        assert_eq!(
            log.read(6, 100),
            Some((6, channel::STDERR, b"world".to_vec()))
        );
        assert_eq!(log.read(11, 100), None);
        let big = vec![b'x'; DATA_CHUNK];
        for _ in 0..(DETACHED_LOG_BYTES as usize / DATA_CHUNK + 2) {
            log.append(channel::STDOUT, &big);
        }
        assert!(log.end - log.start <= DETACHED_LOG_BYTES);
        assert!(log.start > 11);
        // An offset from before what is kept reads from the oldest kept.
        let (from, _, _) = log.read(0, 10).unwrap();
        assert_eq!(from, log.start);
    }
}
