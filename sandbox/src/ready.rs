//! The guest agent's ready signal. At boot the agent connects to host
//! vsock port [`READY_PORT`] (the Unix socket `<vsock>_1025`) and sends
//! its hello. Until it has, anything the guest does there is untrusted
//! noise: each connection gets a short, whole-frame deadline, the socket's
//! backlog is tiny (so a guest cannot park many connections, and the
//! host memory their unread data holds, on it), and the socket is gone
//! once the signal came.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devices::virtio::vsock::connect_to_guest;
use guest_agent::protocol::{FrameKind, FrameReader, Hello, AGENT_PORT, READY_PORT};
use guest_agent::{AgentClient, ClientOptions};

use crate::error::Error;

/// Connections the ready socket queues before the device's connects are
/// refused (the guest then sees a reset).
const BACKLOG: i32 = 4;
/// How long one connection has to deliver the whole hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

/// What waiting for the signal came to.
pub(crate) enum Waited {
    Ready,
    /// The deadline passed.
    TimedOut,
    /// `stop` said to give up.
    Stopped,
}

impl ReadyListener {
    /// Listens where the vsock device at `vsock_path` sends the guest's
    /// connections to port [`READY_PORT`].
    pub fn bind(vsock_path: &Path) -> std::io::Result<Self> {
        let path = PathBuf::from(format!("{}_{READY_PORT}", vsock_path.display()));
        let listener = devices::host_socket::bind_private(&path)?;
        listener.set_nonblocking(true)?;
        // listen() again on a listening socket only changes its backlog.
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(BACKLOG)?)?;
        Ok(ReadyListener { listener, path })
    }

    /// Waits until a connection delivers a valid agent hello, `deadline`
    /// passes, or `stop` (checked every few milliseconds) returns true.
    /// Anything else on the socket is dropped.
    pub fn wait(
        &self,
        deadline: Instant,
        mut stop: impl FnMut() -> bool,
    ) -> std::io::Result<Waited> {
        loop {
            match self.listener.accept() {
                // Only the vsock device (this process) connects here.
                Ok((conn, _)) if !devices::host_socket::peer_is_trusted(&conn) => {}
                Ok((conn, _)) => {
                    let until = deadline.min(Instant::now() + HELLO_TIMEOUT);
                    match read_hello(conn, until) {
                        Ok(()) => return Ok(Waited::Ready),
                        Err(why) => devices::guest_warn!(
                            "ignoring a connection on the guest's ready port: {why}"
                        ),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if stop() {
                return Ok(Waited::Stopped);
            }
            if Instant::now() >= deadline {
                return Ok(Waited::TimedOut);
            }
            wait_readable(&self.listener, Duration::from_millis(10));
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What waiting for a guest's agent came to.
pub(crate) enum AgentWait {
    Ready(AgentClient),
    /// No ready signal by the deadline.
    TimedOut,
    /// `stop` said to give up.
    Stopped,
    /// The guest said its agent was ready, and the agent then did not
    /// answer its hello: a guest faking readiness, or one that broke.
    Silent(Error),
}

/// Waits for the ready signal on `listener`, then connects to the agent
/// through the vsock device at `vsock_path` and has its hello, by
/// `deadline` (but at least `answer_min` after the signal). Ready means
/// the agent answers: a guest that only says so fails here, closed.
pub(crate) fn wait_for_agent(
    listener: &ReadyListener,
    vsock_path: &Path,
    deadline: Instant,
    answer_min: Duration,
    stop: impl FnMut() -> bool,
) -> std::io::Result<AgentWait> {
    match listener.wait(deadline, stop)? {
        Waited::Ready => {}
        Waited::TimedOut => return Ok(AgentWait::TimedOut),
        Waited::Stopped => return Ok(AgentWait::Stopped),
    }
    let by = deadline.max(Instant::now() + answer_min);
    Ok(match connect_agent_by(vsock_path, by) {
        Ok(agent) => AgentWait::Ready(agent),
        Err(e) => AgentWait::Silent(e),
    })
}

/// Connects to the agent through the vsock device at `vsock_path` and
/// reads its hello, both before `deadline`.
pub(crate) fn connect_agent_by(vsock_path: &Path, deadline: Instant) -> Result<AgentClient, Error> {
    connect_agent_with(vsock_path, deadline, ClientOptions::default())
}

/// Like [`connect_agent_by`], the client bounded by `options`.
pub(crate) fn connect_agent_with(
    vsock_path: &Path,
    deadline: Instant,
    options: ClientOptions,
) -> Result<AgentClient, Error> {
    // A zero timeout would mean "wait forever" to the socket.
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let stream = connect_to_guest(vsock_path, AGENT_PORT, left)?;
    Ok(AgentClient::connect_with(stream, deadline, options)?)
}

/// Reads one hello from `conn`, all of it before `deadline`.
fn read_hello(conn: UnixStream, deadline: Instant) -> Result<(), String> {
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    let frame = match FrameReader::unbuffered(conn).read_by(deadline) {
        Ok(Some(frame)) => frame,
        Ok(None) => return Err("closed without a hello".into()),
        Err(e) if e.is_timeout() => return Err("no complete hello in time".into()),
        Err(e) => return Err(e.to_string()),
    };
    if frame.kind != FrameKind::Hello {
        return Err(format!("a {:?} frame instead of a hello", frame.kind));
    }
    let hello: Hello = frame.parse().map_err(|e| e.to_string())?;
    hello.check().map_err(|e| e.to_string())
}

/// Sleeps until `listener` has a connection waiting or `timeout` passes:
/// the ready signal is seen as soon as it arrives without spinning, and
/// the caller still rechecks the VM's state every `timeout`.
fn wait_readable(listener: &UnixListener, timeout: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    // An error or EINTR just means the caller polls again.
    let _ = poll(&mut fds, timeout);
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_agent::protocol::Frame;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    fn listener() -> (tempfile::TempDir, ReadyListener, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let ready = ReadyListener::bind(&vsock).unwrap();
        let path = PathBuf::from(format!("{}_{READY_PORT}", vsock.display()));
        (dir, ready, path)
    }

    #[test]
    fn garbage_and_stalled_connections_do_not_hide_the_hello() {
        let (_dir, ready, path) = listener();
        // A connection that says nothing, one that sends junk, one that
        // starts a frame and stops: then the real hello.
        let silent = UnixStream::connect(&path).unwrap();
        let mut junk = UnixStream::connect(&path).unwrap();
        junk.write_all(b"\x05\0\0\0\x02\0\0\0\0").unwrap();
        let mut partial = UnixStream::connect(&path).unwrap();
        partial.write_all(&1000u32.to_le_bytes()).unwrap();
        let hello = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut c = UnixStream::connect(&path).unwrap();
            Frame::json(FrameKind::Hello, 0, &Hello::new("agent", 65536, 0))
                .write_to(&mut c)
                .unwrap();
            c
        });
        let t = Instant::now();
        let waited = ready
            .wait(Instant::now() + Duration::from_secs(30), || false)
            .unwrap();
        assert!(matches!(waited, Waited::Ready));
        // Two stalled connections at two seconds each, at most.
        assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
        drop((silent, junk, partial, hello.join().unwrap()));
    }

    #[test]
    fn the_backlog_is_small_and_the_socket_goes_with_the_listener() {
        let (_dir, ready, path) = listener();
        let mut held = Vec::new();
        for _ in 0..64 {
            // As the vsock device connects: without blocking.
            match devices::host_socket::connect_nonblocking(&path) {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
        // Linux queues backlog + 1.
        assert!(held.len() <= BACKLOG as usize + 1, "{} queued", held.len());
        drop(ready);
        assert!(!path.exists());
    }

    /// Sends the agent's hello on the ready port, as a guest would.
    fn say_ready(path: &Path) -> UnixStream {
        let mut c = UnixStream::connect(path).unwrap();
        Frame::json(FrameKind::Hello, 0, &Hello::new("agent", 65536, 0))
            .write_to(&mut c)
            .unwrap();
        c
    }

    /// A stand-in for the vsock device: takes `CONNECT 1024`, says OK, and
    /// then runs `agent` on the connection.
    fn fake_device(
        vsock: &Path,
        agent: impl FnOnce(UnixStream) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(vsock).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            std::io::Read::read_exact(&mut conn, &mut line).unwrap();
            assert_eq!(&line, b"CONNECT 1024\n");
            conn.write_all(b"OK 1073741824\n").unwrap();
            agent(conn);
        })
    }

    #[test]
    fn a_guest_that_says_it_is_ready_and_then_does_not_answer_is_refused() {
        let (dir, ready, path) = listener();
        let vsock = dir.path().join("vsock.sock");
        // The agent port takes the connection and never says hello.
        let device = fake_device(&vsock, |conn| {
            std::thread::sleep(Duration::from_secs(3));
            drop(conn);
        });
        let _signal = say_ready(&path);
        let t = Instant::now();
        let waited = wait_for_agent(
            &ready,
            &vsock,
            Instant::now() + Duration::from_millis(500),
            Duration::from_secs(1),
            || false,
        )
        .unwrap();
        match waited {
            AgentWait::Silent(e) => assert!(e.is_guest_unresponsive(), "{e}"),
            _ => panic!("a silent agent was taken for a ready one"),
        }
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        device.join().unwrap();
    }

    #[test]
    fn a_guest_whose_agent_answers_is_ready() {
        let (dir, ready, path) = listener();
        let vsock = dir.path().join("vsock.sock");
        let device = fake_device(&vsock, |mut conn| {
            let hello = Frame::read_from(&mut conn).unwrap().unwrap();
            assert_eq!(hello.kind, FrameKind::Hello);
            Frame::json(FrameKind::Hello, 0, &Hello::new("agent", 65536, 8))
                .write_to(&mut conn)
                .unwrap();
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut conn, &mut rest);
        });
        let _signal = say_ready(&path);
        let waited = wait_for_agent(
            &ready,
            &vsock,
            Instant::now() + Duration::from_secs(5),
            Duration::from_secs(1),
            || false,
        )
        .unwrap();
        let AgentWait::Ready(agent) = waited else {
            panic!("an answering agent was not taken as ready");
        };
        assert_eq!(agent.peer().software, "agent");
        drop(agent);
        device.join().unwrap();
    }

    #[test]
    fn a_stop_or_deadline_ends_the_wait() {
        let (_dir, ready, _path) = listener();
        let t = Instant::now();
        let waited = ready
            .wait(Instant::now() + Duration::from_millis(100), || false)
            .unwrap();
        assert!(matches!(waited, Waited::TimedOut));
        assert!(t.elapsed() < Duration::from_secs(2));
        let waited = ready
            .wait(Instant::now() + Duration::from_secs(30), || true)
            .unwrap();
        assert!(matches!(waited, Waited::Stopped));
    }
}
