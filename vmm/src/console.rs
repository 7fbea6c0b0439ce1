//! Where the guest's serial console goes: a log file, optionally the
//! terminal, and always a small in-memory tail for error messages.
//!
//! The guest decides how much it prints, so the log file is capped: at
//! [`CONSOLE_LOG_MAX`] bytes it moves to `<name>.1` (replacing the one
//! before) and a new file starts. At most twice the cap is on disk, the
//! newest output always among it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How much console output is kept in memory for error reports.
const TAIL_BYTES: usize = 16 * 1024;

/// Size at which a console log file is rotated.
pub const CONSOLE_LOG_MAX: u64 = 1 << 20;

/// A log file that rotates once it reaches its cap.
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    written: u64,
    limit: u64,
}

impl RotatingLog {
    /// Starts `path` afresh (created 0600, never through a symlink).
    pub fn create(path: &Path) -> io::Result<Self> {
        Self::with_limit(path, CONSOLE_LOG_MAX)
    }

    pub fn with_limit(path: &Path, limit: u64) -> io::Result<Self> {
        Ok(RotatingLog {
            file: crate::private::create_file(path, true)?,
            path: path.to_path_buf(),
            written: 0,
            limit,
        })
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        if self.written > 0 && self.written + data.len() as u64 > self.limit {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.path, &old)?;
            self.file = crate::private::create_file(&self.path, false)?;
            self.written = 0;
        }
        self.file.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }
}

/// The last bytes the guest printed, shared with the VM handle.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    fn push(&self, data: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tail.extend(data);
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
    }

    /// The last `lines` complete or partial lines.
    pub fn last_lines(&self, lines: usize) -> String {
        let tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: Vec<u8> = tail.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        if all.is_empty() {
            "(the guest printed nothing)".to_string()
        } else {
            all[start..].join("\n")
        }
    }
}

/// The serial port's output sink. Serial output arrives a byte at a time;
/// it is written out a line at a time.
pub struct ConsoleSink {
    file: Option<RotatingLog>,
    echo: bool,
    tail: ConsoleTail,
    line: Vec<u8>,
}

impl ConsoleSink {
    pub fn new(file: Option<RotatingLog>, echo: bool, tail: ConsoleTail) -> Self {
        ConsoleSink {
            file,
            echo,
            tail,
            line: Vec::with_capacity(256),
        }
    }

    fn emit(&mut self) {
        if self.line.is_empty() {
            return;
        }
        self.tail.push(&self.line);
        if let Some(f) = &mut self.file {
            let _ = f.write_all(&self.line);
        }
        if self.echo {
            let _ = io::stderr().write_all(&self.line);
        }
        self.line.clear();
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= 256 {
                self.emit();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.emit();
        Ok(())
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        self.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines() {
        let tail = ConsoleTail::default();
        let mut sink = ConsoleSink::new(None, false, tail.clone());
        assert_eq!(tail.last_lines(3), "(the guest printed nothing)");
        for i in 0..2000 {
            writeln!(sink, "line {i}").unwrap();
        }
        write!(sink, "partial").unwrap();
        sink.flush().unwrap();
        assert_eq!(tail.last_lines(3), "line 1998\nline 1999\npartial");
    }

    #[test]
    fn the_log_file_is_capped_and_keeps_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let log = RotatingLog::with_limit(&path, 64 << 10).unwrap();
        let mut sink = ConsoleSink::new(Some(log), false, ConsoleTail::default());
        for i in 0..200_000 {
            writeln!(sink, "guest line {i} with some padding to make it longer").unwrap();
        }
        sink.flush().unwrap();
        let total: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 2 * (64 << 10), "{total} bytes on disk");
        let newest = std::fs::read_to_string(&path).unwrap();
        assert!(newest.ends_with("guest line 199999 with some padding to make it longer\n"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
