//! Where the guest's serial console goes: a log file, optionally the
//! terminal, and always a small in-memory tail for error messages.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// How much console output is kept in memory for error reports.
const TAIL_BYTES: usize = 16 * 1024;

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
    file: Option<File>,
    echo: bool,
    tail: ConsoleTail,
    line: Vec<u8>,
}

impl ConsoleSink {
    pub fn new(file: Option<File>, echo: bool, tail: ConsoleTail) -> Self {
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
}
