//! Boot a microVM, run a command in it, shut it down.
//!
//!     cargo run --release --example boot_and_exec -- VMLINUX INITRAMFS [COMMAND...]

use std::time::Duration;

use sandbox::VmSettings;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (kernel, initramfs) = (
        args.next().ok_or("kernel?")?,
        args.next().ok_or("initramfs?")?,
    );
    let mut command: Vec<String> = args.collect();
    if command.is_empty() {
        command = vec!["uname".into(), "-a".into()];
    }

    let mut vm = sandbox::Sandbox::builder()
        .kernel(kernel)
        .initramfs(initramfs)
        .cpus(2)
        .memory_mib(256)
        .console_to_stderr(std::env::var_os("CAPSULE_CONSOLE").is_some())
        .verbose_console(std::env::var_os("CAPSULE_CONSOLE").is_some())
        .boot()?;
    let ready = vm.wait_ready(Duration::from_secs(30))?;
    let out = vm.exec(command)?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    vm.shutdown(Duration::from_secs(10))?;

    eprintln!("ready after {ready:?}, exit status {:?}", out.status);
    Ok(())
}
