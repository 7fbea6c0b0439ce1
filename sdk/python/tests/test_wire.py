"""The SDK's own logic, no daemon needed: output decoding and error
mapping."""

import base64

import pytest

import capsule
from capsule import _wire
from capsule.errors import from_answer


def _chunk(kind, raw):
    return {"type": kind, "data": base64.b64encode(raw).decode()}


def test_a_character_split_across_chunks_arrives_whole():
    seen = []
    d = _wire.ExecDecoder("x", seen.append, None)
    euro = "€".encode()
    d.feed({"type": "started", "pid": 7})
    d.feed(_chunk("stdout", b"a" + euro[:1]))
    d.feed(_chunk("stdout", euro[1:] + b"b\xff"))
    r = d.feed({"type": "exit", "exit_code": 0, "signal": None, "timed_out": False})
    assert seen == ["a", "€b\ufffd"] and r.stdout == "a€b\ufffd" and r.pid == 7


def test_the_end_of_a_stream_says_how_it_went():
    d = _wire.ExecDecoder(["sleep", "9"], None, None)
    d.feed({"type": "exit", "exit_code": None, "signal": 9, "timed_out": True})
    with pytest.raises(capsule.Timeout) as e:
        d.finish()
    assert e.value.result.signal == 9
    with pytest.raises(capsule.SandboxFailed):
        _wire.ExecDecoder("x", None, None).feed({"type": "error", "code": "lost",
                                                  "message": "gone"})
    with pytest.raises(capsule.SandboxFailed):
        _wire.ExecDecoder("x", None, None).finish()


def test_api_errors_map_to_their_classes():
    cases = [(400, "bad_request", capsule.BadRequest), (404, "sandbox_not_found", capsule.NotFound),
             (409, "conflict", capsule.Conflict), (429, "quota_exceeded", capsule.QuotaExceeded),
             (429, "host_full", capsule.QuotaExceeded), (401, "unauthorized", capsule.Unauthorized),
             (500, "sandbox_failed", capsule.SandboxFailed),
             (502, "guest_unavailable", capsule.SandboxFailed),
             (403, "permission_denied", capsule.PermissionDenied),
             (404, "file_not_found", capsule.NotFound), (507, "no_space", capsule.NoSpace)]
    for status, code, cls in cases:
        e = from_answer(status, {"code": code, "message": "m"})
        assert type(e) is cls and (e.code, e.status, e.message) == (code, status, "m")
    assert isinstance(from_answer(503, "text"), capsule.SandboxFailed)


def test_commands_and_bodies():
    assert _wire.argv("echo hi") == ["sh", "-c", "echo hi"]
    assert _wire.argv(["ls", 1]) == ["ls", "1"]
    with pytest.raises(ValueError):
        _wire.argv([])
    body = _wire.create_body("py", None, None, None, None, {"a": "b"}, None, {"A": "1"},
                             None, None)
    assert body == {"template": "py", "labels": {"a": "b"}, "timeout_seconds": 0,
                    "env": {"A": "1"}}


def test_the_docstrings_render_with_pydoc():
    import pydoc
    for thing in (capsule, capsule.Sandbox, capsule.AsyncSandbox, capsule.sandbox.Commands,
                  capsule.Files, capsule.files, capsule.EntryInfo,
                  capsule.CommandHandle, capsule.Template, capsule.Capsule):
        text = pydoc.render_doc(thing, renderer=pydoc.plaintext)
        assert thing.__doc__ and thing.__doc__.strip().splitlines()[0] in text
    assert "Creates a sandbox and waits" in pydoc.render_doc(capsule.Sandbox.create,
                                                             renderer=pydoc.plaintext)
