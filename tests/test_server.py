"""llama-server with Orthrus drafting (`--spec-type orthrus`, patch 0006), over HTTP.

Needs `orthrus-gguf build` (CI runs it first); without a build these tests fail with the
message saying so, they do not skip.

Identity: at temperature 0 the drafting server must return exactly the text of the same
server with drafting off, and of the Python API. On CPU a batched verify can differ from
one-token decodes in the last bits (see docs/LLAMA_CPP.md), which can flip a
near-tie; so these tests use f32 and q8_0 GGUFs of tiny random models (std-0.5 weights:
peaked logits, no near-ties) and run the server with flash attention off (`-fa off`,
ggml's CPU flash attention works in f16) and an f32 KV cache (`-ctk f32 -ctv f32`).
HTTP uses only the standard library.
"""
from __future__ import annotations

import http.client
import json
import re
import socket
import threading

import numpy as np
import pytest

from orthrus_gguf.serve import Server, free_port, server_command

EXACT = ("-fa", "off", "-ctk", "f32", "-ctv", "f32", "-t", "2", "-c", "2048", "--no-warmup")
N_PARALLEL = 2
MAX_TOKENS = 24
PROMPTS = [
    "def fib(n):", "import json", "class A:\n    x = ", "The quick brown fox", "for i in range(10):",
    "return self.", "# comment\n", "{\"key\": [1, 2", "while True:\n    if", "hello world",
    "0123456789", "x = y + z *",
]
CHAT = [[{"role": "user", "content": p}] for p in PROMPTS[:10]]


def start(tmp_path_factory, model, drafting, extra=EXACT, n_parallel=N_PARALLEL, **kw) -> Server:
    port = free_port()
    cmd, _ = server_command(model, port=port, n_parallel=n_parallel, extra=extra, drafting=drafting, **kw)
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


def test_context_limit_stops_where_drafting_off_stops(gguf, tmp_path_factory, request):
    """A request that runs out of context (-c 64, one slot, no context shift) ends with the
    same text with drafting on as off: no drafted step may cross llama-server's
    context-limit check before the tokens ahead of it are out (0006 keeps one more cell
    free when it sizes a draft)."""
    small = tuple(x if x != "2048" else "64" for x in EXACT)
    on1 = start(tmp_path_factory, gguf, drafting=True, extra=small, n_parallel=1)
    request.addfinalizer(on1.stop)
    off1 = start(tmp_path_factory, gguf, drafting=False, extra=small, n_parallel=1)
    request.addfinalizer(off1.stop)
    drafted = 0
    for p in PROMPTS:
        body = dict(prompt=p, n_predict=1000, temperature=0, return_tokens=True, ignore_eos=True)
        (s_on, r_on), (s_off, r_off) = post(on1, "/completion", body), post(off1, "/completion", body)
        assert s_on == s_off == 200, (r_on, r_off)
        assert r_on["tokens"] == r_off["tokens"], p
        assert r_on["truncated"] and r_on["stop_type"] == "limit", (r_on["truncated"], r_on["stop_type"], r_on["tokens_predicted"])
        drafted += r_on["timings"].get("draft_n", 0)
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
    """temperature > 0 with llama-server's default sampler chain (top-k 40, top-p 0.95,
    min-p 0.05): drafts are used, a seed repeats its text, and a grammar is obeyed (under a
    grammar the server keeps drafts by token matching: p has no closed form there)."""
    body = dict(prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.8, seed=1)
    texts = []
    for _ in range(2):
        status, r = post(on, "/v1/completions", body)
        assert status == 200, r
        assert r["usage"]["completion_tokens"] >= 1
        assert r["timings"].get("draft_n", 0) > 0
        texts.append(r["choices"][0]["text"])
    assert texts[0] == texts[1]
    status, r = post(on, "/v1/completions", dict(body, grammar='root ::= [a-z ]+'))
    assert status == 200, r
    assert re.fullmatch("[a-z ]+", r["choices"][0]["text"]), r["choices"][0]["text"]


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
    for bad in ([-1], [10**9]):  # token ids outside the vocabulary (upstream: a 500)
        status, r = post(on, "/detokenize", dict(tokens=bad))
        assert status == 400 and "is outside the vocabulary" in r["error"]["message"], r
    assert post(on, "/detokenize", dict(tokens=[5, 6]))[0] == 200
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


def test_bench_server_reports_identity_and_acceptance(gguf, tmp_path):
    """`bench-server` at T=0: the drafting server's texts equal drafting off's, its
    counts are the server's own timings, and the ratio is taken against drafting off."""
    from orthrus_gguf.serve_bench import format_server_report, run_server_bench
    from orthrus_gguf.errors import OrthrusError
    rep = run_server_bench(gguf, {"p": PROMPTS[:4]}, max_tokens=16, settings=("speculative",),
                           extra=EXACT, log_dir=tmp_path, progress=lambda *_: None)
    g = rep["runs"][0]["groups"]["p"]
    off, on = g["off"], g["speculative"]
    assert on["identical"] == 4 and off["draft_n"] == 0 and "identical" not in off
    assert 0 < on["draft_n_accepted"] <= on["draft_n"] and on["predicted_n"] == off["predicted_n"]
    assert on["vs_off"] == pytest.approx(on["tokens_per_second"] / off["tokens_per_second"])
    assert on["tokens_per_step"] == pytest.approx(on["predicted_n"] / (on["predicted_n"] - on["draft_n_accepted"]))
    assert "4/4" in format_server_report(rep)
    assert (tmp_path / "orthrus-bench-server-speculative-c1.log").is_file()
    with pytest.raises(OrthrusError, match="unknown setting"):
        run_server_bench(gguf, {"p": PROMPTS[:1]}, settings=("fast",))


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


def _serve_cli(gguf, port: int):
    """`orthrus-gguf serve` in a process group of its own, once it has printed its URL:
    (the process, the lines it printed)."""
    import queue
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, "-m", "orthrus_gguf.cli", "serve", "-m", str(gguf), "--port", str(port),
                             "--draft-max", "3", "--", *EXACT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen = []
    deadline = time.monotonic() + 120
    while not any(x.startswith("serving ") for x in seen):
        if time.monotonic() > deadline or proc.poll() is not None:
            _stop_serve_cli(proc)
            raise AssertionError("".join(seen)[-3000:])
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    return proc, seen


def _stop_serve_cli(proc) -> None:
    """SIGINT first, so that serve stops its llama-server too; then SIGKILL."""
    import os
    import signal
    import subprocess
    for sig in (signal.SIGINT, signal.SIGKILL):
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def test_serve_command_prints_the_url_and_stops_on_ctrl_c(tiny_gguf):
    """`orthrus-gguf serve` as a user runs it: it says how it drafts, prints the URL once the
    server is healthy, serves with drafting, and Ctrl-C (SIGINT) ends it with status 0 and
    the llama-server process gone (its port refuses connections)."""
    import os
    import signal
    gguf = tiny_gguf("f32", **MODEL)
    port = free_port()
    proc, seen = _serve_cli(gguf, port)
    try:
        assert "Orthrus drafting on: 3 drafts per step" in "".join(seen)
        assert f"http://127.0.0.1:{port}" in next(x for x in seen if x.startswith("serving "))
        server = Server([], port=port)
        status, r = post(server, "/v1/completions", dict(prompt=PROMPTS[0], max_tokens=8, temperature=0))
        assert status == 200 and r["timings"].get("draft_n", 0) > 0, r
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        _stop_serve_cli(proc)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_serve_stopped_during_a_stream_takes_its_server_with_it(tiny_gguf, sig):
    """A stream is open (its client reads no further) when serve is told to stop: SIGTERM
    ends both within seconds, and so does SIGKILL, where no cleanup of serve's runs: the
    child's death signal is SIGKILL, since on the SIGTERM it used to get llama-server
    waited ~30 s for the open connection. (With a client reading a long stream, llama-server
    also holds a first SIGTERM; serve's second one ends it: seen by hand, 10.3 s -> 1.3 s.)"""
    import os
    import signal
    import subprocess
    import time
    gguf = tiny_gguf("f32", **MODEL)
    port = free_port()
    proc, _ = _serve_cli(gguf, port)
    try:
        (child,) = _children(proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/completion", json.dumps({"prompt": PROMPTS[0], "n_predict": 1000, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline()  # the stream is open and flowing
        t0 = time.monotonic()
        os.kill(proc.pid, getattr(signal, sig))
        proc.wait(30)
        while os.path.exists(f"/proc/{child}") and time.monotonic() - t0 < 30:
            try:  # a zombie until its parent (init, or the dead serve's reaper) collects it
                with open(f"/proc/{child}/stat") as f:
                    if f.read().split(")")[-1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.05)
        gone = time.monotonic() - t0
        conn.close()
        assert gone < 5, f"llama-server outlived serve by {gone:.1f} s after {sig}"
        assert proc.returncode == (0 if sig == "SIGTERM" else -signal.SIGKILL)
    finally:
        _stop_serve_cli(proc)
        subprocess.run(["pkill", "-KILL", "-f", f"llama-server.*--port {port}"], check=False)


# ---------------------------------------------------------------- temperature > 0: exact in distribution

SAMPLING = dict(temperature=1.5, top_k=3, top_p=1.0, min_p=0.0)
SAMPLE_PROMPT = [5, 17, 42, 99, 7]  # token ids: the server and the enumeration see the same prompt
N_SAMPLES = 1500


def warp(logits: np.ndarray) -> dict[int, float]:
    """The request's sampler on one row: top-k 3, then temperature (top-p/min-p off)."""
    top = np.argsort(-logits.astype(np.float64), kind="stable")[:SAMPLING["top_k"]]
    x = logits[top].astype(np.float64) / SAMPLING["temperature"]
    e = np.exp(x - x.max())
    return dict(zip(top.tolist(), (e / e.sum()).tolist()))


def exact_distributions(gguf) -> tuple[dict, dict, dict]:
    """Enumerated with the Python runtime on the same GGUF: the AR joint of (t1, t2, t3);
    and two (t1, t2) laws a wrong acceptance rule would give, for the power check: keeping
    every draft (t2 ~ q) and rejecting without the residual (t2 ~ min(p, q) + rest * p).
    q is the diffusion row the server drafts t2 from: block 3 (max_tokens 4 leaves room for
    2 drafts after t1)."""
    from orthrus_gguf.native import NativeModel
    L = len(SAMPLE_PROMPT)
    joint, keep, no_res = {}, {}, {}
    with NativeModel(gguf, n_ctx=64, n_batch=16, n_threads=2) as nm:
        nm.prefill(SAMPLE_PROMPT)
        p1 = warp(nm.logits(1)[0])
        for t1, a in p1.items():
            nm.decode_ar([t1], L)
            p2 = warp(nm.logits(1)[0])
            for t2, b in p2.items():
                nm.decode_ar([t2], L + 1)
                for t3, c in warp(nm.logits(1)[0]).items():
                    joint[t1, t2, t3] = a * b * c
                nm.seq_rm(L + 1)
            nm.seq_rm(L)
            nm.draft(t1, L, 3)
            q2 = warp(nm.logits(1)[0])
            overlap = {t: min(p2.get(t, 0.0), q) for t, q in q2.items()}
            rest = 1.0 - sum(overlap.values())
            for t in set(p2) | set(q2):
                keep[t1, t] = a * q2.get(t, 0.0)
                no_res[t1, t] = a * (overlap.get(t, 0.0) + rest * p2.get(t, 0.0))
    return joint, keep, no_res


def sample_server(server, n: int) -> tuple[list[tuple], int, int]:
    """n completions of 4 tokens at seeds 0..n-1 (two at a time: both slots): the first
    three tokens of each, and the drafted / accepted totals."""
    out, drafted, accepted, errors = [None] * n, [0], [0], []

    def run(seeds):
        try:
            for s in seeds:
                status, r = post(server, "/completion", dict(prompt=SAMPLE_PROMPT, n_predict=4, seed=s,
                                                             return_tokens=True, **SAMPLING))
                assert status == 200, r
                out[s] = tuple(r["tokens"][:3])
                drafted[0] += r["timings"].get("draft_n", 0)
                accepted[0] += r["timings"].get("draft_n_accepted", 0)
        except Exception as e:  # surfaced below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(range(k, n, N_PARALLEL),)) for k in range(N_PARALLEL)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    assert not errors, errors
    return out, drafted[0], accepted[0]


def pvalue(samples, law: dict, n: int) -> float:
    """Chi-square p-value of the samples' first n tokens against the law (keys: n-tuples)."""
    from collections import Counter
    from test_reference import chi2_pvalue
    import torch
    keys = sorted(law)
    counts = Counter(s[:n] for s in samples)
    return chi2_pvalue(np.array([counts.get(k, 0) for k in keys], dtype=np.float64),
                       torch.tensor([law[k] for k in keys], dtype=torch.float64))


@pytest.mark.parametrize("rule", ["speculative", "match"])
def test_sampled_text_has_the_ar_distribution(rule, tiny_gguf, tmp_path_factory, request):
    """temperature > 0, top-k 3: 1500 completions (seeds 0..1499) against the AR law of the
    first three tokens, enumerated exactly. t2 and t3 are drafted (t2 from a 3-block
    diffusion row), so both go through the acceptance rule: speculative sampling (the
    default) or token matching (--spec-orthrus-match). Every sample must lie in the law's
    support, and chi-square must not reject the law (p > 1e-3: a false alarm about 1 run in
    500 for the two fits); for speculative sampling the same samples must reject the laws
    of two wrong rules, which shows the test has the power to catch them."""
    gguf = tiny_gguf("f32", **MODEL)
    joint, keep, no_res = exact_distributions(gguf)
    pair = {}
    for (t1, t2, _), v in joint.items():
        pair[t1, t2] = pair.get((t1, t2), 0.0) + v
    s = start(tmp_path_factory, gguf, drafting=True, rule=rule)
    request.addfinalizer(s.stop)
    samples, drafted, accepted = sample_server(s, N_SAMPLES)
    assert set(samples) <= set(joint)
    assert 0 < accepted < drafted  # drafts were kept and rejected
    assert pvalue(samples, joint, 3) > 1e-3
    assert pvalue(samples, pair, 2) > 1e-3
    if rule == "speculative":
        assert pvalue(samples, keep, 2) < 1e-3
        assert pvalue(samples, no_res, 2) < 1e-3
