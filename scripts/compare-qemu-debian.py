#!/usr/bin/env python3
"""Side by side: a real workload under Capsule and QEMU microvm, in the same
run, on the same kernel, initramfs and guest agent, with a Debian bookworm
root (images/build-debian-root.sh: minbase + python3) as an ext4 disk.

Both guests: 2 vCPUs, 1 GiB, the root as one raw virtio-blk disk (a fresh
copy of the image on the same filesystem for each VMM), each VMM's default
flush handling (Capsule: flushes honoured; QEMU: cache=writeback, which
honours them too). The agent starts from the initramfs and switches into
the root (capsule.root=/dev/vda).

Boot (medians of ROUNDS launches, from launching the VMM process):
  ready, initramfs      the agent's hello, no disk
  ready, + disk         the same with the root image attached, not mounted
                        (what the guest kernel's probe of a disk costs)
  ready, ext4 root      the agent's hello after mounting and entering the root
  mount                 `mount /dev/vda` in an initramfs guest, less an
                        exec of `true` (the agent round trip)
Capsule's goal: ready with the ext4 root no later than ready with the
initramfs (and the disk attached) plus the mount.

Workloads (Python in the root, one command each, timed on the host):
  small files   2000 files of 100 bytes written, os.sync(), read back   s
  sqlite        300 inserts, each its own transaction (fsync each)      s
  4k random     4096 O_DIRECT reads of 4 KiB at random offsets of the
                whole disk, one at a time                               IOPS
  cpu           a pure-Python loop (the VMM should not matter)          s

Prints each figure as it is taken; with --combine LOG..., the medians and
Capsule/QEMU ratios from such output. Needs hardware KVM: run it through
scripts/compare-qemu.sh --debian, which uses the nested test host where
needed (one per side, retried if it locks up) and combines the sides.
ROUNDS (default 2) tunes it; SIDES (default "capsule qemu") picks the
VMMs; DEBIAN_ROOT names the image.
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qemu_agent import CAPSULE, CMDLINE, INITRAMFS, KERNEL, agent_run, boot_qemu, stop_qemu  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "2"))
IMAGE = os.environ["DEBIAN_ROOT"]
CPUS, MEMORY = 2, "1G"
# A workload that takes longer has stalled (the nested test host's
# emulated CPU sometimes stops a guest).
TIMEOUT = 300

SMALL_FILES = """
import os
d = "/root/small"
os.makedirs(d, exist_ok=True)
for i in range(2000):
    with open(f"{d}/f{i}", "wb") as f:
        f.write(b"x" * 100)
os.sync()
for i in range(2000):
    with open(f"{d}/f{i}", "rb") as f:
        assert len(f.read()) == 100
for i in range(2000):
    os.unlink(f"{d}/f{i}")
os.sync()
"""
SQLITE = """
import os, sqlite3
path = "/root/bench.db"
if os.path.exists(path):
    os.unlink(path)
db = sqlite3.connect(path, isolation_level=None)
db.execute("create table t (id integer primary key, v text)")
for i in range(300):
    db.execute("begin")
    db.execute("insert into t (v) values (?)", (f"row {i}",))
    db.execute("commit")
db.close()
"""
RANDOM_READS = """
import mmap, os, random
fd = os.open("/dev/vda", os.O_RDONLY | os.O_DIRECT)
size = os.lseek(fd, 0, os.SEEK_END)
buf = mmap.mmap(-1, 4096)
rng = random.Random(7)
for _ in range(4096):
    assert os.preadv(fd, [buf], rng.randrange(size // 4096) * 4096) == 4096
"""
CPU = """
n = 0
for i in range(1_000_000):
    n += i * i % 7
"""
WORKLOADS = [("small files", SMALL_FILES, None, "s"), ("sqlite", SQLITE, None, "s"),
             ("4k random", RANDOM_READS, 4096, "IOPS"), ("cpu", CPU, None, "s")]


def fresh_copy(workdir, name):
    path = os.path.join(workdir, name)
    subprocess.run(["cp", "--sparse=always", IMAGE, path], check=True)
    return path


def capsule(*args, env=None):
    try:
        return subprocess.run([CAPSULE, *args], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, check=True, timeout=2 * TIMEOUT)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        # What the kept sandboxes' children said, and their guests' consoles.
        sys.stderr.write(f"capsule {' '.join(args[:3])} failed: {getattr(e, 'stderr', '')}\n")
        home = (env or {}).get("CAPSULE_HOME")
        for root, _, files in os.walk(os.path.join(home, "sandboxes")) if home else ():
            for name in files:
                if name.endswith(".log"):
                    text = open(os.path.join(root, name), errors="replace").read()[-3000:]
                    sys.stderr.write(f"--- {os.path.join(root, name)}\n{text}\n")
        raise


def capsule_ready(extra, env):
    """Seconds from launch to agent ready for one `capsule run -- true`."""
    t0 = time.monotonic()
    out = capsule("run", "--timings", "--cpus", str(CPUS), "--memory", MEMORY, "--boot-timeout", "300",
                  *extra, "--", "true", env=env)
    wall = time.monotonic() - t0
    m = re.search(r"boot to ready ([\d.]+) ms, .* total ([\d.]+) ms", out.stderr)
    ready_ms, total_ms = map(float, m.groups())
    return wall - total_ms / 1e3 + ready_ms / 1e3


def timed(run_cmd, argv):
    t0 = time.monotonic()
    run_cmd(argv)
    return time.monotonic() - t0


def note(side, row, seconds):
    """Each figure as it is taken, so a run cut short keeps what it had."""
    print(f"{side}: {row} {seconds * 1e3:.0f} ms", flush=True)


def mount_time(run_cmd):
    """Seconds an initramfs guest takes to mount the root (exec of mount,
    less an exec of true); unmounts after."""
    base = timed(run_cmd, ["true"])
    took = timed(run_cmd, ["mount", "-t", "ext4", "/dev/vda", "/mnt"]) - base
    run_cmd(["umount", "/mnt"])
    return took


def workload_rounds(side, start, stop):
    """Each round in a guest of its own: `start()` boots one and returns
    how to run a command in it, `stop()` ends it. A round whose guest dies
    (the nested test host's emulated CPU resets one now and then, QEMU's as
    well as ours) is said so and run again, at most twice in all."""
    times = {name: [] for name, *_ in WORKLOADS}
    lost = 0
    while len(times["cpu"]) < ROUNDS:
        try:
            run_cmd = start()
            got = [(name, timed(run_cmd, ["python3", "-c", script])) for name, script, _, _ in WORKLOADS]
        except Exception as e:  # noqa: BLE001 - any failure loses the round
            lost += 1
            print(f"{side}: a round was lost ({type(e).__name__}: {str(e)[:200]})", flush=True)
            if lost > 2:
                raise
            continue
        finally:
            stop()
        for name, took in got:
            times[name].append(took)
            note(side, name, took)
    return times


def capsule_side(workdir):
    # CAPSULE_LOG=info: a kept sandbox's child logs how its VM ended.
    env = dict(os.environ, CAPSULE_HOME=tempfile.mkdtemp(dir=workdir), CAPSULE_LOG="info")
    img = fresh_copy(workdir, "capsule-root.ext4")
    boot = {"ready, initramfs": [], "ready, + disk": [], "ready, ext4 root": [], "mount": []}
    for _ in range(ROUNDS):
        for row, extra in (("ready, initramfs", []), ("ready, + disk", ["--disk", img]),
                           ("ready, ext4 root", ["--rootfs", img])):
            boot[row].append(capsule_ready(extra, env))
            note("capsule", row, boot[row][-1])
    capsule("run", "--keep", "--name", "mnt", "--cpus", str(CPUS), "--memory", MEMORY, "--boot-timeout", "300",
            "--disk", img, "--", "mkdir", "-p", "/mnt", env=env)
    try:
        for _ in range(ROUNDS):
            boot["mount"].append(mount_time(lambda argv: capsule("exec", "mnt", "--", *argv, env=env)))
            note("capsule", "mount", boot["mount"][-1])
    finally:
        subprocess.run([CAPSULE, "stop", "mnt"], env=env)
    def start():
        capsule("run", "--keep", "--name", "deb", "--cpus", str(CPUS), "--memory", MEMORY, "--boot-timeout", "120",
                "--rootfs", img, "--", "true", env=env)
        return lambda argv: capsule("exec", "deb", "--", *argv, env=env)

    def stop():
        subprocess.run([CAPSULE, "stop", "deb"], env=env, capture_output=True)
    return boot, workload_rounds("capsule", start, stop)


def qemu_side(workdir):
    img = fresh_copy(workdir, "qemu-root.ext4")
    drive = ["-drive", f"file={img},format=raw,if=none,id=d0", "-device", "virtio-blk-device,drive=d0"]
    root = CMDLINE + " capsule.root=/dev/vda"
    boot = {"ready, initramfs": [], "ready, + disk": [], "ready, ext4 root": [], "mount": []}
    cid = 10
    for _ in range(ROUNDS):
        for row, extra, cmdline in (("ready, initramfs", [], CMDLINE), ("ready, + disk", drive, CMDLINE),
                                    ("ready, ext4 root", drive, root)):
            cid += 1
            proc, ready = boot_qemu(cid, workdir, cpus=CPUS, memory=MEMORY, extra=extra, cmdline=cmdline)
            stop_qemu(proc)
            boot[row].append(ready)
            note("qemu", row, ready)
    cid += 1
    proc, _ = boot_qemu(cid, workdir, cpus=CPUS, memory=MEMORY, extra=drive)
    try:
        agent_run(cid, ["mkdir", "-p", "/mnt"], timeout=TIMEOUT)
        for _ in range(ROUNDS):
            boot["mount"].append(mount_time(lambda argv: agent_run(cid, argv, timeout=TIMEOUT)))
            note("qemu", "mount", boot["mount"][-1])
    finally:
        stop_qemu(proc)
    guest = {"cid": cid}

    def start():
        guest["cid"] += 1
        c = guest["cid"]
        guest["proc"], _ = boot_qemu(c, workdir, timeout=120, cpus=CPUS, memory=MEMORY, extra=drive, cmdline=root)
        return lambda argv: agent_run(c, argv, timeout=TIMEOUT)

    def stop():
        if "proc" in guest:
            stop_qemu(guest.pop("proc"))
    return boot, workload_rounds("qemu", start, stop)


def parse_notes(text):
    """The figures in `note` lines of earlier runs: {side: {row: [seconds]}}."""
    taken = {"capsule": {}, "qemu": {}}
    for m in re.finditer(r"^(capsule|qemu): (.+) (\d+) ms$", text, re.M):
        taken[m.group(1)].setdefault(m.group(2), []).append(int(m.group(3)) / 1e3)
    return taken


def report(taken):
    med = statistics.median
    ours, theirs = taken["capsule"], taken["qemu"]
    print(f"\n{CPUS} vCPUs, {MEMORY} guests, Debian bookworm + python3 as a raw ext4 root")
    print(f"{'':20}{'capsule':>12}{'qemu':>12}{'ratio':>8}  rounds")
    boot_rows = ("ready, initramfs", "ready, + disk", "ready, ext4 root", "mount")
    for name in boot_rows:
        if name in ours and name in theirs:
            a, b = med(ours[name]), med(theirs[name])
            print(f"{name:20}{a * 1e3:9.0f} ms{b * 1e3:9.0f} ms{a / b:8.2f}  {len(ours[name])}/{len(theirs[name])}")
    for name, _, amount, unit in WORKLOADS:
        if name in ours and name in theirs:
            a, b = med(ours[name]), med(theirs[name])
            if amount is None:
                print(f"{name:20}{a:10.2f} {unit}{b:10.2f} {unit}{a / b:8.2f}  {len(ours[name])}/{len(theirs[name])}")
            else:
                print(f"{name:20}{amount / a:8.0f} {unit}{amount / b:8.0f} {unit}{b / a:6.2f}"
                      f"  {len(ours[name])}/{len(theirs[name])}")
    print("(ratio: for times Capsule's over QEMU's, below 1 means Capsule is faster; "
          "for IOPS Capsule's over QEMU's, above 1 means faster)")
    if all(k in ours for k in ("ready, ext4 root", "ready, + disk", "mount")):
        ready_root, ready_disk, mount = (med(ours[k]) for k in ("ready, ext4 root", "ready, + disk", "mount"))
        verdict = "met" if ready_root <= ready_disk + mount else "not met"
        print(f"capsule: ready with the ext4 root {ready_root * 1e3:.0f} ms, initramfs (disk attached) + mount "
              f"{(ready_disk + mount) * 1e3:.0f} ms: goal {verdict}")


def main():
    # --combine LOG...: the table from the figures earlier runs printed
    # (scripts/compare-qemu.sh --debian runs each side in a test host of
    # its own, since one may lock up under this load, and combines them).
    if sys.argv[1:2] == ["--combine"]:
        report(parse_notes("".join(open(p, errors="replace").read() for p in sys.argv[2:])))
        return
    for tool in ("qemu-system-x86_64", CAPSULE):
        if not shutil.which(tool):
            sys.exit(f"compare-qemu-debian: {tool} not found")
    sides = os.environ.get("SIDES", "capsule qemu").split()
    print(f"kernel {KERNEL}, initramfs {INITRAMFS}, root {IMAGE}, {ROUNDS} rounds", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        if "capsule" in sides:
            capsule_side(workdir)
        if "qemu" in sides:
            qemu_side(workdir)


if __name__ == "__main__":
    main()
