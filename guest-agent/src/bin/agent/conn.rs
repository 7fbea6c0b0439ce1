//! One host connection: hello exchange, then a loop routing frames to the
//! streams they belong to. Each connection can run many execs at once.

use std::collections::HashMap;
use std::fs::File;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use guest_agent::protocol::{Frame, FrameKind, Hello, ProtocolError, Reply, Request, Signal};

use crate::exec::{self, send, Writer};
use crate::sys;

struct Stream {
    pid: i32,
    stdin: Option<SyncSender<Vec<u8>>>,
}

type Streams = Arc<Mutex<HashMap<u32, Stream>>>;

fn lock(m: &Mutex<HashMap<u32, Stream>>) -> std::sync::MutexGuard<'_, HashMap<u32, Stream>> {
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

fn serve_inner(conn: File) -> Result<(), ProtocolError> {
    let mut reader = conn.try_clone()?;
    let writer: Writer = Arc::new(Mutex::new(conn));
    match Frame::read_from(&mut reader)? {
        Some(f) if f.kind == FrameKind::Hello => f.parse::<Hello>()?.check()?,
        Some(f) => return Err(ProtocolError::Unexpected(f.kind)),
        None => return Ok(()),
    }
    send(&writer, &Frame::json(FrameKind::Hello, 0, &Hello::ours()));

    let streams: Streams = Arc::default();
    while let Some(frame) = Frame::read_from(&mut reader)? {
        match frame.kind {
            FrameKind::Request => handle_request(&frame, &writer, &streams),
            FrameKind::Stdin => {
                let mut streams = lock(&streams);
                if let Some(s) = streams.get_mut(&frame.stream) {
                    let eof = frame.payload.is_empty();
                    if let Some(tx) = &s.stdin {
                        if tx.send(frame.payload).is_err() || eof {
                            s.stdin = None;
                        }
                    }
                }
            }
            FrameKind::Signal => {
                let sig: Signal = frame.parse()?;
                if let Some(s) = lock(&streams).get(&frame.stream) {
                    let _ = sys::kill(-s.pid, sig.signal);
                }
            }
            other => return Err(ProtocolError::Unexpected(other)),
        }
    }
    Ok(())
}

fn handle_request(frame: &Frame, writer: &Writer, streams: &Streams) {
    let id = frame.stream;
    let reply = |r: Reply| send(writer, &Frame::json(FrameKind::Reply, id, &r));
    let request: Request = match frame.parse() {
        Ok(r) => r,
        Err(e) => {
            return reply(Reply::Error {
                message: e.to_string(),
            })
        }
    };
    match request {
        Request::Ping => reply(Reply::Pong),
        Request::Restored(identity) => reply(Reply::Restored {
            problems: crate::identity::apply(&identity),
        }),
        Request::Shutdown { reboot } => {
            reply(Reply::ShuttingDown);
            crate::init::shutdown(if reboot { "reboot" } else { "poweroff" });
        }
        Request::Exec(req) => {
            if lock(streams).contains_key(&id) {
                return reply(Reply::Error {
                    message: format!("stream {id} is already in use"),
                });
            }
            // Hold the table lock across the start so the exit cleanup
            // cannot run before the stream is registered.
            let mut table = lock(streams);
            let cleanup_streams = streams.clone();
            let on_exit = move || {
                lock(&cleanup_streams).remove(&id);
            };
            match exec::start(id, req, writer.clone(), on_exit) {
                Ok(started) => {
                    table.insert(
                        id,
                        Stream {
                            pid: started.pid,
                            stdin: started.stdin,
                        },
                    );
                }
                Err(message) => {
                    drop(table);
                    reply(Reply::Error { message })
                }
            }
        }
    }
}
