"""The synchronous SDK against the real daemon and real guests."""

import threading
import time

import pytest

import capsule
from capsule import Sandbox

from conftest import TEMPLATE


def test_create_run_and_the_result(client, template):
    with Sandbox.create(template=TEMPLATE, timeout=600, labels={"owner": "alice"},
                        envs={"A": "1"}, capsule=client) as sb:
        r = sb.commands.run("python3 -c 'print(6*7)' 2>/dev/null || echo $((6*7))")
        assert (r.exit_code, r.stdout) == (0, "42\n")
        r = sb.commands.run("echo $A; echo oops >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr) == (3, "1\n", "oops\n")
        # A list is the program and its arguments, no shell.
        r = sb.commands.run(["printf", "%s|", "a b", "$A"])
        assert r.stdout == "a b|$A|"
        assert sb.commands.run("cat /tmp/primed").stdout == "primed\n"
        assert sb.commands.run("cat", stdin="in\n").stdout == "in\n"
        r = sb.commands.run("echo $A $B; pwd; id -u", envs={"B": "2"}, cwd="/tmp", user="1000")
        assert r.stdout == "1 2\n/tmp\n1000\n"
        info = sb.get_info()
        assert (info.state, info.labels, info.env) == ("running", {"owner": "alice"}, {"A": "1"})
    # The context manager ended it.
    assert Sandbox.connect(sb.id, capsule=client).get_info().ended.reason == "deleted"


def test_output_streams_to_callbacks_before_the_command_ends(sandbox):
    seen = []
    start = time.monotonic()
    # Across stdout and stderr only time orders output: a second apart.
    r = sandbox.commands.run("echo first; sleep 3; echo second >&2; sleep 1; echo third",
                             on_stdout=lambda t: seen.append(("out", t, time.monotonic())),
                             on_stderr=lambda t: seen.append(("err", t, time.monotonic())))
    ended = time.monotonic()
    assert [(k, t) for k, t, _ in seen] == [("out", "first\n"), ("err", "second\n"),
                                            ("out", "third\n")]
    # The first line came while the command still slept.
    assert seen[0][2] - start < ended - start - 2.0, seen
    assert r.stdout == "first\nthird\n" and r.stderr == "second\n"


def test_a_background_command_takes_stdin_and_is_killed(sandbox):
    lines = []
    h = sandbox.commands.run("while read l; do echo got $l; done", background=True,
                             on_stdout=lines.append, timeout=None)
    assert h.pid and h.exit_code is None
    assert [c.pid for c in sandbox.commands.list()] == [h.pid]
    h.send_stdin("one\n")
    h.send_stdin(b"two\n")
    h.close_stdin()
    r = h.wait(timeout=60)
    assert (r.exit_code, r.stdout, "".join(lines)) == (0, "got one\ngot two\n", r.stdout)

    h = sandbox.commands.run("sleep 100", background=True)
    with pytest.raises(capsule.Timeout):
        h.wait(timeout=0.5)  # still running: the wait gave up, not the command
    h.kill()
    r = h.wait(timeout=60)
    assert (r.exit_code, r.signal) == (None, 9)
    assert sandbox.commands.list() == []
    with pytest.raises(capsule.NotFound) as e:
        sandbox.commands.kill(h.pid)
    assert e.value.code == "command_not_found"


def test_a_command_past_its_timeout_is_killed_in_the_sandbox(sandbox):
    start = time.monotonic()
    with pytest.raises(capsule.Timeout) as e:
        sandbox.commands.run("echo before; sleep 60", timeout=2)
    assert time.monotonic() - start < 30
    assert e.value.code == "command_timed_out"
    assert e.value.result.timed_out and e.value.result.stdout == "before\n"
    # Distinct: a request timeout is the connection's, and says so.
    with capsule.Capsule(request_timeout=0.001) as hasty:
        with pytest.raises(capsule.Timeout) as e:
            hasty.create(template=TEMPLATE)
        assert e.value.code == "request_timeout"


def test_errors_are_typed_with_the_api_code(client, template):
    with pytest.raises(capsule.NotFound) as e:
        Sandbox.connect("sb-nosuchsandbox00", capsule=client)
    assert (e.value.code, e.value.status) == ("sandbox_not_found", 404)
    with pytest.raises(capsule.NotFound):
        client.create(template="no-such-template")
    client.groups.create("sdk-none", max_sandboxes=0)
    with pytest.raises(capsule.QuotaExceeded) as e:
        client.create(template=TEMPLATE, group="sdk-none")
    assert e.value.code == "quota_exceeded" and "sdk-none" in e.value.message
    with pytest.raises(capsule.BadRequest):
        client.create(template=TEMPLATE, labels={"bad key!": "x"})
    sb = client.create(template=TEMPLATE)
    sb.kill()
    sb.kill()  # ending an ended sandbox does nothing
    with pytest.raises(capsule.SandboxEnded) as e:
        sb.commands.run("true")
    assert e.value.reason == "deleted"
    with pytest.raises(capsule.DaemonUnavailable):
        capsule.Capsule(socket="/nonexistent/api.sock").list()


def test_suspend_and_resume_keep_memory_and_files(sandbox):
    # The sleeper's output goes nowhere, so the command ends without it.
    sandbox.commands.run("echo kept > /tmp/file; sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/pid")
    pid = sandbox.commands.run("cat /tmp/pid").stdout.strip()
    for _ in range(2):
        assert sandbox.suspend().state == "suspended"
        with pytest.raises(capsule.Conflict):
            sandbox.suspend()
        assert sandbox.resume().state == "running"
    assert sandbox.commands.run("cat /tmp/file").stdout == "kept\n"
    # The same process, still running: its memory came back.
    assert sandbox.commands.run(f"kill -0 {pid} && echo alive").stdout == "alive\n"


def test_labels_timeouts_listing_and_stats(client, sandbox):
    sandbox.set_labels({"suite": "sdk", "job": "7"})
    ids = [s.id for s in Sandbox.list(labels={"job": "7"}, capsule=client)]
    assert ids == [sandbox.id]
    assert sandbox.id in [s.id for s in client.list(state="running")]
    assert [s.id for s in Sandbox.list(selector="job!=7,suite=sdk", capsule=client)] == []
    before = sandbox.get_info().end_at
    assert sandbox.get_info().end_at == before  # reading never changes it
    assert sandbox.set_timeout(3600).end_at != before
    assert sandbox.set_timeout(None).end_at is None
    stats = sandbox.stats()
    assert stats.state == "running" and stats.memory_bytes > 0 and stats.cpu_seconds > 0


def test_snapshot_and_fork(client, sandbox):
    sandbox.commands.run("echo from-the-snapshot > /tmp/state")
    snap = sandbox.snapshot(name="sdk-primed")
    forks = snap.fork(count=3, labels={"batch": "1"})
    try:
        assert len(forks) == 3
        names = set()
        for f in forks:
            assert f.commands.run("cat /tmp/state").stdout == "from-the-snapshot\n"
            names.add(f.commands.run("hostname").stdout.strip())
        assert names == {f.id for f in forks}
        assert {s.id for s in Sandbox.list(labels={"batch": "1"}, capsule=client)} == \
            {f.id for f in forks}
    finally:
        for f in forks:
            f.kill()
        snap.delete()


def test_templates_pools_groups_secrets_and_events(client, template):
    assert TEMPLATE in [t.name for t in client.templates.list()]
    pool = template.set_pool(1)
    assert (pool.template, pool.warm) == (TEMPLATE, 1)
    deadline = time.monotonic() + 120
    while client.pools.list()[0].ready < 1:
        assert time.monotonic() < deadline, "the pool never filled"
        time.sleep(0.2)
    client.pools.delete(TEMPLATE)

    g = client.groups.create("sdk-team", max_sandboxes=2)
    assert g.quota["max_sandboxes"] == 2
    client.secrets.set("sdk-team", "TOKEN", "s3cret-value")
    assert [s.name for s in client.secrets.list("sdk-team")] == ["TOKEN"]
    with client.create(template=TEMPLATE, group="sdk-team", secrets=["TOKEN"]) as sb:
        assert sb.commands.run("echo $TOKEN").stdout == "s3cret-value\n"
        assert "s3cret-value" not in repr(sb.get_info())
    client.secrets.delete("sdk-team", "TOKEN")

    events = client.events.list()
    assert {"created", "ready", "ended"} <= {e.kind for e in events}
    # Following: the next event arrives as it happens.
    got = []
    follower = threading.Thread(target=lambda: got.append(
        next(e for e in client.events.follow(after=events[-1].seq) if e.kind == "ended")))
    follower.start()
    client.create(template=TEMPLATE).kill()
    follower.join(timeout=120)
    assert got and got[0].kind == "ended"


def test_a_tcp_daemon_with_its_token(daemon, monkeypatch):
    with capsule.Capsule(url=daemon["url"], token=daemon["token"]) as c:
        assert isinstance(c.list(), list)
    # From the environment, as a deployed agent would be configured.
    monkeypatch.setenv("CAPSULE_URL", daemon["url"])
    monkeypatch.setenv("CAPSULE_TOKEN_FILE", daemon["token_file"])
    with capsule.Capsule() as c:
        assert c.connection.url == daemon["url"] and isinstance(c.groups.list(), list)
    with pytest.raises(capsule.Unauthorized) as e:
        capsule.Capsule(url=daemon["url"], token="wrong").list()
    assert e.value.code == "unauthorized"


def test_files_round_trip_stream_and_fail_with_typed_errors(sandbox, tmp_path):
    sb = sandbox
    info = sb.files.write("/work/notes/a.txt", "hello\n", mode=0o640)
    assert (info.type, info.size, info.mode) == ("file", 6, 0o640)
    assert sb.files.read("/work/notes/a.txt") == "hello\n"
    assert sb.commands.run("cat /work/notes/a.txt").stdout == "hello\n"
    assert sb.files.read_bytes("/work/notes/a.txt", offset=1, length=3) == b"ell"
    # A name that is not UTF-8, given as bytes.
    sb.files.write(b"/work/notes/caf\xe9", b"\x00\xff")
    names = [e.name_bytes for e in sb.files.list("/work/notes")]
    assert names == [b"a.txt", b"caf\xe9"]
    assert sb.files.read_bytes(b"/work/notes/caf\xe9") == b"\x00\xff"
    # A local file streamed in and out, in chunks.
    local = tmp_path / "blob.bin"
    local.write_bytes(bytes(range(256)) * 40000)
    local.chmod(0o751)
    up = sb.files.upload(local, "/work/blob.bin")
    assert (up.size, up.mode) == (10240000, 0o751)
    back = tmp_path / "back.bin"
    assert sb.files.download("/work/blob.bin", back) == 10240000
    assert back.read_bytes() == local.read_bytes()
    assert sum(len(c) for c in sb.files.iter_bytes("/work/blob.bin")) == 10240000
    assert sb.files.make_dir("/work/d/e").is_dir
    assert sb.files.rename("/work/notes/a.txt", "/work/d/e/b.txt").size == 6
    assert sb.files.exists("/work/d/e/b.txt") and not sb.files.exists("/work/notes/a.txt")
    with pytest.raises(capsule.NotFound) as e:
        sb.files.read("/work/missing")
    assert e.value.code == "file_not_found" and "/work/missing" in e.value.message
    with pytest.raises(capsule.Conflict) as e:
        sb.files.remove("/work/d")
    assert e.value.code == "directory_not_empty"
    with pytest.raises(capsule.BadRequest):
        sb.files.stat("relative/path")
    sb.files.remove("/work", recursive=True)
    assert not sb.files.exists("/work")


def test_a_directory_tree_round_trips_with_modes_and_symlinks(sandbox, tmp_path):
    import os
    src = tmp_path / "src"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "pkg" / "run.sh").write_text("#!/bin/sh\necho run\n")
    (src / "pkg" / "run.sh").chmod(0o755)
    (src / "pkg" / "sub" / "data.txt").write_text("data\n")
    (src / "pkg" / "sub" / "data.txt").chmod(0o600)
    os.symlink("sub/data.txt", src / "pkg" / "link")
    info = sandbox.files.upload_dir(src, "/opt/tree")
    assert info.is_dir
    assert sandbox.commands.run("/opt/tree/pkg/run.sh").stdout == "run\n"
    assert sandbox.commands.run("readlink /opt/tree/pkg/link").stdout == "sub/data.txt\n"
    assert sandbox.commands.run("stat -c %a /opt/tree/pkg/sub/data.txt").stdout == "600\n"
    back = tmp_path / "back"
    sandbox.files.download_dir("/opt/tree", back)
    assert (back / "pkg" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (back / "pkg" / "sub" / "data.txt").stat().st_mode & 0o777 == 0o600
    assert os.readlink(back / "pkg" / "link") == "sub/data.txt"
    assert (back / "pkg" / "link").read_text() == "data\n"
    with pytest.raises(capsule.Conflict):
        sandbox.files.download_dir("/opt/tree/pkg/run.sh", tmp_path / "nope")


def _in_order(seen, wanted):
    """``wanted`` appears in ``seen`` in order, with only chmods and
    repeated writes between."""
    it = iter(wanted)
    want = next(it, None)
    for event in seen:
        if event == want:
            want = next(it, None)
        else:
            assert event[0] in ("chmod", "write"), (event, seen)
    assert want is None, (want, seen)


def test_a_watch_reports_create_write_and_remove_in_order(sandbox):
    sandbox.files.make_dir("/watched")
    with sandbox.files.watch_dir("/watched", recursive=True) as watch:
        sandbox.commands.run("echo a > /watched/f; echo b >> /watched/f; mkdir /watched/d; "
                             "sleep 0.2; touch /watched/d/inner; rm /watched/f")
        seen = []
        for event in watch:
            seen.append((event.type, event.path))
            if event.type == "remove":
                break
    _in_order(seen, [("create", "/watched/f"), ("write", "/watched/f"),
                     ("create", "/watched/d"), ("create", "/watched/d/inner"),
                     ("remove", "/watched/f")])
    with sandbox.files.watch_dir("/watched") as watch:
        sandbox.commands.run("rm -r /watched")
        with pytest.raises(capsule.NotFound):
            for _ in watch:
                pass
    with pytest.raises(capsule.NotFound):
        sandbox.files.watch_dir("/watched")


def test_a_detached_process_is_reattached_mid_output_with_nothing_lost(client, sandbox):
    proc = sandbox.commands.spawn("for i in $(seq 1 30); do echo line$i; sleep 0.1; done; "
                                  "echo done >&2; exit 7")
    # Read some of it, then let go mid-output.
    got = b""
    for chunk in proc.logs(follow=True):
        got += chunk.data
        if got.count(b"\n") >= 5:
            break
    # Another connection to the daemon finds it by pid and reads on from
    # where the first left off.
    with capsule.Capsule(socket=client.connection.socket) as other:
        again = Sandbox.connect(sandbox.id, capsule=other).commands.connect(proc.pid)
        rest = b"".join(c.data for c in again.logs(offset=len(got), follow=True)
                        if c.stream == "stdout")
        assert (got + rest).decode() == "".join(f"line{i}\n" for i in range(1, 31))
        result = again.wait()
        assert (result.exit_code, result.stderr) == (7, "done\n")
        assert result.stdout.count("\n") == 30
    info = proc.info()
    assert (info.running, info.exit_code, info.kept_from) == (False, 7, 0)
    assert proc.pid in [p.pid for p in sandbox.commands.processes()]
    sleeper = sandbox.commands.spawn(["sleep", "300"])
    assert sleeper.info().running
    sleeper.signal(15)
    assert sleeper.wait().signal == 15
    with pytest.raises(capsule.NotFound) as e:
        sandbox.commands.connect(999999)
    assert e.value.code == "process_not_found"


def _read_until(term, want, timeout=60.0):
    seen = b""
    deadline = time.monotonic() + timeout
    while want not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {want!r} in {seen!r}"
        chunk = term.read(timeout=left)
        assert chunk, f"the session ended before {want!r}: {seen!r}"
        seen += chunk
    return seen


def _run(term, command):
    """What the terminal shows for ``command``, up to a marker the typed
    line itself does not contain (a shell redraws its prompt at will)."""
    term.send(command + "; echo @@$((40+2))\n")
    return _read_until(term, b"@@42")


def test_a_terminal_session_resizes_takes_ctrl_c_and_reports_its_exit(client, sandbox):
    with sandbox.pty.create(cols=90, rows=20, cmd=["sh", "-i"]) as term:
        assert b"20 90" in _run(term, "stty size")
        term.resize(cols=111, rows=33)
        assert b"33 111" in _run(term, "stty size")
        term.send("sleep 100\n")
        time.sleep(0.5)
        term.send(b"\x03")
        assert b"rc=130" in _run(term, "echo rc=$?")
        term.send("exit 4\n")
        assert term.wait(timeout=60) == 4
    # Output comes to a callback as it is produced, the terminal's way.
    seen = []
    term = sandbox.pty.create(cmd="echo one; sleep 1; echo two", on_data=seen.append)
    assert term.wait(timeout=60) == 0
    assert b"".join(seen) == b"one\r\ntwo\r\n"
    with pytest.raises(capsule.NotFound):
        Sandbox("sb-missing", client).pty.create()
    with pytest.raises(capsule.BadRequest) as e:
        sandbox.pty.create(cols=0)
    assert e.value.code == "bad_request"


def test_a_guest_server_is_reached_through_get_host(sandbox):
    import httpx
    sandbox.commands.spawn("mkdir -p /www && echo served > /www/index.html && "
                           "exec httpd -f -p 127.0.0.1:8080 -h /www")
    host = sandbox.get_host(8080)
    assert sandbox.get_host(8080) == host
    deadline = time.monotonic() + 60
    while True:
        try:
            r = httpx.get(f"http://{host}/index.html", timeout=10)
            if r.status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the guest's server never answered"
        time.sleep(0.25)
    assert r.text == "served\n"
    assert sandbox.ports() == {8080: host}
    sandbox.unexpose(8080)
    assert sandbox.ports() == {}
    with pytest.raises(capsule.NotFound):
        sandbox.unexpose(8080)
    with pytest.raises(capsule.BadRequest):
        sandbox.get_host(70000)

