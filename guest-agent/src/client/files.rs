//! Files in the guest, seen from the host: requests with one reply, and
//! streamed reads and writes that hold at most the stream's window in
//! memory whatever the file's size.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::files::{FileInfo, GuestPath, TransferEnd, WatchEvent, WriteFile};
use crate::protocol::{channel, Frame, FrameKind, Open, Reply, Reset, DATA_CHUNK};

use super::connection::Connection;
use super::stream::{Incoming, StreamKind, StreamSlot};
use super::{AgentClient, ClientError};

/// One page of a directory's entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<FileInfo>,
    /// The directory has entries after the last one here.
    pub more: bool,
}

pub(super) fn refused(reply: Reply) -> ClientError {
    match reply {
        Reply::Error { code, message } => ClientError::Refused { code, message },
        other => ClientError::UnexpectedReply(other),
    }
}

impl AgentClient {
    fn file_request(&self, open: Open) -> Result<Reply, ClientError> {
        let timeout = self.conn.options.request_timeout;
        match self.request(&open, timeout)? {
            reply @ Reply::Error { .. } => Err(refused(reply)),
            reply => Ok(reply),
        }
    }

    /// What `path` is (a final symlink is described, not followed).
    pub fn stat(&self, path: impl Into<GuestPath>) -> Result<FileInfo, ClientError> {
        match self.file_request(Open::Stat { path: path.into() })? {
            Reply::Stat(info) => Ok(info),
            other => Err(refused(other)),
        }
    }

    /// One page of a directory's entries in name order, after `after`.
    pub fn list_page(
        &self,
        path: impl Into<GuestPath>,
        after: Option<GuestPath>,
        limit: Option<u32>,
    ) -> Result<Listing, ClientError> {
        let open = Open::List {
            path: path.into(),
            after,
            limit,
        };
        match self.file_request(open)? {
            Reply::Listing { entries, more } => Ok(Listing { entries, more }),
            other => Err(refused(other)),
        }
    }

    /// A directory's entries in name order, at most `limit`, read page by
    /// page; `more` if the directory has others.
    pub fn list(&self, path: impl Into<GuestPath>, limit: usize) -> Result<Listing, ClientError> {
        let path = path.into();
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let want = u32::try_from(limit - all.len()).unwrap_or(u32::MAX);
            let page = self.list_page(path.clone(), after, Some(want))?;
            all.extend(page.entries);
            let done = !page.more || all.len() >= limit;
            if done {
                return Ok(Listing {
                    more: page.more,
                    entries: all,
                });
            }
            after = all.last().map(|e| e.name.clone());
        }
    }

    /// Makes a directory; with `parents`, its missing parents too (and an
    /// existing directory is no error).
    pub fn mkdir(
        &self,
        path: impl Into<GuestPath>,
        parents: bool,
        mode: Option<u32>,
    ) -> Result<(), ClientError> {
        let open = Open::Mkdir {
            path: path.into(),
            parents,
            mode,
        };
        self.file_request(open).map(drop)
    }

    /// Removes a file, a symlink or an empty directory; with `recursive`,
    /// any directory and everything in it.
    pub fn remove(&self, path: impl Into<GuestPath>, recursive: bool) -> Result<(), ClientError> {
        let open = Open::Remove {
            path: path.into(),
            recursive,
        };
        self.file_request(open).map(drop)
    }

    /// Renames `from` to `to` inside the guest.
    pub fn rename(
        &self,
        from: impl Into<GuestPath>,
        to: impl Into<GuestPath>,
    ) -> Result<(), ClientError> {
        let open = Open::Rename {
            from: from.into(),
            to: to.into(),
        };
        self.file_request(open).map(drop)
    }

    /// Opens a file for reading from `offset`, at most `limit` bytes (all
    /// of it if `None`). Its bytes arrive as the returned reader is read.
    pub fn read_file(
        &self,
        path: impl Into<GuestPath>,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<FileDownload, ClientError> {
        self.download(Open::ReadFile {
            path: path.into(),
            offset,
            limit,
        })
    }

    /// A directory tree as a tar stream (symlinks as symlinks; modes,
    /// owners and times kept), read as it is made.
    pub fn read_tree(&self, path: impl Into<GuestPath>) -> Result<FileDownload, ClientError> {
        self.download(Open::ReadTree { path: path.into() })
    }

    fn download(&self, open: Open) -> Result<FileDownload, ClientError> {
        let (slot, size) = self.open_streaming(&open, |reply| match reply {
            Reply::Reading { size } => Ok(size),
            other => Err(other),
        })?;
        Ok(FileDownload {
            conn: self.conn.clone(),
            slot,
            size,
            pending: Vec::new(),
            at: 0,
            end: None,
        })
    }

    /// Opens a stream with `open` and waits for its reply, which `accept`
    /// takes if it is the one expected; any other is refused, and on any
    /// failure the connection forgets the stream.
    pub(super) fn open_streaming<T>(
        &self,
        open: &Open,
        accept: impl FnOnce(Reply) -> Result<T, Reply>,
    ) -> Result<(Arc<StreamSlot>, T), ClientError> {
        let slot = self.conn.open(open, StreamKind::Streaming)?;
        let deadline = Instant::now() + self.conn.options.request_timeout;
        match slot
            .wait_reply(deadline)
            .and_then(|reply| accept(reply).map_err(refused))
        {
            Ok(accepted) => Ok((slot, accepted)),
            Err(e) => {
                self.conn.forget(slot.id);
                Err(e)
            }
        }
    }

    /// Writes a file from `data`, as fast as the guest's disk takes it,
    /// and returns how many bytes were written. The file appears whole at
    /// its path once every byte is written; if anything fails on the way
    /// (here or in the guest) the old file is left as it was.
    pub fn write_file(&self, request: WriteFile, data: &mut dyn Read) -> Result<u64, ClientError> {
        self.upload(Open::WriteFile(request), data)
    }

    /// Unpacks the tar stream `data` into the directory `path` (made if
    /// missing); returns the archive's size. What was unpacked before a
    /// failure stays.
    pub fn write_tree(
        &self,
        path: impl Into<GuestPath>,
        data: &mut dyn Read,
    ) -> Result<u64, ClientError> {
        self.upload(Open::WriteTree { path: path.into() }, data)
    }

    /// Watches a directory (and every directory under it with
    /// `recursive`); events arrive through the returned handle in the
    /// order they happened, until it is dropped.
    pub fn watch(
        &self,
        path: impl Into<GuestPath>,
        recursive: bool,
    ) -> Result<WatchHandle, ClientError> {
        let open = Open::Watch {
            path: path.into(),
            recursive,
        };
        let (slot, ()) = self.open_streaming(&open, |reply| match reply {
            Reply::Watching => Ok(()),
            other => Err(other),
        })?;
        Ok(WatchHandle {
            conn: self.conn.clone(),
            slot,
            ended: false,
        })
    }

    fn upload(&self, open: Open, data: &mut dyn Read) -> Result<u64, ClientError> {
        let slot = self.conn.open(&open, StreamKind::Streaming)?;
        let upload = Upload {
            conn: &self.conn,
            slot: &slot,
            done: false,
        };
        upload.run(data)
    }
}

/// A write under way; dropped before the end it aborts the write.
struct Upload<'a> {
    conn: &'a Connection,
    slot: &'a Arc<StreamSlot>,
    done: bool,
}

impl Upload<'_> {
    fn run(mut self, data: &mut dyn Read) -> Result<u64, ClientError> {
        let deadline = Instant::now() + self.conn.options.request_timeout;
        match self.slot.wait_reply(deadline)? {
            Reply::Writing => {}
            other => {
                self.done = true;
                return Err(refused(other));
            }
        }
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            let n = fill(data, &mut buf).map_err(ClientError::Source)?;
            if n == 0 {
                break;
            }
            let mut chunk = &buf[..n];
            while !chunk.is_empty() {
                // A guest that takes nothing for this long is stuck.
                let deadline = Instant::now() + self.conn.options.request_timeout;
                let credit = match self.slot.take_credit(chunk.len(), Some(deadline)) {
                    Ok(credit) => credit,
                    // The agent stopped the write: its end says why.
                    Err(ClientError::StreamEnded | ClientError::StdinClosed) => {
                        return self.finish();
                    }
                    Err(e) => return Err(e),
                };
                self.conn
                    .send(&Frame::data(self.slot.id, channel::STDIN, &chunk[..credit]))?;
                chunk = &chunk[credit..];
            }
        }
        self.conn.send(&Frame::eof(self.slot.id, channel::STDIN))?;
        self.finish()
    }

    /// Waits for the agent's end of the transfer.
    fn finish(mut self) -> Result<u64, ClientError> {
        loop {
            // Bounded by the connection's keepalive: an agent that stops
            // answering loses it.
            let (incoming, _) = self.slot.next(None)?;
            match incoming {
                Incoming::Data { .. } => {}
                Incoming::End(frame) => {
                    self.done = true;
                    return transfer_result(frame.parse::<TransferEnd>()?);
                }
                Incoming::Reset(message) => {
                    self.done = true;
                    return Err(ClientError::StreamReset(message));
                }
            }
        }
    }
}

/// Reads until `buf` is full or the source ends: whole frames whatever
/// pieces the source comes in (an HTTP body's are small), so the guest
/// takes a few large packets rather than many small ones.
fn fill(data: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match data.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn transfer_result(end: TransferEnd) -> Result<u64, ClientError> {
    match end.error {
        None => Ok(end.bytes),
        Some(e) => Err(ClientError::Refused {
            code: e.code,
            message: e.message,
        }),
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        release(
            self.conn,
            self.slot,
            self.done,
            "the host abandoned the write",
        );
    }
}

/// What dropping a stream this side opened does: the agent is told to
/// reset it unless it has ended, and the connection forgets it.
pub(super) fn release(conn: &Connection, slot: &StreamSlot, ended: bool, why: &str) {
    if !ended && !slot.is_finished() {
        reset(conn, slot, why);
    }
    conn.forget(slot.id);
}

pub(super) fn reset(conn: &Connection, slot: &StreamSlot, message: &str) {
    let reset = Reset {
        message: message.into(),
    };
    let _ = conn.send(&Frame::json(FrameKind::Reset, slot.id, &reset));
}

/// A file being read from the guest. Dropping it before the end stops the
/// transfer.
pub struct FileDownload {
    conn: Arc<Connection>,
    slot: Arc<StreamSlot>,
    size: u64,
    pending: Vec<u8>,
    at: usize,
    end: Option<Result<u64, String>>,
}

impl FileDownload {
    /// The file's size when it was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next bytes of the file, `None` at its end; an error if the
    /// read failed in the guest or the connection did.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        if self.at < self.pending.len() {
            let rest = self.pending.split_off(self.at);
            self.pending.clear();
            self.at = 0;
            return Ok(Some(rest));
        }
        if let Some(end) = &self.end {
            return match end {
                Ok(_) => Ok(None),
                Err(m) => Err(ClientError::Lost(m.clone())),
            };
        }
        // A guest that sends nothing for this long is stuck.
        let deadline = Instant::now() + self.conn.options.request_timeout;
        let incoming = self.slot.next_granting(&self.conn, Some(deadline))?;
        match incoming {
            Incoming::Data { bytes, .. } => Ok(Some(bytes)),
            Incoming::End(frame) => {
                let result = transfer_result(frame.parse::<TransferEnd>()?);
                self.end = Some(result.as_ref().copied().map_err(|e| e.to_string()));
                result.map(|_| None)
            }
            Incoming::Reset(message) => {
                self.end = Some(Err(message.clone()));
                Err(ClientError::StreamReset(message))
            }
        }
    }
}

impl std::fmt::Debug for FileDownload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDownload")
            .field("stream", &self.slot.id)
            .field("size", &self.size)
            .finish()
    }
}

impl Read for FileDownload {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at >= self.pending.len() {
            match self.next_chunk() {
                Ok(Some(chunk)) => {
                    self.pending = chunk;
                    self.at = 0;
                }
                Ok(None) => return Ok(0),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Drop for FileDownload {
    fn drop(&mut self) {
        let ended = self.end.is_some();
        release(&self.conn, &self.slot, ended, "the host stopped reading");
    }
}

/// A directory being watched. Dropping it ends the watch.
pub struct WatchHandle {
    conn: Arc<Connection>,
    slot: Arc<StreamSlot>,
    ended: bool,
}

impl WatchHandle {
    /// The next event, waiting at most `timeout` ([`ClientError::Timeout`]
    /// then, the watch still on) or, with `None`, as long as the agent
    /// answers. `Ok(None)` once the watch has ended; an error says why it
    /// did (the directory went: `NotFound`).
    pub fn next_event(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<WatchEvent>, ClientError> {
        if self.ended {
            return Ok(None);
        }
        let incoming = self
            .slot
            .next_granting(&self.conn, timeout.map(|t| Instant::now() + t))?;
        match incoming {
            Incoming::Data { bytes, .. } => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ClientError::Lost(format!("the agent sent a bad watch event: {e}"))),
            Incoming::End(frame) => {
                self.ended = true;
                transfer_result(frame.parse::<TransferEnd>()?).map(|_| None)
            }
            Incoming::Reset(message) => {
                self.ended = true;
                Err(ClientError::StreamReset(message))
            }
        }
    }
}

impl std::fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHandle")
            .field("stream", &self.slot.id)
            .field("ended", &self.ended)
            .finish()
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        release(
            &self.conn,
            &self.slot,
            self.ended,
            "the host stopped watching",
        );
    }
}
