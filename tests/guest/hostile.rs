//! Real guests misbehaving: a stream in trouble never holds up another,
//! output that never ends is capped, and a frozen replica is reported
//! failed while its siblings finish.

use super::*;

/// How long a simple command may take in the nested test host, where
/// everything is 5-20x slower: far more than it needs, far less than a
/// hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Runs `echo alive` and pings, within [`ANSWER_WITHIN`] each.
fn still_answers(vm: &mut Sandbox, while_what: &str) {
    let t = Instant::now();
    let connected = vm_agent(vm);
    let agent = guest_ok(vm, connected);
    let mut handle = agent
        .exec(ExecRequest::new(["echo", "alive"]))
        .unwrap_or_else(|e| panic!("exec while {while_what}: {e}"));
    let mut out = Vec::new();
    loop {
        match handle.next_event_timeout(ANSWER_WITHIN) {
            Ok(Some(ExecEvent::Stdout(d))) => out.extend(d),
            Ok(Some(ExecEvent::Exit(status))) => {
                assert!(status.success());
                break;
            }
            Ok(Some(ExecEvent::Stderr(_))) => {}
            Ok(None) => panic!("no exit status while {while_what}"),
            Err(e) => panic!("an exec did not answer while {while_what}: {e}"),
        }
    }
    assert_eq!(out, b"alive\n");
    agent
        .ping(ANSWER_WITHIN)
        .unwrap_or_else(|e| panic!("ping while {while_what}: {e}"));
    eprintln!("an exec answered in {:?} while {while_what}", t.elapsed());
}

/// What the guest's processes are doing and its console's last lines, for
/// a failure's message, asked within a few seconds; and whether the guest
/// answered.
fn guest_state(agent: &sandbox::AgentClient, vm: &mut Sandbox) -> (bool, String) {
    let script = "cat /proc/loadavg; for p in /proc/[0-9]*; do \
                  echo \"${p#/proc/} $(cut -d' ' -f3 $p/stat) $(cat $p/wchan) $(cat $p/comm)\"; \
                  done 2>/dev/null";
    let mut out = Vec::new();
    let (answered, listing) = match agent.exec(ExecRequest::new(["sh", "-c", script])) {
        Ok(mut handle) => loop {
            match handle.next_event_timeout(Duration::from_secs(10)) {
                Ok(Some(ExecEvent::Stdout(d))) => out.extend(d),
                Ok(Some(ExecEvent::Exit(_)) | None) => {
                    break (true, String::from_utf8_lossy(&out).into())
                }
                Ok(Some(_)) => {}
                Err(e) => break (false, format!("(the listing stopped: {e})")),
            }
        },
        Err(e) => (false, format!("(no listing: {e})")),
    };
    let state = format!(
        "guest processes (pid state wchan name):\n{listing}\nconsole:\n{}",
        vm.console_tail(20)
    );
    (answered, state)
}

/// The VM's agent connection, opened if need be.
fn vm_agent(vm: &mut Sandbox) -> sandbox::Result<sandbox::AgentClient> {
    sandbox::connect_agent(vm.vsock_path())
}

#[test]
fn a_stream_in_trouble_never_holds_up_another() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let mut vm = boot(builder());
    let connected = vm_agent(&mut vm);
    let agent = guest_ok(&mut vm, connected);

    // Prints forever; nobody reads it.
    let flood = agent.exec(ExecRequest::new(["yes"])).expect("yes");
    still_answers(&mut vm, "`yes` prints and nobody reads");

    // Never reads its stdin, while the host has megabytes for it.
    let deaf = agent
        .exec(ExecRequest {
            stdin: true,
            ..ExecRequest::new(["sleep", "600"])
        })
        .expect("sleep");
    let input = deaf.input();
    let writer = std::thread::spawn(move || input.write_stdin(&vec![b'k'; 8 << 20]));
    still_answers(&mut vm, "a process never reads its stdin");

    // Stopped while it streams.
    let mut stopped = agent
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "while :; do echo line; done",
        ]))
        .expect("looper");
    let mut seen = 0;
    let t = Instant::now();
    while seen < 4096 {
        match stopped.next_event_timeout(ANSWER_WITHIN) {
            Ok(Some(ExecEvent::Stdout(d))) => seen += d.len(),
            other => {
                let (answered, state) = guest_state(&agent, &mut vm);
                let what = format!(
                    "the looper did not stream: {other:?} after {seen} bytes in {:?}\n{state}",
                    t.elapsed()
                );
                // A guest that answers nothing else either has stalled
                // (the nested test host does that); one that answers a new
                // command while this stream is stuck has a real bug.
                if !answered && died_without_a_word(&vm.console_tail(40)) {
                    end_test(GUEST_STALLED_IN_TESTHOST, format_args!("{what}"));
                }
                panic!("{what}");
            }
        }
    }
    stopped.signal(libc::SIGSTOP).expect("SIGSTOP");
    still_answers(&mut vm, "a process is stopped mid-stream");

    // All three at once, and then they end: the deaf one by a signal
    // (its blocked writer is released), the others killed and dropped.
    still_answers(&mut vm, "all three are stuck");
    deaf.signal(libc::SIGKILL).expect("SIGKILL");
    let status = deaf.output().expect("the deaf process's end");
    assert_eq!(status.status.signal, Some(libc::SIGKILL));
    assert!(writer.join().unwrap().is_err(), "the writer was released");
    flood.kill().expect("kill yes");
    stopped.kill().expect("kill the looper");
    drop(flood);
    drop(stopped);
    let left = sh_ok(&mut vm, "sleep 1; pidof yes sleep; true");
    assert_eq!(left.trim(), "", "processes outlived being killed: {left}");
    still_answers(&mut vm, "the stuck streams are gone");
    drop(agent);
    stop(vm);
}

#[test]
fn output_that_never_ends_is_capped_and_killed() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let mut vm = boot(builder());
    let connected = vm_agent(&mut vm);
    let agent = guest_ok(&mut vm, connected);
    let handle = agent.exec(ExecRequest::new(["yes"])).expect("yes");
    match handle.output_with_limit(4 << 20) {
        Err(sandbox::ClientError::OutputTooLarge { limit }) => assert_eq!(limit, 4 << 20),
        other => panic!("endless output gave {other:?}"),
    }
    let left = sh_ok(&mut vm, "sleep 1; pidof yes; true");
    assert_eq!(left.trim(), "", "`yes` survived its capped stream");
    drop(agent);
    stop(vm);
}

/// `capsule fork --count 10` where one replica's agent freezes (moved into
/// a frozen cgroup) right after it restored: the command returns within
/// its timeout plus the grace period, that replica is reported failed,
/// and the other nine's output is all there.
#[test]
fn a_frozen_fork_is_reported_and_the_others_finish() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let home = tempfile::tempdir().unwrap();
    let snap = home.path().join("snap");
    let mut vm = boot(builder());
    vm.snapshot(&snap).expect("snapshot");
    vm.kill();
    // fork-3 freezes its own agent (PID 1) and so never answers again.
    let script = "if [ \"$(hostname)\" = fork-3 ]; then \
                    mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup; \
                    mkdir /sys/fs/cgroup/frozen && echo 1 > /sys/fs/cgroup/frozen/cgroup.procs \
                    && echo 1 > /sys/fs/cgroup/frozen/cgroup.freeze; sleep 1000; fi; \
                  echo ok $(hostname)";
    let t = Instant::now();
    let (code, stdout, stderr) = super::snapshot::capsule(
        home.path(),
        &[
            "fork",
            snap.to_str().unwrap(),
            "--count",
            "10",
            "--timeout",
            "20",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let took = t.elapsed();
    eprintln!("capsule fork took {took:?}:\n{stdout}\n{stderr}");
    assert_eq!(code, 125, "a replica failed, so the sandbox status is 125");
    for i in (0..10).filter(|i| *i != 3) {
        assert!(
            stdout.contains(&format!("[fork-{i}] ok fork-{i}")),
            "fork-{i}'s output is missing:\n{stdout}\n{stderr}"
        );
    }
    assert!(!stdout.contains("ok fork-3"), "{stdout}");
    let failed = stderr
        .lines()
        .find(|l| l.starts_with("[fork-3] capsule: error:"))
        .unwrap_or_else(|| panic!("fork-3 was not reported failed:\n{stderr}"));
    assert!(
        failed.contains("not responding") || failed.contains("not stop it"),
        "{failed}"
    );
    // 20 s of timeout, 10 s of grace, plus ten restores in the nested
    // test host: well under the watchdog.
    assert!(
        took < Duration::from_secs(150),
        "capsule fork took {took:?}"
    );
}

/// Reads the guest's disk has completed (`/sys/block/vda/stat`).
fn disk_reads(vm: &mut Sandbox) -> u64 {
    let stat = sh_ok(vm, "cat /sys/block/vda/stat");
    stat.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no read count in {stat:?}"))
}

/// A guest that keeps its disk flat out (eight readers of 1 MiB O_DIRECT
/// blocks: the queue never empties) cannot hold up the host. Pause, a
/// snapshot and teardown each finish within a bound, because the device
/// serves a bounded batch per wake-up and looks at the pause gate and the
/// stop flag between batches (a self-feeding queue is refused outright:
/// devices/tests/fairness.rs).
#[test]
fn pause_snapshot_and_teardown_are_prompt_while_the_disk_is_flat_out() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let (_dir, disk) = scratch_file("busy.img", 64 << 20);
    let mut vm = boot(builder().disk(&disk, false));
    // setsid: the readers outlive the exec that starts them.
    sh_ok(
        &mut vm,
        "for i in 1 2 3 4 5 6 7 8; do            setsid sh -c 'while :; do dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>/dev/null; done'              </dev/null >/dev/null 2>&1 &          done",
    );
    let before = disk_reads(&mut vm);
    std::thread::sleep(Duration::from_secs(1));
    let busy = disk_reads(&mut vm);
    assert!(
        busy > before,
        "the readers are not reading ({before} then {busy})"
    );

    let bounded = |what: &str, limit: Duration, took: Duration| {
        eprintln!("{what} took {took:?} with the disk flat out");
        assert!(took < limit, "{what} took {took:?} (limit {limit:?})");
    };
    let t = Instant::now();
    vm.pause().expect("pause while the disk is busy");
    bounded("pause", Duration::from_secs(3), t.elapsed());
    vm.resume().expect("resume");

    let snap = tempfile::tempdir().unwrap();
    let t = Instant::now();
    vm.snapshot(snap.path().join("s"))
        .expect("snapshot while the disk is busy");
    bounded("snapshot", Duration::from_secs(60), t.elapsed());
    // Still reading afterwards: the load ran through all of it.
    let after = disk_reads(&mut vm);
    assert!(after > busy, "the readers stopped ({busy} then {after})");

    let t = Instant::now();
    let exit = vm.kill();
    bounded("teardown", Duration::from_secs(5), t.elapsed());
    assert_eq!(exit, VmExit::Stopped, "{}", vm.console_tail(20));
}

/// Many short execs one after another on one connection: every stream's
/// bookkeeping on both sides comes and goes cleanly.
#[test]
fn five_hundred_execs_on_one_connection() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let mut vm = boot(builder());
    for i in 0..500 {
        let result = vm.exec(["true"]);
        let out = guest_ok_doing(&mut vm, &format!("exec number {i}"), result);
        assert!(out.status.success(), "exec number {i}: {:?}", out.status);
    }
    stop(vm);
}
