"""`capsule mcp` driven by the `mcp` package's own stdio client (a client
nobody here wrote), against the real daemon and real guests."""

import json
import os

import pytest

# Installed by scripts/test-sdk.sh; missing, the run fails rather than skips.
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

from conftest import REPO, TEMPLATE

pytestmark = pytest.mark.anyio


def _params(daemon):
    binary = os.environ.get("CAPSULE_BIN", str(REPO / "target/release/capsule"))
    env = {k: v for k, v in os.environ.items() if k not in ("CAPSULE_URL", "CAPSULE_SOCKET")}
    env["CAPSULE_HOME"] = daemon["home"]
    return StdioServerParameters(command=binary, args=["mcp"], env=env)


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
                         "sandbox_suspend", "sandbox_resume", "exec_output"):
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
