//! What kind of KVM this host offers.

use std::path::Path;

/// How `/dev/kvm` is implemented on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavor {
    /// Intel VT-x (`kvm_intel`).
    Intel,
    /// AMD-V (`kvm_amd`).
    Amd,
    /// PVM, software virtualization on pagetables (`kvm_pvm`): an ordinary
    /// Linux guest kernel does not run on it.
    Pvm,
    /// No known KVM module is loaded (or /sys is not visible).
    Unknown,
}

impl KvmFlavor {
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    pub fn detect_in(sys_module: &Path) -> Self {
        let has = |m: &str| sys_module.join(m).exists();
        if has("kvm_pvm") {
            KvmFlavor::Pvm
        } else if has("kvm_intel") {
            KvmFlavor::Intel
        } else if has("kvm_amd") {
            KvmFlavor::Amd
        } else {
            KvmFlavor::Unknown
        }
    }

    /// True if an unmodified Linux guest can run here.
    pub fn is_hardware(self) -> bool {
        matches!(self, KvmFlavor::Intel | KvmFlavor::Amd)
    }
}

/// Raises this process's soft limit on open files to its hard limit and
/// returns the new limit. Every VM holds a few dozen descriptors (KVM,
/// eventfds, sockets, files): the usual soft limit of 1024 runs out at a
/// few dozen VMs in one process. A library does not change process limits
/// on its own; programs that run many VMs call this.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_flavor_from_loaded_modules() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(KvmFlavor::detect_in(dir.path()), KvmFlavor::Unknown);
        std::fs::create_dir(dir.path().join("kvm_amd")).unwrap();
        assert_eq!(KvmFlavor::detect_in(dir.path()), KvmFlavor::Amd);
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert_eq!(KvmFlavor::detect_in(dir.path()), KvmFlavor::Pvm);
        assert!(!KvmFlavor::Pvm.is_hardware());
        assert!(KvmFlavor::Amd.is_hardware());
    }
}
