#!/usr/bin/env python3
"""Side by side: Capsule against QEMU microvm on the same kernel, initramfs
and guest agent, in the same run.

Both VMMs boot the same vmlinux (PVH) and initramfs with 1 vCPU and 256 MiB,
a serial console and virtio-rng; QEMU gets vhost-vsock so the same agent can
announce itself and run a command. Measured per round, from launching the
VMM process:

  ready   the agent's hello arrives on host vsock port 1025
  first   `true` has run in the guest and its exit status is back

Capsule's figures come from `capsule run --timings -- true` (measured inside
the process, plus the process launch measured here). Prints medians and the
Capsule/QEMU ratio. Needs hardware KVM (run it through scripts/compare-qemu.sh,
which uses the nested test host where needed).
"""

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qemu_agent import (  # noqa: E402
    CAPSULE, INITRAMFS, KERNEL, READY_PORT, exec_true, qemu_command, read_frame,
)

ROUNDS = int(os.environ.get("ROUNDS", "5"))


def qemu_round(cid, workdir):
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, READY_PORT))
    listener.listen(1)
    listener.settimeout(120)
    cmd = qemu_command(cid, workdir)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        conn, _ = listener.accept()
        read_frame(conn)
        ready = time.monotonic() - t0
        conn.close()
        exec_true(cid)
        first = time.monotonic() - t0
        return ready, first
    except Exception:
        log = open(f"{workdir}/qemu-console-{cid}.log", errors="replace").read()[-2000:]
        sys.stderr.write(f"QEMU round failed; console tail:\n{log}\n")
        raise
    finally:
        listener.close()
        proc.kill()
        proc.wait()


def capsule_round():
    t0 = time.monotonic()
    out = subprocess.run(
        [CAPSULE, "run", "--timings", "--memory", "256M", "--kernel", KERNEL, "--initramfs", INITRAMFS, "--", "true"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True,
    )
    wall = time.monotonic() - t0
    m = re.search(r"boot to ready ([\d.]+) ms, command ([\d.]+) ms, teardown ([\d.]+) ms, total ([\d.]+) ms", out.stderr)
    ready_ms, command_ms, teardown_ms, total_ms = map(float, m.groups())
    launch = wall - total_ms / 1e3  # process start before boot() began
    return launch + ready_ms / 1e3, launch + (ready_ms + command_ms) / 1e3


def main():
    workdir = tempfile.mkdtemp()
    rows = {"capsule": [], "qemu": []}
    for i in range(ROUNDS):
        rows["capsule"].append(capsule_round())
        rows["qemu"].append(qemu_round(100 + i, workdir))
        print(f"round {i + 1}/{ROUNDS}: capsule ready {rows['capsule'][-1][0] * 1e3:.0f} ms, "
              f"qemu ready {rows['qemu'][-1][0] * 1e3:.0f} ms", flush=True)
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
    print(f"\n{'':10}{'launch -> agent ready':>24}{'launch -> `true` done':>24}")
    for k in ("capsule", "qemu"):
        print(f"{k:10}{med[k][0] * 1e3:>21.0f} ms{med[k][1] * 1e3:>21.0f} ms")
    print(f"{'ratio':10}{med['capsule'][0] / med['qemu'][0]:>24.2f}{med['capsule'][1] / med['qemu'][1]:>24.2f}"
          "   (capsule / qemu; below 1 means Capsule is faster)")


if __name__ == "__main__":
    main()
