//! Running one process for an exec stream: spawn, pump stdout and stderr
//! within the host's credit, feed stdin, enforce the timeout, report the
//! exit.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use guest_agent::protocol::{
    channel, ExecRequest, ExitStatus, Frame, FrameKind, Reply, TerminalSize, DATA_CHUNK,
};

use crate::reaper::Reaper;
use crate::stream::ExecStream;
use crate::sys;
use crate::terminal;

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

/// The command `req` asks for, as the agent runs it: the user's identity
/// and home, a clean environment with the request's over it, its own
/// process group (so timeouts and signals reach the whole tree). Returns
/// it with the working directory, for messages.
pub fn command(req: &ExecRequest) -> Result<(Command, String), String> {
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
    if req.pty.is_some() {
        // What the host's terminal emulators are; the request may say
        // otherwise.
        cmd.env("TERM", "xterm-256color");
    }
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
    // A terminal's process starts a session of its own instead
    // (terminal::Pair::attach), which makes it a group leader too.
    if req.pty.is_none() {
        cmd.process_group(0);
    }
    sys::unblock_signals_on_exec(&mut cmd);
    Ok((cmd, cwd))
}

/// A process that started: its pid and, on a terminal, the terminal's
/// end the agent keeps (for resizes).
pub struct Started {
    pub pid: i32,
    pub terminal: Option<Arc<File>>,
}

/// Spawns the process and the threads serving it, and sends the `Started`
/// reply (before any output). The End frame follows all output;
/// `on_exit` runs after it.
pub fn start(
    stream: Arc<ExecStream>,
    req: ExecRequest,
    on_exit: impl FnOnce() + Send + 'static,
) -> Result<Started, String> {
    if let Some(size) = req.pty {
        size.check()?;
        return start_on_terminal(stream, req, size, on_exit);
    }
    let (mut cmd, cwd) = command(&req)?;
    let program = &req.argv[0];
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
    stream.send(&Frame::json(
        FrameKind::Reply,
        stream.id,
        &Reply::Started { pid },
    ));

    if let Some(pipe) = child.stdin.take() {
        let s = stream.clone();
        spawn_thread("stdin", move || feed_stdin(pipe, &s));
    }
    let pumps = [
        child
            .stdout
            .take()
            .map(|p| pump(p, stream.clone(), channel::STDOUT)),
        child
            .stderr
            .take()
            .map(|p| pump(p, stream.clone(), channel::STDERR)),
    ];
    let timeout = req.timeout_ms.map(Duration::from_millis);
    spawn_thread("exec-wait", move || {
        let status = wait(pid, &exited, timeout);
        for p in pumps.into_iter().flatten() {
            let _ = p.join();
        }
        stream.send(&Frame::json(FrameKind::End, stream.id, &status));
        on_exit();
    });
    Ok(Started {
        pid,
        terminal: None,
    })
}

/// [`start`] for a process on a new terminal of `size`: one pump for
/// what the terminal renders, stdin written to the terminal as typed.
fn start_on_terminal(
    stream: Arc<ExecStream>,
    req: ExecRequest,
    size: TerminalSize,
    on_exit: impl FnOnce() + Send + 'static,
) -> Result<Started, String> {
    let (mut cmd, cwd) = command(&req)?;
    let program = &req.argv[0];
    let failed = |e: std::io::Error| format!("cannot open a terminal for {program:?}: {e}");
    let pair = terminal::open(size).map_err(failed)?;
    pair.attach(&mut cmd).map_err(failed)?;
    let keystrokes = pair.master.try_clone().map_err(failed)?;
    let resizer = Arc::new(pair.master.try_clone().map_err(failed)?);
    let wake = Arc::new(terminal::Wake::new().map_err(failed)?);
    let (child, exited) = Reaper::global().spawn(|| {
        cmd.spawn()
            .map(|c| (c.id() as i32, c))
            .map_err(|e| format!("cannot run {program:?} in {cwd:?}: {e}"))
    })?;
    // The slave's copies here must close, or the terminal never reports
    // that its last user went.
    drop(cmd);
    let terminal::Pair { master, slave } = pair;
    drop(slave);
    let pid = child.id() as i32;
    stream.send(&Frame::json(
        FrameKind::Reply,
        stream.id,
        &Reply::Started { pid },
    ));
    let s = stream.clone();
    spawn_thread("keystrokes", move || feed_stdin(keystrokes, &s));
    let on_abandon = wake.clone();
    stream.on_abandon(move || on_abandon.notify());
    let leader = wake.clone();
    let output = terminal::pump(master, stream.clone(), pid, wake);
    let timeout = req.timeout_ms.map(Duration::from_millis);
    spawn_thread("exec-wait", move || {
        let status = wait(pid, &exited, timeout);
        leader.leader_exited();
        let _ = output.join();
        stream.send(&Frame::json(FrameKind::End, stream.id, &status));
        // Over: this ends the keystroke writer, which closes the terminal.
        stream.abandon();
        on_exit();
    });
    Ok(Started {
        pid,
        terminal: Some(resizer),
    })
}

pub fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("cannot spawn a thread")
}

pub fn wait(pid: i32, exited: &Receiver<sys::WaitStatus>, timeout: Option<Duration>) -> ExitStatus {
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

/// Forwards one pipe to the host, never more than the host's credit: a
/// host that does not read stops this process's output, nothing else.
fn pump(
    mut pipe: impl Read + Send + 'static,
    stream: Arc<ExecStream>,
    channel: u8,
) -> std::thread::JoinHandle<()> {
    spawn_thread("pump", move || {
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            let reserved = stream.reserve(DATA_CHUNK);
            let want = reserved.unwrap_or(DATA_CHUNK);
            let read = loop {
                match pipe.read(&mut buf[..want]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    other => break other,
                }
            };
            // A read error ends the pump like end-of-file.
            let n: usize = read.unwrap_or_default();
            if let Some(reserved) = reserved {
                stream.unreserve(reserved - n);
                if n > 0 {
                    stream.send(&Frame::data(stream.id, channel, &buf[..n]));
                }
            }
            if n == 0 {
                break;
            }
        }
        stream.send(&Frame::eof(stream.id, channel));
    })
}

/// Feeds the host's stdin to a pipe or a terminal (whose Eof the
/// connection never passes on: a terminal has no end of input).
fn feed_stdin(mut pipe: impl Write, stream: &ExecStream) {
    while let Some(data) = stream.next_stdin() {
        if pipe.write_all(&data).is_err() {
            stream.stdin_taken(data.len());
            stream.stdin_gone();
            return;
        }
        stream.stdin_taken(data.len());
    }
    // Dropping the pipe closes the process's stdin.
}
