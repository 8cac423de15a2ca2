"""llama-server with Orthrus drafting (`--spec-type orthrus`, patch 0006), over HTTP.

Needs `orthrus-gguf build` (CI runs it first); without a build these tests fail with the
message saying so, they do not skip.

Identity: at temperature 0 the drafting server must return exactly the text of the same
server with drafting off, and of the Python API. On CPU a batched verify can differ from
one-token decodes in the last bits (see /work/shared/LLAMA_CPP.md), which can flip a
near-tie; so these tests use f32 and q8_0 GGUFs of tiny random models (std-0.5 weights:
peaked logits, no near-ties) and run the server with flash attention off (`-fa off`,
ggml's CPU flash attention works in f16) and an f32 KV cache (`-ctk f32 -ctv f32`).
HTTP uses only the standard library.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest

from orthrus_gguf.serve import Server, server_command

EXACT = ("-fa", "off", "-ctk", "f32", "-ctv", "f32", "-t", "2", "-c", "2048", "--no-warmup")
N_PARALLEL = 2
MAX_TOKENS = 24
PROMPTS = [
    "def fib(n):", "import json", "class A:\n    x = ", "The quick brown fox", "for i in range(10):",
    "return self.", "# comment\n", "{\"key\": [1, 2", "while True:\n    if", "hello world",
    "0123456789", "x = y + z *",
]
CHAT = [[{"role": "user", "content": p}] for p in PROMPTS[:10]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path_factory, model, drafting, extra=EXACT, **kw) -> Server:
    port = free_port()
    cmd, _ = server_command(model, port=port, n_parallel=N_PARALLEL, extra=extra, drafting=drafting, **kw)
    log = tmp_path_factory.mktemp("server") / "llama-server.log"
    return Server(cmd, port=port, log=log).start()


MODEL = dict(tied=False, block_size=8, seed=3)


@pytest.fixture(scope="module", params=["f32", "q8_0"])
def gguf(request, tiny_gguf):
    return tiny_gguf(request.param, **MODEL)


@pytest.fixture(scope="module")
def on(gguf, tmp_path_factory, request):
    s = start(tmp_path_factory, gguf, drafting=True)
    request.addfinalizer(s.stop)  # stopped even when a test fails
    return s


@pytest.fixture(scope="module")
def off(gguf, tmp_path_factory, request):
    s = start(tmp_path_factory, gguf, drafting=False)
    request.addfinalizer(s.stop)
    return s


# ---------------------------------------------------------------- HTTP helpers

def post(server: Server, path: str, body, raw: bool = False):
    """(status, parsed JSON) of a POST; body may be raw bytes (raw=True)."""
    c = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        data = body if raw else json.dumps(body).encode()
        c.request("POST", path, data, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        c.close()


def post_stream(server: Server, path: str, body) -> list[dict]:
    """The parsed `data:` events of a streamed POST (without [DONE])."""
    c = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        c.request("POST", path, json.dumps(dict(body, stream=True)).encode(),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200, r.read()
        events = []
        for line in r.read().decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
        return events
    finally:
        c.close()


def complete(server, prompt, stream=False, **kw):
    """(text, timings) of /v1/completions at temperature 0."""
    body = dict(prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **kw)
    if stream:
        ev = post_stream(server, "/v1/completions", body)
        return "".join(e["choices"][0]["text"] for e in ev if e.get("choices")), _timings(ev)
    status, r = post(server, "/v1/completions", body)
    assert status == 200, r
    return r["choices"][0]["text"], r.get("timings", {})


def chat(server, messages, stream=False):
    body = dict(messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    if stream:
        ev = post_stream(server, "/v1/chat/completions", body)
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in ev if e.get("choices"))
        return text, _timings(ev)
    status, r = post(server, "/v1/chat/completions", body)
    assert status == 200, r
    return r["choices"][0]["message"]["content"], r.get("timings", {})


def _timings(events) -> dict:
    return next((e["timings"] for e in reversed(events) if "timings" in e), {})


# ---------------------------------------------------------------- lossless at temperature 0

@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_completions_lossless(on, off, stream):
    drafted = accepted = 0
    for p in PROMPTS:
        got, t = complete(on, p, stream)
        want, t_off = complete(off, p, stream)
        assert got == want, p
        assert t_off.get("draft_n", 0) == 0
        drafted += t.get("draft_n", 0)
        accepted += t.get("draft_n_accepted", 0)
    assert drafted > 0 and 0 <= accepted <= drafted


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_chat_lossless(on, off, stream):
    drafted = 0
    for m in CHAT:
        got, t = chat(on, m, stream)
        want, _ = chat(off, m, stream)
        assert got == want, m
        drafted += t.get("draft_n", 0)
    assert drafted > 0


def test_two_slots_concurrent(on, off):
    """Both slots draft their own sequence at once; each returns the drafting-off text."""
    want = {p: complete(off, p)[0] for p in PROMPTS[:6]}
    got, errors = {}, []

    def run(p):
        try:
            got[p] = complete(on, p)
        except Exception as e:  # surfaced below, not lost in the thread
            errors.append(e)

    for batch in (PROMPTS[0:2], PROMPTS[2:4], PROMPTS[4:6]):
        threads = [threading.Thread(target=run, args=(p,)) for p in batch]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    assert not errors, errors
    assert {p: t for p, (t, _) in got.items()} == want
    assert sum(t.get("draft_n", 0) for _, t in got.values()) > 0
    assert "id  1 | task" in on.log_path.read_text(errors="replace")  # the second slot served


def test_matches_python_api(gguf, tmp_path_factory, request):
    """Same GGUF, same prompt: the server's greedy tokens are the Python API's (no BOS either way).

    The Python API runs llama.cpp's default precision (flash attention auto, f16 KV cache),
    so this server does too; the text is compared where it is valid UTF-8 (a random model
    emits byte tokens, and the two decode a cut UTF-8 sequence differently)."""
    from orthrus_gguf.api import Orthrus
    s = start(tmp_path_factory, gguf, drafting=True, extra=("-t", "2", "-c", "2048", "--no-warmup"))
    request.addfinalizer(s.stop)
    drafted = 0
    with Orthrus(gguf, n_ctx=512, n_threads=2) as m:
        for p in PROMPTS[:10]:
            want = m.generate(p, max_tokens=MAX_TOKENS)
            status, r = post(s, "/completion", dict(prompt=p, n_predict=MAX_TOKENS, temperature=0,
                                                    return_tokens=True))
            assert status == 200, r
            assert r["tokens"] == want.tokens, p
            drafted += r["timings"].get("draft_n", 0)
            if "\ufffd" not in want.text:
                assert complete(s, p)[0] == want.text, p
    assert drafted > 0


def test_sampling_runs_and_drafts(on):
    """temperature > 0: upstream token matching (exact in distribution), drafts still used."""
    status, r = post(on, "/v1/completions", dict(prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                                temperature=0.8, seed=1))
    assert status == 200, r
    assert r["usage"]["completion_tokens"] >= 1
    assert r["timings"].get("draft_n", 0) > 0


# ---------------------------------------------------------------- bad requests

def test_bad_requests_get_4xx_and_server_keeps_serving(on):
    want, _ = complete(on, PROMPTS[0])
    status, r = post(on, "/v1/completions", b'{"prompt": "abc", max_tokens: }', raw=True)
    assert 400 <= status < 500, r
    assert complete(on, PROMPTS[0])[0] == want
    status, r = post(on, "/v1/completions", dict(prompt="hello world " * 2000, max_tokens=4))
    assert 400 <= status < 500, r
    assert complete(on, PROMPTS[0])[0] == want
    status, r = post(on, "/v1/completions", dict(prompt="abc", max_tokens=-5))
    assert 400 <= status < 500, r
    status, r = post(on, "/v1/chat/completions", dict(messages="not a list"))
    assert 400 <= status < 500, r
    assert complete(on, PROMPTS[0])[0] == want


# ---------------------------------------------------------------- the command line

def test_draft_lengths(gguf, tmp_path_factory, request, off):
    """--draft-max 3 and auto are lossless too; auto may draft nothing on a tiny model."""
    for draft_max in (3, "auto"):
        s = start(tmp_path_factory, gguf, drafting=True, draft_max=draft_max)
        request.addfinalizer(s.stop)
        try:
            for p in PROMPTS[:4]:
                got, t = complete(s, p)
                assert got == complete(off, p)[0]
                if draft_max == 3:
                    assert t.get("draft_n", 0) > 0
        finally:
            s.stop()


def test_plain_qwen3_serves_with_drafting_off(tiny_gguf, tmp_path, tmp_path_factory, request):
    """A plain qwen3 GGUF (same f32 weights, no diffusion view): `serve` leaves drafting off
    and says so; llama-server given --spec-type orthrus anyway warns and serves plain AR."""
    from test_native import plain_qwen3_copy
    gguf = tiny_gguf("f32", **MODEL)
    plain = plain_qwen3_copy(gguf, tmp_path / "plain-qwen3.gguf")
    off = start(tmp_path_factory, gguf, drafting=False)
    request.addfinalizer(off.stop)
    cmd, note = server_command(plain, port=1, extra=EXACT)
    assert "--spec-type" not in cmd and "drafting off" in note
    s = start(tmp_path_factory, plain, drafting=True, extra=EXACT + ("--spec-type", "orthrus"))
    request.addfinalizer(s.stop)
    for p in PROMPTS[:3]:
        got, t = complete(s, p)
        assert got == complete(off, p)[0]
        assert t.get("draft_n", 0) == 0
    assert "orthrus drafting is off" in s.log_path.read_text(errors="replace")
