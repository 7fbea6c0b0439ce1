//! The supervisor's side of a `capsule-vmm` child: start it, call it,
//! hear its events. Every wait has a deadline.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    connect, getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
};

use crate::channel::{self, Channel, ChannelError};
use crate::protocol::{
    Answer, Event, ExitReason, Failure, FromChild, Op, Request, CONTROL_SOCKET, PROTOCOL_VERSION,
};

/// How long a child has to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the capsule-vmm child: {0}")]
    Channel(#[from] ChannelError),
    #[error(
        "the capsule-vmm child speaks control protocol {child} and this program {PROTOCOL_VERSION}: \
         install matching capsule and capsule-vmm binaries"
    )]
    Version { child: u32 },
    #[error("the capsule-vmm child refused: {}", .0.message)]
    Failed(Failure),
    #[error("the capsule-vmm child said something out of place: {0}")]
    Unexpected(String),
    #[error("cannot start capsule-vmm ({exe}): {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is served by another user's process: refusing to talk to it")]
    Untrusted { path: PathBuf },
}

impl From<nix::Error> for ClientError {
    fn from(e: nix::Error) -> Self {
        ClientError::Channel(ChannelError::Io(e.into()))
    }
}

/// A connection to one child.
pub struct ChildClient {
    channel: Channel,
    next_id: u64,
    /// Events that came while a reply was awaited, oldest first.
    events: VecDeque<Event>,
    pid: u32,
    exited: Option<ExitReason>,
}

/// The `capsule-vmm` executable: `$CAPSULE_VMM`, else next to this
/// program.
pub fn executable() -> PathBuf {
    if let Some(p) = std::env::var_os("CAPSULE_VMM") {
        return p.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("capsule-vmm")))
        .unwrap_or_else(|| PathBuf::from("capsule-vmm"))
}

/// A command that starts a child in `runtime_dir` (its working directory,
/// private and the supervisor's), its control socket on standard input;
/// and the supervisor's end of that socket. The caller adds what else it
/// wants (stderr, a session of its own) and spawns it.
pub fn command(exe: &Path, runtime_dir: &Path) -> Result<(Command, Channel), ClientError> {
    let (ours, theirs) = channel::pair()?;
    let mut cmd = Command::new(exe);
    cmd.current_dir(runtime_dir)
        .stdin(Stdio::from(theirs.into_fd()))
        .stdout(Stdio::null())
        .env_remove("CAPSULE_VMM");
    Ok((cmd, ours))
}

/// Starts `cmd` (from [`command`]) and waits for its hello.
pub fn spawn(
    mut cmd: Command,
    channel: Channel,
) -> Result<(std::process::Child, ChildClient), ClientError> {
    let exe = PathBuf::from(cmd.get_program());
    let mut child = cmd
        .spawn()
        .map_err(|source| ClientError::Spawn { exe, source })?;
    // Our copy of the child's end went with the command.
    drop(cmd);
    match ChildClient::new(channel, HELLO_TIMEOUT) {
        Ok(client) => Ok((child, client)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

impl ChildClient {
    /// Over a connected channel: the child's hello, by `timeout`.
    pub fn new(channel: Channel, timeout: Duration) -> Result<ChildClient, ClientError> {
        channel.set_read_timeout(Some(timeout))?;
        channel.set_write_timeout(Some(timeout))?;
        let (hello, _fds) = channel.recv::<FromChild>()?;
        let FromChild::Hello { protocol, pid, .. } = hello else {
            return Err(ClientError::Unexpected(format!(
                "{hello:?} before its hello"
            )));
        };
        if protocol != PROTOCOL_VERSION {
            return Err(ClientError::Version { child: protocol });
        }
        Ok(ChildClient {
            channel,
            next_id: 1,
            events: VecDeque::new(),
            pid,
            exited: None,
        })
    }

    /// Connects to the child running in `runtime_dir`.
    pub fn connect(runtime_dir: &Path, timeout: Duration) -> Result<ChildClient, ClientError> {
        let path = runtime_dir.join(CONTROL_SOCKET);
        let fd: OwnedFd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // A child whose backlog is full (busy with a long snapshot) must
        // not hold the connect forever.
        let limit = nix::sys::time::TimeVal::new(
            timeout.as_secs() as i64,
            i64::from(timeout.subsec_micros()),
        );
        nix::sys::socket::setsockopt(&fd, sockopt::SendTimeout, &limit)?;
        connect(fd.as_raw_fd(), &UnixAddr::new(&path)?).map_err(|e| {
            ClientError::Channel(ChannelError::Io(std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("connecting to {}: {e}", path.display()),
            )))
        })?;
        // What we send may be secret, and what it says we trust.
        let trusted = getsockopt(&fd, sockopt::PeerCredentials)
            .is_ok_and(|c| c.uid() == nix::unistd::Uid::effective().as_raw() || c.uid() == 0);
        if !trusted {
            return Err(ClientError::Untrusted { path });
        }
        ChildClient::new(Channel::from_fd(fd), timeout)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How the VM ended, once the child has said so.
    pub fn exited(&self) -> Option<&ExitReason> {
        self.exited.as_ref()
    }

    /// Sends `op` with `fds` and waits up to `timeout` for its reply;
    /// events that come meanwhile are kept for [`ChildClient::next_event`].
    pub fn call(
        &mut self,
        op: Op,
        fds: &[BorrowedFd],
        timeout: Duration,
    ) -> Result<Answer, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let deadline = Instant::now() + timeout;
        self.channel
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        self.channel.send(&Request { id, op }, fds)?;
        loop {
            match self.receive(deadline)? {
                None => return Err(ChannelError::TimedOut(timeout).into()),
                Some(FromChild::Reply { id: got, result }) if got == id => {
                    return result.map_err(ClientError::Failed)
                }
                // A late reply to a call that timed out: dropped.
                Some(FromChild::Reply { id: got, .. }) if got < id => {}
                Some(FromChild::Reply { id: got, result }) => {
                    return Err(ClientError::Unexpected(format!(
                        "a reply to request {got} ({result:?}) while waiting for {id}"
                    )))
                }
                Some(FromChild::Event { event }) => self.keep(event),
                Some(hello @ FromChild::Hello { .. }) => {
                    return Err(ClientError::Unexpected(format!("{hello:?}")))
                }
            }
        }
    }

    fn keep(&mut self, event: Event) {
        if let Event::Exited { reason } = &event {
            self.exited = Some(reason.clone());
        }
        // A child sends a handful of events per request: a peer that
        // floods gets its oldest dropped, never our memory.
        if self.events.len() >= 1024 {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// One message by `deadline`, or None once it has passed.
    fn receive(&mut self, deadline: Instant) -> Result<Option<FromChild>, ClientError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        self.channel.set_read_timeout(Some(left))?;
        match self.channel.recv::<FromChild>() {
            Ok((message, _fds)) => Ok(Some(message)),
            Err(ChannelError::TimedOut(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The next event, waiting up to `timeout`; None if none came.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.receive(deadline)? {
                None => return Ok(None),
                Some(FromChild::Event { event }) => {
                    self.keep(event);
                    return Ok(self.events.pop_front());
                }
                // A late reply to a call that timed out: dropped.
                Some(FromChild::Reply { id, .. }) if id < self.next_id => {}
                Some(other) => return Err(ClientError::Unexpected(format!("{other:?} unasked"))),
            }
        }
    }

    /// Waits up to `timeout` for the VM to end; the reason, if it did.
    /// A child whose connection closes without saying why ended too.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitReason>, ClientError> {
        let deadline = Instant::now() + timeout;
        while self.exited.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(ClientError::Channel(ChannelError::Closed)) => {
                    self.exited = Some(ExitReason::Error(
                        "the capsule-vmm child went away without a word".into(),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(self.exited.clone())
    }
}
