"""Helpers shared by the QEMU side-by-side scripts: the guest agent's wire
protocol over AF_VSOCK (as the host sees a QEMU guest through vhost-vsock),
QEMU microvm's command line for our kernel and initramfs, and QMP."""

import json
import os
import socket
import struct
import subprocess
import sys
import time

KERNEL = os.environ["CAPSULE_KERNEL"]
INITRAMFS = os.environ["CAPSULE_INITRAMFS"]
CAPSULE = os.environ.get("CAPSULE_BIN", "target/release/capsule")
CMDLINE = "console=ttyS0 reboot=k panic=1 pci=off nomodule tsc=reliable no_timer_check quiet capsule.hostname=capsule"
READY_PORT, AGENT_PORT = 1025, 1024
# Agent protocol 2 (guest-agent/src/protocol): the frame kinds used here.
HELLO, OPEN, DATA, WINDOW, END, PING, PONG = 1, 2, 4, 6, 8, 10, 11
STDOUT = 1
WINDOW_BYTES = 1 << 20
HELLO_PAYLOAD = json.dumps(
    {"protocol": 2, "software": "compare-qemu", "window": WINDOW_BYTES, "max_streams": 0}
).encode()


def frame(kind, stream, payload):
    return struct.pack("<IBI", 5 + len(payload), kind, stream) + payload


def run(agent, argv, stream=1):
    """Runs `argv` on a connected agent (hello done); returns (how many
    stdout bytes it wrote, its exit status). Grants the window back as
    output is read."""
    agent.sendall(frame(OPEN, stream, json.dumps({"op": "exec", "argv": argv}).encode()))
    out, unacked = 0, 0
    while True:
        kind, _, payload = read_frame(agent)
        if kind == DATA:
            if payload[:1] == bytes([STDOUT]):
                out += len(payload) - 1
            unacked += len(payload) - 1
            if unacked >= WINDOW_BYTES // 4:
                agent.sendall(frame(WINDOW, stream, struct.pack("<I", unacked)))
                unacked = 0
        elif kind == PING:
            agent.sendall(frame(PONG, 0, payload))
        elif kind == END:
            return out, json.loads(payload)


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def read_frame(sock):
    (length,) = struct.unpack("<I", read_exact(sock, 4))
    kind, stream = struct.unpack("<BI", read_exact(sock, 5))
    return kind, stream, read_exact(sock, length - 5)


def qemu_command(cid, workdir, memory="256M", extra=(), cpus=1, cmdline=CMDLINE):
    return [
        "qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host",
        "-smp", str(cpus), "-m", memory, "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot", "-serial", f"file:{workdir}/qemu-console-{cid}.log",
        "-kernel", KERNEL, "-initrd", INITRAMFS, "-append", cmdline,
        "-device", "virtio-rng-device",
        "-device", f"vhost-vsock-device,guest-cid={cid}",
        *extra,
    ]


def exec_true(cid, deadline=60):
    """Connects to the agent of guest `cid` and runs `true`. Retries while
    the agent is not listening yet, and when the connection is reset: a
    guest restored by QEMU gets a vsock transport reset after it resumes,
    which drops a connection made before the guest processed it (Capsule's
    restored device resets the old connections in order instead, so a new
    one can be made at once)."""
    end = time.monotonic() + deadline
    while True:
        agent = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        agent.settimeout(max(1, end - time.monotonic()))
        try:
            agent.connect((cid, AGENT_PORT))
            agent.sendall(frame(HELLO, 0, HELLO_PAYLOAD))
            read_frame(agent)
            _, status = run(agent, ["true"])
            assert status.get("code") == 0, status
            return
        except (OSError, EOFError):
            if time.monotonic() > end:
                raise
            time.sleep(0.005)
        finally:
            agent.close()


class Qmp:
    """A minimal QMP client on a Unix socket."""

    def __init__(self, path, timeout=120):
        end = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.01)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.command("qmp_capabilities")

    def command(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            return reply.get("return")

    def close(self):
        self.sock.close()


def boot_qemu(cid, workdir, timeout=300, **kwargs):
    """Launches QEMU microvm (`kwargs` as for qemu_command) and waits for
    the agent's hello. Returns (the process, seconds from launch to ready).
    Kills QEMU and shows its console's tail if the guest never gets ready."""
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, READY_PORT))
    listener.listen(1)
    listener.settimeout(timeout)
    t0 = time.monotonic()
    proc = subprocess.Popen(qemu_command(cid, workdir, **kwargs), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        conn, _ = listener.accept()
        read_frame(conn)
        ready = time.monotonic() - t0
        conn.close()
        return proc, ready
    except BaseException:
        stop_qemu(proc)
        log = open(f"{workdir}/qemu-console-{cid}.log", errors="replace").read()[-2000:]
        sys.stderr.write(f"QEMU guest {cid} never got ready; console tail:\n{log}\n")
        raise
    finally:
        listener.close()


def stop_qemu(proc):
    proc.kill()
    proc.wait()


def agent_run(cid, argv, timeout=600):
    """Runs `argv` through the agent of QEMU guest `cid` on a connection
    of its own and checks that it exited 0."""
    agent = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    agent.settimeout(timeout)
    try:
        agent.connect((cid, AGENT_PORT))
        agent.sendall(frame(HELLO, 0, HELLO_PAYLOAD))
        read_frame(agent)
        _, status = run(agent, argv)
        assert status.get("code") == 0, (argv, status)
    finally:
        agent.close()
