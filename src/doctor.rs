//! `capsule doctor`: whether this host can run sandboxes, and if not, why
//! and what to do. Each check says what it found; the exit status is 0
//! only when every required check passed.

use std::path::Path;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    /// False for a check whose failure leaves sandboxes possible.
    required: bool,
    found: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn check(name: &'static str, required: bool, result: Result<String, (String, String)>) -> Check {
    match result {
        Ok(found) => Check {
            name,
            ok: true,
            required,
            found,
            fix: None,
        },
        Err((found, fix)) => Check {
            name,
            ok: false,
            required,
            found,
            fix: Some(fix),
        },
    }
}

fn kvm_device() -> Result<String, (String, String)> {
    let path = Path::new("/dev/kvm");
    if !path.exists() {
        return Err((
            "/dev/kvm does not exist".into(),
            "load kvm_intel or kvm_amd (modprobe), or enable virtualization in the firmware or \
             the VM's settings (nested virtualization)"
                .into(),
        ));
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Ok("/dev/kvm opens read-write".into()),
        Err(e) => Err((
            format!("/dev/kvm: {e}"),
            "add this user to the kvm group (usermod -aG kvm $USER, then log in again)".into(),
        )),
    }
}

fn kvm_flavor() -> Result<String, (String, String)> {
    let flavor = vmm::KvmFlavor::detect();
    if flavor.is_hardware() {
        Ok(format!("{flavor:?} hardware virtualization"))
    } else {
        Err((
            format!("{flavor:?}: {}", vmm::PVM_HINT),
            "run on a host with VT-x or AMD-V (the test suite uses a nested test host here)".into(),
        ))
    }
}

fn artifact(var: &str, file: &str) -> Result<String, (String, String)> {
    crate::artifacts::find(None, var, file)
        .map(|p| p.display().to_string())
        .map_err(|e| {
            (
                format!("{e:#}"),
                "run `make artifacts`, or set the path".into(),
            )
        })
}

fn vmm_child() -> Result<String, (String, String)> {
    let exe = capsule_vmm::client::executable();
    if exe.is_file() {
        Ok(exe.display().to_string())
    } else {
        Err((
            format!("{} does not exist", exe.display()),
            "build it (cargo build --release -p capsule-vmm) or set CAPSULE_VMM".into(),
        ))
    }
}

fn home() -> Result<String, (String, String)> {
    crate::keeper::home()
        .map(|p| format!("{} (private)", p.display()))
        .map_err(|e| {
            (
                format!("{e:#}"),
                "set CAPSULE_HOME to a directory of your own".into(),
            )
        })
}

fn daemon() -> Result<String, (String, String)> {
    let socket = crate::daemon::socket_path().map_err(|e| (format!("{e:#}"), String::new()))?;
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(_) => Ok(format!("serving on {}", socket.display())),
        Err(_) => Err((
            format!("nothing serves {}", socket.display()),
            "start it with `capsule serve` (needed for capsule sandbox/group/secret/events)".into(),
        )),
    }
}

pub fn doctor(args: DoctorArgs) -> Result<u8> {
    let checks = vec![
        check("kvm device", true, kvm_device()),
        check("kvm kind", true, kvm_flavor()),
        check(
            "guest kernel",
            true,
            artifact("CAPSULE_KERNEL", crate::artifacts::KERNEL_FILE),
        ),
        check(
            "guest initramfs",
            true,
            artifact("CAPSULE_INITRAMFS", crate::artifacts::INITRAMFS_FILE),
        ),
        check("capsule-vmm", true, vmm_child()),
        check("home", true, home()),
        check("daemon", false, daemon()),
    ];
    let ready = checks.iter().all(|c| c.ok || !c.required);
    if args.json {
        let report = serde_json::json!({ "ready": ready, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &checks {
            let mark = match (c.ok, c.required) {
                (true, _) => "ok  ",
                (false, true) => "FAIL",
                (false, false) => "note",
            };
            println!("{mark} {:<16} {}", c.name, c.found);
            if let Some(fix) = &c.fix {
                println!("     {:<16} -> {fix}", "");
            }
        }
        println!(
            "{}",
            if ready {
                "this host can run sandboxes"
            } else {
                "this host cannot run sandboxes yet (see FAIL above)"
            }
        );
    }
    Ok(if ready { 0 } else { 1 })
}
