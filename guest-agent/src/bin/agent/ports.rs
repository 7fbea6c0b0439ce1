//! TCP connections to the guest's own ports, carried over the agent's
//! connection: the host's bytes go to a socket on 127.0.0.1:port and the
//! socket's come back, each direction within its stream's credit. A port
//! forward or an HTTP preview needs no network device in the guest.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use guest_agent::protocol::{channel, ErrorCode, Reply};

use crate::exec::spawn_thread;
use crate::files::{end, reply, Failure};
use crate::stream::{ExecStream, StdinReader, StreamWriter};

/// How long a connection to a guest port may take to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn connect(stream: Arc<ExecStream>, port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let socket = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(socket) => socket,
        Err(e) => {
            let code = match e.kind() {
                io::ErrorKind::ConnectionRefused => ErrorCode::ConnectionRefused,
                _ => ErrorCode::Other,
            };
            let message = format!("port {port} in the guest: {e}");
            return reply(&stream, &Failure { code, message }.reply());
        }
    };
    let _ = socket.set_nodelay(true);
    let (Ok(mut to_guest), Ok(mut from_guest)) = (socket.try_clone(), socket.try_clone()) else {
        let message = format!("port {port}: cannot share the socket");
        let failure = Failure {
            code: ErrorCode::Other,
            message,
        };
        return reply(&stream, &failure.reply());
    };
    reply(&stream, &Reply::Connected);

    let inbound = stream.clone();
    let feeder = spawn_thread("port-in", move || {
        let mut host = StdinReader::new(&inbound);
        let _ = io::copy(&mut host, &mut to_guest);
        drop(host);
        if inbound.is_live() {
            // The host's Eof: the guest's program reads its end of file.
            let _ = to_guest.shutdown(Shutdown::Write);
        } else {
            // The host reset the stream: the connection goes.
            let _ = to_guest.shutdown(Shutdown::Both);
        }
    });

    let mut host = StreamWriter {
        stream: &stream,
        channel: channel::STDOUT,
        sent: 0,
    };
    let copied = copy(&mut from_guest, &mut host);
    let sent = host.sent;
    let _ = socket.shutdown(Shutdown::Both);
    if stream.is_live() {
        let failure = copied.err().map(|e| Failure {
            code: ErrorCode::Other,
            message: format!("port {port} in the guest: {e}"),
        });
        end(&stream, sent, failure);
    }
    // Nothing more goes to the guest: wake the feeder if it waits.
    stream.abandon();
    let _ = feeder.join();
}

/// `io::copy`, but a reset from the guest's side counts as its end.
fn copy(from: &mut TcpStream, to: &mut StreamWriter<'_>) -> io::Result<u64> {
    let mut buf = vec![0u8; guest_agent::protocol::DATA_CHUNK];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(total),
            Err(e) => return Err(e),
        };
        io::Write::write_all(to, &buf[..n])?;
        total += n as u64;
    }
}
