"""The asynchronous SDK: the same calls with ``await``."""

import asyncio
import time

import pytest

import capsule
from capsule import AsyncCapsule, AsyncSandbox

from conftest import TEMPLATE

pytestmark = pytest.mark.anyio


@pytest.fixture
async def aclient(daemon, template):
    async with AsyncCapsule(socket=daemon["socket"]) as c:
        yield c


async def test_async_create_run_suspend_and_fork(aclient):
    await aclient.secrets.set("default", "ASYNC_KEY", "async-secret")
    async with await AsyncSandbox.create(template=TEMPLATE, envs={"A": "1"}, timeout=600,
                                         labels={"suite": "async"}, secrets=["ASYNC_KEY"],
                                         capsule=aclient) as sb:
        listed = await AsyncSandbox.list(labels={"suite": "async"}, capsule=aclient)
        assert [s.id for s in listed] == [sb.id]
        assert (await sb.commands.run("echo $ASYNC_KEY")).stdout == "async-secret\n"
        assert (await sb.set_timeout(None)).end_at is None
        assert (await sb.stats()).state == "running"
        seen = []
        start = time.monotonic()

        async def on_stdout(text):
            seen.append((text, time.monotonic()))

        r = await sb.commands.run("echo $A; sleep 3; echo done", on_stdout=on_stdout)
        assert (r.exit_code, r.stdout) == (0, "1\ndone\n")
        assert seen[0][0] == "1\n" and seen[0][1] - start < time.monotonic() - start - 2.0

        await sb.commands.run("echo kept > /tmp/f")
        assert (await sb.suspend()).state == "suspended"
        assert (await sb.resume()).state == "running"
        assert (await sb.commands.run("cat /tmp/f")).stdout == "kept\n"

        snap = await sb.snapshot(name="sdk-async")
        forks = await snap.fork(count=2)
        try:
            outs = await asyncio.gather(*(f.commands.run("cat /tmp/f") for f in forks))
            assert [o.stdout for o in outs] == ["kept\n", "kept\n"]
        finally:
            for f in forks:
                await f.kill()
            await snap.delete()
    assert (await (await AsyncSandbox.connect(sb.id, capsule=aclient)).get_info()).state \
        == "ended"


async def test_async_background_stdin_kill_and_errors(aclient):
    async with await aclient.create(template=TEMPLATE) as sb:
        h = await sb.commands.run("read l; echo got $l; sleep 100", background=True,
                                  timeout=None)
        await h.send_stdin("it\n")
        deadline = time.monotonic() + 60
        while "got it" not in h.stdout:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        with pytest.raises(capsule.Timeout):
            await h.wait(timeout=0.2)
        await h.kill()
        r = await h.wait(timeout=60)
        assert (r.signal, r.stdout) == (9, "got it\n")
        with pytest.raises(capsule.Timeout) as e:
            await sb.commands.run("sleep 60", timeout=1)
        assert e.value.result.timed_out
    with pytest.raises(capsule.NotFound):
        await AsyncSandbox.connect("sb-nosuchsandbox00", capsule=aclient)
    await aclient.groups.create("sdk-async-none", max_sandboxes=0)
    with pytest.raises(capsule.QuotaExceeded):
        await aclient.create(template=TEMPLATE, group="sdk-async-none")
    assert TEMPLATE in [t.name for t in await aclient.templates.list()]


async def test_async_files(aclient, tmp_path):
    async with await AsyncSandbox.create(template=TEMPLATE, capsule=aclient) as sb:
        info = await sb.files.write("/srv/x/y.txt", "async file")
        assert info.size == 10
        assert await sb.files.read("/srv/x/y.txt") == "async file"
        assert [e.name for e in await sb.files.list("/srv/x")] == ["y.txt"]
        assert (await sb.files.stat("/srv/x")).is_dir
        await sb.files.rename("/srv/x/y.txt", "/srv/z.txt")
        assert await sb.files.exists("/srv/z.txt")
        with pytest.raises(capsule.NotFound):
            await sb.files.read_bytes("/srv/x/y.txt")
        await sb.files.remove("/srv", recursive=True)
        assert not await sb.files.exists("/srv")

        src = tmp_path / "tree"
        (src / "d").mkdir(parents=True)
        (src / "d" / "f.txt").write_text("tree file")
        assert (await sb.files.upload_dir(src, "/srv/tree")).is_dir
        assert await sb.files.read("/srv/tree/d/f.txt") == "tree file"
        await sb.files.download_dir("/srv/tree", tmp_path / "back")
        assert (tmp_path / "back" / "d" / "f.txt").read_text() == "tree file"

        async with await sb.files.watch_dir("/srv/tree") as watch:
            await sb.commands.run("echo x > /srv/tree/new; rm /srv/tree/new")
            seen = []
            async for event in watch:
                seen.append((event.type, event.path))
                if event.type == "remove":
                    break
        assert seen[0] == ("create", "/srv/tree/new") and seen[-1] == ("remove", "/srv/tree/new")


async def test_async_detached_processes(aclient):
    async with await AsyncSandbox.create(template=TEMPLATE, capsule=aclient) as sb:
        proc = await sb.commands.spawn("echo out; echo err >&2; sleep 0.5; echo later")
        seen = []

        async def on_stdout(text):
            seen.append(text)

        result = await (await sb.commands.connect(proc.pid)).wait(on_stdout=on_stdout)
        assert (result.exit_code, result.stdout, result.stderr) == (0, "out\nlater\n", "err\n")
        assert "".join(seen) == "out\nlater\n"
        chunks = [c async for c in proc.logs(offset=4)]
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"later\n"
        assert [p.pid for p in await sb.commands.processes()] == [proc.pid]


async def test_async_terminal(aclient):
    async with await AsyncSandbox.create(template=TEMPLATE, capsule=aclient) as sb:
        seen = []

        async def on_data(data):
            seen.append(data)

        term = await sb.pty.create(cols=50, rows=10, cmd="stty size; read line; echo got:$line",
                                   on_data=on_data)
        await term.send("hello\n")
        assert await term.wait(timeout=60) == 0
        text = b"".join(seen).decode()
        assert "10 50" in text and "got:hello" in text, text


async def test_async_get_host(aclient):
    async with await AsyncSandbox.create(template=TEMPLATE, capsule=aclient) as sb:
        host = await sb.get_host(9000)
        assert host.startswith("127.0.0.1:")
        assert await sb.ports() == {9000: host}
        await sb.unexpose(9000)
        assert await sb.ports() == {}
