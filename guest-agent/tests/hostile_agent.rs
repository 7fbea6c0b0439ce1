//! The host client against a hostile agent: a fake on the other end of a
//! socketpair that floods, stalls, drips, lies and breaks the protocol.
//! Each misdeed must end in a clear error within its deadline, with host
//! memory bounded; nothing hangs.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use guest_agent::protocol::{
    channel, Control, ExitStatus, Frame, FrameKind, FrameReader, Hello, Open, Reply,
    DEFAULT_HOST_WINDOW, MAX_WINDOW,
};
use guest_agent::{AgentClient, ClientError, ClientOptions, ExecEvent, ExecRequest};

/// The agent's side of the socketpair, driven by the test.
struct Fake {
    sock: UnixStream,
    reader: FrameReader<UnixStream>,
}

impl Fake {
    fn send(&mut self, frame: &Frame) {
        frame.write_to(&mut self.sock).expect("fake agent write");
    }

    /// The next frame from the host, within 5 s.
    fn recv(&mut self) -> Frame {
        self.recv_within(Duration::from_secs(5))
            .expect("the host sent nothing within 5 s")
    }

    fn recv_within(&mut self, timeout: Duration) -> Option<Frame> {
        self.reader.read_by(Instant::now() + timeout).ok().flatten()
    }

    /// Waits for the host's next frame of `kind`, answering pings.
    fn expect(&mut self, kind: FrameKind) -> Frame {
        loop {
            let f = self.recv();
            if f.kind == kind {
                return f;
            }
            if f.kind == FrameKind::Ping {
                self.send(&Frame::pong(f.nonce().unwrap()));
            }
        }
    }

    /// Half of a data frame for `stream`, one byte every 20 ms (10 s in
    /// all, each byte well inside any per-read timeout), until the host
    /// closes the connection.
    fn drip_half_a_frame(&mut self, stream: u32) {
        let mut frame = Vec::new();
        Frame::data(stream, channel::STDOUT, &[0; 1000])
            .encode_into(&mut frame)
            .unwrap();
        for byte in frame.iter().take(500) {
            if self.sock.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Answers the host's next Open (an exec) with Started.
    fn start_exec(&mut self) -> u32 {
        let open = self.expect(FrameKind::Open);
        assert!(matches!(open.parse::<Open>().unwrap(), Open::Exec(_)));
        self.send(&Frame::json(
            FrameKind::Reply,
            open.stream,
            &Reply::Started { pid: 42 },
        ));
        open.stream
    }
}

fn quick_options() -> ClientOptions {
    ClientOptions {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        exec_grace: Duration::from_millis(500),
        ..ClientOptions::default()
    }
}

fn agent_hello(window: u32) -> Hello {
    Hello::new("fake agent", window, 16)
}

/// A connected client and the fake agent serving it.
fn connect(options: ClientOptions) -> (AgentClient, Fake) {
    let (host, agent) = UnixStream::pair().unwrap();
    let mut fake = Fake {
        reader: FrameReader::new(agent.try_clone().unwrap()),
        sock: agent,
    };
    // Written before the host reads: the socket buffers it.
    fake.send(&Frame::json(FrameKind::Hello, 0, &agent_hello(256 << 10)));
    let client =
        AgentClient::connect_with(host, Instant::now() + Duration::from_secs(5), options).unwrap();
    let hello = fake.recv();
    assert_eq!(hello.kind, FrameKind::Hello);
    (client, fake)
}

/// Resident memory of this process (each test is its own process under
/// nextest, so this is the test's).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Waits for the client to notice its connection is lost, failing the
/// test (not hanging it) if it has not within `limit`.
fn lost_within(client: &AgentClient, limit: Duration, what: &str) -> ClientError {
    let deadline = Instant::now() + limit;
    loop {
        if let Err(e) = client.check_alive() {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the connection was not lost within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn within<T>(limit: Duration, what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    assert!(
        t.elapsed() <= limit,
        "{what} took {:?}, more than {limit:?}",
        t.elapsed()
    );
    out
}

#[test]
fn endless_output_is_capped_and_the_process_killed() {
    let options = ClientOptions {
        output_limit: 4 << 20,
        ..quick_options()
    };
    let (client, mut fake) = connect(options);
    let feeder = std::thread::spawn(move || {
        let id = fake.start_exec();
        let mut credit = u64::from(DEFAULT_HOST_WINDOW);
        let chunk = vec![b'y'; 60 * 1024];
        let mut killed = false;
        loop {
            while credit >= chunk.len() as u64 && !killed {
                fake.send(&Frame::data(id, channel::STDOUT, &chunk));
                credit -= chunk.len() as u64;
            }
            let f = fake.recv();
            match f.kind {
                FrameKind::Window => credit += u64::from(f.window_bytes().unwrap()),
                FrameKind::Ping => fake.send(&Frame::pong(f.nonce().unwrap())),
                FrameKind::Control => {
                    killed = f.parse::<Control>().unwrap()
                        == Control::Signal {
                            signal: libc::SIGKILL,
                        };
                }
                FrameKind::Reset => return killed && f.stream == id,
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    let before = rss_bytes();
    let handle = client.exec(ExecRequest::new(["yes"])).unwrap();
    let err = within(Duration::from_secs(10), "capped output", || {
        handle.output().unwrap_err()
    });
    assert!(
        matches!(err, ClientError::OutputTooLarge { limit } if limit == 4 << 20),
        "{err}"
    );
    assert!(err.to_string().contains("next_event"), "{err}");
    assert!(
        feeder.join().unwrap(),
        "the host killed the process, then detached"
    );
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 32 << 20, "memory grew by {grown} bytes");
}

#[test]
fn a_consumer_that_streams_is_not_capped_and_memory_stays_bounded() {
    let (client, mut fake) = connect(quick_options());
    const TOTAL: u64 = 256 << 20;
    let feeder = std::thread::spawn(move || {
        let id = fake.start_exec();
        let mut credit = u64::from(DEFAULT_HOST_WINDOW);
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while sent < TOTAL {
            while credit >= chunk.len() as u64 && sent < TOTAL {
                fake.send(&Frame::data(id, channel::STDOUT, &chunk));
                credit -= chunk.len() as u64;
                sent += chunk.len() as u64;
            }
            let f = fake.expect(FrameKind::Window);
            credit += u64::from(f.window_bytes().unwrap());
        }
        let status = ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
        };
        fake.send(&Frame::json(FrameKind::End, id, &status));
        fake
    });
    let before = rss_bytes();
    let mut handle = client.exec(ExecRequest::new(["cat", "/dev/zero"])).unwrap();
    let mut got = 0u64;
    let mut peak = 0;
    loop {
        match handle.next_event().unwrap() {
            Some(ExecEvent::Stdout(d)) => got += d.len() as u64,
            Some(ExecEvent::Exit(status)) => {
                assert!(status.success());
                break;
            }
            other => panic!("{other:?}"),
        }
        if got.is_multiple_of(16 << 20) {
            peak = peak.max(rss_bytes().saturating_sub(before));
        }
    }
    assert_eq!(got, TOTAL);
    assert!(peak < 32 << 20, "memory grew by {peak} bytes");
    drop(feeder.join().unwrap());
}

#[test]
fn an_agent_that_ignores_the_window_loses_the_connection() {
    let (client, mut fake) = connect(quick_options());
    let feeder = std::thread::spawn(move || {
        let id = fake.start_exec();
        let chunk = vec![1u8; 64 * 1024];
        // Twice the window, never waiting for a grant.
        for _ in 0..(2 * DEFAULT_HOST_WINDOW as usize / chunk.len()) {
            let frame = Frame::data(id, channel::STDOUT, &chunk).encode().unwrap();
            if fake.sock.write_all(&frame).is_err() {
                break;
            }
        }
        fake
    });
    let handle = client.exec(ExecRequest::new(["flood"])).unwrap();
    // Not reading: the buffer fills to the window, then the connection
    // breaks rather than grow.
    std::thread::sleep(Duration::from_millis(300));
    let err = within(Duration::from_secs(5), "window violation", || {
        handle.output().unwrap_err()
    });
    assert!(err.to_string().contains("beyond the"), "{err}");
    assert!(matches!(client.check_alive(), Err(ClientError::Lost(_))));
    drop(feeder.join().unwrap());
}

#[test]
fn no_exit_after_the_commands_timeout_fails_after_the_grace_period() {
    let (client, mut fake) = connect(quick_options());
    let before = rss_bytes();
    let agent = std::thread::spawn(move || {
        fake.start_exec();
        // Answers pings, sends nothing else, for 5 s.
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Some(f) = fake.recv_within(Duration::from_millis(100)) {
                if f.kind == FrameKind::Ping {
                    fake.send(&Frame::pong(f.nonce().unwrap()));
                }
            }
        }
    });
    let request = ExecRequest {
        timeout_ms: Some(500),
        ..ExecRequest::new(["sleep", "1000"])
    };
    let handle = client.exec(request).unwrap();
    let err = within(Duration::from_secs(3), "overdue exec", || {
        handle.output().unwrap_err()
    });
    assert!(matches!(err, ClientError::Overdue { .. }), "{err}");
    assert!(err.is_no_answer());
    assert!(rss_bytes().saturating_sub(before) < 8 << 20);
    agent.join().unwrap();
}

#[test]
fn an_agent_that_stops_answering_pings_is_unresponsive() {
    let (client, mut fake) = connect(quick_options());
    let agent = std::thread::spawn(move || {
        fake.start_exec();
        // Reads everything, answers nothing.
        while fake.recv_within(Duration::from_secs(4)).is_some() {}
    });
    let mut handle = client.exec(ExecRequest::new(["sleep", "1000"])).unwrap();
    let err = within(Duration::from_secs(3), "keepalive", || {
        handle.next_event().unwrap_err()
    });
    assert!(matches!(err, ClientError::Unresponsive(_)), "{err}");
    assert!(err.to_string().contains("keepalive"), "{err}");
    // Everything after fails at once with the same reason.
    let err = within(
        Duration::from_millis(200),
        "exec on a lost connection",
        || client.exec(ExecRequest::new(["true"])).unwrap_err(),
    );
    assert!(err.is_no_answer(), "{err}");
    drop(handle);
    agent.join().unwrap();
}

#[test]
fn a_drip_fed_hello_fails_by_the_deadline() {
    let (host, mut agent) = UnixStream::pair().unwrap();
    let dripper = std::thread::spawn(move || {
        // A 256 KiB frame, then one byte every 50 ms.
        let _ = agent.write_all(&(256u32 << 10).to_le_bytes());
        let _ = agent.write_all(&[FrameKind::Hello as u8, 0, 0, 0, 0]);
        for _ in 0..100 {
            if agent.write_all(b"{").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let err = within(Duration::from_millis(1500), "drip-fed hello", || {
        AgentClient::connect(host, Instant::now() + Duration::from_secs(1)).err()
    })
    .expect("the handshake cannot succeed");
    assert!(matches!(err, ClientError::NoHello), "{err}");
    dripper.join().unwrap();
}

#[test]
fn a_frame_dripped_mid_session_loses_the_connection() {
    let (client, mut fake) = connect(quick_options());
    let before = rss_bytes();
    let dripper = std::thread::spawn(move || {
        let id = fake.start_exec();
        fake.drip_half_a_frame(id);
    });
    let mut handle = client.exec(ExecRequest::new(["x"])).unwrap();
    let err = within(Duration::from_secs(3), "dripped frame", || {
        handle.next_event().unwrap_err()
    });
    assert!(err.is_no_answer(), "{err}");
    assert!(rss_bytes().saturating_sub(before) < 8 << 20);
    drop(handle);
    drop(client);
    dripper.join().unwrap();
}

/// With nothing in flight the client sends no pings, so only the
/// whole-frame deadline can notice a frame that never ends.
#[test]
fn a_frame_dripped_to_an_idle_client_hits_the_frame_deadline() {
    let options = ClientOptions {
        keepalive_interval: Duration::from_secs(600),
        ..quick_options()
    };
    let (client, mut fake) = connect(options);
    let dripper = std::thread::spawn(move || {
        fake.drip_half_a_frame(1);
    });
    let err = lost_within(&client, Duration::from_secs(3), "dripped frame, idle");
    assert!(
        err.to_string().contains("in the middle of a frame"),
        "{err}"
    );
    drop(client);
    dripper.join().unwrap();
}

#[test]
fn three_hundred_unread_frames_then_drop_returns_at_once() {
    let (client, mut fake) = connect(quick_options());
    let before = rss_bytes();
    let (handle, id) = exec_answered(&client, &mut fake);
    for i in 0..300u32 {
        fake.send(&Frame::data(
            id,
            channel::STDOUT,
            &i.to_le_bytes().repeat(256),
        ));
    }
    // Nobody read any of it; what the client holds stays small.
    std::thread::sleep(Duration::from_millis(200));
    assert!(rss_bytes().saturating_sub(before) < 8 << 20);
    within(Duration::from_secs(2), "dropping handle and client", || {
        drop(handle);
        drop(client);
    });
    // The agent heard the stream was reset, then the connection close.
    let reset = fake.expect(FrameKind::Reset);
    assert_eq!(reset.stream, id);
    assert!(fake.recv_within(Duration::from_secs(2)).is_none());
}

/// Starts an exec with the fake answering it on this thread.
fn exec_answered(client: &AgentClient, fake: &mut Fake) -> (guest_agent::ExecHandle, u32) {
    std::thread::scope(|scope| {
        let exec = scope.spawn(|| client.exec(ExecRequest::new(["flood"])).unwrap());
        let id = fake.start_exec();
        (exec.join().unwrap(), id)
    })
}

#[test]
fn a_frame_for_a_stream_never_opened_is_a_clear_error() {
    let (client, mut fake) = connect(quick_options());
    let before = rss_bytes();
    let waiter = std::thread::spawn(move || {
        fake.start_exec();
        fake.send(&Frame::data(77, channel::STDOUT, b"hi"));
        fake
    });
    let mut handle = client.exec(ExecRequest::new(["x"])).unwrap();
    let err = within(Duration::from_secs(2), "unknown stream", || {
        handle.next_event().unwrap_err()
    });
    assert!(
        err.to_string()
            .contains("stream 77, which was never opened"),
        "{err}"
    );
    assert!(rss_bytes().saturating_sub(before) < 8 << 20);
    drop(waiter.join().unwrap());
}

#[test]
fn a_giant_declared_length_is_refused_before_allocating() {
    let (client, mut fake) = connect(quick_options());
    let before = rss_bytes();
    let mut frame = u32::MAX.to_le_bytes().to_vec();
    frame.extend_from_slice(&[FrameKind::Data as u8, 1, 0, 0, 0]);
    fake.sock.write_all(&frame).unwrap();
    let err = lost_within(&client, Duration::from_secs(2), "giant length");
    assert!(err.to_string().contains("frame length 4294967295"), "{err}");
    assert!(rss_bytes().saturating_sub(before) < 8 << 20);
}

#[test]
fn garbage_json_in_a_reply_is_a_clear_error() {
    let (client, mut fake) = connect(quick_options());
    let before = rss_bytes();
    let agent = std::thread::spawn(move || {
        let open = fake.expect(FrameKind::Open);
        fake.send(&Frame::new(
            FrameKind::Reply,
            open.stream,
            b"{\"reply\": started".to_vec(),
        ));
        fake
    });
    let err = within(Duration::from_secs(2), "garbage reply", || {
        client.exec(ExecRequest::new(["x"])).err().unwrap()
    });
    assert!(err.to_string().contains("malformed Reply payload"), "{err}");
    assert!(rss_bytes().saturating_sub(before) < 8 << 20);
    drop(agent.join().unwrap());
}

#[test]
fn an_agent_of_another_version_is_named() {
    let (host, mut agent) = UnixStream::pair().unwrap();
    let old = serde_json::json!({"protocol": 1, "software": "capsule-agent 0.0.1"});
    Frame::json(FrameKind::Hello, 0, &old)
        .write_to(&mut agent)
        .unwrap();
    let err = AgentClient::connect(host, Instant::now() + Duration::from_secs(2))
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(
        text.contains("version 1") && text.contains("version 2"),
        "{text}"
    );
}

#[test]
fn an_agent_that_stops_reading_cannot_stall_writes() {
    let (host, agent) = UnixStream::pair().unwrap();
    let mut fake = Fake {
        reader: FrameReader::new(agent.try_clone().unwrap()),
        sock: agent,
    };
    // The largest window there is, so the host sends plenty of stdin.
    fake.send(&Frame::json(FrameKind::Hello, 0, &agent_hello(MAX_WINDOW)));
    let client = AgentClient::connect_with(
        host,
        Instant::now() + Duration::from_secs(5),
        quick_options(),
    )
    .unwrap();
    fake.recv();
    let (handle, _) = exec_answered(&client, &mut fake);
    // From here the fake reads nothing.
    let writer = std::thread::spawn({
        let input = handle.input();
        move || input.write_stdin(&vec![0u8; MAX_WINDOW as usize])
    });
    let err = within(Duration::from_secs(4), "a write nobody reads", || loop {
        if let Err(e) = client.check_alive() {
            break e;
        }
        std::thread::sleep(Duration::from_millis(10));
    });
    assert!(err.is_no_answer(), "{err}");
    assert!(err.to_string().contains("stopped reading"), "{err}");
    let _ = writer.join().unwrap();
    within(Duration::from_secs(2), "dropping", || {
        drop(handle);
        drop(client);
    });
    drop(fake);
}

#[test]
fn a_request_without_a_reply_times_out() {
    let (client, mut fake) = connect(quick_options());
    let agent = std::thread::spawn(move || {
        fake.expect(FrameKind::Open);
        std::thread::sleep(Duration::from_secs(3));
        fake
    });
    let err = within(Duration::from_secs(3), "unanswered request", || {
        client
            .restored(Default::default(), Duration::from_millis(500))
            .unwrap_err()
    });
    assert!(matches!(err, ClientError::Timeout), "{err}");
    drop(agent.join().unwrap());
}
