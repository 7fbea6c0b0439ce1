//! A new machine: kernel and initramfs loaded, boot tables written,
//! devices attached, vCPUs at the kernel's entry point.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::virtio::block::Block;
use devices::virtio::mmio::MMIO_LEN;
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use linux_loader::loader::Cmdline;
use vm_memory::GuestAddress;

use super::{assemble, ConsoleOptions, Foundation, GUEST_CID};
use crate::boot;
use crate::config::VmConfig;
use crate::cpu::{cpuid, regs};
use crate::error::{Error, Result};
use crate::layout::CMDLINE_MAX;
use crate::memory;
use crate::runtime_dir::RuntimeDir;
use crate::vm::Vm;
use crate::vstate;

const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule tsc=reliable no_timer_check";

/// Creates the VM described by `config` and starts its vCPUs (unless it
/// asks to start paused).
pub fn boot(config: VmConfig) -> Result<Vm> {
    let started = Instant::now();
    config.check()?;
    let (kvm, vm_fd) = vstate::create_vm()?;
    let mem = memory::create(config.memory_mib << 20)?;
    memory::register(&vm_fd, &mem, false)?;
    let kernel = boot::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initramfs {
        Some(path) => Some(boot::load_initramfs(&mem, path)?),
        None => None,
    };

    let mut foundation = Foundation::new(
        &vm_fd,
        RuntimeDir::new(config.runtime_dir.as_deref())?,
        ConsoleOptions {
            log: config.console_log.as_deref(),
            to_stderr: config.console_to_stderr,
        },
        None,
    )?;
    let devices = &mut foundation.devices;
    for disk in &config.disks {
        let mut block = Block::open(disk.file.clone(), disk.read_only)
            .map_err(|e| Error::Device(e.to_string()))?;
        block.set_flush_policy(disk.flush);
        devices.add_virtio(&vm_fd, &mem, Arc::new(Mutex::new(block)), None)?;
    }
    devices.add_virtio(&vm_fd, &mem, Arc::new(Mutex::new(Rng::new()?)), None)?;
    let vsock = Vsock::new(GUEST_CID, &foundation.vsock_path)?;
    devices.add_virtio(&vm_fd, &mem, Arc::new(Mutex::new(vsock)), None)?;

    let cmdline = kernel_cmdline(&config, &foundation.devices.slots)?;
    boot::write_cmdline(&mem, &cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes_with_nul().len())
        .unwrap_or(0);
    boot::write_boot_info(&mem, &kernel, cmdline_len, initrd)?;
    boot::write_boot_tables(&mem)?;
    boot::mptable::write(&mem, config.cpus)?;

    let supported = vstate::supported_cpuid(&kvm)?;
    let paused = config.start_paused;
    let cpus = config.cpus;
    let external_files = config
        .disks
        .iter()
        .map(|d| d.file.name().to_path_buf())
        .collect();
    let mut vm = assemble(config, kvm, vm_fd, mem, foundation, started)?;
    vm.external_files = external_files;
    let mut fds = Vec::new();
    for i in 0..cpus {
        let fd = vm
            .vm_fd
            .create_vcpu(u64::from(i))
            .map_err(Error::kvm("creating a vCPU"))?;
        fd.set_cpuid2(&cpuid::for_vcpu(&supported, i, cpus))
            .map_err(Error::kvm("setting CPUID"))?;
        regs::setup_msrs(&vm.kvm, &fd)?;
        regs::setup_lapic(&fd)?;
        if i == 0 {
            regs::setup_regs(&fd, kernel.entry)?;
            regs::setup_sregs(&fd, kernel.entry)?;
            regs::setup_fpu(&fd)?;
        }
        fds.push(fd);
    }
    vm.spawn_vcpus(fds, paused)?;
    Ok(vm)
}

/// The base options, the caller's words, and one `virtio_mmio.device=`
/// per device.
fn kernel_cmdline(
    config: &VmConfig,
    slots: &[crate::device_manager::VirtioSlot],
) -> Result<Cmdline> {
    let bad = |e: linux_loader::cmdline::Error| Error::Config(format!("kernel command line: {e}"));
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(bad)?;
    cmdline.insert_str(BASE_CMDLINE).map_err(bad)?;
    if !config.verbose_console {
        cmdline.insert_str("quiet").map_err(bad)?;
    }
    for arg in &config.cmdline {
        cmdline.insert_str(arg).map_err(bad)?;
    }
    for slot in slots {
        cmdline
            .add_virtio_mmio_device(MMIO_LEN, GuestAddress(slot.base), slot.irq, None)
            .map_err(bad)?;
    }
    Ok(cmdline)
}
