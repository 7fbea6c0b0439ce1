#!/usr/bin/env python3
"""Side by side: Capsule's snapshots against QEMU's own save/restore
(migration to a file, then -incoming), on the same kernel, initramfs and
guest agent, in the same run.

Both guests: 1 vCPU, 256 MiB, booted to the agent and primed with one
`true`. Measured:

  save      Capsule: `capsule snapshot` of a kept sandbox (wall time of the
            command); QEMU: `stop` + `migrate` to a file until completed
  restore   from launching the VMM process to `true` having run in the
            restored guest (Capsule: `capsule restore DIR -- true`;
            QEMU: `-incoming "exec:cat FILE"`, then the agent over vsock)
  fork N    N restores of one snapshot launched at once, until every one
            has run `true` (Capsule: `capsule fork --count N -- true`;
            QEMU: N processes each loading the same file)

Prints medians and Capsule/QEMU ratios. Needs hardware KVM: run it through
scripts/compare-qemu.sh --snapshot, which uses the nested test host where
needed. ROUNDS (default 3) and FORKS (default "1 10 50") tune it.
"""

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qemu_agent import (  # noqa: E402
    CAPSULE, INITRAMFS, KERNEL, READY_PORT, Qmp, exec_true, qemu_command, read_frame,
)

ROUNDS = int(os.environ.get("ROUNDS", "3"))
FORKS = [int(n) for n in os.environ.get("FORKS", "1 10 50").split()]


def capsule(*args, env=None):
    out = subprocess.run(
        [CAPSULE, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"capsule {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def capsule_rounds(workdir):
    env = dict(os.environ, CAPSULE_HOME=f"{workdir}/capsule-home")
    common = ["--kernel", KERNEL, "--initramfs", INITRAMFS]
    snap = f"{workdir}/capsule-snap"
    saves, restores = [], []
    for _ in range(ROUNDS):
        shutil.rmtree(snap, ignore_errors=True)
        capsule("run", "--keep", "--name", "cmp", "--memory", "256M", *common, "--", "true", env=env)
        t0 = time.monotonic()
        capsule("snapshot", "cmp", "--to", snap, env=env)
        saves.append(time.monotonic() - t0)
        capsule("stop", "cmp", env=env)
        t0 = time.monotonic()
        capsule("restore", snap, "--", "true", env=env)
        restores.append(time.monotonic() - t0)
    forks = {}
    for n in FORKS:
        t0 = time.monotonic()
        capsule("fork", snap, "--count", str(n), "--", "true", env=env)
        forks[n] = time.monotonic() - t0
        print(f"capsule fork {n}: {forks[n] * 1e3:.0f} ms", flush=True)
    return saves, restores, forks


def qemu_boot(cid, workdir, qmp_path):
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, READY_PORT))
    listener.listen(1)
    listener.settimeout(120)
    proc = subprocess.Popen(
        qemu_command(cid, workdir, extra=["-qmp", f"unix:{qmp_path},server=on,wait=off"]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        conn, _ = listener.accept()
        read_frame(conn)
        conn.close()
    finally:
        listener.close()
    exec_true(cid)
    return proc


def launch_restore(cid, workdir, state, qmp_path):
    return subprocess.Popen(
        qemu_command(cid, workdir, extra=[
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-incoming", f"exec:cat {state}",
        ]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def finish_restore(proc, cid, workdir, qmp_path, poll=0.002):
    """Waits for the incoming migration, continues the guest (it was
    stopped when saved, and keeps that state) and runs `true` in it.
    `poll` is how often to ask QMP whether the migration is done: many
    restores polling at once every 2 ms would starve the guests of CPU."""
    try:
        qmp = Qmp(qmp_path)
        while qmp.command("query-migrate").get("status") != "completed":
            time.sleep(poll)
        qmp.command("cont")
        qmp.close()
        exec_true(cid, deadline=float(os.environ.get("QEMU_RESTORE_DEADLINE", "180")))
    except Exception:
        try:
            qmp = Qmp(qmp_path, timeout=5)
            sys.stderr.write(f"QEMU restore: status {qmp.command('query-status')}, "
                             f"migration {qmp.command('query-migrate')}\n")
        except Exception as e:
            sys.stderr.write(f"QEMU restore: no QMP ({e})\n")
        proc.kill()
        sys.stderr.write(proc.stderr.read().decode(errors="replace")[-2000:])
        log = open(f"{workdir}/qemu-console-{cid}.log", errors="replace").read()[-2000:]
        sys.stderr.write(f"console tail:\n{log}\n")
        raise


def stop(proc):
    proc.kill()
    proc.wait()


def qemu_rounds(workdir):
    state = f"{workdir}/qemu.state"
    saves, restores = [], []
    for i in range(ROUNDS):
        qmp_path = f"{workdir}/qmp-{i}.sock"
        proc = qemu_boot(3000 + i, workdir, qmp_path)
        qmp = Qmp(qmp_path)
        t0 = time.monotonic()
        qmp.command("stop")
        qmp.command("migrate", uri=f"exec:cat > {state}")
        while qmp.command("query-migrate").get("status") not in ("completed", "failed"):
            time.sleep(0.002)
        saves.append(time.monotonic() - t0)
        status = qmp.command("query-migrate").get("status")
        qmp.close()
        stop(proc)
        if status != "completed":
            raise RuntimeError(f"QEMU migration to a file: {status}")
        t0 = time.monotonic()
        qmp_path = f"{workdir}/qmp-r{i}.sock"
        proc = launch_restore(3100 + i, workdir, state, qmp_path)
        finish_restore(proc, 3100 + i, workdir, qmp_path)
        restores.append(time.monotonic() - t0)
        stop(proc)
    forks = {}
    for n in FORKS:
        t0 = time.monotonic()
        procs = []
        try:
            for k in range(n):
                procs.append(launch_restore(4000 + k, workdir, state, f"{workdir}/qmp-f{k}.sock"))
            with ThreadPoolExecutor(max_workers=n) as pool:
                done = [
                    pool.submit(finish_restore, p, 4000 + k, workdir, f"{workdir}/qmp-f{k}.sock",
                                poll=0.002 * n)
                    for k, p in enumerate(procs)
                ]
                for d in done:
                    d.result()
            forks[n] = time.monotonic() - t0
            print(f"qemu fork {n}: {forks[n] * 1e3:.0f} ms", flush=True)
        finally:
            for p in procs:
                stop(p)
    return saves, restores, forks


def main():
    workdir = tempfile.mkdtemp()
    print(f"{ROUNDS} rounds, forks {FORKS}; 1 vCPU, 256 MiB guests", flush=True)
    c_save, c_restore, c_forks = capsule_rounds(workdir)
    print("capsule done", flush=True)
    q_save, q_restore, q_forks = qemu_rounds(workdir)
    print("qemu done\n", flush=True)
    rows = [
        ("save (snapshot to disk)", statistics.median(c_save), statistics.median(q_save)),
        ("restore to first `true`", statistics.median(c_restore), statistics.median(q_restore)),
    ]
    rows += [(f"fork {n} to `true` in all", c_forks[n], q_forks[n]) for n in FORKS]
    print(f"{'':28}{'capsule':>12}{'qemu':>12}{'ratio':>8}")
    for name, c, q in rows:
        print(f"{name:28}{c * 1e3:>9.0f} ms{q * 1e3:>9.0f} ms{c / q:>8.2f}")
    print("(ratio = capsule / qemu; below 1 means Capsule is faster)")
    size = os.path.getsize(f"{workdir}/qemu.state")
    used = sum(
        os.stat(os.path.join(f"{workdir}/capsule-snap", f)).st_blocks * 512
        for f in os.listdir(f"{workdir}/capsule-snap")
    )
    print(f"on disk: capsule snapshot {used >> 20} MiB, qemu state file {size >> 20} MiB")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
