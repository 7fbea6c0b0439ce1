//! One end of a control connection: whole messages over SOCK_SEQPACKET,
//! descriptors alongside, every wait bounded by the socket's timeout.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use serde::{de::DeserializeOwned, Serialize};

use crate::protocol::{MAX_FDS, MAX_MESSAGE};

/// The most descriptors the kernel passes with one message.
const SCM_MAX_FD: usize = 253;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("no message within {0:?}")]
    TimedOut(Duration),
    #[error("a message of more than {MAX_MESSAGE} bytes (refused)")]
    TooLarge,
    #[error("more than {MAX_FDS} descriptors with one message (refused)")]
    TooManyFds,
    #[error("an unreadable message: {0}")]
    Malformed(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<nix::Error> for ChannelError {
    fn from(e: nix::Error) -> Self {
        ChannelError::Io(e.into())
    }
}

/// A connected SOCK_SEQPACKET socket.
pub struct Channel {
    fd: OwnedFd,
}

/// A connected pair, one end for each side.
pub fn pair() -> Result<(Channel, Channel), ChannelError> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((Channel { fd: a }, Channel { fd: b }))
}

impl Channel {
    /// A channel over a connected SOCK_SEQPACKET socket.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    pub fn try_clone(&self) -> Result<Channel, ChannelError> {
        Ok(Channel {
            fd: self.fd.try_clone()?,
        })
    }

    /// Bounds every later receive (None: wait as long as it takes).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ChannelError> {
        self.with_stream(|s| s.set_read_timeout(timeout))?;
        Ok(())
    }

    /// Bounds every later send: a peer that stops reading cannot hold
    /// the sender forever.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), ChannelError> {
        self.with_stream(|s| s.set_write_timeout(timeout))?;
        Ok(())
    }

    /// The socket options live on the descriptor: set them through a
    /// borrowed std socket.
    fn with_stream<T>(
        &self,
        f: impl FnOnce(&UnixStream) -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        let stream = UnixStream::from(self.fd.try_clone()?);
        f(&stream)
    }

    pub fn send<T: Serialize>(&self, message: &T, fds: &[BorrowedFd]) -> Result<(), ChannelError> {
        let bytes =
            serde_json::to_vec(message).map_err(|e| ChannelError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLarge);
        }
        if fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFds);
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs = if raw.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        let iov = [IoSlice::new(&bytes)];
        loop {
            match sendmsg::<UnixAddr>(
                self.fd.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EPIPE | nix::Error::ECONNRESET) => {
                    return Err(ChannelError::Closed)
                }
                Err(nix::Error::EAGAIN) => {
                    return Err(ChannelError::TimedOut(Duration::ZERO));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next message and the descriptors that came with it.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        // Room for as many descriptors as the kernel ever passes at once
        // (SCM_MAX_FD): a message with more than we take is refused with
        // all of them closed, never cut short with some left open.
        let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let (len, fds, truncated) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<UnixAddr>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for c in msg.cmsgs()? {
                        if let ControlMessageOwned::ScmRights(received) = c {
                            for fd in received {
                                // SAFETY: the kernel just installed `fd` in
                                // this process for this message; nothing
                                // else owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                    let truncated = msg
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                    break (msg.bytes, fds, truncated);
                }
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => {
                    let timeout = self.with_stream(|s| s.read_timeout())?.unwrap_or_default();
                    return Err(ChannelError::TimedOut(timeout));
                }
                Err(nix::Error::ECONNRESET) => return Err(ChannelError::Closed),
                Err(e) => return Err(e.into()),
            }
        };
        if len == 0 && fds.is_empty() {
            return Err(ChannelError::Closed);
        }
        if truncated || len > MAX_MESSAGE {
            return Err(ChannelError::TooLarge);
        }
        if fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFds);
        }
        let message = serde_json::from_slice(&buf[..len])
            .map_err(|e| ChannelError::Malformed(e.to_string()))?;
        Ok((message, fds))
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
