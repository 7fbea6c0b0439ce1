//! Sandboxes whose VM runs in a `capsule-vmm` child: a guest booted
//! through the child binary, its snapshot forked into children of their
//! own, and a child that dies.

use std::process::Stdio;

use sandbox::{ChildOptions, ChildVm};

use super::*;

fn in_child(dir: PathBuf) -> ChildOptions {
    let mut options = ChildOptions::new(dir);
    options.customize = Box::new(|cmd| {
        cmd.stderr(Stdio::inherit());
    });
    options
}

fn boot_in_child(builder: SandboxBuilder, dir: PathBuf) -> Sandbox<ChildVm> {
    let config = builder.vm_config().expect("config");
    let child = ChildVm::boot(&config, in_child(dir)).expect("boot in a capsule-vmm child");
    let mut sb = Sandbox::adopt_booted(child, builder.guest_info()).expect("adopt");
    let ready = sb.wait_ready(READY_TIMEOUT);
    ready_ok(&mut sb, ready);
    sb
}

#[test]
fn a_child_runs_the_guest_and_its_snapshot_forks_into_children() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let tmp = tempfile::tempdir().unwrap();
    let (_disk_dir, disk) = scratch_file("data.img", 8 << 20);
    let mut sb = boot_in_child(builder().disk(&disk, false), tmp.path().join("base"));
    assert_ne!(
        sb.machine().pid(),
        std::process::id(),
        "the VM is elsewhere"
    );
    sh_ok(
        &mut sb,
        "echo base > /tmp/who; printf on-disk | dd of=/dev/vda conv=fsync 2>/dev/null",
    );
    let snap = tmp.path().join("snap");
    sb.snapshot(&snap).expect("snapshot through the child");

    for i in 0..3 {
        let options = sandbox::RestoreOptions {
            identity: sandbox::fork_identity(format!("fork-{i}")).unwrap(),
            vm: super::snapshot::with_disk(&disk),
            ..Default::default()
        };
        let dir = tmp.path().join(format!("fork{i}"));
        let mut fork = restore_ok(
            "restore in a child",
            ChildVm::restore(&snap, &options, in_child(dir)),
        );
        let out = sh_ok(&mut fork, "cat /tmp/who; hostname; head -c 7 /dev/vda");
        assert_eq!(out, format!("base\nfork-{i}\non-disk"));
        let timings = fork
            .restore_timings()
            .expect("a restore says where its time went");
        assert!(
            timings.phases.iter().any(|(p, _)| p.contains("memory"))
                && timings.phases.iter().any(|(p, _)| p.contains("agent")),
            "{timings}"
        );
        assert_eq!(fork.kill(), VmExit::Stopped);
    }
    // The original carries on, and powers off cleanly through its agent.
    assert_eq!(sh_ok(&mut sb, "cat /tmp/who"), "base\n");
    stop(sb);
}

#[test]
fn a_child_that_dies_is_seen_to_have_died() {
    let _watchdog = Watchdog::arm(TEST_LIMIT);
    let tmp = tempfile::tempdir().unwrap();
    let mut sb = boot_in_child(builder(), tmp.path().join("doomed"));
    let pid = nix::unistd::Pid::from_raw(sb.machine().pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let exit = sb.wait(Some(Duration::from_secs(30)));
    assert!(
        matches!(&exit, Some(VmExit::Error(m)) if m.contains("went away")),
        "{exit:?}"
    );
    assert!(
        sb.exec(["true"]).is_err(),
        "nothing answers for a dead child"
    );
}
