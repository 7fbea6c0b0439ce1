#!/usr/bin/env python3
"""Side by side: block I/O under Capsule and QEMU microvm, on the same
kernel, initramfs and guest agent, in the same run.

Both guests: 1 vCPU, 256 MiB, one 512 MiB raw disk (a fresh file on the
same filesystem for each), the VMM's default flush handling (Capsule:
flushes honoured; QEMU: cache=writeback, which honours them too). Each
workload runs as one command through the agent and is timed on the host
around it (one agent round trip each, the same for both):

  seq write   256 MiB in 1 MiB O_DIRECT writes, then fsync     MB/s
  seq read    256 MiB in 1 MiB O_DIRECT reads                   MB/s
  4k reads    16 MiB in 4 KiB O_DIRECT reads, one request each  IOPS
              (queue depth 1, sequential offsets: busybox has no
              random-offset reader; scripts/compare-qemu-debian.py
              has the random row, from Python in a Debian root)
  small files 2000 files of a few bytes written by the shell into a
              fresh ext2, then sync and unmount                  s

Prints medians and Capsule/QEMU ratios (for the rates, above 1 means
Capsule is faster). Needs hardware KVM: run it through
scripts/compare-qemu.sh --block, which uses the nested test host where
needed. ROUNDS (default 2) tunes it.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qemu_agent import CAPSULE, agent_run, boot_qemu, stop_qemu  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "2"))
DISK_MIB = 512
SEQ_MIB = 256
SMALL_MIB = 16

WORKLOADS = [
    ("seq write", f"dd if=/dev/zero of=/dev/vda bs=1M count={SEQ_MIB} oflag=direct conv=fsync 2>/dev/null",
     SEQ_MIB, "MB/s"),
    ("seq read", f"dd if=/dev/vda of=/dev/null bs=1M count={SEQ_MIB} iflag=direct 2>/dev/null",
     SEQ_MIB, "MB/s"),
    ("4k reads", f"dd if=/dev/vda of=/dev/null bs=4096 count={SMALL_MIB * 256} iflag=direct 2>/dev/null",
     SMALL_MIB * 256, "IOPS"),
    ("small files", "mount /dev/vda /mnt && cd /mnt && i=0; while [ $i -lt 2000 ]; do "
     "echo file $i > f$i; i=$((i+1)); done; sync; cd /; umount /mnt",
     None, "s"),
]
# Before the small-files row: a fresh filesystem (not timed).
MKFS = "mke2fs -q -F /dev/vda >/dev/null 2>&1; mkdir -p /mnt"


def disk(workdir, name):
    path = os.path.join(workdir, name)
    with open(path, "wb") as f:
        f.truncate(DISK_MIB << 20)
    return path


def timed_rounds(run_cmd):
    """Runs every workload ROUNDS times through `run_cmd(script)`; returns
    the seconds each took, by workload."""
    times = {name: [] for name, *_ in WORKLOADS}
    for _ in range(ROUNDS):
        for name, script, _, _ in WORKLOADS:
            if name == "small files":
                run_cmd(MKFS)
            t0 = time.monotonic()
            run_cmd(script)
            times[name].append(time.monotonic() - t0)
    return times


def capsule(workdir):
    home = tempfile.mkdtemp(dir=workdir)
    env = dict(os.environ, CAPSULE_HOME=home)
    img = disk(workdir, "capsule.img")
    subprocess.run([CAPSULE, "run", "--keep", "--name", "blk", "--memory", "256M",
                    "--boot-timeout", "300", "--disk", img, "--", "true"],
                   env=env, check=True, stdout=subprocess.DEVNULL)

    def run_cmd(script):
        subprocess.run([CAPSULE, "exec", "blk", "--", "sh", "-c", script], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    try:
        return timed_rounds(run_cmd)
    finally:
        subprocess.run([CAPSULE, "stop", "blk"], env=env)


def qemu(workdir):
    cid = 7
    img = disk(workdir, "qemu.img")
    extra = ["-drive", f"file={img},format=raw,if=none,id=d0", "-device", "virtio-blk-device,drive=d0"]
    proc, _ = boot_qemu(cid, workdir, extra=extra)
    try:
        return timed_rounds(lambda script: agent_run(cid, ["sh", "-c", script]))
    finally:
        stop_qemu(proc)


def main():
    with tempfile.TemporaryDirectory() as workdir:
        ours = capsule(workdir)
        print("capsule done", flush=True)
        theirs = qemu(workdir)
        print("qemu done", flush=True)
    print(f"{ROUNDS} rounds; 1 vCPU, 256 MiB guests, a {DISK_MIB} MiB raw disk each")
    print(f"{'':24}{'capsule':>12}{'qemu':>12}{'ratio':>8}")
    for name, _, amount, unit in WORKLOADS:
        a, b = statistics.median(ours[name]), statistics.median(theirs[name])
        if amount is None:
            print(f"{name:24}{a:10.2f} {unit}{b:10.2f} {unit}{b / a:8.2f}")
        else:
            ra, rb = amount / a, amount / b
            print(f"{name:24}{ra:9.0f} {unit:4}{rb:7.0f} {unit:4}{ra / rb:6.2f}")
    print("(ratio: Capsule's rate over QEMU's, or QEMU's time over Capsule's: above 1 means Capsule is faster)")


if __name__ == "__main__":
    main()
