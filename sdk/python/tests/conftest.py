"""A real `capsule serve` with real guests for the SDK's tests: started once
for the session in a private home, with a small template to restore from.

Needs the guest artifacts (CAPSULE_KERNEL, CAPSULE_INITRAMFS; CAPSULE_ROOTFS
for the disk tests) and KVM that runs them: scripts/test-sdk.sh runs this
inside the nested test host where the machine's KVM cannot.
"""

import os
import pathlib
import signal
import socket
import subprocess
import tempfile
import time

import pytest

import capsule

REPO = pathlib.Path(__file__).resolve().parents[3]
TEMPLATE = "sdk-test"


def _artifact(name):
    value = os.environ.get(name)
    if not value or not os.path.isfile(value):
        pytest.exit(f"{name} must name the guest artifact (run the SDK tests with "
                    f"scripts/test-sdk.sh or `make test`)", returncode=2)
    return value


@pytest.fixture(scope="session")
def daemon():
    """The daemon's home, socket and process."""
    binary = os.environ.get("CAPSULE_BIN", str(REPO / "target/release/capsule"))
    home = tempfile.mkdtemp(prefix="capsule-sdk-")
    env = dict(os.environ, CAPSULE_HOME=home)
    env.pop("CAPSULE_URL", None)
    log_path = os.path.join(home, "daemon.log")
    log = open(log_path, "w")
    # Also on TCP behind a bearer token, for the tests that connect so.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = os.path.join(home, "token")
    process = subprocess.Popen(
        [binary, "serve", "--kernel", _artifact("CAPSULE_KERNEL"),
         "--initramfs", _artifact("CAPSULE_INITRAMFS"),
         "--listen", f"127.0.0.1:{port}", "--token-file", token_file],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    socket_path = os.path.join(home, "api.sock")
    deadline = time.monotonic() + 30
    while not os.path.exists(socket_path):
        if process.poll() is not None or time.monotonic() > deadline:
            log.close()
            pytest.exit(f"capsule serve did not start:\n{open(log_path).read()}", returncode=2)
        time.sleep(0.02)
    while not os.path.exists(token_file):
        time.sleep(0.02)
    with open(token_file) as f:
        token = f.read().strip()
    yield {"home": home, "socket": socket_path, "process": process, "log": log_path,
           "url": f"http://127.0.0.1:{port}", "token": token, "token_file": token_file}
    # Sandboxes outlive their daemon: the tests' own must not outlive the run.
    with capsule.Capsule(socket=socket_path) as c:
        for sb in c.list(state=["creating", "running", "suspended"]):
            c.connect(sb.id).kill()
        for pool in c.pools.list():
            c.pools.delete(pool.template)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="session")
def client(daemon):
    """A sync connection, through the socket as a user's default would be."""
    os.environ["CAPSULE_SOCKET"] = daemon["socket"]
    with capsule.Capsule() as c:
        yield c


@pytest.fixture(scope="session")
def template(client):
    """A template primed with a file and a variable in memory."""
    t = client.templates.create(
        TEMPLATE, ["sh", "-c", "echo primed > /tmp/primed"], memory_mib=128)
    yield t


@pytest.fixture
def sandbox(client, template):
    with client.create(template=TEMPLATE, timeout=600, labels={"suite": "sdk"}) as sb:
        yield sb


@pytest.fixture(scope="session")
def anyio_backend():
    # Async tests (marked anyio) run on asyncio through anyio's pytest
    # plugin, httpx's own dependency: no other event loop plugin needed.
    return "asyncio"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report carries the daemon's log and the live
    sandboxes' VMM logs: what happened on the other side."""
    outcome = yield
    report = outcome.get_result()
    daemon = item.funcargs.get("daemon") or getattr(item.session, "_capsule_daemon", None)
    if "daemon" in item.funcargs:
        item.session._capsule_daemon = item.funcargs["daemon"]
    if report.when != "call" or not report.failed or daemon is None:
        return
    def tail(path, n=40):
        try:
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError as e:
            return f"({e})\n"
    report.sections.append(("daemon log", tail(daemon["log"])))
    vms = pathlib.Path(daemon["home"]) / "daemon" / "vms"
    for log in sorted(vms.glob("*/vmm.log")):
        report.sections.append((f"{log.parent.name} vmm.log", tail(log, 20)))
    for console in sorted(vms.glob("*/runtime/console.log")):
        report.sections.append((f"{console.parent.parent.name} console", tail(console, 20)))
