"""`fit`: prepared data -> base -> self-generated data -> diffusion heads -> export -> measure.

Every stage leaves its result in the work directory (base.pt, selfgen.npy, heads.pt), so
an interrupted run continues where it stopped. Needs only torch, numpy, tokenizers,
safetensors, matplotlib and tqdm.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import base, heads, loop
from .measure import load_exported, measure


@dataclass
class Plan:
    """Step counts (or minutes) and batch shapes of one run."""
    base_steps: int | None = None
    base_minutes: float | None = None
    base_cap: int | None = None
    base_batch: int = 32
    base_lr: float = 2e-3
    selfgen: int = 768  # greedy sequences of CONTEXT tokens for the heads
    head_steps: int | None = None
    head_minutes: float | None = None
    head_batch: int = 8
    head_blocks: int = 8  # diffusion blocks per sequence in one forward
    head_lr: float = 1e-3
    corpus_frac: float = 0.25
    ce_weight: float = 1.0
    decay: float = 8.0  # block-row weights exp(-j/decay); 0: uniform (measured worse)
    n_prompts: int = 32


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        name = f"{names[0]} ({len(names)} cores)" if names else name
    return f"{name}, {torch.get_num_threads()} torch thread(s)"


def fit(data: str | Path, out: str | Path, plan: Plan, device: torch.device, work: Path | None = None,
        threads: int | None = None, note: str = "") -> dict:
    data, out = Path(data), Path(out)
    work = work or Path("build") / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    from tokenizers import Tokenizer
    meta = json.loads((data / "meta.json").read_text())
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    train, val = np.load(data / "train.npy"), np.load(data / "val.npy")
    cfg = base.model_config(meta["n_tokens"], meta["vocab_size"])
    if cfg["mask_token_id"] != meta["mask_token_id"]:
        raise SystemExit(f"{data}: mask id {meta['mask_token_id']} does not follow the tokenizer")
    model = base.init_model(cfg).to(device)
    log = {"device": str(device), "hardware": hardware(device), "torch": torch.__version__, "note": note,
           "plan": plan.__dict__, "config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")}}
    t0 = time.perf_counter()

    log["base"] = loop.run(base.base_stage(model, train, val, device, batch=plan.base_batch,
                                           steps=plan.base_steps, minutes=plan.base_minutes,
                                           max_steps=plan.base_cap,
                                           lr=plan.base_lr), work / "base.pt")
    sg_path = work / "selfgen.npy"
    if not sg_path.is_file():
        t1 = time.perf_counter()
        model.eval()
        selfgen = heads.self_generate(model, train, plan.selfgen, base.CONTEXT, device,
                                      batch=512 if device.type == "cuda" else 64)
        np.save(sg_path, selfgen)
        sg_path.with_suffix(".json").write_text(json.dumps({"seconds": time.perf_counter() - t1}))
    selfgen = np.load(sg_path)
    log["selfgen_seconds"] = json.loads(sg_path.with_suffix(".json").read_text())["seconds"]
    hs = heads.heads_stage(
        model, selfgen, train, device, batch=plan.head_batch, blocks=plan.head_blocks,
        steps=plan.head_steps, minutes=plan.head_minutes, corpus_frac=plan.corpus_frac,
        ce_weight=plan.ce_weight, decay=plan.decay, lr=plan.head_lr, fresh=not (work / "heads.pt").is_file())
    log["heads"] = {**loop.run(hs, work / "heads.pt"), "extra": hs.extra}
    log["train_seconds"] = time.perf_counter() - t0

    export(model, cfg, tok, data, out)
    exported = load_exported(out)
    prompts = json.loads((out / "heldout_prompts.json").read_text())
    prompts = {k: v[: plan.n_prompts] for k, v in prompts.items()}
    log["measure"] = measure(exported, tok, prompts)
    log["val_loss"] = log["base"]["eval"][-1][1] if log["base"]["eval"] else None
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    from .card import write_card
    write_card(out, log, json.loads((data / "manifest.json").read_text()))
    return log


def export(model, cfg: dict, tok, data: Path, out: Path) -> None:
    """The published HF layout (through testing.write_checkpoint) plus data provenance."""
    from ..testing import write_checkpoint
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    write_checkpoint(out, cfg, sd, tokenizer=tok)
    for name in ("heldout_prompts.json", "manifest.json"):
        shutil.copy(data / name, out / name)
