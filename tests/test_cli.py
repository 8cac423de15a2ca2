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
    assert stats["backend_sampling"] is False  # the CPU default
    # greedy picks in the graph (forced on the CPU): the same text
    r = cli("generate", "-m", path, "-p", "def f(x):", "-n", 20, "--threads", 2, "--stats", "-bs")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert json.loads(r.stderr[r.stderr.index("{"):])["backend_sampling"] is True


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


def test_bench_costs_table_with_and_without_kept_graphs(tiny_gguf, tmp_path):
    """--costs: the cost table for every width 1..block and the prefill speeds; the kept graphs
    make every alternating forward a reuse, the single graph (--graph-slots 0) none of w >= 2."""
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["def f(x):"]))
    reps = {}
    for slots in (None, 0):
        out, png = tmp_path / f"r{slots}.json", tmp_path / f"r{slots}.png"
        args = ["bench", "-m", tiny_gguf("f32", tied=False), "--prompts", prompts, "-n", 8, "--threads", 2,
                "--block-size", 8, "--costs", "--json", out, "--plot", png]
        r = cli(*args, *([] if slots is None else ["--graph-slots", slots]))
        assert r.returncode == 0, r.stderr
        assert "alt/b2b" in r.stdout and "argmax" in r.stdout and "prefill of" in r.stdout and "reused/step" in r.stdout
        assert (tmp_path / f"r{slots}-costs.png").read_bytes()[:4] == b"\x89PNG"
        reps[slots] = json.loads(out.read_text())
    kept, single = reps[None]["costs"], reps[0]["costs"]
    assert [r["width"] for r in kept["rows"]] == list(range(1, 9))
    assert kept["rows"][0]["verify"] == 1.0  # the unit
    # the host's argmax of the verify rows, timed apart from the forwards
    assert all(r["argmax"] > 0 and r["argmax_s"] > 0 for r in kept["rows"])
    assert all(r["reused"] == 1.0 for r in kept["rows"])
    assert all(r["reused"] == 0.0 for r in single["rows"] if r["width"] >= 2)
    assert kept["graph_slots"] > 0 and kept["graph_compute_bytes"] > 0 and single["graph_slots"] == 0
    assert set(reps[None]["prefill"]) >= {"fast_tokens_per_second", "exact_tokens_per_second", "exact_over_fast"}


def test_bench_prefix_cache(tiny_gguf, tmp_path):
    """--prefix-cache compares calls on a reused prefix with fresh calls: with every forward on
    the exact kernels they always agree."""
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["def f(x):", "Q: 1 + 2 = ?\nA:"]))
    out = tmp_path / "r.json"
    r = cli("bench", "-m", tiny_gguf("f32", tied=False), "--prompts", prompts, "-n", 12, "--threads", 2,
            "--prefix-cache", "--json", out)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["identical"]["all"] == "2/2" and set(rep["identical"]) == {"verify", "all"}
    assert "exact=all: cached call = fresh call on 2/2 prompts" in r.stdout


def test_llama_cpp_flag_spellings_reach_the_api(tiny_gguf, monkeypatch, tmp_path):
    """Each llama.cpp spelling (and the old long form) sets the Orthrus argument it names."""
    from click.testing import CliRunner

    import orthrus_gguf.api as api
    from orthrus_gguf.cli import main
    seen = {}

    class Spy(api.Orthrus):
        def __init__(self, path, **kw):
            seen.update(kw)
            super().__init__(path, **kw)

        def steps(self, prompt, max_tokens=256, **kw):
            seen.update(kw, prompt=prompt, max_tokens=max_tokens)
            return super().steps(prompt, max_tokens, **kw)
    monkeypatch.setattr(api, "Orthrus", Spy)
    path = str(tiny_gguf("f32", tied=False))
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "ab"')
    prompt = tmp_path / "p.txt"
    prompt.write_text("from a file")
    runs = [
        (["-c", "300", "-t", "1", "-ngl", "0", "-fa", "off", "-ctk", "q8_0", "-ctv", "f16", "-b", "128", "-ub", "64",
          "-n", "3", "-s", "4", "--temp", "0.5", "--min-p", "0.1", "--repeat-penalty", "1.1", "-f", prompt,
          "--grammar-file", grammar],
         dict(n_ctx=300, n_threads=1, n_gpu_layers=0, flash_attn=False, type_k="q8_0", type_v="f16", n_batch=128,
              n_ubatch=64, max_tokens=3, seed=4, temperature=0.5, min_p=0.1, repeat_penalty=1.1,
              prompt="from a file", grammar='root ::= "ab"')),
        (["--ctx-size", "320", "--threads", "2", "--gpu-layers", "auto", "--flash-attn", "on", "--n-predict", "2",
          "--seed", "5", "-p", "x", "-sys", "be brief"],
         dict(n_ctx=320, n_threads=2, n_gpu_layers="auto", flash_attn=True, max_tokens=2, seed=5)),
        (["-cnv", "-p", "z", "--top-k", "7", "--top-p", "0.5", "--presence-penalty", "0.3",
          "--frequency-penalty", "0.2", "--repeat-last-n", "16", "--grammar", 'root ::= "x"', "-n", "2"],
         dict(top_k=7, top_p=0.5, presence_penalty=0.3, frequency_penalty=0.2, penalty_last_n=16,
              grammar='root ::= "x"', max_tokens=2)),
        (["--n-ctx", "330", "--n-gpu-layers", "all", "--max-tokens", "2", "-p", "y"],
         dict(n_ctx=330, n_gpu_layers="all", max_tokens=2)),
    ]
    for args, want in runs:
        seen.clear()
        r = CliRunner().invoke(main, ["generate", "-m", path, *map(str, args)])
        assert r.exit_code == 0, r.output
        assert {k: seen[k] for k in want} == want
    assert seen["prompt"] == "y"
    import orthrus_gguf.demo as demo
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: seen.update(kw, args=a))
    for args in (["-t", "3", "-ngl", "all", "-n", "5"], ["--threads", "3", "--gpu-layers", "all", "--n-predict", "5"]):
        seen.clear()
        r = CliRunner().invoke(main, ["demo", *args])
        assert r.exit_code == 0, r.output
        assert seen["n_threads"] == 3 and seen["n_gpu_layers"] == "all" and seen["args"][1] == 5
    r = CliRunner().invoke(main, ["generate", "-m", path, "-p", "x", "-ngl", "-3"])
    assert r.exit_code == 2 and "expected an integer >= -1, 'all' or 'auto'" in r.output
    r = CliRunner().invoke(main, ["generate", "-m", path])
    assert r.exit_code == 2 and "give the prompt with -p TEXT or -f FILE" in r.output


def test_bench_markdown_and_json_output_and_early_path_check(tiny_gguf, tmp_path):
    """bench -o md prints llama-bench's table shape; -o json its records; an unwritable --json
    path fails before the bench runs."""
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["def f(x):"]))
    base = ["bench", "-m", tiny_gguf("f32", tied=False), "--prompts", prompts, "-n", 6, "-t", 2, "--block-size", 4]
    md = cli(*base)
    assert md.returncode == 0, md.stderr
    assert "| model | backend | threads | test | mode | t/s | × AR | tok/step | identical |" in md.stdout
    assert "| CPU | 2 | prompts tg6 | orthrus B=4 |" in md.stdout
    js = cli(*base, "-o", "json")
    recs = json.loads(js.stdout)
    assert js.returncode == 0 and [r["mode"] for r in recs] == ["ar", "orthrus B=4"]
    assert recs[1]["identical"] == "1/1" and recs[1]["n_gen"] == 6 and recs[1]["avg_ts"] > 0
    bad = cli(*base, "--json", tmp_path / "missing" / "r.json")
    assert bad.returncode == 2 and "cannot write there" in bad.stderr and "decoding" not in bad.stderr
