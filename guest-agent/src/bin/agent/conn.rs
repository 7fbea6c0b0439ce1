//! One host connection: hello exchange, then a loop routing frames to the
//! streams they belong to. The loop never waits on a stream: stdin goes
//! into the stream's bounded buffer, credit and signals take effect at
//! once, so a stuck process never stops the connection.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};

use guest_agent::protocol::{
    channel, Control, ErrorCode, Frame, FrameKind, FrameReader, Hello, Open, Poll, ProtocolError,
    Reply, AGENT_MAX_STREAMS, AGENT_WINDOW,
};

use crate::stream::{send, ExecStream, Writer};
use crate::sys;
use crate::{detached, exec, files, ports, tree, watch};

/// An exec stream and its process.
struct Running {
    stream: Arc<ExecStream>,
    pid: i32,
    /// The agent's end of an exec's terminal, for resizes.
    terminal: Option<Arc<File>>,
}

type Streams = Arc<Mutex<HashMap<u32, Running>>>;

fn lock(m: &Mutex<HashMap<u32, Running>>) -> MutexGuard<'_, HashMap<u32, Running>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn serve(conn: File) {
    match serve_inner(conn) {
        Ok(()) => {}
        // The host reset it: every connection is reset after a restore,
        // and a host process that exits drops its own. Not worth a line on
        // the console, which the host reads for the guest's troubles.
        Err(ProtocolError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::NotConnected
                    | std::io::ErrorKind::BrokenPipe
            ) => {}
        Err(e) => eprintln!("capsule-agent: connection closed: {e}"),
    }
}

pub fn hello() -> Hello {
    Hello::new(
        concat!("capsule-agent ", env!("CARGO_PKG_VERSION")),
        AGENT_WINDOW,
        AGENT_MAX_STREAMS,
    )
}

fn read(reader: &mut FrameReader<File>) -> Result<Option<Frame>, ProtocolError> {
    loop {
        match reader.poll()? {
            Poll::Frame(f) => return Ok(Some(f)),
            Poll::Closed => return Ok(None),
            // No read timeout is set: only a signal gets here.
            Poll::Pending => {}
        }
    }
}

fn serve_inner(conn: File) -> Result<(), ProtocolError> {
    let writer: Writer = Arc::new(Mutex::new(conn.try_clone()?));
    let mut reader = FrameReader::new(conn);
    let host = match read(&mut reader)? {
        Some(f) if f.kind == FrameKind::Hello => f.parse::<Hello>()?,
        Some(f) => return Err(ProtocolError::Unexpected(f.kind)),
        None => return Ok(()),
    };
    // Ours goes out even to a host of another version, which can then
    // say which versions differ.
    send(&writer, &Frame::json(FrameKind::Hello, 0, &hello()));
    host.check()?;
    let host_window = host.usable_window();

    let streams: Streams = Arc::default();
    let result = route(&mut reader, &writer, &streams, host_window);
    // The host is gone: its streams' output goes nowhere, their processes
    // carry on (a restored VM's are from before the snapshot).
    for (_, running) in lock(&streams).drain() {
        running.stream.abandon();
    }
    result
}

fn route(
    reader: &mut FrameReader<File>,
    writer: &Writer,
    streams: &Streams,
    host_window: u32,
) -> Result<(), ProtocolError> {
    while let Some(frame) = read(reader)? {
        let id = frame.stream;
        let stream = || lock(streams).get(&id).map(|r| (r.stream.clone(), r.pid));
        let terminal = || lock(streams).get(&id).and_then(|r| r.terminal.clone());
        match frame.kind {
            FrameKind::Open => open(&frame, writer, streams, host_window),
            FrameKind::Data => {
                if frame.channel()? != channel::STDIN {
                    return Err(ProtocolError::Unexpected(FrameKind::Data));
                }
                // Data for a stream that just ended is nobody's.
                if let Some((s, _)) = stream() {
                    s.push_stdin(frame.into_data_bytes())
                        .map_err(|m| ProtocolError::Io(std::io::Error::other(m)))?;
                }
            }
            FrameKind::Eof => {
                // A terminal has no end of input.
                if frame.channel()? == channel::STDIN && terminal().is_none() {
                    if let Some((s, _)) = stream() {
                        s.close_stdin();
                    }
                }
            }
            FrameKind::Window => {
                let grant = frame.window_bytes()?;
                if let Some((s, _)) = stream() {
                    s.add_credit(grant);
                }
            }
            FrameKind::Control => match frame.parse()? {
                Control::Signal { signal } => {
                    if let Some((_, pid)) = stream().filter(|(_, pid)| *pid > 0) {
                        let _ = sys::kill(-pid, signal);
                    }
                }
                // A size out of bounds is ignored like a resize of a
                // stream without a terminal.
                Control::Resize(size) => {
                    if let Some(t) = terminal().filter(|_| size.check().is_ok()) {
                        let _ = crate::terminal::resize(&t, size);
                    }
                }
            },
            // The host detached: the process runs on, unheard.
            FrameKind::Reset => {
                if let Some(running) = lock(streams).remove(&id) {
                    running.stream.abandon();
                }
            }
            FrameKind::Ping => send(writer, &Frame::pong(frame.nonce()?)),
            FrameKind::Pong => {}
            other => return Err(ProtocolError::Unexpected(other)),
        }
    }
    Ok(())
}

fn open(frame: &Frame, writer: &Writer, streams: &Streams, host_window: u32) {
    let id = frame.stream;
    let reply = |r: Reply| send(writer, &Frame::json(FrameKind::Reply, id, &r));
    let request: Open = match frame.parse() {
        Ok(r) => r,
        Err(e) => {
            return reply(Reply::Error {
                code: ErrorCode::BadRequest,
                message: e.to_string(),
            })
        }
    };
    match request {
        Open::Restored(identity) => reply(Reply::Restored {
            problems: crate::identity::apply(&identity),
        }),
        Open::Shutdown { reboot } => {
            reply(Reply::ShuttingDown);
            crate::init::shutdown(if reboot { "reboot" } else { "poweroff" });
        }
        Open::Exec(req) => {
            let Some((stream, on_exit)) = open_stream(id, writer, streams, host_window) else {
                return;
            };
            match exec::start(stream, req, on_exit) {
                Ok(started) => {
                    // Signals sent meanwhile reached pid 0, our own group:
                    // none can have been, the host waits for Started.
                    if let Some(r) = lock(streams).get_mut(&id) {
                        r.pid = started.pid;
                        r.terminal = started.terminal;
                    }
                }
                Err(message) => {
                    lock(streams).remove(&id);
                    reply(Reply::Error {
                        code: ErrorCode::SpawnFailed,
                        message,
                    })
                }
            }
        }
        // File and process requests touch the guest's disks or wait on
        // processes, which may be slow: each runs on a thread of its own,
        // never on the connection's reader.
        request => {
            let Some((stream, on_exit)) = open_stream(id, writer, streams, host_window) else {
                return;
            };
            let spawned = std::thread::Builder::new()
                .name("request".into())
                .spawn(move || {
                    let answer = |r: Result<Reply, files::Failure>| {
                        let r = r.unwrap_or_else(files::Failure::reply);
                        stream.send(&Frame::json(FrameKind::Reply, stream.id, &r));
                    };
                    match request {
                        Open::Stat { path } => answer(files::stat(&path)),
                        Open::List { path, after, limit } => {
                            answer(files::list(&path, after.as_ref(), limit))
                        }
                        Open::Mkdir {
                            path,
                            parents,
                            mode,
                        } => answer(files::mkdir(&path, parents, mode)),
                        Open::Remove { path, recursive } => answer(files::remove(&path, recursive)),
                        Open::Rename { from, to } => answer(files::rename(&from, &to)),
                        Open::ReadFile {
                            path,
                            offset,
                            limit,
                        } => files::read(stream, &path, offset, limit),
                        Open::WriteFile(req) => files::write(stream, &req),
                        Open::ReadTree { path } => tree::read_tree(stream, &path),
                        Open::WriteTree { path } => tree::write_tree(stream, &path),
                        Open::Watch { path, recursive } => watch::watch(stream, &path, recursive),
                        Open::Spawn(req) => answer(detached::spawn(&req)),
                        Open::Attach {
                            pid,
                            offset,
                            follow,
                        } => detached::attach(stream, pid, offset, follow),
                        Open::Processes => answer(detached::list()),
                        Open::SignalProcess { pid, signal } => {
                            answer(detached::signal(pid, signal))
                        }
                        Open::Connect { port } => ports::connect(stream, port),
                        Open::Exec(_) | Open::Restored(_) | Open::Shutdown { .. } => {
                            unreachable!("served above")
                        }
                    }
                    on_exit();
                });
            if let Err(e) = spawned {
                lock(streams).remove(&id);
                reply(Reply::Error {
                    code: ErrorCode::Other,
                    message: format!("cannot start a thread: {e}"),
                });
            }
        }
    }
}

/// Enters a new stream in the connection's table, or refuses it (the id
/// in use, or too many streams) with a reply. Returns the stream and what
/// takes it out of the table when it is over.
fn open_stream(
    id: u32,
    writer: &Writer,
    streams: &Streams,
    host_window: u32,
) -> Option<(Arc<ExecStream>, impl FnOnce() + Send + 'static)> {
    let refuse = |code, message: String| {
        send(
            writer,
            &Frame::json(FrameKind::Reply, id, &Reply::Error { code, message }),
        )
    };
    let stream = ExecStream::new(id, writer.clone(), host_window);
    let mut table = lock(streams);
    if table.contains_key(&id) {
        drop(table);
        refuse(
            ErrorCode::StreamInUse,
            format!("stream {id} is already in use"),
        );
        return None;
    }
    if table.len() >= AGENT_MAX_STREAMS as usize {
        drop(table);
        refuse(
            ErrorCode::TooManyStreams,
            format!("{AGENT_MAX_STREAMS} streams are already open"),
        );
        return None;
    }
    table.insert(
        id,
        Running {
            stream: stream.clone(),
            pid: 0,
            terminal: None,
        },
    );
    let cleanup = streams.clone();
    Some((stream, move || {
        lock(&cleanup).remove(&id);
    }))
}
