//! Host tier: the daemon's HTTP API, driven with curl (a client nobody
//! here wrote) over its Unix socket, for everything that needs no guest:
//! errors and their codes, groups and quota refusals, the OpenAPI
//! document, the socket's privacy, the TCP listener's token, and state
//! surviving a SIGKILL of the daemon.

#[path = "common/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use daemon::Daemon;
use serde_json::{json, Value};

fn stand_in(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, b"not a kernel").unwrap();
    p
}

/// A daemon whose kernel and initramfs are stand-ins: enough for every
/// request that boots nothing.
fn start(extra: &[&str]) -> Daemon {
    let home = tempfile::tempdir().unwrap();
    let kernel = stand_in(home.path(), "vmlinux");
    let initramfs = stand_in(home.path(), "initramfs.cpio");
    Daemon::start_in(home, &kernel, &initramfs, extra)
}

/// Asserts an error answer: its status and its stable code, and a message.
fn refused(answer: (u16, Value), status: u16, code: &str) -> String {
    let (got, body) = answer;
    assert_eq!(got, status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    let message = body["message"].as_str().unwrap_or_default().to_string();
    assert!(!message.is_empty(), "{body}");
    message
}

#[test]
fn bad_requests_get_json_errors_with_a_stable_code() {
    let d = start(&[]);
    refused(
        d.call("GET", "/v1/sandboxes/sb-nope", None),
        404,
        "sandbox_not_found",
    );
    refused(d.call("GET", "/v2/nothing", None), 404, "not_found");
    refused(
        d.call("POST", "/v1/sandboxes", Some("{")),
        400,
        "bad_request",
    );
    refused(
        d.call("POST", "/v1/sandboxes", Some("[1]")),
        400,
        "bad_request",
    );
    let m = refused(
        d.call("POST", "/v1/sandboxes", Some(r#"{"bogus": 1}"#)),
        400,
        "bad_request",
    );
    assert!(m.contains("bogus"), "{m}");
    let m = refused(
        d.call("POST", "/v1/sandboxes", Some(r#"{"cpus": 0}"#)),
        400,
        "bad_request",
    );
    assert!(m.contains("cpus"), "{m}");
    let m = refused(
        d.call("POST", "/v1/sandboxes", Some(r#"{"memory_mib": 1}"#)),
        400,
        "bad_request",
    );
    assert!(m.contains("memory_mib"), "{m}");
    let m = refused(
        d.call("POST", "/v1/sandboxes", Some(r#"{"rootfs": "x.ext4"}"#)),
        400,
        "bad_request",
    );
    assert!(m.contains("absolute"), "{m}");
    let m = refused(
        d.call(
            "POST",
            "/v1/sandboxes",
            Some(r#"{"rootfs": "/nonexistent.ext4"}"#),
        ),
        404,
        "file_not_found",
    );
    assert!(m.contains("/nonexistent.ext4"), "{m}");
    let m = refused(
        d.call("POST", "/v1/sandboxes", Some(r#"{"labels": {"-x": "y"}}"#)),
        400,
        "bad_request",
    );
    assert!(m.contains("label key"), "{m}");
    let m = refused(
        d.call(
            "POST",
            "/v1/sandboxes",
            Some(r#"{"timeout_seconds": 99999999999}"#),
        ),
        400,
        "bad_request",
    );
    assert!(m.contains("timeout_seconds"), "{m}");
    let m = refused(
        d.call("POST", "/v1/sandboxes", Some(r#"{"group": "Team A"}"#)),
        400,
        "bad_request",
    );
    assert!(m.contains("group name"), "{m}");
    refused(
        d.call("POST", "/v1/sandboxes", Some(r#"{"group": "nope"}"#)),
        404,
        "group_not_found",
    );
    let m = refused(
        d.call("GET", "/v1/sandboxes?label_selector=a%20b", None),
        400,
        "bad_request",
    );
    assert!(m.contains("not a requirement"), "{m}");
    refused(
        d.call("GET", "/v1/sandboxes?state=weird", None),
        400,
        "bad_request",
    );
    refused(
        d.call("GET", "/v1/sandboxes?bogus=1", None),
        400,
        "bad_request",
    );
    refused(
        d.call(
            "POST",
            "/v1/sandboxes/sb-nope/exec",
            Some(r#"{"cmd": ["true"]}"#),
        ),
        404,
        "sandbox_not_found",
    );
    // What a request acts on is looked up first: an unknown sandbox is a
    // 404 whatever the body says.
    refused(
        d.call("POST", "/v1/sandboxes/sb-nope/exec", Some(r#"{"cmd": []}"#)),
        404,
        "sandbox_not_found",
    );
    refused(
        d.call(
            "POST",
            "/v1/sandboxes",
            Some(r#"{"cpus": 2.0, "memory_mib": 1.5}"#),
        ),
        400,
        "bad_request",
    );
    refused(
        d.call(
            "POST",
            "/v1/groups",
            Some(r#"{"name": "q", "quota": {"max_vcpus": 2000000}}"#),
        ),
        400,
        "bad_request",
    );
    refused(
        d.call("GET", "/v1/events?limit=1001", None),
        400,
        "bad_request",
    );
    refused(
        d.call("DELETE", "/v1/sandboxes/sb-nope", None),
        404,
        "sandbox_not_found",
    );
    refused(
        d.call("PATCH", "/v1/sandboxes/sb-nope", Some(r#"{"labels": {}}"#)),
        404,
        "sandbox_not_found",
    );
    refused(
        d.call(
            "POST",
            "/v1/sandboxes/sb-nope/timeout",
            Some(r#"{"timeout_seconds": 5}"#),
        ),
        404,
        "sandbox_not_found",
    );
    refused(
        d.call("GET", "/v1/events?after=x", None),
        400,
        "bad_request",
    );
    for verb in ["suspend", "resume"] {
        let path = format!("/v1/sandboxes/sb-nope/{verb}");
        refused(d.call("POST", &path, None), 404, "sandbox_not_found");
    }
    // The daemon is still whole after all of that.
    assert_eq!(d.call("GET", "/v1/sandboxes", None), (200, json!([])));
}

#[test]
fn quota_refusals_leave_nothing_behind() {
    let d = start(&[]);
    let (status, group) = d.call(
        "POST",
        "/v1/groups",
        Some(r#"{"name": "team-a", "quota": {"max_sandboxes": 0, "max_vcpus": 64, "max_memory_mib": 65536}}"#),
    );
    assert_eq!(status, 201, "{group}");
    assert_eq!(group["quota"]["max_sandboxes"], 0);
    assert_eq!(group["usage"]["sandboxes"], 0);
    refused(
        d.call("POST", "/v1/groups", Some(r#"{"name": "team-a"}"#)),
        409,
        "conflict",
    );
    let m = refused(
        d.call("POST", "/v1/sandboxes", Some(r#"{"group": "team-a"}"#)),
        429,
        "quota_exceeded",
    );
    assert!(m.contains("at most 0 sandboxes"), "{m}");
    let (status, all) = d.call(
        "GET",
        "/v1/sandboxes?state=creating,running,suspended,ended",
        None,
    );
    assert_eq!((status, all), (200, json!([])));
    assert!(!d
        .home
        .path()
        .join("home/daemon/vms")
        .read_dir()
        .unwrap()
        .any(|_| true));
    let (_, events) = d.call("GET", "/v1/events", None);
    assert_eq!(events, json!([]));

    let (status, g) = d.call(
        "PUT",
        "/v1/groups/team-a/quota",
        Some(r#"{"max_vcpus": 0}"#),
    );
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["quota"]["max_sandboxes"], Value::Null);
    let m = refused(
        d.call("POST", "/v1/sandboxes", Some(r#"{"group": "team-a"}"#)),
        429,
        "quota_exceeded",
    );
    assert!(m.contains("vCPUs"), "{m}");
    refused(
        d.call("PUT", "/v1/groups/nope/quota", Some("{}")),
        404,
        "group_not_found",
    );
    refused(
        d.call("DELETE", "/v1/groups/default", None),
        409,
        "conflict",
    );
    assert_eq!(d.call("DELETE", "/v1/groups/team-a", None).0, 204);
    refused(
        d.call("GET", "/v1/groups/team-a", None),
        404,
        "group_not_found",
    );

    // The same through the CLI, which goes through the API.
    let (code, out, err) = d.capsule(&[
        "group",
        "create",
        "team-b",
        "--max-sandboxes",
        "1",
        "--max-memory",
        "64G",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let g: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(g["quota"]["max_memory_mib"], 65536);
    let (code, out, _) = d.capsule(&["group", "ls"]);
    assert_eq!(code, 0);
    assert!(out.contains("team-b") && out.contains("0/1"), "{out}");
    let (code, _, err) = d.capsule(&["sandbox", "get", "sb-nope"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no sandbox") && err.contains("sandbox_not_found"),
        "{err}"
    );
    let (code, out, _) = d.capsule(&["sandbox", "ls", "--json"]);
    assert_eq!((code, out.trim()), (0, "[]"));
}

#[test]
fn the_openapi_document_is_served_as_checked_in() {
    let d = start(&[]);
    let (status, served) = d.call("GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let checked_in: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(served, checked_in);
    assert!(served["paths"]["/v1/sandboxes/{id}/exec"].is_object());
}

#[test]
fn the_socket_is_private_and_one_daemon_serves_a_home() {
    let d = start(&[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = d
        .serve_command(&[])
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serving"), "{err}");
    // The refused second daemon left the first one's socket alone.
    assert_eq!(d.call("GET", "/v1/groups", None).0, 200);
}

#[test]
fn state_survives_a_sigkill_of_the_daemon() {
    let mut d = start(&[]);
    assert_eq!(
        d.call(
            "POST",
            "/v1/groups",
            Some(r#"{"name": "kept", "quota": {"max_vcpus": 3}}"#)
        )
        .0,
        201
    );
    d.kill();
    d.restart(&[]);
    let (status, g) = d.call("GET", "/v1/groups/kept", None);
    assert_eq!(status, 200, "{g}");
    assert_eq!(g["quota"]["max_vcpus"], 3);
}

#[test]
fn the_tcp_listener_needs_the_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tokdir = tempfile::tempdir().unwrap();
    let token_file = tokdir.path().join("token");
    let addr = format!("127.0.0.1:{port}");
    let d = start(&[
        "--listen",
        &addr,
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(token.len() >= 32);
    let curl = |auth: Option<&str>| {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let mut cmd = Command::new("curl");
            cmd.args([
                "-s",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ]);
            if let Some(a) = auth {
                cmd.args(["-H", &format!("authorization: {a}")]);
            }
            let out = cmd
                .arg(format!("http://{addr}/v1/groups"))
                .output()
                .unwrap();
            let code = String::from_utf8_lossy(&out.stdout).to_string();
            if code != "000" || Instant::now() > end {
                return code;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(curl(None), "401");
    assert_eq!(curl(Some("Bearer wrong")), "401");
    assert_eq!(curl(Some(&format!("Bearer {token}"))), "200");
    drop(d);
}

#[test]
fn secrets_go_in_and_never_come_out() {
    let d = start(&[]);
    let value = "s3cr3t-value-7f1d";
    let (status, body) = d.call(
        "PUT",
        "/v1/groups/default/secrets/API_KEY",
        Some(&format!(r#"{{"value": "{value}"}}"#)),
    );
    assert_eq!(status, 204, "{body}");
    let (status, list) = d.call("GET", "/v1/groups/default/secrets", None);
    assert_eq!(status, 200);
    assert_eq!(list[0]["name"], "API_KEY");
    assert!(!list.to_string().contains(value), "{list}");
    refused(
        d.call(
            "PUT",
            "/v1/groups/default/secrets/1BAD",
            Some(r#"{"value": "x"}"#),
        ),
        400,
        "bad_request",
    );
    refused(
        d.call(
            "PUT",
            "/v1/groups/nope/secrets/API_KEY",
            Some(r#"{"value": "x"}"#),
        ),
        404,
        "group_not_found",
    );
    refused(
        d.call("GET", "/v1/groups/nope/secrets", None),
        404,
        "group_not_found",
    );
    let big = format!(r#"{{"value": "{}"}}"#, "x".repeat(70_000));
    refused(
        d.call("PUT", "/v1/groups/default/secrets/BIG", Some(&big)),
        400,
        "bad_request",
    );
    let m = refused(
        d.call("POST", "/v1/sandboxes", Some(r#"{"secrets": ["MISSING"]}"#)),
        404,
        "secret_not_found",
    );
    assert!(m.contains("MISSING"), "{m}");
    refused(
        d.call("DELETE", "/v1/groups/default/secrets/MISSING", None),
        404,
        "secret_not_found",
    );

    // Through the CLI: the value from stdin.
    let out = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["secret", "set", "default", "PIPED"])
        .env("CAPSULE_HOME", d.capsule_home())
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"piped-value-91c\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, listed, _) = d.capsule(&["secret", "ls", "default", "--json"]);
    assert_eq!(code, 0);
    assert!(
        listed.contains("PIPED") && !listed.contains("piped-value"),
        "{listed}"
    );

    // Sealed at rest: neither value is in the database or the log.
    let daemon_dir = d.capsule_home().join("daemon");
    for entry in std::fs::read_dir(&daemon_dir).unwrap().flatten() {
        if entry.path().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            for secret in [value.as_bytes(), b"piped-value-91c"] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret),
                    "a secret in plain text in {}",
                    entry.path().display()
                );
            }
        }
    }
    let log = d.log();
    assert!(
        !log.contains(value) && !log.contains("piped-value"),
        "{log}"
    );
    assert_eq!(
        d.call("DELETE", "/v1/groups/default/secrets/API_KEY", None)
            .0,
        204
    );
    // A group's secrets go with it.
    assert_eq!(
        d.call("POST", "/v1/groups", Some(r#"{"name": "g"}"#)).0,
        201
    );
    let set = d.call("PUT", "/v1/groups/g/secrets/K", Some(r#"{"value": "v"}"#));
    assert_eq!(set.0, 204);
    assert_eq!(d.call("DELETE", "/v1/groups/g", None).0, 204);
    assert_eq!(
        d.call("POST", "/v1/groups", Some(r#"{"name": "g"}"#)).0,
        201
    );
    let (_, listed) = d.call("GET", "/v1/groups/g/secrets", None);
    assert_eq!(
        listed,
        json!([]),
        "a new group of the same name starts empty"
    );
}

#[test]
fn metrics_and_stats_answer_without_sandboxes() {
    let d = start(&[]);
    let (status, text) = d.call("GET", "/metrics", None);
    assert_eq!(status, 200);
    let text = text.as_str().expect("OpenMetrics text").to_string();
    for line in [
        "# TYPE capsule_sandboxes gauge",
        "capsule_sandboxes{state=\"running\"} 0",
        "capsule_sandboxes{state=\"ended\"} 0",
        "# TYPE capsule_sandbox_create_seconds histogram",
        "capsule_sandbox_create_seconds_count{source=\"pool\"} 0",
        "capsule_sandbox_create_seconds_count{source=\"boot\"} 0",
        "# TYPE capsule_sandbox_resume_seconds histogram",
        "# EOF",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    refused(
        d.call("GET", "/v1/sandboxes/sb-nosuchsandbox00/stats", None),
        404,
        "sandbox_not_found",
    );
    let (code, _, err) = d.capsule(&["sandbox", "stats", "sb-nosuchsandbox00"]);
    assert_eq!(code, 3, "{err}");
}

/// The statuses docs/API.md promises scripts, one per kind of refusal.
#[test]
fn the_cli_exits_with_a_status_for_each_kind_of_refusal() {
    let d = start(&[]);
    let run = |args: &[&str]| {
        let (code, _, err) = d.capsule(args);
        (code, err)
    };
    assert_eq!(run(&["group", "create", "team-a"]).0, 0);
    // 400: a name the API refuses.
    let (code, err) = run(&["group", "create", "Bad Name"]);
    assert_eq!(code, 2, "{err}");
    // 404
    let (code, err) = run(&["sandbox", "get", "sb-nosuchsandbox00"]);
    assert_eq!(code, 3, "{err}");
    // 409: it exists already.
    let (code, err) = run(&["group", "create", "team-a"]);
    assert_eq!(code, 4, "{err}");
    // 429: the host's limit is 0 in this test's daemon? Not here: a quota.
    assert_eq!(
        run(&["group", "create", "none", "--max-sandboxes", "0"]).0,
        0
    );
    let (code, err) = run(&["sandbox", "create", "--group", "none"]);
    assert_eq!(code, 5, "{err}");
    // Deletes say what went, with --json.
    let (code, out, err) = d.capsule(&["group", "rm", "none", "--json"]);
    assert_eq!(code, 0, "{err}");
    let said: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(said, json!({ "deleted": { "group": "none" } }));
    // clap's own: an unknown flag.
    assert_eq!(run(&["sandbox", "ls", "--no-such-flag"]).0, 2);
    // No daemon.
    let out = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["sandbox", "ls"])
        .env("CAPSULE_HOME", d.home.path().join("elsewhere"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shell_completion_scripts_name_the_commands() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef capsule"),
        ("fish", "complete -c capsule"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_capsule"))
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        assert!(script.contains("sandbox"), "{shell}: no sandbox command");
    }
}

#[test]
fn the_json_log_is_one_object_per_line() {
    let d = start(&["--log-format", "json"]);
    assert_eq!(
        d.call("POST", "/v1/groups", Some(r#"{"name": "logged"}"#))
            .0,
        201
    );
    let log = d.log();
    assert!(log.contains("serving the API"), "{log}");
    for line in log.lines() {
        let event: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(
            event["level"].is_string() && event["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// curl through the preview gateway with `host` as the Host header:
/// status and JSON body.
fn preview(gateway: u16, host: &str) -> (u16, Value) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "-w", "\n%{http_code}", "-H"])
        .arg(format!("Host: {host}"))
        .arg(format!("http://127.0.0.1:{gateway}/index.html"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", ""));
    (
        status.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[test]
fn the_preview_gateway_refuses_what_it_cannot_route_with_the_reason() {
    let gateway = free_port();
    let d = start(&["--gateway", &format!("127.0.0.1:{gateway}")]);
    let msg = refused(preview(gateway, "example.com"), 404, "not_a_preview");
    assert!(msg.contains("<port>-<sandbox id>.localhost"), "{msg}");
    refused(preview(gateway, "8000.localhost"), 404, "not_a_preview");
    let msg = refused(
        preview(
            gateway,
            &format!("8000-sb-nosuchsandbox00.localhost:{gateway}"),
        ),
        404,
        "sandbox_not_found",
    );
    assert!(msg.contains("sb-nosuchsandbox00"), "{msg}");
    // Not HTTP at all, and a head past the bound.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", gateway)).unwrap();
    use std::io::{Read, Write};
    raw.write_all(b"\x16\x03\x01 hello\r\n\r\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", gateway)).unwrap();
    let long = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n", "a".repeat(20 << 10));
    let _ = raw.write_all(long.as_bytes());
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    // The daemon's API still answers.
    let (status, _) = d.call("GET", "/v1/sandboxes", None);
    assert_eq!(status, 200);
}

#[test]
fn ports_and_terminals_of_a_missing_sandbox_are_not_found() {
    let d = start(&[]);
    let missing = "/v1/sandboxes/sb-nosuchsandbox00";
    refused(
        d.call(
            "POST",
            &format!("{missing}/ports"),
            Some(r#"{"port": 8000}"#),
        ),
        404,
        "sandbox_not_found",
    );
    refused(
        d.call("GET", &format!("{missing}/ports"), None),
        404,
        "sandbox_not_found",
    );
    refused(
        d.call("DELETE", &format!("{missing}/ports/8000"), None),
        404,
        "sandbox_not_found",
    );
    refused(
        d.call("GET", &format!("{missing}/pty"), None),
        404,
        "sandbox_not_found",
    );
    let (code, _, err) = d.capsule(&["port", "sb-nosuchsandbox00", "8000"]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = d.capsule(&["shell", "sb-nosuchsandbox00"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("sandbox_not_found"), "{err}");
}
