"""`orthrus-gguf bench-server`: llama-server with drafting off against Orthrus drafting, in one run.

Each setting gets its own server on a free local port, the same prompts and seeds, and
one request at a time, with the environment `orthrus-gguf serve` gives it (exact CPU
kernels unless GGML_CPU_USE_REF=0). Figures come from the server's own `timings` (predicted_n,
predicted_ms, draft_n, draft_n_accepted), so HTTP and start-up do not count. At
temperature 0 the report also counts the texts identical to the drafting-off server's.
"""
from __future__ import annotations

import http.client
import json
import tempfile
from pathlib import Path

from .errors import OrthrusError
from .serve import Server, free_port, server_command, server_env

# name -> server_command keywords
SETTINGS = {
    "off": dict(drafting=False),
    "speculative": dict(rule="speculative"),
    "match": dict(rule="match"),
    "auto": dict(draft_max="auto"),
}


def _complete(port: int, body: dict) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        c.request("POST", "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = json.loads(r.read() or b"null")
        if r.status != 200:
            raise OrthrusError(f"llama-server answered {r.status}: {data}")
        return data
    finally:
        c.close()


def run_server_bench(model: str | Path, prompts: dict[str, list[str]], max_tokens: int = 128,
                     temperature: float = 0.0, settings=("off", "speculative", "match"),
                     draft_max=None, extra=(), log_dir: str | Path | None = None, progress=print) -> dict:
    """Run each setting's server over the prompts; the logs go to log_dir (default: the
    temp directory) as orthrus-bench-server-<setting>.log."""
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise OrthrusError(f"unknown setting(s) {unknown}: choose from {', '.join(SETTINGS)}")
    if "off" not in settings:
        settings = ("off", *settings)  # the baseline of every ratio
    report = {"model": Path(model).name, "max_tokens": max_tokens, "temperature": temperature,
              "extra": list(extra), "groups": {g: {} for g in prompts}}
    texts: dict[tuple, str] = {}
    for name in settings:
        kw = dict(SETTINGS[name])
        if draft_max is not None and kw.get("drafting", True):
            kw.setdefault("draft_max", draft_max)
        port = free_port()
        cmd, note = server_command(model, port=port, extra=tuple(extra), **kw)
        progress(f"{name}: {note}")
        log = Path(log_dir or tempfile.gettempdir()) / f"orthrus-bench-server-{name}.log"
        with Server(cmd, port=port, log=log, timeout=600.0, env=server_env()):
            _complete(port, dict(prompt=next(iter(prompts.values()))[0], n_predict=8))  # warm-up
            for group, items in prompts.items():
                tot = dict(predicted_n=0, predicted_ms=0.0, draft_n=0, draft_n_accepted=0, identical=0)
                for i, p in enumerate(items):
                    r = _complete(port, dict(prompt=p, n_predict=max_tokens, temperature=temperature, seed=i,
                                             cache_prompt=False))
                    t = r["timings"]
                    for k in ("predicted_n", "predicted_ms", "draft_n", "draft_n_accepted"):
                        tot[k] += t.get(k, 0)
                    texts[name, group, i] = r["content"]
                    tot["identical"] += r["content"] == texts.get(("off", group, i))
                if name == "off" or temperature != 0:  # sampled texts differ by design
                    del tot["identical"]
                n, acc = tot["predicted_n"], tot["draft_n_accepted"]
                tot["tokens_per_second"] = n / (tot["predicted_ms"] / 1e3) if tot["predicted_ms"] else 0.0
                # each step emits its kept drafts and one token of its own
                tot["tokens_per_step"] = n / (n - acc) if n > acc else 0.0
                tot["acceptance"] = acc / tot["draft_n"] if tot["draft_n"] else 0.0
                tot["prompts"] = len(items)
                report["groups"][group][name] = tot
    for g in report["groups"].values():
        base = g["off"]["tokens_per_second"]
        for rec in g.values():
            rec["vs_off"] = rec["tokens_per_second"] / base if base else 0.0
    return report


def format_server_report(rep: dict) -> str:
    head = (f"{'prompts':<10}{'server':<13}{'tok/s':>9}{'× off':>7}{'tok/step':>10}{'drafted':>9}"
            f"{'accepted':>10}{'acc %':>7}" + (f"{'= off':>8}" if rep["temperature"] == 0 else ""))
    lines = [f"T = {rep['temperature']}, {rep['max_tokens']} tokens per prompt", head, "-" * len(head)]
    for group, g in rep["groups"].items():
        for k, (name, r) in enumerate(g.items()):
            same = f"{r['identical']}/{r['prompts']}" if "identical" in r else "-"
            lines.append(f"{group if k == 0 else '':<10}{name:<13}{r['tokens_per_second']:>9.1f}{r['vs_off']:>7.2f}"
                         f"{r['tokens_per_step']:>10.2f}{r['draft_n']:>9}{r['draft_n_accepted']:>10}"
                         f"{100 * r['acceptance']:>7.1f}" + (f"{same:>8}" if rep["temperature"] == 0 else ""))
    return "\n".join(lines)
