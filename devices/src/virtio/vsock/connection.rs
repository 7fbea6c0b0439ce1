//! One vsock stream connection bridged to a host Unix socket: its state,
//! its credit accounting (virtio-vsock's flow control), and the bytes in
//! flight in each direction.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

/// Bytes the device buffers for one connection on the way to the host
/// socket. Advertised to the guest as `buf_alloc`, so a guest that respects
/// the credit protocol can never make it grow past this.
pub const TX_BUF_SIZE: u32 = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The host asked to connect; waiting for the guest's RESPONSE.
    HostConnecting,
    Established,
    /// The host sends nothing more (a half-close or a full close); guest
    /// data still flows to it until the guest finishes too.
    HostClosed,
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// Guest's receive buffer size and how much of what we sent it has
    /// consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    /// Bytes from the guest written to the host socket.
    pub fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    pub last_fwd_cnt_sent: Wrapping<u32>,
    /// Guest data the host socket has not accepted yet.
    pub tx_buf: VecDeque<u8>,
    /// Host data read but not yet delivered (bytes that arrived after the
    /// CONNECT line).
    pub rx_pending: Vec<u8>,
    /// The host socket may have data (edge-triggered readiness).
    pub readable: bool,
    /// The guest said it will send nothing more.
    pub peer_done_sending: bool,
    /// The host closed both directions (not just a half-close).
    pub host_gone: bool,
    /// The host has been sent end-of-file.
    host_write_ended: bool,
    /// The guest opened it (rather than a host program).
    pub from_guest: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, state: State) -> Self {
        Connection {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            rx_pending: Vec::new(),
            readable: true,
            peer_done_sending: false,
            host_gone: false,
            host_write_ended: false,
            from_guest: false,
        }
    }

    /// How many more bytes the guest can accept right now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Whether the guest should hear about freed buffer space now rather
    /// than wait for the next packet we send it.
    pub fn credit_update_due(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= TX_BUF_SIZE / 2
    }

    /// Forwards guest data to the host socket, buffering what it cannot
    /// take now. Errors if the guest overran the credit it was given.
    pub fn send_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        if self.tx_buf.len() + data.len() > TX_BUF_SIZE as usize {
            return Err(io::Error::other("guest exceeded its vsock credit"));
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            written = write_some(&mut self.stream, data)?;
            self.fwd_cnt += Wrapping(written as u32);
        }
        self.tx_buf.extend(&data[written..]);
        Ok(())
    }

    /// Once the guest has finished sending and the host has taken all of
    /// it, the host reads end-of-file.
    pub fn end_host_write_once_flushed(&mut self) {
        // Once only: every shutdown wakes the socket's watchers, which
        // would bring us straight back here.
        if self.peer_done_sending && self.tx_buf.is_empty() && !self.host_write_ended {
            self.host_write_ended = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    /// Writes buffered guest data to the host socket.
    pub fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let n = write_some(&mut self.stream, front)?;
            if n == 0 {
                break;
            }
            self.tx_buf.drain(..n);
            self.fwd_cnt += Wrapping(n as u32);
        }
        Ok(())
    }
}

/// Writes what the non-blocking socket accepts; 0 when it would block.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_accounting_wraps() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, State::Established);
        c.update_peer_credit(1000, u32::MAX - 10);
        c.rx_cnt = Wrapping(u32::MAX - 10);
        assert_eq!(c.peer_credit(), 1000);
        c.rx_cnt += Wrapping(100); // wraps past zero
        assert_eq!(c.peer_credit(), 900);
        c.rx_cnt += Wrapping(5000);
        assert_eq!(
            c.peer_credit(),
            0,
            "overcommitted peer never yields negative credit"
        );
    }

    #[test]
    fn guest_overrunning_credit_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::new(a, State::Established);
        // Fill the socket until it pushes back, then the buffer.
        let chunk = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        while c.send_to_host(&chunk).is_ok() {
            total += chunk.len();
            assert!(total < 64 * 1024 * 1024, "never pushed back");
        }
        assert!(c.tx_buf.len() <= TX_BUF_SIZE as usize);
        drop(b);
    }
}
