//! Host tier: `capsule run` fails with errors a user can act on, before
//! any guest is involved.

use std::path::PathBuf;
use std::process::Command;

fn capsule() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capsule"))
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("run capsule");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A file that exists, standing in for a kernel or initramfs the checks
/// should get past.
fn some_file(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, b"not a kernel").unwrap();
    p
}

/// `capsule run` with a stand-in kernel and initramfs plus `extra`
/// arguments, running `true`.
fn run_with_stand_ins(extra: &[&str]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = some_file(&dir, "vmlinux");
    let initramfs = some_file(&dir, "initramfs.cpio");
    let mut cmd = capsule();
    cmd.arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .args(extra)
        .args(["--", "true"]);
    run(&mut cmd)
}

#[test]
fn missing_kernel_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run(capsule()
        .args(["run", "--kernel", "/nonexistent/vmlinux", "--", "true"])
        .env_remove("CAPSULE_KERNEL"));
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");

    let (code, err) = run(capsule()
        .args(["run", "--", "true"])
        .env("CAPSULE_KERNEL", dir.path().join("gone")));
    assert_eq!(code, 125);
    assert!(err.contains("CAPSULE_KERNEL"), "{err}");
}

#[test]
fn missing_rootfs_is_named() {
    let (code, err) = run_with_stand_ins(&["--rootfs", "/nonexistent/root.ext4"]);
    assert_eq!(code, 125);
    assert!(err.contains("/nonexistent/root.ext4"), "{err}");
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        &["run", "--memory", "lots", "--", "true"][..],
        &["run", "--memory", "8M", "--", "true"],
        &["run", "--env", "NOEQUALS", "--", "true"],
        &["run"],
    ] {
        let (code, err) = run(capsule().args(args));
        assert_eq!(code, 2, "{args:?}: {err}");
    }
}

/// Values that once panicked, aborted or slipped words onto the guest's
/// kernel command line are usage errors saying what is wrong.
#[test]
fn hostile_values_are_usage_errors_not_crashes() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--boot-timeout", "NaN", "--", "true"], "above 0"),
        (&["run", "--boot-timeout=-3", "--", "true"], "above 0"),
        (&["run", "--boot-timeout", "1e300", "--", "true"], "days"),
        (&["run", "--timeout", "inf", "--", "true"], "above 0"),
        (
            &["run", "--memory", "18014398509481983M", "--", "true"],
            "more",
        ),
        (
            &["run", "--memory", "99999999999999999999G", "--", "true"],
            "not a size",
        ),
        (&["run", "--memory", "2000000G", "--", "true"], "more"),
        (
            &["run", "--hostname", "x capsule.root=/dev/sda", "--", "true"],
            "invalid hostname",
        ),
        (&["run", "--hostname", "", "--", "true"], "invalid hostname"),
        (&["run", "--cpus", "0", "--", "true"], "--cpus takes 1"),
        (&["run", "--cpus", "200", "--", "true"], "--cpus takes 1"),
        (
            &["fork", "/nonexistent", "--count", "0", "--", "true"],
            "count",
        ),
        (
            &["fork", "/nonexistent", "--count", "100000", "--", "true"],
            "count",
        ),
        (
            &["restore", "/nonexistent", "--hostname", "a b", "--", "true"],
            "invalid hostname",
        ),
    ];
    for (args, says) in cases {
        let (code, err) = run(capsule().args(*args));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn a_garbage_kernel_is_reported_not_run() {
    let (code, err) = run_with_stand_ins(&[]);
    assert_eq!(code, 125);
    // Either KVM is missing here, or the kernel is refused: both say so.
    assert!(
        err.contains("neither an ELF vmlinux") || err.contains("/dev/kvm"),
        "{err}"
    );
}

/// Without /dev/kvm (hidden in a private mount namespace) the error says
/// there is no KVM and what to do.
#[test]
fn no_kvm_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = some_file(&dir, "vmlinux");
    let initramfs = some_file(&dir, "initramfs.cpio");
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {} --initramfs {} -- true",
        env!("CARGO_BIN_EXE_capsule"),
        kernel.display(),
        initramfs.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("Operation not permitted"),
        "this test needs root to make a mount namespace: {err}"
    );
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("/dev/kvm does not exist"), "{err}");
}

/// On this machine's own KVM: a PVM host (software virtualization) cannot
/// run the ordinary guest kernel, and `capsule run` must say so and stop,
/// never hang; on hardware KVM the same command simply works.
#[test]
fn this_hosts_kvm_runs_the_guest_or_explains_why_not() {
    let kernel = std::env::var("CAPSULE_KERNEL")
        .expect("CAPSULE_KERNEL is not set: run the host tier with `make test`");
    let initramfs = std::env::var("CAPSULE_INITRAMFS")
        .expect("CAPSULE_INITRAMFS is not set: run the host tier with `make test`");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let (code, err) = run(capsule().args([
        "run",
        "--kernel",
        &kernel,
        "--initramfs",
        &initramfs,
        "--boot-timeout",
        "120",
        "--",
        "true",
    ]));
    if pvm {
        assert_eq!(code, 125, "{err}");
        assert!(err.contains("PVM"), "{err}");
        assert!(err.contains("PVM-enabled guest kernel"), "{err}");
    } else if std::path::Path::new("/dev/kvm").exists() {
        assert_eq!(code, 0, "{err}");
    } else {
        assert!(err.contains("/dev/kvm does not exist"), "{err}");
    }
}

/// `capsule ls` with `home` as CAPSULE_HOME: (exit code, stderr).
fn ls_with_home(home: &std::path::Path) -> (i32, String) {
    run(capsule().arg("ls").env("CAPSULE_HOME", home))
}

#[test]
fn a_home_others_can_write_or_that_is_a_link_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let (code, err) = ls_with_home(&home);
    assert_eq!(code, 0, "a missing home is made: {err}");
    let mode = std::fs::metadata(&home).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = ls_with_home(&home);
    assert_eq!(code, 125, "{err}");
    assert!(
        err.contains("writable by others") && err.contains("CAPSULE_HOME"),
        "{err}"
    );

    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&home, &link).unwrap();
    let (code, err) = ls_with_home(&link);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("symbolic link"), "{err}");
}

/// Runs as root (the test tiers do): a home another user made, as one
/// would in a shared /tmp before the victim's first run, is refused.
#[test]
fn a_home_another_user_made_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534))
        .expect("this test needs root to give a directory to another user");
    let (code, err) = ls_with_home(&home);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("belongs to uid 65534"), "{err}");

    // The default home of an unprivileged user, planted in /tmp by root.
    let planted = std::path::Path::new("/tmp/capsule-65534");
    let _ = std::fs::remove_dir_all(planted);
    std::fs::create_dir(planted).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_capsule"))
        .arg("ls")
        .env_remove("CAPSULE_HOME")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("setpriv (util-linux) runs");
    let _ = std::fs::remove_dir_all(planted);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("/tmp/capsule-65534") && err.contains("belongs to uid 0"),
        "{err}"
    );
}
