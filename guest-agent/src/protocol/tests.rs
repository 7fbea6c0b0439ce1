use std::io::{Cursor, Read};

use super::*;

fn roundtrip(frame: &Frame) -> Frame {
    let mut buf = Vec::new();
    frame.write_to(&mut buf).unwrap();
    Frame::read_from(&mut Cursor::new(buf)).unwrap().unwrap()
}

#[test]
fn frames_roundtrip() {
    let f = Frame::data(7, channel::STDOUT, b"hello");
    let back = roundtrip(&f);
    assert_eq!(back, f);
    assert_eq!(back.channel().unwrap(), channel::STDOUT);
    assert_eq!(back.data_bytes(), b"hello");
    assert_eq!(back.into_data_bytes(), b"hello");
    let req = Open::Exec(ExecRequest::new(["echo", "hi"]));
    let f = Frame::json(FrameKind::Open, 1, &req);
    assert_eq!(roundtrip(&f).parse::<Open>().unwrap(), req);
    assert_eq!(
        roundtrip(&Frame::window(3, 4096)).window_bytes().unwrap(),
        4096
    );
    assert_eq!(roundtrip(&Frame::ping(99)).nonce().unwrap(), 99);
    assert_eq!(roundtrip(&Frame::eof(3, 0)).channel().unwrap(), 0);
}

#[test]
fn fixed_payloads_are_checked() {
    for f in [
        Frame::new(FrameKind::Window, 1, vec![1, 2, 3]),
        Frame::new(FrameKind::Window, 1, vec![0; 5]),
    ] {
        assert!(matches!(
            f.window_bytes(),
            Err(ProtocolError::BadFixedPayload { .. })
        ));
    }
    assert!(Frame::new(FrameKind::Ping, 0, vec![]).nonce().is_err());
    assert!(Frame::new(FrameKind::Eof, 1, vec![]).channel().is_err());
    assert!(Frame::new(FrameKind::Eof, 1, vec![1, 2]).channel().is_err());
    assert!(Frame::new(FrameKind::Data, 1, vec![]).channel().is_err());
}

#[test]
fn eof_at_boundary_is_clean() {
    assert!(Frame::read_from(&mut Cursor::new(Vec::new()))
        .unwrap()
        .is_none());
}

#[test]
fn oversized_length_is_refused_without_allocating() {
    let mut buf = Vec::new();
    buf.extend_from_slice(&u32::MAX.to_le_bytes());
    buf.push(FrameKind::Data as u8);
    buf.extend_from_slice(&0u32.to_le_bytes());
    let err = Frame::read_from(&mut Cursor::new(buf)).unwrap_err();
    assert!(matches!(err, ProtocolError::BadLength(n) if n == u32::MAX as usize));

    let mut buf = Vec::new();
    buf.extend_from_slice(&((MAX_FRAME_LEN + 1) as u32).to_le_bytes());
    buf.extend_from_slice(&[FrameKind::Data as u8, 0, 0, 0, 0]);
    let err = Frame::read_from(&mut Cursor::new(buf)).unwrap_err();
    assert!(matches!(err, ProtocolError::BadLength(_)));
}

#[test]
fn undersized_length_is_refused() {
    for len in 0..5u32 {
        let mut buf = len.to_le_bytes().to_vec();
        buf.extend_from_slice(&[0; 16]);
        let err = Frame::read_from(&mut Cursor::new(buf)).unwrap_err();
        assert!(matches!(err, ProtocolError::BadLength(_)), "len {len}");
    }
}

#[test]
fn oversized_payload_is_not_encoded() {
    let f = Frame::new(FrameKind::Data, 1, vec![0; MAX_PAYLOAD + 1]);
    let mut buf = Vec::new();
    assert!(matches!(
        f.write_to(&mut buf),
        Err(ProtocolError::PayloadTooLarge(_))
    ));
    assert!(buf.is_empty(), "nothing written for a refused frame");
    let max = Frame::new(FrameKind::Data, 1, vec![7; MAX_PAYLOAD]);
    assert_eq!(roundtrip(&max), max);
}

#[test]
fn truncated_frames_are_refused_at_every_cut() {
    let mut buf = Vec::new();
    Frame::data(3, channel::STDERR, b"0123456789")
        .write_to(&mut buf)
        .unwrap();
    for cut in 1..buf.len() {
        let err = Frame::read_from(&mut Cursor::new(&buf[..cut])).unwrap_err();
        assert!(matches!(err, ProtocolError::Truncated), "cut at {cut}");
    }
}

#[test]
fn unknown_kind_is_refused() {
    let mut buf = 5u32.to_le_bytes().to_vec();
    buf.push(99);
    buf.extend_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        Frame::read_from(&mut Cursor::new(buf)),
        Err(ProtocolError::UnknownKind(99))
    ));
}

#[test]
fn malformed_json_is_an_error() {
    let f = Frame::new(FrameKind::Open, 1, b"{not json".to_vec());
    assert!(matches!(
        f.parse::<Open>(),
        Err(ProtocolError::BadPayload { .. })
    ));
    let f = Frame::new(FrameKind::Open, 1, br#"{"op":"format_disk"}"#.to_vec());
    assert!(f.parse::<Open>().is_err());
}

#[test]
fn version_mismatch_is_reported_with_both_versions() {
    // A version-1 agent's hello has no window: it still parses, so the
    // mismatch is what gets reported.
    let old: Hello = serde_json::from_str(r#"{"protocol":1,"software":"old"}"#).unwrap();
    let e = old.check().unwrap_err();
    assert!(matches!(e, ProtocolError::VersionMismatch { peer: 1 }));
    let text = e.to_string();
    assert!(
        text.contains("version 1") && text.contains("make artifacts"),
        "{text}"
    );
    Hello::new("test", MIN_WINDOW, 0).check().unwrap();
}

#[test]
fn windows_are_clamped() {
    let mut h = Hello::new("t", 0, 0);
    assert_eq!(h.usable_window(), MIN_WINDOW);
    h.window = u32::MAX;
    assert_eq!(h.usable_window(), MAX_WINDOW);
}

#[test]
fn unknown_error_codes_read_as_other() {
    let r: Reply =
        serde_json::from_str(r#"{"reply":"error","code":"disk_on_fire","message":"m"}"#).unwrap();
    assert_eq!(
        r,
        Reply::Error {
            code: ErrorCode::Other,
            message: "m".into()
        }
    );
    let r: Reply = serde_json::from_str(r#"{"reply":"error","message":"m"}"#).unwrap();
    assert!(matches!(
        r,
        Reply::Error {
            code: ErrorCode::Other,
            ..
        }
    ));
}

#[test]
fn shell_code_convention() {
    let st = |code, signal| ExitStatus {
        code,
        signal,
        timed_out: false,
    };
    assert_eq!(st(Some(3), None).shell_code(), 3);
    assert_eq!(st(None, Some(9)).shell_code(), 137);
}

/// A source that hands out one byte per read and reports a timeout
/// between them, like a socket a peer drips into.
struct Drip {
    bytes: Vec<u8>,
    at: usize,
    starved: bool,
}

impl Read for Drip {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.starved = !self.starved;
        if self.starved {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        if self.at == self.bytes.len() || buf.is_empty() {
            return Ok(0);
        }
        buf[0] = self.bytes[self.at];
        self.at += 1;
        Ok(1)
    }
}

#[test]
fn a_reader_keeps_partial_frames_across_timeouts() {
    let mut bytes = Vec::new();
    for f in [
        Frame::data(1, channel::STDOUT, b"abc"),
        Frame::window(1, 7),
        Frame::pong(5),
    ] {
        f.encode_into(&mut bytes).unwrap();
    }
    for buffered in [false, true] {
        let drip = Drip {
            bytes: bytes.clone(),
            at: 0,
            starved: false,
        };
        let mut reader = if buffered {
            FrameReader::new(drip)
        } else {
            FrameReader::unbuffered(drip)
        };
        let mut frames = Vec::new();
        let mut pending = 0;
        loop {
            match reader.poll().unwrap() {
                Poll::Frame(f) => frames.push(f),
                Poll::Pending => {
                    pending += 1;
                    assert!(pending < 10_000);
                }
                Poll::Closed => break,
            }
        }
        assert!(!reader.in_frame());
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].data_bytes(), b"abc");
        assert_eq!(frames[1].window_bytes().unwrap(), 7);
        assert_eq!(frames[2].nonce().unwrap(), 5);
        assert!(pending > bytes.len() / 2, "timeouts were seen");
    }
}

#[test]
fn a_reader_knows_when_it_is_inside_a_frame() {
    let mut bytes = Vec::new();
    Frame::data(1, channel::STDOUT, &[1; 100])
        .encode_into(&mut bytes)
        .unwrap();
    let mut reader = FrameReader::unbuffered(Drip {
        bytes: bytes[..20].to_vec(),
        at: 0,
        starved: false,
    });
    assert!(!reader.in_frame());
    let mut seen_inside = false;
    loop {
        match reader.poll() {
            Ok(Poll::Pending) => seen_inside |= reader.in_frame(),
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                assert!(matches!(e, ProtocolError::Truncated));
                break;
            }
        }
    }
    assert!(seen_inside);
}

#[test]
fn an_unbuffered_reader_leaves_what_follows() {
    let mut bytes = Vec::new();
    Frame::ping(1).encode_into(&mut bytes).unwrap();
    bytes.extend_from_slice(b"after");
    let mut cursor = Cursor::new(bytes);
    let f = Frame::read_from(&mut cursor).unwrap().unwrap();
    assert_eq!(f.kind, FrameKind::Ping);
    let mut rest = String::new();
    cursor.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "after");
}
