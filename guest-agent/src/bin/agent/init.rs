//! PID 1 duties: mount the basic filesystems, switch to the root disk if
//! one was given, name the machine, and power off cleanly.

use std::time::Duration;

use crate::sys;

/// Options the VMM passes on the kernel command line.
#[derive(Debug, Default)]
pub struct BootOptions {
    /// Block device holding the root filesystem (`capsule.root=/dev/vda`).
    pub root: Option<String>,
    pub root_fstype: String,
    pub root_readonly: bool,
    pub hostname: String,
}

impl BootOptions {
    pub fn parse(cmdline: &str) -> Self {
        let mut opts = BootOptions {
            root_fstype: "ext4".into(),
            hostname: "capsule".into(),
            ..Default::default()
        };
        for word in cmdline.split_whitespace() {
            match word.split_once('=') {
                Some(("capsule.root", v)) => opts.root = Some(v.to_string()),
                Some(("capsule.rootfstype", v)) => opts.root_fstype = v.to_string(),
                Some(("capsule.hostname", v)) => opts.hostname = v.to_string(),
                None if word == "capsule.ro" => opts.root_readonly = true,
                _ => {}
            }
        }
        opts
    }
}

fn mkdir(path: &str) {
    let _ = std::fs::create_dir_all(path);
}

fn mount_or_warn(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) {
    mkdir(target);
    if let Err(e) = sys::mount(source, target, Some(fstype), flags, data) {
        if e.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("capsule-agent: mount {fstype} on {target}: {e}");
        }
    }
}

/// Mounted twice: once to read the command line, again in the new root.
fn mount_proc() {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_or_warn("proc", "/proc", "proc", flags, None);
}

/// Mounted twice: once to find the root disk, again in the new root.
fn mount_dev() {
    mount_or_warn(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID,
        Some("mode=0755"),
    );
}

/// Sets the machine up; returns the boot options it found.
pub fn setup() -> BootOptions {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    mount_proc();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let opts = BootOptions::parse(&cmdline);

    if let Some(root) = &opts.root {
        mount_dev();
        if let Err(e) = switch_root(root, &opts) {
            eprintln!("capsule-agent: cannot switch to root {root}: {e}; staying in the initramfs");
        }
    }

    mount_proc();
    mount_or_warn(
        "sysfs",
        "/sys",
        "sysfs",
        nosuid_nodev | libc::MS_NOEXEC,
        None,
    );
    mount_dev();
    mount_or_warn(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    );
    mount_or_warn(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        nosuid_nodev,
        Some("mode=1777"),
    );
    mount_or_warn("tmpfs", "/tmp", "tmpfs", nosuid_nodev, Some("mode=1777"));
    mount_or_warn("tmpfs", "/run", "tmpfs", nosuid_nodev, Some("mode=0755"));
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    if let Err(e) = sys::sethostname(&opts.hostname) {
        eprintln!("capsule-agent: sethostname: {e}");
    }
    // Servers in the guest listen on its loopback, which is where
    // forwarded ports and previews connect.
    if let Err(e) = sys::loopback_up() {
        eprintln!("capsule-agent: cannot bring up the loopback interface: {e}");
    }
    opts
}

/// Mounts `device` and makes it `/`, keeping this process (and its
/// in-memory binary) as PID 1. Works from an initramfs, where
/// pivot_root is not allowed: move the new root over `/` and chroot.
fn switch_root(device: &str, opts: &BootOptions) -> std::io::Result<()> {
    let mut flags = 0;
    if opts.root_readonly {
        flags |= libc::MS_RDONLY;
    }
    mkdir("/newroot");
    sys::mount(device, "/newroot", Some(&opts.root_fstype), flags, None)?;
    let _ = sys::umount("/proc", libc::MNT_DETACH);
    let _ = sys::umount("/dev", libc::MNT_DETACH);
    std::env::set_current_dir("/newroot")?;
    sys::mount(".", "/", None, libc::MS_MOVE, None)?;
    sys::chroot(".")?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// Stops everything, flushes the disks and resets the VM, which the VMM
/// takes as the end of the VM. Never returns.
pub fn shutdown(why: &str) -> ! {
    eprintln!("capsule-agent: {why}");
    sys::sync();
    let _ = sys::kill(-1, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(50));
    let _ = sys::kill(-1, libc::SIGKILL);
    sys::sync();
    // Remount read-only so the filesystem is clean on the host.
    let _ = sys::mount("none", "/", None, libc::MS_REMOUNT | libc::MS_RDONLY, None);
    sys::sync();
    let err = sys::reboot();
    eprintln!("capsule-agent: reboot failed: {err}");
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_boot_options() {
        let o = BootOptions::parse(
            "console=ttyS0 capsule.root=/dev/vda capsule.ro capsule.hostname=box-7 quiet",
        );
        assert_eq!(o.root.as_deref(), Some("/dev/vda"));
        assert!(o.root_readonly);
        assert_eq!(o.hostname, "box-7");
        assert_eq!(o.root_fstype, "ext4");
        let d = BootOptions::parse("");
        assert!(d.root.is_none());
        assert_eq!(d.hostname, "capsule");
    }
}
