//! Execs on a real terminal of this machine through the agent's
//! connection code: the size the program sees and its changes, Ctrl-C
//! reaching the foreground job and not the shell, keystrokes after an
//! Eof, the session's end, and a host that detaches hanging it up.

use std::time::{Duration, Instant};

use guest_agent::{ClientError, ExecEvent, ExecHandle, ExecRequest, TerminalSize};

use crate::tests::connect;

fn shell(cols: u16, rows: u16) -> ExecRequest {
    ExecRequest {
        pty: Some(TerminalSize { cols, rows }),
        // No rc files, no history: the same prompt everywhere.
        env: vec![("PS1".into(), "$ ".into()), ("ENV".into(), "".into())],
        ..ExecRequest::new(["sh", "-i"])
    }
}

/// Reads the terminal until `want` has appeared after everything seen so
/// far, within 10 s; returns what was read.
fn read_until(handle: &mut ExecHandle, seen: &mut String, want: &str) -> String {
    let start = seen.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen[start..].contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match handle.next_event_timeout(left) {
            Ok(Some(ExecEvent::Stdout(d))) => seen.push_str(&String::from_utf8_lossy(&d)),
            Ok(Some(ExecEvent::Stderr(d))) => panic!("a terminal has no stderr: {d:?}"),
            other => panic!("waiting for {want:?} after {:?}: {other:?}", &seen[start..]),
        }
    }
    seen[start..].to_string()
}

#[test]
fn a_shell_on_a_terminal_sees_its_size_change_and_ctrl_c_stops_only_the_job() {
    let client = crate::tests::connect();
    let mut sh = client.exec(shell(80, 24)).unwrap();
    let mut seen = String::new();
    read_until(&mut sh, &mut seen, "$ ");
    sh.write_stdin(b"stty size; tty\n").unwrap();
    let out = read_until(&mut sh, &mut seen, "$ ");
    assert!(out.contains("24 80"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "{out:?}");

    sh.resize(TerminalSize {
        cols: 132,
        rows: 43,
    })
    .unwrap();
    sh.write_stdin(b"stty size\n").unwrap();
    let out = read_until(&mut sh, &mut seen, "$ ");
    assert!(out.contains("43 132"), "{out:?}");

    // The terminal turns 0x03 into SIGINT for the foreground job only:
    // the shell lives on and says how the job ended.
    sh.write_stdin(b"sleep 30\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    sh.write_stdin(b"\x03").unwrap();
    read_until(&mut sh, &mut seen, "$ ");
    assert!(t.elapsed() < Duration::from_secs(10));
    // An Eof changes nothing: keystrokes still arrive after it.
    sh.close_stdin().unwrap();
    sh.write_stdin(b"echo status=$?\n").unwrap();
    let out = read_until(&mut sh, &mut seen, "$ ");
    assert!(out.contains("status=130"), "{out:?}");

    sh.write_stdin(b"exit 7\n").unwrap();
    let status = loop {
        match sh.next_event_timeout(Duration::from_secs(10)).unwrap() {
            Some(ExecEvent::Exit(status)) => break status,
            Some(_) => {}
            None => panic!("no exit status"),
        }
    };
    assert_eq!(status.code, Some(7));
}

#[test]
fn a_session_ends_with_its_leader_even_if_a_background_job_holds_the_terminal() {
    let client = connect();
    let request = ExecRequest {
        pty: Some(TerminalSize { cols: 80, rows: 24 }),
        ..ExecRequest::new(["sh", "-c", "sleep 30 & echo started; exit 0"])
    };
    let t = Instant::now();
    let out = client.exec(request).unwrap().output().unwrap();
    assert_eq!(out.status.code, Some(0));
    // The terminal turns "\n" into "\r\n".
    assert_eq!(out.stdout, b"started\r\n");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn a_host_that_detaches_from_a_terminal_hangs_its_session_up() {
    let client = connect();
    let marker = format!("/tmp/capsule-hangup-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    let script =
        format!("trap 'echo hup > {marker}; exit 1' HUP; echo ready; while :; do sleep 0.1; done");
    let mut handle = client
        .exec(ExecRequest {
            pty: Some(TerminalSize { cols: 80, rows: 24 }),
            ..ExecRequest::new(["sh", "-c", &script])
        })
        .unwrap();
    let mut seen = String::new();
    read_until(&mut handle, &mut seen, "ready");
    drop(handle);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::path::Path::new(&marker).exists() {
        assert!(Instant::now() < deadline, "the session was not hung up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&marker);
}

#[test]
fn a_terminal_of_no_size_or_a_huge_one_is_refused() {
    let client = connect();
    for (cols, rows) in [(0, 24), (80, 0), (5000, 24)] {
        let request = ExecRequest {
            pty: Some(TerminalSize { cols, rows }),
            ..ExecRequest::new(["true"])
        };
        match client.exec(request) {
            Err(ClientError::Refused { message, .. }) => {
                assert!(message.contains("terminal"), "{message}")
            }
            other => panic!("{cols}x{rows}: {other:?}"),
        }
    }
    let sh = client.exec(shell(80, 24)).unwrap();
    assert!(sh.resize(TerminalSize { cols: 0, rows: 1 }).is_err());
    sh.kill().unwrap();
}
