"""`orthrus-gguf demo`: the embedded orthrus-tiny, converted and raced against AR."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import OrthrusError

def embedded_model() -> Path:
    """models/orthrus-tiny: in the checkout, or where a wheel packs it (build.data_root)."""
    from .build import data_root
    model = data_root() / "models" / "orthrus-tiny"
    if not (model / "config.json").is_file():
        raise OrthrusError(f"the embedded model is missing at {model}: reinstall orthrus-gguf or "
                           f"restore models/ in the checkout")
    return model


def converted(model: Path, outtype: str) -> Path:
    """Conversions are cached by the checkpoint's content, so a second demo starts at once."""
    from .build import cache_root
    from .convert import convert
    h = hashlib.sha256()
    for f in sorted(model.glob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            h.update(f.name.encode() + f.read_bytes())
    out = cache_root() / "demo" / f"{model.name}-{h.hexdigest()[:12]}-{outtype}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {model.name} to {outtype} …", flush=True)
        convert(model, out, outtype, force=True)
    return out


def run_demo(outtypes=("f16", "q4_k_m"), max_tokens: int = 96, blocks=(None, "auto"),
             n_threads: int | None = None, n_gpu_layers: int = 0, json_out: str | None = None,
             max_prompts: int | None = None) -> dict:
    from .bench import format_report, load_prompts, run_bench
    model = embedded_model()
    prompts = {g: ps[:max_prompts] for g, ps in load_prompts(model / "heldout_prompts.json").items()}
    reports = {}
    for ot in outtypes:
        gguf = converted(model, ot)
        print(f"\n== {model.name} {ot}: AR vs Orthrus, greedy, {max_tokens} tokens per prompt ==", flush=True)
        rep = run_bench(gguf, prompts, max_tokens, blocks, n_threads=n_threads, n_gpu_layers=n_gpu_layers)
        print(format_report(rep), flush=True)
        reports[ot] = rep
    if json_out:
        Path(json_out).write_text(json.dumps(reports, indent=2))
    return reports
