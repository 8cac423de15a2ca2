"""The CLI end to end on a tiny GGUF: generate streams the API's text, bench writes its report."""
import json
import subprocess
import sys


def cli(*args):
    return subprocess.run([sys.executable, "-m", "orthrus_gguf.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_generate_streams_the_api_text(tiny_gguf):
    from orthrus_gguf.api import Orthrus
    path = tiny_gguf("f32", tied=False)
    r = cli("generate", "-m", path, "-p", "def f(x):", "-n", 20, "--threads", 2, "--stats")
    assert r.returncode == 0, r.stderr
    with Orthrus(path, n_threads=2, n_ctx=4096) as m:
        want = m.generate("def f(x):", max_tokens=20).text
    assert r.stdout == want + "\n"
    stats = json.loads(r.stderr[r.stderr.index("{"):])
    assert stats["tokens"] == 20 and stats["mode"] == "orthrus"


def test_generate_bad_input_exit_code(tiny_gguf, tmp_path):
    r = cli("generate", "-m", tmp_path / "missing.gguf", "-p", "x")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = cli("generate", "-m", tiny_gguf("f32", tied=False), "-p", "x", "--temp", -1)
    assert r.returncode == 2 and "temperature must be >= 0" in r.stderr


def test_bench_json_and_plot(tiny_gguf, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"a": ["def f(x):", "import os"], "b": ["Q: 1 + 2 = ?\nA:"]}))
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    r = cli("bench", "-m", tiny_gguf("f32", tied=False), "--prompts", prompts, "-n", 16, "--threads", 2,
            "--block-size", 8, "--block-size", "auto", "--json", out, "--plot", png)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert set(rep["groups"]) == {"a", "b"}
    o = rep["groups"]["a"]["orthrus"]["8"]
    assert o["identical"] == "2/2" and o["speedup"] > 0 and len(o["acceptance_by_position"]) == 7
    assert "auto" in rep["groups"]["b"]["orthrus"] and "forward_cost_ms" in rep
    assert "× AR" in r.stdout and png.read_bytes()[:4] == b"\x89PNG"
