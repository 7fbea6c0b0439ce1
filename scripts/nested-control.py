#!/usr/bin/env python3
"""Control experiment for the nested test host: runs the guest tier's
10 MB stdout/stderr workload under QEMU microvm (2 vCPUs, vhost-vsock, the
same kernel, initramfs and agent), ROUNDS times, each in a fresh VM.

Inside the nested test host (QEMU TCG emulating SVM) some rounds end with
the guest triple-faulting or stalling without a word on its console; this
script shows that QEMU's guests do it as often as Capsule's, so it is the
environment and not the VMM. Run it there with:

    testhost/run.sh --env CAPSULE_KERNEL --env CAPSULE_INITRAMFS -- \\
        python3 scripts/nested-control.py

Prints one line per round and a summary; exits non-zero if any failed.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("compare_qemu", os.path.join(HERE, "compare-qemu.py"))
cq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cq)

ROUNDS = int(os.environ.get("ROUNDS", "16"))
CPUS = os.environ.get("CPUS", "2")
SIZE = 10 * 1024 * 1024
SCRIPT = ("(i=1; while [ $i -le 2000 ]; do echo \"err $i\" >&2; i=$((i+1)); done) & "
          f"yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | head -c {SIZE}; wait")


def one_round(cid, console):
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, cq.READY_PORT))
    listener.listen(1)
    listener.settimeout(120)
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host",
         "-smp", CPUS, "-m", "192M", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
         "-serial", f"file:{console}", "-kernel", cq.KERNEL, "-initrd", cq.INITRAMFS,
         "-append", cq.CMDLINE.replace(" quiet", ""),
         "-device", "virtio-rng-device", "-device", f"vhost-vsock-device,guest-cid={cid}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        conn, _ = listener.accept()
        cq.read_frame(conn)
        conn.close()
        agent = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        agent.settimeout(90)
        agent.connect((cid, cq.AGENT_PORT))
        agent.sendall(cq.frame(cq.HELLO, 0, cq.HELLO_PAYLOAD))
        cq.read_frame(agent)
        out, status = cq.run(agent, ["sh", "-c", SCRIPT])
        if out != SIZE or status.get("code") != 0:
            return f"wrong result: {out} bytes, {status}"
        return None
    except Exception as e:  # the guest died or stalled: say how
        return f"{e!r}; QEMU {'still running' if proc.poll() is None else 'exited'}"
    finally:
        listener.close()
        proc.kill()
        proc.wait()


def main():
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ROUNDS):
            console = os.path.join(tmp, f"console-{r}.log")
            t0 = time.monotonic()
            problem = one_round(300 + r, console)
            took = time.monotonic() - t0
            if problem:
                failed += 1
                tail = open(console, errors="replace").read()[-600:]
                print(f"round {r + 1}: FAILED after {took:.0f} s: {problem}\n  console tail:\n{tail}", flush=True)
            else:
                print(f"round {r + 1}: ok in {took:.0f} s", flush=True)
    print(f"qemu microvm, {CPUS} vCPUs: {ROUNDS - failed} ok, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
