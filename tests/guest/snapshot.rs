//! Snapshots, restores and forks of real guests.

use super::*;

/// Starts a loop in the guest that counts in a tmpfs file, ten times a
/// second, detached from the exec that started it. With
/// CAPSULE_DEBUG_COUNT set it also prints the count on the console.
fn start_counter(vm: &mut Vm) {
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

fn count(vm: &mut Vm) -> u64 {
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

    let mut restored = Vm::restore(&snap, vmm::RestoreOptions::default()).expect("restore");
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
        let options = vmm::RestoreOptions {
            identity: vmm::fork_identity(name).unwrap(),
            ..Default::default()
        };
        Vm::restore(&snap, options).expect("restore")
    };
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
