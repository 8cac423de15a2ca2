"""AR against Orthrus on the same GGUF, prompts and process: speed, acceptance, identity; and
the cost of one Orthrus step's forwards (cost_table) and of a prompt (prefill_speed)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .api import Orthrus
from .errors import OrthrusError, utf8, utf8_text
from .native import gpu_layers

DEFAULT_PROMPTS = {"text": ["def fibonacci(n):", "import os\n\n\ndef main():", "class Stack:\n    def __init__(self):",
                            "Q: 12 + 35 = ?\nA:", "The quick brown fox"]}


def load_prompts(path: str | Path | None) -> dict[str, list[str]]:
    """A JSON list of prompts, or an object of named lists (e.g. {"code": […], "math": […]})."""
    if path is None:
        return DEFAULT_PROMPTS
    try:
        data = json.loads(utf8_text(Path(path).read_bytes(), f"the prompts file {path}"))
    except (OSError, json.JSONDecodeError) as e:
        raise OrthrusError(f"{path}: cannot read prompts ({e})") from None
    groups = {"prompts": data} if isinstance(data, list) else data
    if not isinstance(groups, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v)
                                               for v in groups.values()):
        raise OrthrusError(f"{path}: expected a JSON list of strings or an object of such lists")
    for v in groups.values():
        for i, text in enumerate(v):
            utf8(text, f"{path}: prompt {i + 1}")  # a lone surrogate ("\\udcff") has no UTF-8 form
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        raise OrthrusError(f"{path}: holds no prompts; give at least one")
    return groups


def first_difference_margin(m: Orthrus, prompt: str, common: list[int]) -> float:
    """AR top-1 minus top-2 logit, relative to |top-1|, at the first position where outputs differ."""
    nm = m.native
    nm.set_backend_sampling(False)  # the margin needs the logits
    nm.clear()
    nm.prefill(m.tokenize(prompt, special=True) + common)
    return nm.margin() / max(1e-9, abs(float(nm.logits(1)[0].max())))


def _agg(runs: list[dict]) -> dict:
    tokens = sum(r["tokens"] - 1 for r in runs)
    t = sum(r["time_draft_s"] + r["time_verify_s"] + r["time_python_s"] for r in runs)
    fw = sum(r["time_draft_s"] + r["time_verify_s"] for r in runs)
    steps = sum(r["steps"] for r in runs)
    drafted = [s["accepted"] + 1 for r in runs for s in r.get("steps_detail", ()) if s["drafted"]]
    return {"tokens_per_second": tokens / t if t else 0.0,
            # the reference's measure: counts drafts accepted past an end-of-generation token
            "accepted_plus_one": float(np.mean(drafted)) if drafted else 0.0,
            "tokens_per_step": sum(r["tokens"] - 1 for r in runs) / steps if steps else 0.0,
            "tokens_per_forward": tokens / max(1, sum(r["forwards"] for r in runs)),
            "step_over_forwards": t / fw if fw else 0.0,
            "graphs_reused_per_step": sum(r["graphs_reused_per_step"] * r["steps"] for r in runs) / steps if steps else 0.0,
            "python_share": sum(r["time_python_s"] for r in runs) / t if t else 0.0}


def acceptance_by_position(runs: list[dict], block: int) -> list[float]:
    """P(draft i accepted | drafts < i accepted), i = 1..block-1, over every drafted step."""
    hit, seen = np.zeros(block), np.zeros(block)
    for r in runs:
        for s in r["steps_detail"]:
            k, a = len(s["drafted"]), s["accepted"]
            seen[1:min(k, a + 1) + 1] += 1
            hit[1:a + 1] += 1
    return [float(h / s) if s else float("nan") for h, s in zip(hit[1:], seen[1:])]


def run_bench(model: str | Path, prompts: dict[str, list[str]], max_tokens: int = 128,
              block_sizes=(None, "auto"), n_ctx: int = 2048, n_threads: int | None = None,
              n_gpu_layers: int = 0, chat: bool = False, costs: bool = False,
              graph_slots: int | None = None, progress=None, **model_kw) -> dict:
    """costs: also the forward cost table (cost_table) and the prefill speeds (prefill_speed).
    graph_slots: kinds of batch with a kept graph (None: llama.cpp's default; 0: upstream's
    single graph, to measure what the kept graphs save). model_kw: more Orthrus(...) arguments."""
    say = progress or (lambda msg: None)
    with Orthrus(model, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, **model_kw) as m:
        nm = m.native
        if graph_slots is not None:
            nm.set_graph_slots(graph_slots)
        blocks = [nm.block_size if b is None else b for b in block_sizes]
        if "auto" in blocks:
            m.calibrate()
        first = next(iter(prompts.values()))[0]
        for b in blocks:  # warm-up: page in weights, build graphs
            m.generate(first, max_tokens=8, mode="orthrus", block_size=b)
        m.generate(first, max_tokens=8, mode="ar")
        # where the greedy picks ran (the warm-up left greedy's setting): in the graph on the
        # output layer's device (backend sampling), or on the host
        report = {"model": Path(model).name, "max_tokens": max_tokens, "n_threads": nm.n_threads,
                  "n_gpu_layers": gpu_layers(n_gpu_layers), "exact": m.exact,
                  "backend_sampling": nm.backend_sampling, "groups": {}}
        if costs and nm.is_orthrus:
            say("measuring forward costs by width …")
            report["costs"] = cost_table(nm)
            say("measuring prefill speed …")
            report["prefill"] = prefill_speed(nm)
        if "auto" in blocks:
            d, v = m.calibrate()
            report["forward_cost_ms"] = {"draft": {k: x * 1e3 for k, x in d.items()},
                                         "verify": {k: x * 1e3 for k, x in v.items()}}
        differ = []  # (its record, prompt, common prefix) of each run that differs from AR
        for group, texts in prompts.items():
            say(f"decoding {len(texts)} {group} prompts …")
            ar_runs, modes = [], {str(b): {"runs": [], "identical": 0, "differ": []} for b in blocks}
            from tqdm import tqdm
            for text in tqdm(texts, desc=group, unit="prompt", disable=progress is None, leave=False):
                prompt = m.apply_chat_template([{"role": "user", "content": text}]) if chat else text
                # every run from an empty cache: each decodes the whole prompt the same way
                m.reset()
                ar = m.generate(prompt, max_tokens=max_tokens, mode="ar")
                ar_runs.append(ar.stats)
                for b in blocks:
                    m.reset()
                    o = m.generate(prompt, max_tokens=max_tokens, mode="orthrus", block_size=b)
                    rec = modes[str(b)]
                    rec["runs"].append(o.stats)
                    if o.tokens == ar.tokens:
                        rec["identical"] += 1
                    else:
                        i = next(i for i, (x, y) in enumerate(zip(o.tokens + [-1], ar.tokens + [-2])) if x != y)
                        rec["differ"].append((prompt, ar.tokens[:i]))
            g = {"prompts": len(texts), "ar": _agg(ar_runs), "orthrus": {}}
            for b in blocks:
                rec = modes[str(b)]
                agg = _agg(rec["runs"])
                ar_tps = g["ar"]["tokens_per_second"]  # 0 when every AR run ended at its first token
                agg["speedup"] = agg["tokens_per_second"] / ar_tps if ar_tps > 0 else float("nan")
                agg["identical"] = f"{rec['identical']}/{len(texts)}"
                agg["first_diff_margins"] = []  # filled in after every timed run
                differ += [(agg, p, common) for p, common in rec["differ"]]
                agg["acceptance_by_position"] = acceptance_by_position(rec["runs"], nm.block_size)
                g["orthrus"][str(b)] = agg
            report["groups"][group] = g
        # after all timed runs: the margins need logits, and turning backend sampling off and
        # on again would drop the kept graphs between timed runs
        for agg, p, common in differ:
            agg["first_diff_margins"].append(first_difference_margin(m, p, common))
    return report


def format_markdown(rep: dict) -> str:
    """llama-bench's markdown table (model, backend, threads, test, t/s), with Orthrus' columns:
    bench_records as rows."""
    lines = ["| model | backend | threads | test | mode | t/s | × AR | tok/step | identical |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in bench_records(rep):
        backend = "CPU" if r["n_gpu_layers"] == 0 else f"ngl {r['n_gpu_layers']}"
        lines.append(f"| {Path(r['model_filename']).name} | {backend} | {r['n_threads']} | {r['test']} tg{r['n_gen']} "
                     f"| {r['mode']} | {r['avg_ts']:.2f} | {r['speedup']:.2f} | {r['tokens_per_step']:.2f} "
                     f"| {r['identical'] or '-'} |")
    return "\n".join(lines)


def bench_records(rep: dict) -> list[dict]:
    """llama-bench's -o json shape: one record per (test, mode), with Orthrus' fields."""
    out = []
    for group, g in rep["groups"].items():
        base = {"model_filename": rep["model"], "backends": "CPU" if rep["n_gpu_layers"] == 0 else "GPU",
                "n_gpu_layers": rep["n_gpu_layers"], "n_threads": rep["n_threads"], "n_prompt": 0,
                "n_gen": rep["max_tokens"], "test": group, "prompts": g["prompts"], "exact": rep["exact"]}
        out.append(base | {"mode": "ar", "avg_ts": g["ar"]["tokens_per_second"], "speedup": 1.0,
                           "tokens_per_step": 1.0, "identical": None})
        for b, o in g["orthrus"].items():
            out.append(base | {"mode": f"orthrus B={b}", "avg_ts": o["tokens_per_second"], "speedup": o["speedup"],
                               "tokens_per_step": o["tokens_per_step"], "identical": o["identical"]})
    return out


def format_report(rep: dict) -> str:
    head = f"{'prompts':<10}{'mode':<16}{'tok/s':>9}{'× AR':>7}{'tok/step':>10}{'tok/fwd':>9}" \
           f"{'step/fwds':>11}{'reused/step':>13}{'identical':>11}"
    lines = [head, "-" * len(head)]
    for group, g in rep["groups"].items():
        a = g["ar"]
        lines.append(f"{group:<10}{'ar':<16}{a['tokens_per_second']:>9.1f}{1.0:>7.2f}{1.0:>10.2f}"
                     f"{a['tokens_per_forward']:>9.2f}{a['step_over_forwards']:>11.3f}"
                     f"{a['graphs_reused_per_step']:>13.2f}{'-':>11}")
        for b, o in g["orthrus"].items():
            lines.append(f"{'':<10}{'orthrus B=' + b:<16}{o['tokens_per_second']:>9.1f}{o['speedup']:>7.2f}"
                         f"{o['tokens_per_step']:>10.2f}{o['tokens_per_forward']:>9.2f}"
                         f"{o['step_over_forwards']:>11.3f}{o['graphs_reused_per_step']:>13.2f}{o['identical']:>11}")
    return "\n".join(lines)


# ------------------------------------------------------------------ prefix cache

def prefix_cache_parity(model: str | Path, prompts: dict[str, list[str]], max_tokens: int = 32,
                        n_ctx: int = 2048, n_threads: int | None = None, n_gpu_layers: int = 0,
                        exact_modes=("verify", "all"), progress=None, **model_kw) -> dict:
    """How often a cached call equals a fresh object's call: for each prompt, generate, then
    extend the prompt by the output and a newline and generate again on the same object
    (prefix reused) and on a second object from an empty cache; greedy, per exact mode."""
    say = progress or (lambda msg: None)
    texts = [t for group in prompts.values() for t in group]
    out = {"model": Path(model).name, "max_tokens": max_tokens, "prompts": len(texts), "identical": {}}
    for exact in exact_modes:
        say(f"prefix cache, exact={exact}: {len(texts)} prompts …")
        kw = dict(model_kw, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, exact=exact)
        with Orthrus(model, **kw) as a, Orthrus(model, **kw) as b:
            same = 0
            for t in texts:
                a.reset()
                first = a.generate(t, max_tokens=max_tokens)
                ids = a.tokenize(t, special=True) + first.tokens + a.tokenize("\n")
                cached = a.generate(ids, max_tokens=max_tokens)
                b.reset()
                same += cached.tokens == b.generate(ids, max_tokens=max_tokens).tokens
        out["identical"][exact] = f"{same}/{len(texts)}"
    return out


# ------------------------------------------------------------------ forward costs

def cost_table(nm, widths=None, rounds: int = 5, n: int = 4, context: int = 64) -> dict:
    """What one Orthrus step's forwards cost at each width w, after `context` cached tokens:
    draft(w) and verify(w) run back to back (n of one kind, then n of the other), and the
    draft + verify pair run alternating, as the decoding loop runs them. Each figure is the
    fastest of `rounds` rounds (the least disturbed by the rest of the machine), in seconds and
    in units of one one-token forward (verify(1)); `reused` is the share of the alternating
    forwards that reused a kept graph; `argmax` is the host's argmax of a verify's w rows,
    which a greedy step adds to its forwards (timed apart from them: on a GPU, with a large
    vocabulary, the rows' copy and this pass are what a wide forward adds on the host).
    The forwards run as greedy decoding runs them: with backend sampling where the model has
    it (`backend_sampling`: the argmax is then part of the forward, and `argmax` only reads
    the w token ids)."""
    widths = list(widths or range(1, nm.block_size + 1))
    if 1 not in widths:
        raise OrthrusError("the cost table needs width 1 (the unit)")
    clock = time.perf_counter
    sampling = nm.set_backend_sampling(True)
    nm.clear()
    nm.prefill(np.arange(context, dtype=np.int32) % max(2, nm.mask_token))
    p = context
    rows = []
    for w in widths:
        toks = np.full(w, 1, dtype=np.int32)

        def verify(argmax: bool = False) -> float:
            nm.verify(toks, p)
            t = clock()
            if argmax:
                nm.argmax(w)
            t = clock() - t
            nm.seq_rm(p)
            return t

        def alternating():
            if w >= 2:
                nm.draft(1, p, w)
            verify()

        alternating(), alternating()  # warm-up: build (or find) both graphs
        best = {"draft": float("inf"), "verify": float("inf"), "pair": float("inf"), "argmax": float("inf")}
        reused, forwards = 0, 0
        for _ in range(rounds):
            t0 = clock()
            for _ in range(n):
                if w >= 2:
                    nm.draft(1, p, w)
            t1 = clock()
            host = sum(verify(argmax=True) for _ in range(n))
            t2 = clock()
            r0 = nm.n_reused
            for _ in range(n):
                alternating()
            t3 = clock()
            reused += nm.n_reused - r0
            forwards += n * (2 if w >= 2 else 1)
            best["draft"] = min(best["draft"], (t1 - t0) / n)
            best["verify"] = min(best["verify"], (t2 - t1 - host) / n)
            best["argmax"] = min(best["argmax"], host / n)
            best["pair"] = min(best["pair"], (t3 - t2) / n)
        back_to_back = (best["draft"] if w >= 2 else 0.0) + best["verify"]
        rows.append({"width": w, "draft_s": best["draft"] if w >= 2 else 0.0, "verify_s": best["verify"],
                     "pair_alternating_s": best["pair"], "pair_back_to_back_s": back_to_back,
                     "alternating_over_back_to_back": best["pair"] / back_to_back,
                     "argmax_s": best["argmax"], "reused": reused / forwards})
    nm.clear()
    unit = next(r["verify_s"] for r in rows if r["width"] == 1)
    for r in rows:
        for k in ("draft", "verify", "pair_alternating", "pair_back_to_back", "argmax"):
            r[k] = r[k + "_s"] / unit
    slots, nbytes = nm.graph_slots()
    return {"unit_s": unit, "context": context, "rounds": rounds, "n": n, "rows": rows,
            "graph_slots": slots, "graph_compute_bytes": nbytes, "backend_sampling": sampling}


def format_costs(tab: dict) -> str:
    head = (f"{'width':>5}{'draft':>8}{'verify':>8}{'pair alt':>10}{'pair b2b':>10}{'alt/b2b':>9}"
            f"{'reused':>8}{'argmax':>8}")
    lines = [f"forward costs after {tab['context']} cached tokens, unit = one one-token forward "
             f"({tab['unit_s'] * 1e3:.3f} ms); {tab['graph_slots']} kept graphs, "
             f"{tab['graph_compute_bytes'] / 2**20:.1f} MiB of compute buffers; argmax on the "
             f"{'device (backend sampling)' if tab.get('backend_sampling') else 'host'}", head, "-" * len(head)]
    for r in tab["rows"]:
        lines.append(f"{r['width']:>5}{r['draft']:>8.2f}{r['verify']:>8.2f}{r['pair_alternating']:>10.2f}"
                     f"{r['pair_back_to_back']:>10.2f}{r['alternating_over_back_to_back']:>9.3f}{r['reused']:>8.2f}"
                     f"{r['argmax']:>8.2f}")
    return "\n".join(lines)


def prefill_speed(nm, n_tokens: int = 500, rounds: int = 3) -> dict:
    """Prompt tokens per second of a prefill with exact "off" and "verify" (prefill takes the
    fast kernels either way), and with exact "all" (the batch-invariant kernels: what exact
    mode's prefill used to cost). Fastest of `rounds`."""
    n_tokens = min(n_tokens, nm.n_ctx - 1)
    toks = np.arange(n_tokens, dtype=np.int32) % max(2, nm.mask_token)
    exact0 = nm.exact
    out = {"tokens": int(n_tokens)}
    try:
        for name, exact in (("fast", "off"), ("exact", "verify"), ("reference_kernels", "all")):
            nm.exact = exact
            best = float("inf")
            for _ in range(rounds):
                nm.clear()
                t0 = time.perf_counter()
                nm.prefill(toks)
                best = min(best, time.perf_counter() - t0)
            out[name + "_tokens_per_second"] = n_tokens / best
    finally:
        nm.exact = exact0
        nm.clear()
    out["exact_over_fast"] = out["exact_tokens_per_second"] / out["fast_tokens_per_second"]
    return out


def plot_costs(tab: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    w = [r["width"] for r in tab["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("draft", "draft(w)"), ("verify", "verify(w)"), ("pair_alternating", "draft + verify, alternating"),
                       ("pair_back_to_back", "draft + verify, back to back")):
        ax.plot(w, [r[key] for r in tab["rows"]], marker=".", label=label)
    ax.plot(w, w, color="#aaa", linestyle=":", label="w one-token forwards")
    ax.set(xlabel="width w (tokens in the forward)", ylabel="cost (one-token forwards)",
           title=title or "cost of one Orthrus step's forwards")
    ax.set_ylim(0, max(max(r["pair_alternating"] for r in tab["rows"]), 4) * 1.1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_report(rep: dict, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for group, g in rep["groups"].items():
        for b, o in g["orthrus"].items():
            acc = o["acceptance_by_position"]
            ax1.plot(range(1, len(acc) + 1), acc, marker=".", label=f"{group}, B={b}")
    ax1.set(xlabel="draft position i", ylabel="P(accept i | accepted < i)", title="acceptance by draft position",
            ylim=(0, 1.02))
    ax1.legend(fontsize=8)
    labels, values = [], []
    for group, g in rep["groups"].items():
        labels.append(f"{group}\nAR")
        values.append(g["ar"]["tokens_per_second"])
        for b, o in g["orthrus"].items():
            labels.append(f"{group}\nB={b}")
            values.append(o["tokens_per_second"])
    ax2.bar(range(len(values)), values, color=["#888" if "AR" in lb else "#2a7" for lb in labels])
    ax2.set_xticks(range(len(values)), labels, fontsize=7)
    ax2.set(ylabel="tokens / s", title="decode speed per mode")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
