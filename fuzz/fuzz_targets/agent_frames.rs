//! The agent protocol's decoder, as the host runs it on what a (possibly
//! hostile) agent sends: frames, and every payload kind's parser.
#![no_main]

use std::io::Cursor;

use guest_agent::protocol::{
    Control, ExitStatus, Frame, FrameKind, FrameReader, Hello, Open, Poll, Reply, Reset,
};
use libfuzzer_sys::fuzz_target;

fn touch(f: &Frame) {
    match f.kind {
        FrameKind::Hello => {
            if let Ok(h) = f.parse::<Hello>() {
                let _ = h.check();
                let _ = h.usable_window();
            }
        }
        FrameKind::Open => drop(f.parse::<Open>()),
        FrameKind::Reply => drop(f.parse::<Reply>()),
        FrameKind::End => drop(f.parse::<ExitStatus>()),
        FrameKind::Reset => drop(f.parse::<Reset>()),
        FrameKind::Control => drop(f.parse::<Control>()),
        FrameKind::Data | FrameKind::Eof => {
            let _ = f.channel();
            let _ = f.data_bytes().len();
        }
        FrameKind::Window => drop(f.window_bytes()),
        FrameKind::Ping | FrameKind::Pong => drop(f.nonce()),
    }
}

fuzz_target!(|data: &[u8]| {
    // Whole, and a byte at a time (what a reader keeps across timeouts).
    let mut reader = FrameReader::new(Cursor::new(data));
    while let Ok(Poll::Frame(f)) = reader.poll() {
        touch(&f);
    }
    let mut reader = FrameReader::unbuffered(Cursor::new(data));
    while let Ok(Poll::Frame(f)) = reader.poll_once() {
        touch(&f);
    }
});
