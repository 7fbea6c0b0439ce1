//! Running one process for an exec stream: spawn, pump stdout and stderr
//! as they are produced, feed stdin, enforce the timeout, report the exit.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_agent::protocol::{ExecRequest, ExitStatus, Frame, FrameKind, Reply, MAX_PAYLOAD};

use crate::reaper::Reaper;
use crate::sys;

pub type Writer = Arc<Mutex<File>>;

/// Sends a frame to the host; a failed write means the host went away,
/// which the connection's reader notices on its own.
pub fn send(writer: &Writer, frame: &Frame) {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    let _ = frame.write_to(&mut *w);
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A user the process should run as.
struct User {
    uid: u32,
    gid: u32,
    home: String,
    name: String,
}

/// Resolves `name`, `uid` or `uid:gid` against /etc/passwd. Parsed by hand:
/// the agent is static and glibc's NSS does not work from static binaries.
fn resolve_user(spec: &str) -> Result<User, String> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 6)
        .collect();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = entries
        .iter()
        .find(|f| f[0] == user_part || (user_part.parse::<u32>().is_ok() && f[2] == user_part));
    let (uid, mut gid, home, name) = match (entry, user_part.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse().map_err(|_| format!("bad uid for {}", f[0]))?,
            f[3].parse().map_err(|_| format!("bad gid for {}", f[0]))?,
            f[5].to_string(),
            f[0].to_string(),
        ),
        (None, Ok(uid)) => (uid, uid, "/".to_string(), uid.to_string()),
        (None, Err(_)) => return Err(format!("no such user: {user_part}")),
    };
    if let Some(g) = group_part {
        gid = g
            .parse()
            .map_err(|_| format!("group must be numeric: {g}"))?;
    }
    Ok(User {
        uid,
        gid,
        home,
        name,
    })
}

/// A started process: what the connection needs to feed and signal it.
pub struct Started {
    pub pid: i32,
    pub stdin: Option<SyncSender<Vec<u8>>>,
}

/// Spawns the process and the threads serving it, and sends the `Started`
/// reply. The exit frame is sent after all output; `on_exit` runs after it.
pub fn start(
    stream: u32,
    req: ExecRequest,
    writer: Writer,
    on_exit: impl FnOnce() + Send + 'static,
) -> Result<Started, String> {
    let Some(program) = req.argv.first() else {
        return Err("empty argv".into());
    };
    let user = req.user.as_deref().map(resolve_user).transpose()?;
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..]);
    cmd.env_clear();
    cmd.env("PATH", DEFAULT_PATH);
    let home = user
        .as_ref()
        .map_or("/root".to_string(), |u| u.home.clone());
    cmd.env("HOME", &home);
    cmd.env("USER", user.as_ref().map_or("root", |u| u.name.as_str()));
    for (k, v) in &req.env {
        cmd.env(k, v);
    }
    let cwd = req.cwd.clone().unwrap_or_else(|| {
        if std::path::Path::new(&home).is_dir() {
            home
        } else {
            "/".into()
        }
    });
    cmd.current_dir(&cwd);
    if let Some(u) = &user {
        cmd.uid(u.uid).gid(u.gid);
    }
    // Own process group, so timeout and signals reach the whole tree.
    cmd.process_group(0);
    sys::unblock_signals_on_exec(&mut cmd);
    cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());

    let (child, exited) = Reaper::global().spawn(|| {
        cmd.spawn()
            .map(|c| (c.id() as i32, c))
            .map_err(|e| format!("cannot run {program:?} in {cwd:?}: {e}"))
    })?;
    let pid = child.id() as i32;
    let mut child = child;
    // The reply must precede any output frame of this stream.
    send(
        &writer,
        &Frame::json(FrameKind::Reply, stream, &Reply::Started { pid }),
    );

    let stdin = child.stdin.take().map(|pipe| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(256);
        spawn_thread("stdin", move || feed_stdin(pipe, rx));
        tx
    });
    let pumps = [
        child
            .stdout
            .take()
            .map(|p| pump(p, stream, FrameKind::Stdout, writer.clone())),
        child
            .stderr
            .take()
            .map(|p| pump(p, stream, FrameKind::Stderr, writer.clone())),
    ];
    let timeout = req.timeout_ms.map(Duration::from_millis);
    spawn_thread("exec-wait", move || {
        let status = wait(pid, &exited, timeout);
        for p in pumps.into_iter().flatten() {
            let _ = p.join();
        }
        send(&writer, &Frame::json(FrameKind::Exit, stream, &status));
        on_exit();
    });
    Ok(Started { pid, stdin })
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("cannot spawn a thread")
}

fn wait(pid: i32, exited: &Receiver<sys::WaitStatus>, timeout: Option<Duration>) -> ExitStatus {
    let mut timed_out = false;
    let status = match timeout {
        None => exited.recv().ok(),
        Some(t) => match exited.recv_timeout(t) {
            Ok(s) => Some(s),
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = sys::kill(-pid, libc::SIGKILL);
                exited.recv().ok()
            }
            Err(RecvTimeoutError::Disconnected) => None,
        },
    };
    let status = status.unwrap_or(sys::WaitStatus {
        code: None,
        signal: None,
    });
    if timed_out {
        // The leader is gone; make sure nothing in its group outlives it
        // holding the output pipes open.
        let _ = sys::kill(-pid, libc::SIGKILL);
    }
    ExitStatus {
        code: status.code,
        signal: status.signal,
        timed_out,
    }
}

fn pump(
    mut pipe: impl Read + Send + 'static,
    stream: u32,
    kind: FrameKind,
    writer: Writer,
) -> std::thread::JoinHandle<()> {
    spawn_thread("pump", move || {
        let mut buf = vec![0u8; MAX_PAYLOAD.min(64 * 1024)];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => send(&writer, &Frame::new(kind, stream, buf[..n].to_vec())),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

fn feed_stdin(mut pipe: ChildStdin, rx: Receiver<Vec<u8>>) {
    while let Ok(data) = rx.recv() {
        if data.is_empty() || pipe.write_all(&data).is_err() {
            break;
        }
    }
    // Dropping the pipe closes the process's stdin.
}
