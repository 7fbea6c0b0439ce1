//! The agent's connection code against the real host client over a
//! socketpair, running real processes on this machine: one stream's
//! trouble (output nobody reads, stdin nobody reads, a stopped process)
//! never holds up another or the signals that end it.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use guest_agent::{AgentClient, ClientError, ExecEvent, ExecRequest};

pub(crate) fn connect() -> AgentClient {
    let (host, agent) = UnixStream::pair().unwrap();
    let agent = std::fs::File::from(OwnedFd::from(agent));
    std::thread::spawn(move || crate::conn::serve(agent));
    AgentClient::connect(host, Instant::now() + Duration::from_secs(5)).unwrap()
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

/// Another exec on the same connection answers at once.
fn still_answers(client: &AgentClient) {
    let t = Instant::now();
    let out = client.exec(sh("echo alive")).unwrap().output().unwrap();
    assert_eq!(out.stdout, b"alive\n");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    client.ping(Duration::from_secs(5)).unwrap();
}

#[test]
fn a_process_that_never_reads_stdin_can_still_be_signalled() {
    let client = connect();
    let handle = client
        .exec(ExecRequest {
            stdin: true,
            ..sh("sleep 60")
        })
        .unwrap();
    // Far more than the agent's window and the pipe hold: the writer
    // waits for credit that never comes.
    let input = handle.input();
    let writer = std::thread::spawn(move || input.write_stdin(&vec![b'k'; 4 << 20]));
    std::thread::sleep(Duration::from_millis(300));
    still_answers(&client);
    handle.signal(libc::SIGKILL).unwrap();
    let out = handle.output().unwrap();
    assert_eq!(out.status.signal, Some(libc::SIGKILL));
    // The blocked writer is released once the stream ends.
    let written = writer.join().unwrap();
    assert!(written.is_err(), "{written:?}");
    still_answers(&client);
}

#[test]
fn output_nobody_reads_stops_only_its_own_process() {
    let client = connect();
    let flood = client.exec(ExecRequest::new(["yes"])).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        still_answers(&client);
    }
    // Dropping the handle detaches: `yes` runs on, its output dropped,
    // and the connection is none the worse.
    let pid = flood.pid();
    drop(flood);
    still_answers(&client);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "a detached process runs on"
    );
    let killed = client
        .exec(ExecRequest::new(vec![
            "kill".to_string(),
            "-9".into(),
            pid.to_string(),
        ]))
        .unwrap()
        .output()
        .unwrap();
    assert!(killed.status.success());
}

#[test]
fn a_stopped_process_holds_up_nothing() {
    let client = connect();
    let mut looper = client.exec(sh("while :; do echo x; done")).unwrap();
    let mut got = 0;
    while got < 10_000 {
        match looper.next_event().unwrap() {
            Some(ExecEvent::Stdout(d)) => got += d.len(),
            other => panic!("{other:?}"),
        }
    }
    looper.signal(libc::SIGSTOP).unwrap();
    still_answers(&client);
    looper.signal(libc::SIGCONT).unwrap();
    let mut more = 0;
    while more < 10_000 {
        if let Some(ExecEvent::Stdout(d)) = looper.next_event().unwrap() {
            more += d.len();
        }
    }
    looper.signal(libc::SIGKILL).unwrap();
    let status = loop {
        match looper.next_event().unwrap() {
            Some(ExecEvent::Exit(status)) => break status,
            Some(_) => {}
            None => panic!("no exit status"),
        }
    };
    assert_eq!(status.signal, Some(libc::SIGKILL));
    still_answers(&client);
}

#[test]
fn stdin_flows_both_ways_and_a_closed_stdin_is_reported() {
    let client = connect();
    // (Processes here are reaped by the agent's reaper, so the test
    // cannot run any of its own.)
    // stdin in, stdout out, both far beyond every window, at once.
    let cat = client
        .exec(ExecRequest {
            stdin: true,
            ..ExecRequest::new(["cat"])
        })
        .unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let input = cat.input();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        input.write_stdin(&sent)?;
        input.close_stdin()
    });
    let out = cat.output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    assert!(
        out.stdout == data,
        "cat gave back {} bytes",
        out.stdout.len()
    );

    // A process that reads a little and closes stdin: the writer hears
    // so instead of waiting for credit forever.
    let head = client
        .exec(ExecRequest {
            stdin: true,
            ..sh("head -c 10 >/dev/null; exec 0<&-; sleep 2")
        })
        .unwrap();
    let t = Instant::now();
    let err = head.write_stdin(&vec![0u8; 8 << 20]).unwrap_err();
    assert!(matches!(err, ClientError::StdinClosed), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(head);
    still_answers(&client);
}

#[test]
fn a_command_timeout_is_enforced_by_the_agent() {
    let client = connect();
    let out = client
        .exec(ExecRequest {
            timeout_ms: Some(200),
            ..sh("sleep 30")
        })
        .unwrap()
        .output()
        .unwrap();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(libc::SIGKILL));
}
