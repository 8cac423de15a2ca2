"""llama-server at scale: one diffusion forward for every drafting slot, the probabilities of
drafted tokens, the drafting options llama.cpp users know, and `serve`'s process contract.

Like tests/test_server.py these run the patched server on tiny random f32 models with the
exact CPU kernels (`serve`'s environment), so a drafting server's greedy text and its
probabilities must equal a drafting-off server's.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from orthrus_gguf.serve import Server, free_port, server_command, server_env
from test_server import EXACT, MODEL, PROMPTS, complete, post

CONC = 4


def start(tmp_path_factory, model, request, drafting=True, extra=EXACT, **kw) -> Server:
    port = free_port()
    cmd, _ = server_command(model, port=port, extra=("--metrics", *extra), drafting=drafting, **kw)
    log = tmp_path_factory.mktemp("server") / "llama-server.log"
    s = Server(cmd, port=port, log=log, env=server_env()).start()
    request.addfinalizer(s.stop)
    return s


def metrics(server) -> dict[str, float]:
    """The server's Orthrus counters (its /metrics, as bench-server reads them)."""
    from orthrus_gguf.serve_bench import draft_counters
    return draft_counters(server.port)


def concurrent(server, prompts, **kw):
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(lambda p: complete(server, p, **kw), prompts))


@pytest.fixture(scope="module")
def gguf(tiny_gguf):
    return tiny_gguf("f32", **MODEL)


@pytest.fixture(scope="module")
def off4(gguf, tmp_path_factory, request):
    return start(tmp_path_factory, gguf, request, drafting=False, n_parallel=CONC)


# ---------------------------------------------------------------- one forward for all slots

@pytest.mark.parametrize("kv", ["per-seq", "unified"])
def test_one_diffusion_forward_drafts_every_slot(gguf, off4, tmp_path_factory, request, kv):
    """-np 4, 4 concurrent greedy requests: the server's counters show exactly one diffusion
    forward per iteration that drafts, those forwards hold more than one slot's block, and
    every text equals the drafting-off server's. With a KV stream per slot (llama-server's
    default for -np N) and with a unified cache (-kvu)."""
    extra = EXACT + (("-kvu",) if kv == "unified" else ())
    on = start(tmp_path_factory, gguf, request, n_parallel=CONC, extra=extra)
    prompts = PROMPTS[:CONC]
    got = concurrent(on, prompts)
    want = concurrent(off4, prompts)
    assert [t for t, _ in got] == [t for t, _ in want]
    m = metrics(on)
    steps, fwd, blocks = (m[f"orthrus_draft_{k}_total"] for k in ("steps", "forwards", "blocks"))
    assert steps > 0 and fwd == steps, m
    assert blocks > fwd, m  # some forwards drafted several slots
    assert sum(t.get("draft_n_accepted", 0) for _, t in got) > 0


def test_auto_length_per_slot_with_batched_drafting(gguf, off4, tmp_path_factory, request):
    """--draft-max auto at -np 4: each slot keeps its own policy (calibrated once), the
    drafting slots of an iteration still share one forward, and the texts equal off's."""
    on = start(tmp_path_factory, gguf, request, n_parallel=CONC, draft_max="auto")
    prompts = PROMPTS[8:8 + CONC]
    got = concurrent(on, prompts)
    assert [t for t, _ in got] == [t for t, _ in concurrent(off4, prompts)]
    m = metrics(on)
    assert m["orthrus_draft_forwards_total"] == m["orthrus_draft_steps_total"], m
    assert "auto: measured width:draft/verify ms" in on.log_path.read_text(errors="replace")


def test_auto_length_calibrates_later_when_the_first_request_ends_the_context(gguf, tmp_path_factory, request):
    """The first drafted request sits where the widest calibration pass (a block of 8) does not
    fit before the end of its slot's context: it takes plain steps and leaves the timing to the
    next request, which calibrates. (Auto used to log 'calibration failed' there and draft the
    full length for the rest of the server's life.) Both answers equal a drafting-off server's."""
    import urllib.request
    extra = tuple("256" if x == "2048" else x for x in EXACT)
    on = start(tmp_path_factory, gguf, request, extra=extra, n_parallel=1, draft_max="auto")
    off = start(tmp_path_factory, gguf, request, extra=extra, n_parallel=1, drafting=False)
    with urllib.request.urlopen(on.url + "/props", timeout=30) as r:
        n_ctx = json.loads(r.read())["default_generation_settings"]["n_ctx"]
    _, tok = post(on, "/tokenize", dict(content=" ".join(PROMPTS) * 40))
    ids = tok["tokens"][: n_ctx - 6]
    assert len(ids) == n_ctx - 6
    near_end = dict(prompt=ids, n_predict=4, temperature=0, cache_prompt=False)
    short = dict(prompt=PROMPTS[0], n_predict=24, temperature=0, cache_prompt=False)
    for body in (near_end, short):
        got, want = post(on, "/completion", body), post(off, "/completion", body)
        assert got[0] == want[0] == 200 and got[1]["content"] == want[1]["content"], (got, want)
    log = on.log_path.read_text(errors="replace")
    assert "calibration failed" not in log
    assert "auto: measured width:draft/verify ms" in log


def test_per_slot_flag_drafts_each_slot_alone(gguf, off4, tmp_path_factory, request):
    """--spec-orthrus-per-slot (the path before batched drafting, kept to measure against):
    one forward per slot draft, the same texts."""
    on = start(tmp_path_factory, gguf, request, n_parallel=CONC, per_slot=True)
    prompts = PROMPTS[4:4 + CONC]
    got = concurrent(on, prompts)
    assert [t for t, _ in got] == [t for t, _ in concurrent(off4, prompts)]
    m = metrics(on)
    assert m["orthrus_draft_forwards_total"] == m["orthrus_draft_blocks_total"] > m["orthrus_draft_steps_total"], m


def test_bench_server_concurrency_reports_forwards(gguf, tmp_path):
    """bench-server at concurrency 2: per-slot and batched drafting against drafting off, in
    one run; texts equal off's and batched drafting takes one forward per drafting step."""
    from orthrus_gguf.serve_bench import format_server_report, run_server_bench
    rep = run_server_bench(gguf, {"p": PROMPTS[:4]}, max_tokens=16, settings=("speculative", "per-slot"),
                           extra=EXACT, log_dir=tmp_path, progress=lambda *_: None, concurrency=(2,))
    g = rep["runs"][0]["groups"]["p"]
    assert rep["runs"][0]["concurrency"] == 2
    assert g["speculative"]["identical"] == 4 and g["per-slot"]["identical"] == 4
    assert g["speculative"]["draft_forwards"] == g["speculative"]["draft_steps"] > 0
    assert g["per-slot"]["draft_forwards"] >= g["per-slot"]["draft_steps"] > 0
    assert g["off"]["draft_steps"] == 0
    assert " 2  p" in format_server_report(rep)
    from orthrus_gguf.serve_bench import plot_server_report
    png = plot_server_report(rep, tmp_path / "server.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- probabilities of drafted tokens

def _probs(server, prompt, **kw):
    status, r = post(server, "/completion", dict(prompt=prompt, n_predict=16, temperature=0, n_probs=3,
                                                 cache_prompt=False, **kw))
    assert status == 200, r
    return r


@pytest.mark.parametrize("post_sampling", [False, True], ids=["raw", "post-sampling"])
def test_drafted_tokens_have_their_verify_rows_probabilities(gguf, off4, tmp_path_factory, request, post_sampling):
    """n_probs of a greedy request with drafting on equal drafting off's for every token,
    drafted ones included (upstream's speculative path left them at logprob 0, no top list)."""
    on = start(tmp_path_factory, gguf, request, n_parallel=1)
    accepted = 0
    for p in PROMPTS[:4]:
        a = _probs(on, p, post_sampling_probs=post_sampling)
        b = _probs(off4, p, post_sampling_probs=post_sampling)
        accepted += a["timings"].get("draft_n_accepted", 0)
        pa, pb = a["completion_probabilities"], b["completion_probabilities"]
        assert a["content"] == b["content"] and len(pa) == len(pb) >= 8  # tokens of split UTF-8 merge
        key = "prob" if post_sampling else "logprob"
        tops = "top_probs" if post_sampling else "top_logprobs"
        for x, y in zip(pa, pb):
            assert x["id"] == y["id"] and x[key] == pytest.approx(y[key], abs=1e-4)
            assert [t["id"] for t in x[tops]] == [t["id"] for t in y[tops]]
            assert len(x[tops]) == (1 if post_sampling else 3)  # greedy: one candidate left after sampling
            assert [t[key] for t in x[tops]] == pytest.approx([t[key] for t in y[tops]], abs=1e-4)
    assert accepted > 0  # drafted tokens were among them


def test_openai_logprobs_of_drafted_tokens(gguf, off4, tmp_path_factory, request):
    on = start(tmp_path_factory, gguf, request, n_parallel=1)
    body = dict(prompt=PROMPTS[0], max_tokens=16, temperature=0, logprobs=2)
    (sa, a), (sb, b) = post(on, "/v1/completions", body), post(off4, "/v1/completions", body)
    assert sa == sb == 200 and a["timings"].get("draft_n_accepted", 0) > 0
    la, lb = a["choices"][0]["logprobs"]["content"], b["choices"][0]["logprobs"]["content"]
    assert len(la) == len(lb) >= 8
    for x, y in zip(la, lb):
        assert x["token"] == y["token"] and x["logprob"] == pytest.approx(y["logprob"], abs=1e-4)
        assert x["logprob"] < 0  # not upstream's 0.0 for a drafted token
        assert [t["logprob"] for t in x["top_logprobs"]] == pytest.approx([t["logprob"] for t in y["top_logprobs"]], abs=1e-4)


# ---------------------------------------------------------------- drafting options

def test_draft_n_min_and_p_min_are_honoured(gguf, off4, tmp_path_factory, request):
    """--spec-draft-n-min above the longest draft leaves nothing drafted; a rising
    --spec-draft-p-min drafts ever fewer tokens (drafts end at the first row less sure than
    it), down to none at 1; the text never changes."""
    want = [complete(off4, p)[0] for p in PROMPTS[:3]]

    def drafted(*extra):
        s = start(tmp_path_factory, gguf, request, n_parallel=1, extra=EXACT + extra)
        got = [complete(s, p) for p in PROMPTS[:3]]
        s.stop()
        assert [t for t, _ in got] == want, extra
        return sum(t.get("draft_n", 0) for _, t in got)

    assert drafted("--spec-draft-n-min", "8") == 0  # block 8: at most 7 drafts
    counts = [drafted("--spec-draft-p-min", str(p)) for p in (0.0, 0.005, 0.01, 0.02, 0.05, 1.0)]
    assert counts[0] > 0 and counts[-1] == 0, counts
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert any(0 < c < counts[0] for c in counts), counts


def test_slot_count_defaults_to_llama_servers_own(gguf):
    """serve passes -np only when asked (llama-server's default picks the count itself), and
    spells the draft length the way upstream does (--spec-draft-n-max)."""
    cmd, _ = server_command(gguf, port=1)
    assert "-np" not in cmd and "--spec-draft-n-max" in cmd
    cmd3 = server_command(gguf, port=1, n_parallel=3)[0]
    assert cmd3[cmd3.index("-np") + 1] == "3"
    r = _serve("-m", str(gguf), "--spec-draft-n-max", "99")
    assert r.returncode == 2 and "--draft-max must be in [1, 7]" in r.stderr, r.stderr


def test_exact_kernels_turn_op_offload_off(gguf, monkeypatch):
    """With the exact CPU kernels (serve's default) llama-server gets --no-op-offload, which
    keeps a 32-token verify of CPU layers off a GPU's kernels; GGML_CPU_USE_REF=0 drops both."""
    monkeypatch.delenv("GGML_CPU_USE_REF", raising=False)
    assert "--no-op-offload" in server_command(gguf, port=1)[0]
    assert server_env()["GGML_CPU_USE_REF"] == "1"
    monkeypatch.setenv("GGML_CPU_USE_REF", "0")
    assert "--no-op-offload" not in server_command(gguf, port=1)[0]
    assert server_env()["GGML_CPU_USE_REF"] == "0"


def test_draft_max_off_serves_without_drafting(gguf, off4, tmp_path_factory, request):
    cmd, note = server_command(gguf, port=1, draft_max="off")
    assert "--spec-type" not in cmd and "drafting off (--draft-max off)" in note
    s = start(tmp_path_factory, gguf, request, draft_max="off")
    text, t = complete(s, PROMPTS[1])
    assert text == complete(off4, PROMPTS[1])[0] and t.get("draft_n", 0) == 0


# ---------------------------------------------------------------- serve: input and processes

def _serve(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "orthrus_gguf.cli", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--port", "99999"], "99999 is not in the range"),
    (["--port", "0"], "0 is not in the range"),
    (["-md", "draft.gguf"], "there is no draft model"),
    (["--draft-max", "lots"], "expected a non-negative integer, 'auto' or 'off'"),
    (["--", "--port", "9000"], "--port after -- would fight serve's own setting: use serve's --port"),
    (["--", "--spec-type", "none"], "use serve's --draft-max off|N|auto"),
    (["--", "-md", "x.gguf"], "there is no draft model"),
    (["--", "--rpc", "nohost"], "is not host:port"),
])
def test_serve_refuses_bad_options(gguf, args, message):
    r = _serve("-m", str(gguf), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_serve_on_a_busy_port_is_a_clear_error(gguf):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        r = _serve("-m", str(gguf), "--port", str(port))
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stdout + r.stderr
    assert "serving" not in r.stdout


def _wait_serving(proc, port):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("serve did not come up")


def _port_closes(port, within=30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(0.2)
        except OSError:
            return True
    return False


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGQUIT", "SIGKILL"])
def test_llama_server_dies_with_serve(gguf, sig):
    """However serve ends (a hang-up, SIGQUIT, or SIGKILL, which it cannot catch), its
    llama-server goes too: nothing is left on the port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orthrus_gguf.cli", "serve", "-m", str(gguf), "--port", str(port),
                             "-np", "1", "--", *EXACT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_serving(proc, port)
        proc.send_signal(getattr(signal, sig))
        rc = proc.wait(30)
        assert rc == (-9 if sig == "SIGKILL" else 0), proc.stdout.read()
        assert _port_closes(port), f"llama-server still listens on {port} after serve got {sig}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the RPC backend

@pytest.fixture()
def rpc_servers(request):
    """Two ggml-rpc-server processes on 127.0.0.1 (exact CPU kernels, like serve's server)."""
    from orthrus_gguf.build import binary
    exe = binary("ggml-rpc-server", "the RPC tests need it")
    procs, eps = [], []
    for _ in range(2):
        port = free_port()
        p = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=server_env(),
                             start_new_session=True)
        procs.append(p)
        eps.append(f"127.0.0.1:{port}")

    def stop():
        for p in procs:
            p.terminate()
            p.wait(10)
    request.addfinalizer(stop)
    for ep in eps:
        host, port = ep.split(":")
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"ggml-rpc-server on {ep} did not start"
                time.sleep(0.1)
    return eps


def test_orthrus_over_rpc_equals_ar(gguf, rpc_servers, capfd):
    """The model split over two RPC servers (-ngl all; llama.cpp's load log shows weights on
    both): Orthrus greedy output equals AR over the same servers, and drafts are accepted
    (the diffusion view runs remotely unchanged)."""
    from orthrus_gguf import Orthrus, native
    lib = native.load()
    lib.orthrus_log_set_min_level(1)  # llama.cpp's info log, to see where the weights went
    try:
        m = Orthrus(gguf, n_ctx=512, n_gpu_layers="all", rpc_servers=rpc_servers, flash_attn=False,
                    type_k="f32", type_v="f32", n_threads=1)
    finally:
        lib.orthrus_log_set_min_level(4)
    log = capfd.readouterr().err
    for ep in rpc_servers:
        assert re.search(rf"RPC\d+\[{re.escape(ep)}\] model buffer size", log), log[-3000:]
    try:
        accepted = 0
        for p in PROMPTS[:3]:
            a = m.generate(p, max_tokens=24, mode="ar")
            o = m.generate(p, max_tokens=24, block_size=8)
            assert o.tokens == a.tokens, p
            accepted += o.stats["draft_acceptance"] > 0
        assert accepted > 0
    finally:
        m.close()


def test_llama_server_over_rpc(gguf, off4, rpc_servers, tmp_path_factory, request):
    s = start(tmp_path_factory, gguf, request, n_parallel=1,
              extra=EXACT + ("--rpc", ",".join(rpc_servers), "-ngl", "99", "-lv", "4"))
    for p in PROMPTS[:2]:
        text, t = complete(s, p)
        assert text == complete(off4, p)[0] and t.get("draft_n_accepted", 0) > 0
    log = s.log_path.read_text(errors="replace")
    for ep in rpc_servers:
        assert re.search(rf"RPC\d+\[{re.escape(ep)}\] model buffer size", log), log[-3000:]


def test_unreachable_rpc_server_is_an_error_not_an_abort(gguf):
    """llama.cpp aborts the process on an RPC endpoint it cannot reach; the API checks first."""
    code = ("from orthrus_gguf import Orthrus\nfrom orthrus_gguf.errors import OrthrusError\n"
            f"try:\n    Orthrus({str(gguf)!r}, rpc_servers=['127.0.0.1:{free_port()}'])\n"
            "except OrthrusError as e:\n    print('error:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "does not answer" in r.stdout and "ggml-rpc-server" in r.stdout, r.stderr


# ---------------------------------------------------------------- the llama.cpp tools

def test_llama_bench_runs_on_an_orthrus_gguf(gguf):
    from orthrus_gguf.build import binary
    r = subprocess.run([str(binary("llama-bench", "")), "-m", str(gguf), "-p", "16", "-n", "8", "-t", "2",
                        "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=300, env=server_env())
    assert r.returncode == 0, r.stderr[-2000:]
    runs = json.loads(r.stdout)
    assert {x["n_prompt"] for x in runs} | {x["n_gen"] for x in runs} >= {16, 8}
    assert all(x["avg_ts"] > 0 for x in runs)


def test_tools_are_built():
    from orthrus_gguf.build import BINARIES, binary
    for name in BINARIES:
        assert os.access(binary(name, ""), os.X_OK), name


def test_imatrix_q4_k_m_of_orthrus_tiny(tmp_path):
    """llama-imatrix on the embedded model's f16 GGUF (calibrated on this package's own
    sources: Python code, like its training data), then `convert --imatrix`: the q4_k_m
    records the matrix, and Orthrus on it stays identical to AR and accepts drafts."""
    from pathlib import Path

    import gguf as gguf_py

    import orthrus_gguf
    from orthrus_gguf import Orthrus
    from orthrus_gguf.build import binary
    from orthrus_gguf.demo import converted, embedded_model
    f16 = converted(embedded_model(), "f16")
    calib = tmp_path / "calibration.txt"
    calib.write_text("\n".join(p.read_text() for p in sorted(Path(orthrus_gguf.__file__).parent.glob("*.py"))))
    imx = tmp_path / "imatrix.gguf"
    r = subprocess.run([str(binary("llama-imatrix", "")), "-m", str(f16), "-f", str(calib), "-o", str(imx),
                        "-c", "128", "--chunks", "16", "-t", "2", "--no-ppl"],
                       capture_output=True, text=True, timeout=300, env=server_env())
    assert r.returncode == 0 and imx.is_file(), r.stderr[-2000:]
    out = tmp_path / "orthrus-tiny-q4_k_m-imatrix.gguf"
    r = subprocess.run([sys.executable, "-m", "orthrus_gguf.cli", "convert", str(embedded_model()), "--outtype",
                        "q4_k_m", "--imatrix", str(imx), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    fields = gguf_py.GGUFReader(out).fields
    assert "quantize.imatrix.file" in fields and "quantize.imatrix.entries_count" in fields
    m = Orthrus(out, n_ctx=512)
    try:
        accepted = 0
        for p in ("def read_lines(path):\n", "Q: 123 + 456 = ?\nA:"):
            o, a = m.generate(p, max_tokens=32), m.generate(p, max_tokens=32, mode="ar")
            assert o.tokens == a.tokens
            accepted += o.stats["draft_acceptance"] > 0
        assert accepted > 0
    finally:
        m.close()


@pytest.mark.parametrize("outtype, message", [("q4_k_m", "no such readable file"),
                                              ("f16", "--imatrix applies to llama-quantize types")])
def test_convert_imatrix_errors(tmp_path, outtype, message):
    from orthrus_gguf.demo import embedded_model
    imx = tmp_path / ("missing.gguf" if outtype == "q4_k_m" else "present.gguf")
    if outtype == "f16":
        imx.write_bytes(b"x")
    r = subprocess.run([sys.executable, "-m", "orthrus_gguf.cli", "convert", str(embedded_model()), "--outtype",
                        outtype, "--imatrix", str(imx), "-o", str(tmp_path / "out.gguf")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "out.gguf").exists()


def test_iq_types_need_an_imatrix(tmp_path):
    from orthrus_gguf.demo import embedded_model
    r = subprocess.run([sys.executable, "-m", "orthrus_gguf.cli", "convert", str(embedded_model()), "--outtype",
                        "iq3_xxs", "-o", str(tmp_path / "out.gguf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs an importance matrix" in r.stderr, r.stderr
