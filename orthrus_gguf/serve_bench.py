"""`orthrus-gguf bench-server`: llama-server with drafting off against Orthrus drafting, in one run.

Each setting gets its own server on a free local port, the same prompts and seeds, with
the environment `orthrus-gguf serve` gives it (exact CPU kernels unless GGML_CPU_USE_REF=0).
At concurrency c the server has c slots (-np c) and c requests are in flight at once.
Throughput is the tokens of all requests over the wall time from the first request to the
last answer (prompt processing included, the same for every setting); the counts (tokens,
drafts, accepted drafts) are the servers' own `timings`, and the diffusion forwards and
drafting iterations come from their /metrics. At temperature 0 the report also counts the
texts identical to the drafting-off server's at the same concurrency.
"""
from __future__ import annotations

import http.client
import json
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import OrthrusError, check_int, check_number
from .serve import (ORTHRUS_ARCH, Server, check_draft_max, check_extra, free_port, model_block_size,
                    server_command, server_env)

# name -> server_command keywords
SETTINGS = {
    "off": dict(drafting=False),
    "speculative": dict(rule="speculative"),
    "match": dict(rule="match"),
    "auto": dict(draft_max="auto"),
    "per-slot": dict(per_slot=True),  # one diffusion forward per slot: the path before batching
}


def _request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        c.request(method, path, json.dumps(body).encode() if body is not None else None,
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _complete(port: int, body: dict) -> dict:
    status, raw = _request(port, "POST", "/completion", body)
    data = json.loads(raw or b"null")
    if status != 200:
        raise OrthrusError(f"llama-server answered {status}: {data}")
    return data


def draft_counters(port: int) -> dict[str, float]:
    """The server's Orthrus counters from /metrics (it runs with --metrics)."""
    status, raw = _request(port, "GET", "/metrics")
    if status != 200:
        raise OrthrusError(f"llama-server /metrics answered {status}: start it with --metrics")
    out = {}
    for name in ("orthrus_draft_steps_total", "orthrus_draft_forwards_total", "orthrus_draft_blocks_total"):
        m = re.search(rf"^llamacpp:{name} (\S+)$", raw.decode(), re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def run_server_bench(model: str | Path, prompts: dict[str, list[str]], max_tokens: int = 128,
                     temperature: float = 0.0, settings=("off", "speculative", "match"),
                     draft_max=None, extra=(), log_dir: str | Path | None = None, progress=print,
                     concurrency=(1,)) -> dict:
    """Run each setting's server over the prompts at each concurrency; the logs go to
    log_dir (default: the temp directory) as orthrus-bench-server-<setting>-c<c>.log."""
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise OrthrusError(f"unknown setting(s) {unknown}: choose from {', '.join(SETTINGS)}")
    bad = [c for c in concurrency if isinstance(c, bool) or not isinstance(c, int) or c < 1]
    if bad or not concurrency:
        raise OrthrusError(f"concurrency must be integers >= 1, got {list(concurrency)!r}")
    check_extra(extra)
    if not prompts or not any(prompts.values()):
        raise OrthrusError("no prompts to run")
    # everything a later server would refuse, refused before the first one runs
    max_tokens = check_int("max_tokens (-n)", max_tokens, 1)
    temperature = check_number("temperature (--temp)", temperature, 0.0)
    block = model_block_size(model)
    if block < 2 and any(SETTINGS[s].get("drafting", True) for s in settings):
        raise OrthrusError(f"{model} is not an {ORTHRUS_ARCH} GGUF: every drafting setting would run "
                           "with drafting off, and the ratios would be noise (convert an Orthrus checkpoint)")
    if draft_max not in (None, "auto", "off"):
        check_draft_max(draft_max, block)
    if "off" not in settings:
        settings = ("off", *settings)  # the baseline of every ratio
    report = {"model": Path(model).name, "max_tokens": max_tokens, "temperature": temperature,
              "extra": list(extra), "runs": []}
    for conc in concurrency:
        run = {"concurrency": conc, "groups": {g: {} for g in prompts}}
        report["runs"].append(run)
        texts: dict[tuple, str] = {}
        for name in settings:
            kw = dict(SETTINGS[name])
            if draft_max is not None and kw.get("drafting", True):
                kw.setdefault("draft_max", draft_max)
            port = free_port()
            cmd, note = server_command(model, port=port, n_parallel=conc,
                                       extra=("--metrics", *extra), **kw)
            progress(f"concurrency {conc}, {name}: {note}")
            log = Path(log_dir or tempfile.gettempdir()) / f"orthrus-bench-server-{name}-c{conc}.log"
            with Server(cmd, port=port, log=log, timeout=600.0, env=server_env()):
                _complete(port, dict(prompt=next(iter(prompts.values()))[0], n_predict=8))  # warm-up
                for group, items in prompts.items():
                    before = draft_counters(port)
                    bodies = [dict(prompt=p, n_predict=max_tokens, temperature=temperature, seed=i,
                                   cache_prompt=False) for i, p in enumerate(items)]
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(max_workers=conc) as pool:
                        answers = list(pool.map(lambda b: _complete(port, b), bodies))
                    wall = time.perf_counter() - t0
                    after = draft_counters(port)
                    tot = dict(predicted_n=0, draft_n=0, draft_n_accepted=0, identical=0)
                    for i, r in enumerate(answers):
                        t = r["timings"]
                        for k in ("predicted_n", "draft_n", "draft_n_accepted"):
                            tot[k] += t.get(k, 0)
                        texts[name, group, i] = r["content"]
                        tot["identical"] += r["content"] == texts.get(("off", group, i))
                    if name == "off" or temperature != 0:  # sampled texts differ by design
                        del tot["identical"]
                    n, acc = tot["predicted_n"], tot["draft_n_accepted"]
                    tot["wall_s"] = wall
                    tot["tokens_per_second"] = n / wall if wall > 0 else 0.0
                    # each step emits its kept drafts and one token of its own
                    tot["tokens_per_step"] = n / (n - acc) if n > acc else 0.0
                    tot["acceptance"] = acc / tot["draft_n"] if tot["draft_n"] else 0.0
                    tot["draft_steps"] = int(after["orthrus_draft_steps_total"] - before["orthrus_draft_steps_total"])
                    tot["draft_forwards"] = int(after["orthrus_draft_forwards_total"]
                                                - before["orthrus_draft_forwards_total"])
                    tot["prompts"] = len(items)
                    run["groups"][group][name] = tot
        for g in run["groups"].values():
            base = g["off"]["tokens_per_second"]
            for rec in g.values():
                rec["vs_off"] = rec["tokens_per_second"] / base if base else 0.0
    return report


def format_server_report(rep: dict) -> str:
    same_col = rep["temperature"] == 0
    head = (f"{'conc':>4}  {'prompts':<10}{'server':<13}{'tok/s':>9}{'× off':>7}{'tok/step':>10}{'drafted':>9}"
            f"{'accepted':>10}{'acc %':>7}{'fwd/step':>9}" + (f"{'= off':>8}" if same_col else ""))
    lines = [f"T = {rep['temperature']}, {rep['max_tokens']} tokens per prompt", head, "-" * len(head)]
    for run in rep["runs"]:
        for group, g in run["groups"].items():
            for k, (name, r) in enumerate(g.items()):
                same = f"{r['identical']}/{r['prompts']}" if "identical" in r else "-"
                fps = f"{r['draft_forwards'] / r['draft_steps']:.2f}" if r["draft_steps"] else "-"
                lines.append(f"{run['concurrency'] if k == 0 else '':>4}  {group if k == 0 else '':<10}{name:<13}"
                             f"{r['tokens_per_second']:>9.1f}{r['vs_off']:>7.2f}"
                             f"{r['tokens_per_step']:>10.2f}{r['draft_n']:>9}{r['draft_n_accepted']:>10}"
                             f"{100 * r['acceptance']:>7.1f}{fps:>9}" + (f"{same:>8}" if same_col else ""))
    return "\n".join(lines)


LABELS = {"speculative": "batched drafting", "per-slot": "per-slot drafting", "match": "token matching"}


def plot_server_report(rep: dict, path: str | Path) -> Path:
    """Throughput against drafting off, and diffusion forwards per drafting step, by
    concurrency: one line per prompt group and setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    concs = [r["concurrency"] for r in rep["runs"]]
    groups = list(rep["runs"][0]["groups"])
    names = [n for n in rep["runs"][0]["groups"][groups[0]] if n != "off"]
    for group in groups:
        for name in names:
            recs = [r["groups"][group][name] for r in rep["runs"]]
            label = f"{group}, {LABELS.get(name, name)}"
            ax1.plot(concs, [x["vs_off"] for x in recs], marker="o", label=label)
            ax2.plot(concs, [x["draft_forwards"] / x["draft_steps"] if x["draft_steps"] else 0 for x in recs],
                     marker="o", label=label)
    ax1.axhline(1.0, color="#aaa", linestyle=":")
    ax1.set(xlabel="concurrent requests (= server slots)", ylabel="tokens/s ÷ drafting off",
            title=f"throughput, T = {rep['temperature']}")
    ax2.set(xlabel="concurrent requests (= server slots)", ylabel="diffusion forwards per drafting step",
            title="forwards per drafting step")
    for ax in (ax1, ax2):
        ax.set_xticks(concs)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
