//! Snapshots, restores and forks of real guests.

use super::*;

/// Starts a loop in the guest that counts in a tmpfs file, ten times a
/// second, detached from the exec that started it. With
/// CAPSULE_DEBUG_COUNT set it also prints the count on the console.
fn start_counter(vm: &mut Sandbox) {
    let echo = if std::env::var_os("CAPSULE_DEBUG_COUNT").is_some() {
        "echo count=$i > /dev/console;"
    } else {
        ""
    };
    sh_ok(
        vm,
        &format!(
            "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; \
             {echo} sleep 0.1; done) </dev/null >/dev/null 2>&1 &"
        ),
    );
}

/// A VM restore that names `disk` again as the snapshot's one disk.
pub(super) fn with_disk(disk: &Path) -> vmm::RestoreOptions {
    vmm::RestoreOptions {
        disks: vec![disk.into()],
        ..Default::default()
    }
}

fn count(vm: &mut Sandbox) -> u64 {
    let out = sh_ok(vm, "cat /tmp/count");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("count is {out:?}"))
}

#[test]
fn a_restored_guest_continues_where_it_was() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let (_dir, disk) = scratch_file("data.img", 8 << 20);
    let snaps = tempfile::tempdir().unwrap();
    let snap = snaps.path().join("snap");

    let mut vm = boot(builder().disk(&disk, false));
    start_counter(&mut vm);
    sh_ok(
        &mut vm,
        "printf 'on-disk-before-snapshot' | dd of=/dev/vda bs=512 conv=fsync 2>/dev/null",
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = count(&mut vm);
    vm.pause().expect("pause");
    let at_snapshot = {
        // Nothing runs while paused: the count is frozen.
        let stats = vm.snapshot(&snap).expect("snapshot");
        eprintln!(
            "snapshot: {} MiB written, {} MiB of zeros skipped, paused {:?}",
            stats.memory_bytes_written >> 20,
            stats.memory_zero_bytes >> 20,
            stats.paused_for
        );
        assert!(stats.memory_bytes_written > 0);
        vm.kill();
        before
    };

    // The snapshot holds only its own files: the disk under it is named
    // again.
    let options = sandbox::RestoreOptions {
        vm: with_disk(&disk),
        ..Default::default()
    };
    let mut restored = restore_ok("restore", Sandbox::restore(&snap, options));
    let after = count(&mut restored);
    assert!(
        after >= at_snapshot && after < at_snapshot + 50,
        "count went from {at_snapshot} to {after}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let later = count(&mut restored);
    assert!(
        later > after,
        "the counter stopped after restore: {after} then {later}"
    );
    assert_eq!(
        sh_ok(&mut restored, "head -c 23 /dev/vda"),
        "on-disk-before-snapshot"
    );
    stop(restored);
}

#[test]
fn forks_get_their_own_identity_and_randomness() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let snaps = tempfile::tempdir().unwrap();
    let snap = snaps.path().join("snap");
    let mut vm = boot(builder());
    // Prime the kernel RNG state that every fork inherits.
    sh_ok(&mut vm, "head -c 64 /dev/urandom >/dev/null");
    vm.snapshot(&snap).expect("snapshot");
    vm.kill();

    let restore = |name: &str| {
        let options = sandbox::RestoreOptions {
            identity: sandbox::fork_identity(name).unwrap(),
            ..Default::default()
        };
        restore_ok("restore", Sandbox::restore(&snap, options))
    };
    // A guest given no time to come back fails the restore as a guest that
    // did not answer (RestoreOptions::timeout is honoured).
    let impatient = sandbox::RestoreOptions {
        timeout: Some(Duration::ZERO),
        ..Default::default()
    };
    // Its stall report (a warning) is expected here: not shown.
    let level = log::max_level();
    log::set_max_level(log::LevelFilter::Error);
    let impatient = Sandbox::restore(&snap, impatient);
    log::set_max_level(level);
    match impatient {
        Err(e) => assert!(e.is_guest_unresponsive(), "{e}"),
        Ok(_) => panic!("a restore with no time for the guest succeeded"),
    }
    let mut a = restore("fork-a");
    let mut b = restore("fork-b");
    let probe = "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s";
    let out_a = sh_ok(&mut a, probe);
    let out_b = sh_ok(&mut b, probe);
    let lines_a: Vec<&str> = out_a.lines().collect();
    let lines_b: Vec<&str> = out_b.lines().collect();
    assert_eq!(lines_a[0], "fork-a", "{out_a}");
    assert_eq!(lines_b[0], "fork-b", "{out_b}");
    assert_ne!(lines_a[1], lines_b[1], "machine ids");
    assert_eq!(lines_a[2].len(), 32, "{out_a}");
    assert_ne!(
        lines_a[2], lines_b[2],
        "two forks read the same random bytes"
    );
    // The wall clock was corrected to the host's.
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let guest_now: u64 = lines_a[3].parse().unwrap();
    assert!(
        host_now.abs_diff(guest_now) < 30,
        "guest clock {guest_now}, host {host_now}"
    );
    stop(a);
    stop(b);
}

/// Runs the `capsule` CLI with the guest artifacts and a private
/// CAPSULE_HOME; returns (exit code, stdout, stderr).
pub(super) fn capsule(home: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .env("CAPSULE_HOME", home)
        .env("CAPSULE_KERNEL", artifact("CAPSULE_KERNEL"))
        .env("CAPSULE_INITRAMFS", artifact("CAPSULE_INITRAMFS"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run capsule");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

fn capsule_ok(home: &std::path::Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = capsule(home, args);
    if code != 0 && died_without_a_word(&stderr) {
        // In the nested test host, a restored guest that stalled or reset
        // without a word ends the test as restore_ok does for the library.
        let status = if stderr.contains("the guest did not become ready within") {
            Some(GUEST_STALLED_IN_TESTHOST)
        } else if stderr.contains(&format!("({})", VmExit::GuestReset)) {
            Some(GUEST_DIED_IN_TESTHOST)
        } else {
            None
        };
        if let Some(status) = status {
            end_test(
                status,
                format_args!(
                    "capsule {args:?}: the guest died or stalled without a word on its console, \
                     in the nested test host (docs/TESTING.md):\n{stderr}\n{}",
                    thread_report()
                ),
            );
        }
    }
    assert_eq!(code, 0, "capsule {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

/// Scale to zero: the VMM process that ran the guest exits, and a new one
/// resumes it from disk.
#[test]
fn a_guest_resumes_in_a_new_vmm_process() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    // Device and VMM warnings on stderr; CAPSULE_TEST_LOG=debug for more.
    vmm::logging::log_to_stderr("", "CAPSULE_TEST_LOG");
    let home = tempfile::tempdir().unwrap();
    let (_dir, disk) = scratch_file("data.img", 8 << 20);
    let snap = home.path().join("snap");
    let h = home.path();
    let disk = disk.to_str().unwrap();
    let snap_s = snap.to_str().unwrap();

    capsule_ok(
        h,
        &[
            "run", "--keep", "--name", "base", "--memory", "192M", "--boot-timeout", "120",
            "--disk", disk, "--",
            "sh", "-c",
            "(i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; \
             sleep 0.1; done) </dev/null >/dev/null 2>&1 & \
             printf on-disk | dd of=/dev/vda conv=fsync 2>/dev/null",
        ],
    );
    std::thread::sleep(Duration::from_millis(800));
    let before: u64 = capsule_ok(h, &["exec", "base", "--", "cat", "/tmp/count"])
        .trim()
        .parse()
        .unwrap();
    let keeper_pid = capsule_ok(h, &["ls"]);
    assert!(keeper_pid.starts_with("base\tpid "), "{keeper_pid}");
    let (_, _, said) = capsule(h, &["snapshot", "base", "--to", snap_s]);
    assert!(said.contains("MiB of memory written"), "{said}");
    capsule_ok(h, &["stop", "base"]);
    assert_eq!(capsule_ok(h, &["ls"]), "", "the keeper outlived stop");

    let out = capsule_ok(
        h,
        &[
            "restore",
            snap_s,
            "--disk",
            disk,
            "--hostname",
            "resumed",
            "--",
            "sh",
            "-c",
            "a=$(cat /tmp/count); sleep 1; b=$(cat /tmp/count); \
                         echo $a $b $(hostname); head -c 7 /dev/vda",
        ],
    );
    let fields: Vec<&str> = out.split_whitespace().collect();
    let (a, b): (u64, u64) = (fields[0].parse().unwrap(), fields[1].parse().unwrap());
    assert!(
        a >= before && a < before + 100,
        "count was {before}, restored at {a}: {out}"
    );
    assert!(b > a, "the counter did not run on after the restore: {out}");
    assert_eq!(fields[2], "resumed", "{out}");
    assert_eq!(fields[3], "on-disk", "{out}");

    // Suspend again: resumed and kept, changed, snapshotted as a diff
    // against the first snapshot, stopped, resumed once more.
    let snap2 = home.path().join("snap2");
    let snap2_s = snap2.to_str().unwrap();
    capsule_ok(
        h,
        &[
            "restore", snap_s, "--disk", disk, "--keep", "--name", "again",
        ],
    );
    capsule_ok(
        h,
        &[
            "exec",
            "again",
            "--",
            "sh",
            "-c",
            "echo second-life > /tmp/mark; \
           printf 'layer' | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null",
        ],
    );
    let (_, _, said) = capsule(h, &["snapshot", "again", "--to", snap2_s, "--diff"]);
    assert!(said.contains("MiB of memory written"), "{said}");
    capsule_ok(h, &["stop", "again"]);
    // The diff holds what it needs of its parent: moved elsewhere, with
    // the first snapshot gone, it restores all the same.
    let moved = home.path().join("moved");
    std::fs::rename(&snap2, &moved).unwrap();
    std::fs::remove_dir_all(&snap).unwrap();
    let moved_s = moved.to_str().unwrap();
    let (code, _, said) = capsule(h, &["restore", moved_s, "--", "true"]);
    assert_eq!(code, 125, "{said}");
    assert!(
        said.contains("--disk"),
        "the error says how to name the disk: {said}"
    );
    let out = capsule_ok(
        h,
        &[
            "restore",
            moved_s,
            "--disk",
            disk,
            "--",
            "sh",
            "-c",
            "cat /tmp/mark; head -c 7 /dev/vda; echo; \
           dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 5",
        ],
    );
    assert_eq!(out, "second-life\non-disk\nlayer", "{out}");
    // The user's disk still holds only what was written before the first
    // snapshot: later writes went to layers.
    let raw = std::fs::read(disk).unwrap();
    assert_eq!(&raw[..7], b"on-disk");
    assert!(raw[8 * 512..8 * 512 + 5].iter().all(|&b| b == 0));
}

/// Private memory (copy-on-write pages) and resident memory, in bytes, of
/// this process's mappings of `file`: what the forks mapping it own, and
/// what they use in all.
fn mapping_memory(file: &std::path::Path) -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let name = file.to_str().unwrap();
    let (mut private, mut rss, mut inside) = (0, 0, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.ends_with(name);
            continue;
        }
        if !inside {
            continue;
        }
        let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Private_Dirty:" => private += kib * 1024,
            "Rss:" => rss += kib * 1024,
            _ => {}
        }
    }
    (private, rss)
}

#[test]
fn twenty_forks_share_memory_and_keep_their_disk_writes_apart() {
    const FORKS: usize = 20;
    const MEMORY_MIB: u64 = 192;
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let (_dir, disk) = scratch_file("data.img", 8 << 20);
    let snaps = tempfile::tempdir().unwrap();
    let snap = snaps.path().join("snap");

    let mut vm = boot(builder().memory_mib(MEMORY_MIB).disk(&disk, false));
    sh_ok(
        &mut vm,
        "printf 'from-the-base' | dd of=/dev/vda bs=512 seek=100 conv=fsync 2>/dev/null",
    );
    vm.snapshot(&snap).expect("snapshot");
    vm.kill();
    let disk_at_snapshot = std::fs::read(&disk).unwrap();

    let started = Instant::now();
    let mut forks: Vec<Sandbox> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..FORKS)
            .map(|i| {
                let (snap, disk) = (&snap, &disk);
                scope.spawn(move || {
                    let options = sandbox::RestoreOptions {
                        // The default backend shares one copy between forks.
                        identity: sandbox::fork_identity(format!("fork-{i}")).unwrap(),
                        vm: with_disk(disk),
                        ..Default::default()
                    };
                    restore_ok("restore", Sandbox::restore(snap, options))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("{FORKS} forks restored in {:?}", started.elapsed());

    // Each fork writes its own name over the same disk block, then reads
    // the disk back: it must see its own write and the base's data.
    let mut randoms = std::collections::HashSet::new();
    for (i, fork) in forks.iter_mut().enumerate() {
        let out = sh_ok(
            fork,
            "printf \"$(hostname)\" | dd of=/dev/vda bs=512 seek=200 conv=fsync 2>/dev/null; \
             dd if=/dev/vda bs=512 skip=200 count=1 2>/dev/null | tr -d '\\0'; echo; \
             dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | tr -d '\\0'; echo; \
             head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            format!("fork-{i}"),
            "fork {i} reads another's write: {out}"
        );
        assert_eq!(lines[1], "from-the-base", "fork {i}: {out}");
        assert!(
            randoms.insert(lines[2].to_string()),
            "fork {i} repeats random bytes"
        );
    }

    let (private, rss) = mapping_memory(&snap.join("memory"));
    let all = FORKS as u64 * (MEMORY_MIB << 20);
    eprintln!(
        "{FORKS} forks of a {MEMORY_MIB} MiB guest: {} MiB private (copy-on-write) memory, \
         {} MiB resident through the shared memory file; {:.1}% of {FORKS} x {MEMORY_MIB} MiB is private",
        private >> 20,
        rss >> 20,
        100.0 * private as f64 / all as f64
    );
    assert!(
        private > 0,
        "no private pages found: is the memory file mapped?"
    );
    assert!(
        private < all / 5,
        "the forks own {private} bytes, more than a fifth of {all}"
    );
    for fork in forks {
        stop(fork);
    }
    assert!(
        std::fs::read(&disk).unwrap() == disk_at_snapshot,
        "a fork's write reached the frozen disk"
    );
}

#[test]
fn a_diff_snapshot_writes_only_what_changed_and_restores_through_its_parent() {
    const MEMORY_MIB: u64 = 192;
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let snaps = tempfile::tempdir().unwrap();
    let (full, diff) = (snaps.path().join("full"), snaps.path().join("diff"));
    let mut vm = boot(builder().memory_mib(MEMORY_MIB));
    // Settle: the first exec after boot faults in the shell and friends.
    sh_ok(&mut vm, "true");
    let full_stats = vm.snapshot(&full).expect("full snapshot");
    // Never over an existing snapshot.
    let again = vm.snapshot(&full).unwrap_err().to_string();
    assert!(again.contains("is not empty"), "{again}");

    // Touch 1% of guest memory: random (non-zero) data into tmpfs.
    let touched: u64 = (MEMORY_MIB << 20) / 100;
    let sum = sh_ok(
        &mut vm,
        &format!("head -c {touched} /dev/urandom > /tmp/touched; md5sum < /tmp/touched"),
    );
    let diff_stats = vm.snapshot_diff(&diff).expect("diff snapshot");
    let memory = MEMORY_MIB << 20;
    eprintln!(
        "full snapshot wrote {} MiB; after touching {} KiB ({:.1}% of memory) the diff wrote {} KiB ({:.2}% of memory)",
        full_stats.memory_bytes_written >> 20,
        touched >> 10,
        100.0 * touched as f64 / memory as f64,
        diff_stats.memory_bytes_written >> 10,
        100.0 * diff_stats.memory_bytes_written as f64 / memory as f64
    );
    assert!(
        diff_stats.memory_bytes_written >= touched,
        "the diff misses the touched pages"
    );
    assert!(
        diff_stats.memory_bytes_written < touched * 3,
        "the diff wrote {} bytes for {touched} touched",
        diff_stats.memory_bytes_written
    );
    assert!(diff_stats.memory_bytes_written * 5 < full_stats.memory_bytes_written);
    vm.kill();

    // The diff restores through its parent: the data is there, intact.
    let mut restored = restore_ok(
        "restore diff",
        Sandbox::restore(&diff, sandbox::RestoreOptions::default()),
    );
    assert_eq!(sh_ok(&mut restored, "md5sum < /tmp/touched"), sum);
    stop(restored);
    // The parent alone is the guest before the change.
    let mut before = restore_ok(
        "restore full",
        Sandbox::restore(&full, sandbox::RestoreOptions::default()),
    );
    assert_eq!(
        sh_ok(&mut before, "ls /tmp/touched 2>/dev/null; echo end"),
        "end\n"
    );
    stop(before);
}

#[test]
fn userfaultfd_restores_lazily_and_prefetches_the_recorded_working_set() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let snaps = tempfile::tempdir().unwrap();
    let snap = snaps.path().join("snap");
    let mut vm = boot(builder());
    let sum = sh_ok(
        &mut vm,
        "head -c 3000000 /dev/urandom > /tmp/data; md5sum < /tmp/data",
    );
    vm.snapshot(&snap).expect("snapshot");
    vm.kill();

    let uffd = |prefetch| sandbox::RestoreOptions {
        vm: vmm::RestoreOptions {
            memory: sandbox::MemoryBackend::Uffd { prefetch },
            ..Default::default()
        },
        ..Default::default()
    };
    // Lazily: only what the guest touches is copied in.
    let mut lazy = restore_ok(
        "restore with userfaultfd",
        Sandbox::restore(&snap, uffd(false)),
    );
    assert_eq!(sh_ok(&mut lazy, "md5sum < /tmp/data"), sum);
    let recorded = lazy.vm().save_working_set(&snap).expect("save working set");
    let first = lazy.vm().uffd_stats().unwrap();
    stop(lazy);
    assert!(first.faults > 0 && first.prefetched == 0, "{first:?}");
    assert!(
        first.bytes_copied < 64 << 20,
        "copied {} bytes of a 192 MiB guest",
        first.bytes_copied
    );

    // Again with the working set: the chunks come in before the guest
    // runs, and far fewer faults are left.
    let mut warm = restore_ok("restore with prefetch", Sandbox::restore(&snap, uffd(true)));
    assert_eq!(sh_ok(&mut warm, "md5sum < /tmp/data"), sum);
    let second = warm.vm().uffd_stats().unwrap();
    stop(warm);
    eprintln!(
        "userfaultfd: lazy restore served {} faults ({} KiB); with the {recorded}-chunk working set \
         {} chunks were prefetched and {} faults remained",
        first.faults,
        first.bytes_copied >> 10,
        second.prefetched,
        second.faults
    );
    assert_eq!(second.prefetched as usize, recorded);
    assert!(
        second.faults * 4 < first.faults,
        "{first:?} then {second:?}"
    );
}
