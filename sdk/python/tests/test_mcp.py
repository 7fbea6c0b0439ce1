"""`capsule mcp` driven by the `mcp` package's own stdio client (a client
nobody here wrote), against the real daemon and real guests."""

import asyncio
import json
import os
import re
import subprocess
import time

import httpx
import pytest

# Installed by scripts/test-sdk.sh; missing, the run fails rather than skips.
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from conftest import REPO, TEMPLATE

pytestmark = pytest.mark.anyio


BINARY = os.environ.get("CAPSULE_BIN", str(REPO / "target/release/capsule"))


def _env(daemon):
    env = {k: v for k, v in os.environ.items() if k not in ("CAPSULE_URL", "CAPSULE_SOCKET")}
    env["CAPSULE_HOME"] = daemon["home"]
    return env


def _params(daemon):
    return StdioServerParameters(command=BINARY, args=["mcp"], env=_env(daemon))


def _json(result):
    assert not result.is_error, result.content
    return json.loads(result.content[0].text)


async def test_an_mcp_client_runs_a_sandbox_through_its_life(daemon, template):
    async with stdio_client(_params(daemon)) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            assert init.server_info.name == "capsule"
            tools = {t.name: t for t in (await session.list_tools()).tools}
            for name in ("sandbox_create", "sandbox_exec", "sandbox_list", "sandbox_delete",
                         "sandbox_snapshot", "template_fork", "template_list",
                         "sandbox_suspend", "sandbox_resume", "exec_output",
                         "file_read", "file_write", "file_list", "process_start",
                         "process_logs", "process_list", "process_kill", "port_expose"):
                assert name in tools, sorted(tools)
                assert tools[name].description and tools[name].input_schema["type"] == "object"

            sb = _json(await session.call_tool("sandbox_create", {"template": TEMPLATE}))
            sid = sb["id"]
            try:
                out = _json(await session.call_tool(
                    "sandbox_exec", {"id": sid, "command": "echo hi; echo err >&2; exit 3"}))
                assert (out["exit_code"], out["stdout"], out["stderr"]) == (3, "hi\n", "err\n")
                # Long output is capped for the model, with the rest to fetch.
                out = _json(await session.call_tool(
                    "sandbox_exec", {"id": sid, "command": "seq 1 20000"}))
                assert out["stdout_truncated"] and len(out["stdout"]) < 20000
                text, offset, pages = out["stdout"], len(out["stdout"].encode()), 0
                while True:
                    more = _json(await session.call_tool(
                        "exec_output", {"output_id": out["output_id"], "stream": "stdout",
                                        "offset": offset}))
                    text, offset, pages = text + more["data"], more["next_offset"], pages + 1
                    if not more["more"]:
                        break
                assert text == "".join(f"{i}\n" for i in range(1, 20001)) and pages > 1

                # A model writes a script, lists it, runs it and reads its output file.
                wrote = _json(await session.call_tool("file_write", {
                    "id": sid, "path": "/work/hello.sh", "mode": "755",
                    "content": "#!/bin/sh\nseq 1 30000 > /work/out.txt\necho written\n"}))
                assert (wrote["size"], wrote["mode"]) == (51, 0o755)
                listing = _json(await session.call_tool("file_list", {"id": sid, "path": "/work"}))
                assert [e["name"] for e in listing["entries"]] == ["hello.sh"]
                out = _json(await session.call_tool(
                    "sandbox_exec", {"id": sid, "argv": ["/work/hello.sh"]}))
                assert (out["exit_code"], out["stdout"]) == (0, "written\n")
                text, offset = "", 0
                while offset is not None:
                    page = _json(await session.call_tool(
                        "file_read", {"id": sid, "path": "/work/out.txt", "offset": offset}))
                    text, offset = text + page["content"], page["next_offset"]
                assert text == "".join(f"{i}\n" for i in range(1, 30001))
                missing = await session.call_tool("file_read", {"id": sid, "path": "/nope"})
                assert missing.is_error and "file_not_found" in missing.content[0].text

                # A server-like process runs on between calls; its output pages.
                started = _json(await session.call_tool("process_start", {
                    "id": sid, "command": "for i in $(seq 1 3000); do echo tick$i; done; sleep 300"}))
                pid = started["pid"]
                text, offset = "", 0
                for _ in range(200):
                    page = _json(await session.call_tool(
                        "process_logs", {"id": sid, "pid": pid, "offset": offset}))
                    text, offset = text + page["stdout"], page["next_offset"]
                    if text.endswith("tick3000\n"):
                        break
                    if not page["more"]:
                        await asyncio.sleep(0.2)
                assert text == "".join(f"tick{i}\n" for i in range(1, 3001))
                assert page["running"]
                exposed = _json(await session.call_tool("port_expose", {"id": sid, "port": 8000}))
                assert exposed["port"] == 8000 and exposed["address"].startswith("127.0.0.1:")
                await session.call_tool("process_kill", {"id": sid, "pid": pid})
                for _ in range(100):
                    listed = _json(await session.call_tool("process_list", {"id": sid}))
                    if not listed[0]["running"]:
                        break
                    await asyncio.sleep(0.1)
                assert listed[0]["signal"] == 9

                listed = _json(await session.call_tool("sandbox_list", {}))
                assert sid in [s["id"] for s in listed]

                snap = _json(await session.call_tool(
                    "sandbox_snapshot", {"id": sid, "name": "mcp-snap"}))
                assert snap["name"] == "mcp-snap"
                forks = _json(await session.call_tool(
                    "template_fork", {"name": "mcp-snap", "count": 2}))
                assert len(forks) == 2
                for f in forks:
                    _json(await session.call_tool("sandbox_delete", {"id": f["id"]}))
            finally:
                gone = _json(await session.call_tool("sandbox_delete", {"id": sid}))
                assert gone["state"] == "ended"

            # Errors a model can act on, and the server carries on.
            missing = await session.call_tool("sandbox_exec",
                                              {"id": "sb-nosuchsandbox00", "command": "true"})
            assert missing.is_error and "sandbox_not_found" in missing.content[0].text
            try:
                bad = await session.call_tool("sandbox_exec", {"id": 5})
                assert bad.is_error
            except MCPError:
                pass
            assert (await session.list_tools()).tools


def _served_url(log, proc, within=30):
    """The URL `capsule mcp --http` says it serves (it picks the port)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = re.search(r"serving MCP on (http://\S+/mcp)", log.read_text())
        if found:
            return found.group(1)
        assert proc.poll() is None, f"capsule mcp --http exited: {log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"capsule mcp --http did not start: {log.read_text()}")


async def test_an_mcp_client_over_streamable_http(daemon, template, tmp_path):
    token_file, log = tmp_path / "mcp-token", tmp_path / "mcp-http.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [BINARY, "mcp", "--http", "127.0.0.1:0", "--token-file", str(token_file)],
            env=_env(daemon), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        url = _served_url(log, proc)
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                 "clientInfo": {"name": "t", "version": "0"}}}
        accept = {"Accept": "application/json, text/event-stream"}
        for auth in (None, "Bearer wrong-token"):
            headers = dict(accept, **({"Authorization": auth} if auth else {}))
            refused = httpx.post(url, json=initialize, headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.json()["code"] == "unauthorized"

        async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
            async with streamable_http_client(url, http_client=http) as (read, write):
                async with ClientSession(read, write) as session:
                    init = await session.initialize()
                    assert init.server_info.name == "capsule"
                    names = {t.name for t in (await session.list_tools()).tools}
                    assert {"sandbox_create", "sandbox_exec", "exec_output"} <= names
                    sid = _json(await session.call_tool(
                        "sandbox_create", {"template": TEMPLATE}))["id"]
                    try:
                        out = _json(await session.call_tool(
                            "sandbox_exec", {"id": sid, "command": "seq 1 20000"}))
                        assert out["stdout_truncated"]
                        # The kept output is there for a later request.
                        more = _json(await session.call_tool(
                            "exec_output", {"output_id": out["output_id"], "stream": "stdout",
                                            "offset": len(out["stdout"].encode())}))
                        assert (out["stdout"] + more["data"]).startswith("1\n2\n")
                    finally:
                        gone = _json(await session.call_tool("sandbox_delete", {"id": sid}))
                        assert gone["state"] == "ended"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
