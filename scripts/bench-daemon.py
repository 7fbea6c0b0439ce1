#!/usr/bin/env python3
"""The manager's figures, through its HTTP API on the Unix socket, as a
client sees them:

  create (pool)      POST /v1/sandboxes from a template whose warm pool
                     has a sandbox ready, until the answer (201, running)
  create (template)  the same with no pool: a restore on the spot
  50 concurrent      50 creates from the template sent at once: the time
                     until the last is running, and each one's latency
  daemon RSS         the daemon's resident memory with those 50 running
                     (the VMM processes are children of their own)

Each create is followed by its delete. Prints p50 and p99 (of ROUNDS
creates, default 30) and a JSON line. Needs guests: run it through
scripts/bench-daemon.sh, which uses the nested test host where needed.
"""

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

CAPSULE = os.environ.get("CAPSULE_BIN", "target/release/capsule")
KERNEL = os.environ["CAPSULE_KERNEL"]
INITRAMFS = os.environ["CAPSULE_INITRAMFS"]
ROUNDS = int(os.environ.get("ROUNDS", "30"))
CONCURRENT = int(os.environ.get("CONCURRENT", "50"))


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=600):
        super().__init__("capsule", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Api:
    def __init__(self, socket_path):
        self.socket_path = socket_path

    def call(self, method, path, body=None):
        conn = UnixConnection(self.socket_path)
        try:
            headers = {"content-type": "application/json"} if body is not None else {}
            conn.request(method, path, json.dumps(body) if body is not None else None, headers)
            response = conn.getresponse()
            text = response.read()
            return response.status, (json.loads(text) if text else None)
        finally:
            conn.close()

    def ok(self, method, path, body=None, want=(200, 201, 204)):
        status, answer = self.call(method, path, body)
        if status not in want:
            raise RuntimeError(f"{method} {path}: {status} {answer}")
        return answer


def percentile(values, p):
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def timed_create(api, body):
    t0 = time.monotonic()
    s = api.ok("POST", "/v1/sandboxes", body)
    return time.monotonic() - t0, s["id"]


def pool_ready(api, template):
    for pool in api.ok("GET", "/v1/pools"):
        if pool["template"] == template:
            return pool["ready"]
    return 0


def wait_pool(api, template, n, within=300):
    end = time.monotonic() + within
    while pool_ready(api, template) < n:
        if time.monotonic() > end:
            raise RuntimeError(f"the pool of {template} never reached {n} ready")
        time.sleep(0.05)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    home = tempfile.mkdtemp(prefix="capsule-bench-daemon-")
    env = dict(os.environ, CAPSULE_HOME=home, CAPSULE_LOG="warn")
    log = open(os.path.join(home, "daemon.log"), "w")
    daemon = subprocess.Popen(
        [CAPSULE, "serve", "--kernel", KERNEL, "--initramfs", INITRAMFS],
        env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )
    api = Api(os.path.join(home, "api.sock"))
    try:
        end = time.monotonic() + 30
        while not os.path.exists(api.socket_path):
            if daemon.poll() is not None or time.monotonic() > end:
                raise RuntimeError("the daemon did not start")
            time.sleep(0.02)
        api.ok("POST", "/v1/templates",
               {"name": "bench", "memory_mib": 128, "cmd": ["true"]})
        body = {"template": "bench", "timeout_seconds": 0}

        from_template = []
        for _ in range(ROUNDS):
            took, sid = timed_create(api, body)
            from_template.append(took)
            api.ok("DELETE", f"/v1/sandboxes/{sid}")

        api.ok("PUT", "/v1/pools/bench", {"warm": 2})
        from_pool = []
        for _ in range(ROUNDS):
            wait_pool(api, "bench", 2)
            took, sid = timed_create(api, body)
            from_pool.append(took)
            api.ok("DELETE", f"/v1/sandboxes/{sid}")
        api.ok("DELETE", "/v1/pools/bench")
        wait_pool_empty = time.monotonic() + 30
        while pool_ready(api, "bench") and time.monotonic() < wait_pool_empty:
            time.sleep(0.05)

        rss_idle = rss_kib(daemon.pid)
        t0 = time.monotonic()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            results = list(pool.map(lambda _: timed_create(api, body), range(CONCURRENT)))
        concurrent_wall = time.monotonic() - t0
        rss_busy = rss_kib(daemon.pid)
        running = len(api.ok("GET", "/v1/sandboxes?state=running"))
        for _, sid in results:
            api.ok("DELETE", f"/v1/sandboxes/{sid}")
        latencies = [took for took, _ in results]
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()

    ms = lambda s: round(s * 1000, 1)  # noqa: E731
    figures = {
        "create_from_pool_ms": {"p50": ms(statistics.median(from_pool)),
                                "p99": ms(percentile(from_pool, 99))},
        "create_from_template_ms": {"p50": ms(statistics.median(from_template)),
                                    "p99": ms(percentile(from_template, 99))},
        "concurrent": {"count": CONCURRENT, "running": running,
                       "wall_ms": ms(concurrent_wall),
                       "p50_ms": ms(statistics.median(latencies)),
                       "p99_ms": ms(percentile(latencies, 99))},
        "daemon_rss_mib": {"idle": round(rss_idle / 1024, 1),
                           "with_concurrent": round(rss_busy / 1024, 1)},
        "rounds": ROUNDS,
    }
    print(f"create from a warm pool:   p50 {figures['create_from_pool_ms']['p50']} ms, "
          f"p99 {figures['create_from_pool_ms']['p99']} ms ({ROUNDS} creates)")
    print(f"create from a template:    p50 {figures['create_from_template_ms']['p50']} ms, "
          f"p99 {figures['create_from_template_ms']['p99']} ms ({ROUNDS} creates)")
    print(f"{CONCURRENT} concurrent creates:   all running after {figures['concurrent']['wall_ms']} ms; "
          f"each p50 {figures['concurrent']['p50_ms']} ms, p99 {figures['concurrent']['p99_ms']} ms")
    print(f"daemon RSS:                {figures['daemon_rss_mib']['idle']} MiB idle, "
          f"{figures['daemon_rss_mib']['with_concurrent']} MiB with {running} sandboxes running")
    print("json: " + json.dumps(figures))
    return 0 if running == CONCURRENT else 1


if __name__ == "__main__":
    sys.exit(main())
