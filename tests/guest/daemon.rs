//! The daemon end to end with real guests, over its HTTP API (curl) and
//! the CLI: create, label selectors, streamed exec with exit status,
//! timeout expiry with its reason, a VMM child killed with SIGKILL, the
//! daemon killed with SIGKILL and restarted (its sandboxes adopted), and
//! delete releasing everything.

use std::process::Command;

use serde_json::Value;

use super::*;

#[path = "../common/daemon.rs"]
mod fixture;

pub(super) use fixture::Daemon;

pub(super) fn start() -> Daemon {
    let home = tempfile::tempdir().unwrap();
    Daemon::start_in(
        home,
        &artifact("CAPSULE_KERNEL"),
        &artifact("CAPSULE_INITRAMFS"),
        &[],
    )
}

/// A daemon-made VM that the nested test host reset or stalled before it
/// said a word is the test host's doing, as for the library's guests
/// (`ready_ok`): the test ends with the status scripts/test-guest.sh
/// retries. Anything else is left to the caller's assertions.
fn not_the_test_hosts_doing(status: u16, body: &Value) {
    let message = body["message"].as_str().unwrap_or_default();
    if status != 500 {
        return;
    }
    let console = message
        .split("Last console lines:")
        .nth(1)
        .unwrap_or_default();
    if message.contains("(the guest reset)") && died_without_a_word(console) {
        end_test(
            GUEST_DIED_IN_TESTHOST,
            format_args!("a daemon's guest reset before it said a word: {message}"),
        );
    }
    if message.contains("did not become ready") && died_without_a_word(console) {
        end_test(
            GUEST_STALLED_IN_TESTHOST,
            format_args!("a daemon's guest stopped answering before it was ready: {message}"),
        );
    }
}

/// What a daemon sandbox's guest has printed on its console.
fn console_of(d: &Daemon, id: &str) -> String {
    std::fs::read_to_string(
        d.capsule_home()
            .join("daemon/vms")
            .join(id)
            .join("runtime/console.log"),
    )
    .unwrap_or_default()
}

/// A CLI command that failed because a daemon sandbox's guest stopped
/// answering a request, with nothing on its console, is the nested test
/// host's stall, as for the library's guests (`guest_ok_doing`): the test
/// ends with the status scripts/test-guest.sh retries. (The VM's own
/// stall report, which tells a VMM at fault, is not reachable through
/// the daemon.) Anything else is left to the caller's assertions.
fn not_a_stall_of_the_test_host(d: &Daemon, id: &str, err: &str) {
    if !(err.contains("guest_unavailable") && err.contains("timed out waiting for the agent")) {
        return;
    }
    let console = console_of(d, id);
    if died_without_a_word(&console) {
        end_test(
            GUEST_STALLED_IN_TESTHOST,
            format_args!(
                "{err}\na daemon's guest stopped answering without a word on its console; the \
                 nested test host stalls QEMU's guests this way too (docs/TESTING.md)"
            ),
        );
    }
}

pub(super) fn create(d: &Daemon, body: &str) -> String {
    let (status, s) = d.call("POST", "/v1/sandboxes", Some(body));
    not_the_test_hosts_doing(status, &s);
    assert_eq!(status, 201, "create {body}: {s}");
    assert_eq!(s["state"], "running", "{s}");
    s["id"].as_str().unwrap().to_string()
}

fn get(d: &Daemon, id: &str) -> Value {
    let (status, s) = d.call("GET", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, 200, "{s}");
    s
}

/// Waits for a sandbox to end; its record.
fn ended(d: &Daemon, id: &str, within: Duration) -> Value {
    let end = Instant::now() + within;
    loop {
        let s = get(d, id);
        if s["state"] == "ended" {
            return s;
        }
        assert!(
            Instant::now() < end,
            "sandbox {id} still {} after {within:?}",
            s["state"]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The exec stream's lines, as curl got them.
fn exec_lines(d: &Daemon, id: &str, body: &str) -> Vec<Value> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "-N",
            "--max-time",
            "120",
            "-H",
            "content-type: application/json",
        ])
        .arg("--unix-socket")
        .arg(d.socket())
        .args(["--data-binary", body])
        .arg(format!("http://capsule/v1/sandboxes/{id}/exec"))
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn decoded(lines: &[Value], kind: &str) -> String {
    use base64::Engine;
    lines
        .iter()
        .filter(|l| l["type"] == kind)
        .map(|l| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(l["data"].as_str().unwrap())
                .unwrap();
            String::from_utf8(bytes).unwrap()
        })
        .collect()
}

/// The `capsule-vmm` process whose working directory is this sandbox's.
fn vmm_pid(d: &Daemon, id: &str) -> i32 {
    let runtime = d.capsule_home().join("daemon/vms").join(id).join("runtime");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd == runtime) {
            return pid;
        }
    }
    panic!("no capsule-vmm process runs sandbox {id}");
}

fn alive(pid: i32) -> bool {
    // A zombie has ended too.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn the_daemon_runs_sandboxes_through_their_whole_life() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let mut d = start();
    let rootfs = artifact("CAPSULE_ROOTFS");
    // Someone following the event stream from the start, with curl.
    let follower = Command::new("curl")
        .args(["-s", "-N", "--max-time", "250"])
        .arg("--unix-socket")
        .arg(d.socket())
        .arg("http://capsule/v1/events/stream")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let secret = "guest-secret-4b9e";
    let (status, body) = d.call(
        "PUT",
        "/v1/groups/default/secrets/API_KEY",
        Some(&format!(r#"{{"value": "{secret}"}}"#)),
    );
    assert_eq!(status, 204, "{body}");
    let alice = create(
        &d,
        r#"{"labels": {"owner": "alice", "job": "42"}, "timeout_seconds": 600}"#,
    );
    let bob = create(
        &d,
        &format!(
            r#"{{"rootfs": "{}", "labels": {{"owner": "bob"}}, "memory_mib": 192, "secrets": ["API_KEY"]}}"#,
            rootfs.display()
        ),
    );

    // Label selectors.
    let (_, list) = d.call(
        "GET",
        "/v1/sandboxes?label_selector=owner%3Dalice%2Cjob!%3D7",
        None,
    );
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [alice.as_str()]);
    let (_, list) = d.call("GET", "/v1/sandboxes?label_selector=!job", None);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], bob.as_str());

    // Exec, streamed, with stdout, stderr, stdin and the exit status.
    let lines = exec_lines(
        &d,
        &alice,
        r#"{"cmd": ["sh", "-c", "cat; echo out; echo err >&2; exit 3"], "stdin": "in\n"}"#,
    );
    assert_eq!(lines[0]["type"], "started", "{lines:?}");
    assert_eq!(decoded(&lines, "stdout"), "in\nout\n");
    assert_eq!(decoded(&lines, "stderr"), "err\n");
    let last = lines.last().unwrap();
    assert_eq!(
        (&last["type"], &last["exit_code"]),
        (&Value::from("exit"), &Value::from(3))
    );

    // The CLI, through the API: the root filesystem and exit codes.
    let (code, out, err) = d.capsule(&["exec", &bob, "--", "cat", "/etc/os-release"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Capsule ext4 test root"), "{out}");
    let (code, _, err) = d.capsule(&["exec", &alice, "--", "sh", "-c", "exit 7"]);
    assert_eq!(code, 7, "{err}");

    // A secret: in its commands' environment, never on the guest's disk,
    // never in what the API shows.
    let (code, out, err) = d.capsule(&["exec", &bob, "--", "sh", "-c", "echo \"$API_KEY\"; sync"]);
    assert_eq!((code, out.trim()), (0, secret), "{err}");
    let (code, out, _) = d.capsule(&["exec", &alice, "--", "sh", "-c", "echo \"[$API_KEY]\""]);
    assert_eq!(
        (code, out.trim()),
        (0, "[]"),
        "only the sandbox given it has it"
    );
    let disk = std::fs::read(
        d.capsule_home()
            .join("daemon/vms")
            .join(&bob)
            .join("rootfs.ext4"),
    )
    .unwrap();
    assert!(
        !disk.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret on the guest's disk"
    );
    for path in [
        "/v1/sandboxes",
        &format!("/v1/sandboxes/{bob}"),
        "/v1/events",
        "/v1/groups/default/secrets",
    ] {
        let (_, body) = d.call("GET", path, None);
        assert!(!body.to_string().contains(secret), "{path}: {body}");
    }
    assert_eq!(get(&d, &bob)["secrets"], serde_json::json!(["API_KEY"]));

    // What each uses, measured on the host; the daemon's metrics.
    let (status, stats) = d.call("GET", &format!("/v1/sandboxes/{bob}/stats"), None);
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["state"], "running", "{stats}");
    assert!(stats["cpu_seconds"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(stats["uptime_seconds"].as_f64().unwrap() > 0.0, "{stats}");
    let memory = stats["memory_bytes"].as_u64().unwrap();
    assert!(memory > 1 << 20 && memory < (192 + 64) << 20, "{stats}");
    assert!(
        stats["memory_pss_bytes"].as_u64().unwrap() <= memory,
        "{stats}"
    );
    // Its own copy of the root filesystem, at least what the guest uses.
    assert!(stats["disk_bytes"].as_u64().unwrap() > 1 << 20, "{stats}");
    let (code, out, err) = d.capsule(&["sandbox", "stats", &bob]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("resident") && out.contains("disk:"), "{out}");
    let (_, metrics) = d.call("GET", "/metrics", None);
    let metrics = metrics.as_str().unwrap().to_string();
    for line in [
        "capsule_sandboxes{state=\"running\"} 2",
        "capsule_sandbox_create_seconds_count{source=\"boot\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
    // Every line the daemon logged about a sandbox names it.
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("sandbox{{id={bob}}}")) && l.contains("running")),
        "{log}"
    );

    // A timeout that passes ends the sandbox, with its reason.
    let (status, s) = d.call(
        "POST",
        &format!("/v1/sandboxes/{bob}/timeout"),
        Some(r#"{"timeout_seconds": 1}"#),
    );
    assert_eq!(status, 200, "{s}");
    let s = ended(&d, &bob, Duration::from_secs(15));
    assert_eq!(s["ended"]["reason"], "expired", "{s}");
    assert!(!d.capsule_home().join("daemon/vms").join(&bob).exists());

    // A VMM killed outright is noticed within a second or so, with why.
    let pid = vmm_pid(&d, &alice);
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let s = ended(&d, &alice, Duration::from_secs(5));
    eprintln!("a killed VMM was recorded after {:?}", killed.elapsed());
    assert_eq!(s["ended"]["reason"], "vmm_died", "{s}");
    assert!(
        s["ended"]["detail"].as_str().unwrap().contains("signal 9"),
        "{s}"
    );
    assert!(!d.capsule_home().join("daemon/vms").join(&alice).exists());
    refused_conflict(d.call(
        "POST",
        &format!("/v1/sandboxes/{alice}/exec"),
        Some(r#"{"cmd": ["true"]}"#),
    ));

    // The daemon killed outright: its sandbox keeps running, and the
    // daemon started again adopts it.
    let carol = create(&d, r#"{"labels": {"owner": "carol"}}"#);
    let (code, _, err) = d.capsule(&["exec", &carol, "--", "sh", "-c", "echo 1 > /tmp/counter"]);
    assert_eq!(code, 0, "{err}");
    let carol_pid = vmm_pid(&d, &carol);
    d.kill();
    assert!(alive(carol_pid), "the sandbox outlives its daemon");
    d.restart(&[]);
    assert_eq!(get(&d, &carol)["state"], "running");
    let (code, out, err) = d.capsule(&["exec", &carol, "--", "cat", "/tmp/counter"]);
    assert_eq!((code, out.as_str()), (0, "1\n"), "{err}");

    // Delete releases everything.
    let (status, _) = d.call("DELETE", &format!("/v1/sandboxes/{carol}"), None);
    assert_eq!(status, 204);
    let s = get(&d, &carol);
    assert_eq!(
        (&s["state"], &s["ended"]["reason"]),
        (&Value::from("ended"), &Value::from("deleted"))
    );
    let end = Instant::now() + Duration::from_secs(10);
    while alive(carol_pid) {
        assert!(
            Instant::now() < end,
            "the deleted sandbox's VMM is still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!d.capsule_home().join("daemon/vms").join(&carol).exists());
    let (_, list) = d.call("GET", "/v1/sandboxes", None);
    assert_eq!(list, serde_json::json!([]));

    // The event log tells it all, in order.
    let (_, events) = d.call("GET", "/v1/events", None);
    let of = |id: &str| -> Vec<String> {
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["sandbox_id"] == id)
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(of(&alice), ["created", "ready", "ended"]);
    assert_eq!(of(&bob), ["created", "ready", "timeout", "ended"]);
    assert_eq!(of(&carol), ["created", "ready", "ended"]);
    assert!(!d.log().contains(secret), "the secret in the daemon's log");

    // The follower saw the same events, as server-sent events with their
    // sequence numbers as ids (its connection outlived one daemon: it
    // ends when the first is killed, so it has what came before).
    let mut follower = follower;
    let _ = follower.kill();
    let out = follower.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert!(
        kinds.starts_with(&["created", "ready"]) && kinds.contains(&"ended"),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "id: 1"), "{text}");
    assert!(!text.contains(secret));
}

fn refused_conflict((status, body): (u16, Value)) {
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "conflict", "{body}");
}

#[test]
fn ten_suspends_and_resumes_keep_memory_and_disk() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let mut d = start();
    let rootfs = artifact("CAPSULE_ROOTFS");
    let id = create(
        &d,
        // Small: each suspend writes all of its memory, and the nested
        // test host is slow to write.
        &format!(
            r#"{{"rootfs": "{}", "labels": {{"cycle": "yes"}}, "memory_mib": 128}}"#,
            rootfs.display()
        ),
    );
    let run = |d: &Daemon, script: &str| {
        let (code, out, err) = d.capsule(&["exec", &id, "--", "sh", "-c", script]);
        if code != 0 {
            not_a_stall_of_the_test_host(d, &id, &err);
        }
        assert_eq!(code, 0, "{script}: {err}");
        out
    };
    run(&d, "echo 0 > /tmp/counter; mkdir -p /root/files");
    let started = Instant::now();
    for i in 1..=10 {
        // Memory (tmpfs) and disk (the ext4 root), changed each cycle.
        run(
            &d,
            &format!("echo $(( $(cat /tmp/counter) + 1 )) > /tmp/counter; echo {i} > /root/files/f{i}; sync"),
        );
        if i == 7 {
            killed_mid_suspend(&mut d, &id);
        }
        let (status, s) = d.call("POST", &format!("/v1/sandboxes/{id}/suspend"), None);
        assert_eq!(
            (status, &s["state"]),
            (200, &Value::from("suspended")),
            "cycle {i}: {s}"
        );
        assert!(!d
            .capsule_home()
            .join("daemon/vms")
            .join(&id)
            .join("runtime")
            .exists());
        refused_conflict(d.call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(r#"{"cmd": ["true"]}"#),
        ));
        refused_conflict(d.call("POST", &format!("/v1/sandboxes/{id}/suspend"), None));
        if i == 5 {
            // The daemon killed while a sandbox is suspended: still suspended after.
            d.kill();
            d.restart(&[]);
            assert_eq!(get(&d, &id)["state"], "suspended");
        }
        let (status, s) = d.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
        not_the_test_hosts_doing(status, &s);
        assert_eq!(
            (status, &s["state"]),
            (200, &Value::from("running")),
            "cycle {i}: {s}"
        );
        assert_eq!(s["id"], id.as_str());
        assert_eq!(s["labels"]["cycle"], "yes");
        let out = run(
            &d,
            "cat /tmp/counter; cat /root/files/* | sort -n | tr '\\n' ' '",
        );
        let want: Vec<String> = (1..=i).map(|n| n.to_string()).collect();
        assert_eq!(out, format!("{i}\n{} ", want.join(" ")), "cycle {i}");
    }
    eprintln!("10 suspend/resume cycles in {:?}", started.elapsed());
    refused_conflict(d.call("POST", &format!("/v1/sandboxes/{id}/resume"), None));
    let (_, events) = d.call("GET", "/v1/events", None);
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["sandbox_id"] == id.as_str())
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "suspended").count(),
        10,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "resumed").count(),
        10,
        "{kinds:?}"
    );
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None).0,
        204
    );
    assert!(!d.capsule_home().join("daemon/vms").join(&id).exists());
}

/// Kills the daemon while it writes sandbox `id`'s suspended state, and
/// restarts it: the sandbox is running again, adopted, the half-written
/// state gone, one VMM process for it, nothing else left in its
/// directory. (Its memory and files are checked by the caller's next
/// cycle.)
fn killed_mid_suspend(d: &mut Daemon, id: &str) {
    let dir = d.capsule_home().join("daemon/vms").join(id);
    let socket = d.socket();
    let url = format!("http://capsule/v1/sandboxes/{id}/suspend");
    let suspend = std::thread::spawn(move || {
        Command::new("curl")
            .args(["-s", "--max-time", "120", "-X", "POST", "--unix-socket"])
            .arg(&socket)
            .arg(url)
            .output()
            .unwrap()
    });
    let end = Instant::now() + Duration::from_secs(60);
    while !dir.join("suspending").exists() {
        assert!(Instant::now() < end, "the suspend never started writing");
        std::thread::sleep(Duration::from_millis(2));
    }
    d.kill();
    let _ = suspend.join();
    d.restart(&[]);
    // Killed before the store said suspended (almost always: the state
    // takes seconds to write), the sandbox runs on; after, it is
    // suspended, whole.
    let s = get(d, id);
    let (vmms, mut want) = match s["state"].as_str() {
        Some("running") => (1, vec!["rootfs.ext4", "runtime", "suspended", "vmm.log"]),
        Some("suspended") => (0, vec!["rootfs.ext4", "suspended", "vmm.log"]),
        _ => panic!("after a kill mid-suspend: {s}"),
    };
    wait_vmm_processes(d, vmms);
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    want.sort();
    assert_eq!(
        left, want,
        "sandbox {id}'s directory after a kill mid-suspend ({})",
        s["state"]
    );
    if vmms == 0 {
        let (status, s) = d.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
        not_the_test_hosts_doing(status, &s);
        assert_eq!(status, 200, "{s}");
    }
}

/// capsule-vmm processes running sandboxes of this daemon.
fn vmm_processes(d: &Daemon) -> usize {
    let vms = d.capsule_home().join("daemon/vms");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&vms)))
        .count()
}

/// Waits (a VMM that has said it stopped takes a moment to exit) until
/// this daemon runs `n` capsule-vmm processes.
fn wait_vmm_processes(d: &Daemon, n: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let now = vmm_processes(d);
        if now == n {
            return;
        }
        assert!(Instant::now() < end, "{now} capsule-vmm processes, not {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn quotas_hold_under_concurrent_creates_idle_sandboxes_sleep_and_a_killed_create_is_cleaned_up() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let mut d = start();

    // 20 creates at once against a quota of 2: exactly 2 made, the rest
    // refused with 429, nothing left of them.
    let (status, _) = d.call(
        "POST",
        "/v1/groups",
        Some(r#"{"name": "small", "quota": {"max_sandboxes": 2}}"#),
    );
    assert_eq!(status, 201);
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                scope.spawn(|| {
                    d.call(
                        "POST",
                        "/v1/sandboxes",
                        Some(r#"{"group": "small", "memory_mib": 128}"#),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, body) in &answers {
        not_the_test_hosts_doing(*status, body);
    }
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        18,
        "{statuses:?}"
    );
    let (_, g) = d.call("GET", "/v1/groups/small", None);
    assert_eq!(g["usage"]["sandboxes"], 2, "{g}");
    wait_vmm_processes(&d, 2);
    assert_eq!(
        std::fs::read_dir(d.capsule_home().join("daemon/vms"))
            .unwrap()
            .count(),
        2
    );
    let (_, all) = d.call(
        "GET",
        "/v1/sandboxes?state=creating,running,suspended,ended",
        None,
    );
    assert_eq!(
        all.as_array().unwrap().len(),
        2,
        "a refused create leaves no record: {all}"
    );
    for s in all.as_array().unwrap() {
        assert_eq!(
            d.call(
                "DELETE",
                &format!("/v1/sandboxes/{}", s["id"].as_str().unwrap()),
                None
            )
            .0,
            204
        );
    }

    // Idle suspend, then a command that resumes it without an error.
    let id = create(&d, r#"{"idle_suspend_seconds": 2, "memory_mib": 128}"#);
    let (code, _, err) = d.capsule(&["exec", &id, "--", "sh", "-c", "echo kept > /tmp/x"]);
    assert_eq!(code, 0, "{err}");
    let end = Instant::now() + Duration::from_secs(60);
    while get(&d, &id)["state"] != "suspended" {
        assert!(Instant::now() < end, "never suspended for idleness");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A suspended sandbox has no VMM process.
    wait_vmm_processes(&d, 0);
    let (code, out, err) = d.capsule(&["exec", &id, "--", "cat", "/tmp/x"]);
    assert_eq!((code, out.as_str()), (0, "kept\n"), "{err}");
    assert_eq!(get(&d, &id)["state"], "running");
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None).0,
        204
    );

    // The daemon killed in the middle of a create: on restart the
    // half-made sandbox is ended as lost, its VMM stopped, its files gone.
    let socket = d.socket();
    let create = std::thread::spawn(move || {
        Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "120",
                "-H",
                "content-type: application/json",
                "-d",
                "{}",
            ])
            .arg("--unix-socket")
            .arg(&socket)
            .arg("http://capsule/v1/sandboxes")
            .output()
            .unwrap()
    });
    let vms = d.capsule_home().join("daemon/vms");
    let end = Instant::now() + Duration::from_secs(60);
    let half_made = loop {
        if let Some(entry) = std::fs::read_dir(&vms).unwrap().flatten().next() {
            break entry.file_name().to_string_lossy().into_owned();
        }
        assert!(Instant::now() < end, "the create never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    d.kill();
    let _ = create.join();
    d.restart(&[]);
    let s = get(&d, &half_made);
    assert_eq!(
        (&s["state"], &s["ended"]["reason"]),
        (&Value::from("ended"), &Value::from("lost")),
        "{s}"
    );
    // The half-made sandbox's VMM is stopped.
    wait_vmm_processes(&d, 0);
    assert!(!vms.join(&half_made).exists());
}

#[test]
fn templates_prime_once_and_fork_into_sandboxes_of_their_own() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let d = start();
    let rootfs = artifact("CAPSULE_ROOTFS");
    // A priming command that fails: refused with its output, nothing kept.
    let (status, body) = d.call(
        "POST",
        "/v1/templates",
        Some(r#"{"name": "broken", "cmd": ["sh", "-c", "echo no such luck >&2; exit 2"], "memory_mib": 128}"#),
    );
    assert_eq!(
        (status, &body["code"]),
        (500, &Value::from("template_failed")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("no such luck"),
        "{body}"
    );
    assert_eq!(d.call("GET", "/v1/templates/broken", None).0, 404);
    assert!(!d.capsule_home().join("daemon/templates/broken").exists());

    let (status, t) = d.call(
        "POST",
        "/v1/templates",
        Some(&format!(
            r#"{{"name": "primed", "rootfs": "{}", "memory_mib": 128,
                "cmd": ["sh", "-c", "seq 1 1000 > /root/primed; echo warm > /tmp/mem; sync"]}}"#,
            rootfs.display()
        )),
    );
    not_the_test_hosts_doing(status, &t);
    assert_eq!(status, 201, "{t}");
    assert_eq!(
        (&t["kind"], &t["has_rootfs"]),
        (&Value::from("template"), &Value::from(true))
    );
    refused_conflict(d.call("POST", "/v1/templates", Some(r#"{"name": "primed"}"#)));

    // Created from it: primed in memory and on disk, with its own identity.
    let a = create(
        &d,
        r#"{"template": "primed", "labels": {"from": "template"}}"#,
    );
    let (code, out, err) = d.capsule(&[
        "exec",
        &a,
        "--",
        "sh",
        "-c",
        "cat /tmp/mem; wc -l < /root/primed; hostname",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("warm\n1000\n{a}\n"));
    assert_eq!(get(&d, &a)["memory_mib"], 128);
    let (status, body) = d.call(
        "POST",
        "/v1/sandboxes",
        Some(r#"{"template": "primed", "cpus": 2}"#),
    );
    assert_eq!(
        (status, &body["code"]),
        (400, &Value::from("bad_request")),
        "{body}"
    );
    assert_eq!(
        d.call("POST", "/v1/sandboxes", Some(r#"{"template": "nope"}"#))
            .0,
        404
    );

    // A sandbox's own snapshot, forked three times: each fork has the
    // state, its own hostname, and writes the others never see.
    let (code, _, err) = d.capsule(&["exec", &a, "--", "sh", "-c", "echo mine > /root/note; sync"]);
    assert_eq!(code, 0, "{err}");
    let (status, snap) = d.call(
        "POST",
        &format!("/v1/sandboxes/{a}/snapshot"),
        Some(r#"{"name": "after-note"}"#),
    );
    assert_eq!(
        (status, &snap["kind"]),
        (201, &Value::from("snapshot")),
        "{snap}"
    );
    let (status, forks) = d.call(
        "POST",
        "/v1/templates/after-note/fork",
        Some(r#"{"count": 3, "labels": {"batch": "1"}}"#),
    );
    assert_eq!(status, 201, "{forks}");
    let ids: Vec<String> = forks
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            f["sandbox"]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("{f}"))
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 3);
    for (i, id) in ids.iter().enumerate() {
        let script =
            format!("cat /root/note; hostname; echo {i} > /root/fork; sync; cat /root/fork");
        let (code, out, err) = d.capsule(&["exec", id, "--", "sh", "-c", &script]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, format!("mine\n{id}\n{i}\n"));
    }
    let (code, out, _) = d.capsule(&[
        "exec",
        &a,
        "--",
        "sh",
        "-c",
        "cat /root/fork 2>/dev/null || echo none",
    ]);
    assert_eq!(
        (code, out.as_str()),
        (0, "none\n"),
        "the forks' writes are their own"
    );
    let (_, batch) = d.call("GET", "/v1/sandboxes?label_selector=batch%3D1", None);
    assert_eq!(batch.as_array().unwrap().len(), 3);

    // A warm pool: two restored and ready; a create takes one (primed,
    // with its own id as hostname) and the pool refills.
    let pool_ready = |d: &Daemon, want: u64| {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, pools) = d.call("GET", "/v1/pools", None);
            if pools[0]["ready"] == want {
                return;
            }
            assert!(
                Instant::now() < end,
                "the pool never had {want} ready: {pools}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (status, p) = d.call("PUT", "/v1/pools/primed", Some(r#"{"warm": 2}"#));
    assert_eq!((status, &p["warm"]), (200, &Value::from(2)), "{p}");
    pool_ready(&d, 2);
    let before = vmm_processes(&d);
    let warm = create(&d, r#"{"template": "primed"}"#);
    let (code, out, err) = d.capsule(&["exec", &warm, "--", "sh", "-c", "cat /tmp/mem; hostname"]);
    assert_eq!((code, out), (0, format!("warm\n{warm}\n")), "{err}");
    pool_ready(&d, 2);
    // The taken one and a new ready one.
    wait_vmm_processes(&d, before + 1);
    assert_eq!(d.call("DELETE", "/v1/pools/primed", None).0, 204);
    // The pool's ready sandboxes stopped.
    wait_vmm_processes(&d, before + 1 - 2);
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{warm}"), None).0,
        204
    );

    // Templates deleted: their sandboxes carry on, and suspend and resume.
    assert_eq!(d.call("DELETE", "/v1/templates/primed", None).0, 204);
    assert_eq!(d.call("DELETE", "/v1/templates/after-note", None).0, 204);
    let fork = &ids[0];
    assert_eq!(
        d.call("POST", &format!("/v1/sandboxes/{fork}/suspend"), None)
            .0,
        200
    );
    assert_eq!(
        d.call("POST", &format!("/v1/sandboxes/{fork}/resume"), None)
            .0,
        200
    );
    let (code, out, err) = d.capsule(&[
        "exec",
        fork,
        "--",
        "sh",
        "-c",
        "cat /root/note /root/fork /tmp/mem",
    ]);
    assert_eq!((code, out.as_str()), (0, "mine\n0\nwarm\n"), "{err}");
    for id in ids.iter().chain([&a]) {
        assert_eq!(
            d.call("DELETE", &format!("/v1/sandboxes/{id}"), None).0,
            204
        );
    }
    wait_vmm_processes(&d, 0);
}

/// curl against a sandbox's file endpoints: its status and body. A
/// transfer that broke because the guest reset without a word is the
/// nested test host's doing, as for a create (`not_the_test_hosts_doing`):
/// the test ends with the status scripts/test-guest.sh runs once more.
fn curl_files(d: &Daemon, id: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "240", "-w", "\n%{http_code}"])
        .arg("--unix-socket")
        .arg(d.socket())
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", ""));
    let status: u16 = status.trim().parse().unwrap_or(0);
    if !out.status.success() || status == 502 {
        not_a_stall_of_the_test_host(d, id, body);
        let what = format!(
            "curl {args:?}: {}{body}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The daemon records a guest that reset a moment after.
        let mut record = get(d, id);
        let until = Instant::now() + Duration::from_secs(5);
        while record["state"] != "ended" && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
            record = get(d, id);
        }
        let console = console_of(d, id);
        if record["ended"]["reason"] == "guest_powered_off" && died_without_a_word(&console) {
            end_test(
                GUEST_DIED_IN_TESTHOST,
                format_args!(
                    "{what}\nthe daemon's guest reset mid-transfer without a word on its \
                     console, as the nested test host does to QEMU's guests (docs/TESTING.md)"
                ),
            );
        }
        panic!("{what}\nsandbox: {record}\nconsole:\n{console}");
    }
    (status, body.to_string())
}

fn sha256(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn files_stream_into_and_out_of_a_daemon_sandbox() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let d = start();
    let id = create(&d, r#"{"memory_mib": 512}"#);
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("data.bin");
    const SIZE: u64 = 64 << 20;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&local).unwrap();
        let mut state = 5u64;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..(SIZE >> 20) {
            for b in buf.iter_mut() {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                *b = (state >> 56) as u8;
            }
            f.write_all(&buf).unwrap();
        }
    }
    let daemon_pid = d.pid().unwrap();
    // Its peak from here on (5 resets it to the current size).
    std::fs::write(format!("/proc/{daemon_pid}/clear_refs"), "5").unwrap();
    let daemon_before = peak_kib(daemon_pid);
    let url = |tail: &str| format!("http://capsule/v1/sandboxes/{id}/files{tail}");

    // Upload with curl, streamed (-T), into a directory that is made.
    let t = Instant::now();
    let (status, body) = curl_files(
        &d,
        &id,
        &[
            "-T",
            local.to_str().unwrap(),
            &url("?path=/work/in/data.bin&parents=true&mode=640"),
        ],
    );
    let up = t.elapsed();
    assert_eq!(status, 200, "{body}");
    let entry: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(entry["size"], SIZE);
    assert_eq!(entry["mode"], 0o640);
    assert_eq!(entry["type"], "file");

    let back = work.path().join("back.bin");
    let t = Instant::now();
    let (status, _) = curl_files(
        &d,
        &id,
        &[
            "-o",
            back.to_str().unwrap(),
            &url("?path=/work/in/data.bin"),
        ],
    );
    let down = t.elapsed();
    assert_eq!(status, 200);
    assert_eq!(sha256(&back), sha256(&local), "the download differs");
    let grown = peak_kib(daemon_pid).saturating_sub(daemon_before);
    eprintln!(
        "daemon files: {} MiB up {:.1} MiB/s, down {:.1} MiB/s; the daemon's peak memory grew {grown} KiB",
        SIZE >> 20,
        (SIZE >> 20) as f64 / up.as_secs_f64(),
        (SIZE >> 20) as f64 / down.as_secs_f64(),
    );
    assert!(
        grown < 48 << 10,
        "the daemon's peak memory grew by {grown} KiB"
    );

    // Errors name the path and carry a code.
    let (status, body) = curl_files(&d, &id, &[&url("?path=/work/missing.txt")]);
    assert_eq!(status, 404, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["code"], "file_not_found");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("/work/missing.txt"));
    let (status, body) = curl_files(&d, &id, &["-T", "/etc/hostname", &url("?path=/work/in")]);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("is_a_directory"), "{body}");
    let (status, body) = curl_files(&d, &id, &[&url("?path=relative")]);
    assert_eq!(status, 400, "{body}");

    // The CLI: cp both ways, ls, stat, mv, rm.
    let small = work.path().join("small.txt");
    std::fs::write(&small, "hello from the host\n").unwrap();
    let target = format!("{id}:/work/in/");
    let (code, _, err) = d.capsule(&["cp", small.to_str().unwrap(), &target]);
    assert_eq!(code, 0, "{err}");
    let copied = work.path().join("copied.txt");
    let (code, _, err) = d.capsule(&[
        "cp",
        &format!("{id}:/work/in/small.txt"),
        copied.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(&copied).unwrap(),
        "hello from the host\n"
    );
    let (code, out, err) = d.capsule(&["files", "ls", &format!("{id}:/work/in"), "--json"]);
    assert_eq!(code, 0, "{err}");
    let listing: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<_> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["data.bin", "small.txt"]);
    let (code, _, err) = d.capsule(&[
        "files",
        "mv",
        &format!("{id}:/work/in/small.txt"),
        "/work/moved.txt",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) =
        d.capsule(&["files", "stat", &format!("{id}:/work/moved.txt"), "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["size"], 20);
    // A tree with an executable, a private file and a symlink, both ways.
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::write(tree.join("sub/secret"), "s").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tree.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(
            tree.join("sub/secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("sub/secret", tree.join("link")).unwrap();
    let (code, _, err) = d.capsule(&["cp", "-r", tree.to_str().unwrap(), &format!("{id}:/work/")]);
    assert_eq!(code, 0, "{err}");
    let ran = exec_lines(
        &d,
        &id,
        r#"{"cmd": ["sh", "-c", "/work/tree/run.sh; stat -c %a /work/tree/sub/secret; readlink /work/tree/link"]}"#,
    );
    assert_eq!(decoded(&ran, "stdout"), "ran\n600\nsub/secret\n");
    let (code, _, err) = d.capsule(&[
        "cp",
        "-r",
        &format!("{id}:/work/tree"),
        work.path().join("back").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let back = work.path().join("back");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(back.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!((mode("run.sh"), mode("sub/secret")), (0o755, 0o600));
    }
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        std::path::Path::new("sub/secret")
    );

    let (code, _, err) = d.capsule(&["files", "rm", "-r", &format!("{id}:/work")]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = d.capsule(&["files", "stat", &format!("{id}:/work")]);
    assert_ne!(code, 0);
    assert!(err.contains("file_not_found"), "{err}");
    let (status, _) = d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, 204);
}

#[test]
fn detached_processes_outlive_the_cli_and_are_read_from_any_offset() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let d = start();
    let id = create(&d, "{}");
    let (code, out, err) = d.capsule(&[
        "exec",
        "--detach",
        &id,
        "--",
        "sh",
        "-c",
        "for i in $(seq 1 20); do echo line$i; sleep 0.1; done; echo bye >&2; exit 5",
    ]);
    assert_eq!(code, 0, "{err}");
    let pid: i32 = out.trim().parse().expect("exec --detach prints the pid");
    // The CLI that started it has exited; the process runs on.
    let (code, out, err) = d.capsule(&["ps", &id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["pid"], pid, "{listed}");
    // Follow from an offset mid-output: nothing after it is lost.
    let (code, out, err) = d.capsule(&["logs", &id, &pid.to_string(), "--follow", "--offset", "6"]);
    assert_eq!(code, 0, "{err}");
    let all: String = (1..=20).map(|i| format!("line{i}\n")).collect();
    assert_eq!(out, all[6..]);
    assert!(err.contains("bye"), "{err}");
    let (status, view) = d.call("GET", &format!("/v1/sandboxes/{id}/processes/{pid}"), None);
    assert_eq!(status, 200);
    assert_eq!(
        (view["running"].clone(), view["exit_code"].clone()),
        (Value::Bool(false), Value::from(5))
    );

    let (code, out, err) = d.capsule(&["exec", "--detach", &id, "--", "sleep", "300"]);
    assert_eq!(code, 0, "{err}");
    let sleeper = out.trim().to_string();
    let (code, _, err) = d.capsule(&["kill", &id, &sleeper, "--signal", "TERM"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = d.capsule(&["logs", &id, &sleeper, "--follow"]);
    assert_eq!(code, 0, "{err}");
    let (_, view) = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/processes/{sleeper}"),
        None,
    );
    assert_eq!(view["signal"], 15, "{view}");
    let (code, _, err) = d.capsule(&["kill", &id, "999999"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("process_not_found"), "{err}");
    let (status, _) = d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, 204);
}
