"""One resumable training loop for both stages: AdamW, warmup + cosine, tqdm, checkpoints.

State (trainable weights, optimizer, step, losses, the step count) is saved to `ckpt`
every `save_every` steps and on Ctrl-C or SIGTERM; a rerun with the same arguments continues.
With `minutes` instead of `steps`, the first steps are timed and the step count is set
so that the stage fits the time (and then kept across resumes).
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

CALIBRATION_STEPS = 8


@dataclass
class Stage:
    name: str
    params: dict[str, torch.nn.Parameter]  # trainable, by name
    loss: Callable[[int], torch.Tensor]  # step -> scalar loss
    steps: int | None = None
    minutes: float | None = None
    max_steps: int | None = None  # a cap on the step count that `minutes` gives
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    save_every: int = 200
    evaluate: Callable[[], float] | None = None
    eval_every: int = 250
    extra: dict = field(default_factory=dict)  # other state saved with the checkpoint


def lr_at(s: Stage, step: int, total: int) -> float:
    warmup = min(s.warmup, max(1, total // 10))
    if step < warmup:
        return s.lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return s.lr * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(s: Stage, ckpt: Path) -> dict:
    """Train until the stage's step count; returns the history (losses, timing)."""
    from tqdm import tqdm
    decay = [p for n, p in s.params.items() if p.ndim >= 2]
    rest = [p for n, p in s.params.items() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))
    hist = {"loss": [], "eval": [], "total": s.steps, "seconds": 0.0, "step": 0}
    if ckpt.is_file():
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for n, p in s.params.items():
                p.copy_(st["params"][n])
        opt.load_state_dict(st["opt"])
        hist = st["hist"]
        s.extra.update(st.get("extra", {}))
        if s.steps and s.steps != hist["total"]:  # an explicit step count wins: extend or cut
            hist["total"] = s.steps
        print(f"{s.name}: resuming at step {hist['step']} from {ckpt}")

    def save():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"params": {n: p.detach().cpu() for n, p in s.params.items()},
                    "opt": opt.state_dict(), "hist": hist, "extra": s.extra}, tmp)
        tmp.replace(ckpt)

    bar = tqdm(desc=s.name, initial=hist["step"], total=hist["total"], dynamic_ncols=True)
    t_cal = None
    old_term = signal.signal(signal.SIGTERM, _interrupt)  # a timeout's TERM saves, like Ctrl-C
    try:
        while hist["total"] is None or hist["step"] < hist["total"]:
            step, t0 = hist["step"], time.perf_counter()
            if hist["total"] is None and step == 2:
                t_cal = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(s, step, hist["total"] or 10 ** 9)
            loss = s.loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(s.params.values()), 1.0)
            opt.step()
            hist["loss"].append(float(loss.detach()))
            hist["step"] = step + 1
            hist["seconds"] += time.perf_counter() - t0
            if hist["total"] is None and hist["step"] == CALIBRATION_STEPS:
                sps = (time.perf_counter() - t_cal) / (CALIBRATION_STEPS - 2)
                hist["total"] = max(CALIBRATION_STEPS, min(s.max_steps or 10 ** 9, int(s.minutes * 60 / sps)))
                hist["calibrated_sec_per_step"] = sps
                bar.total = hist["total"]
                bar.write(f"{s.name}: {sps:.3f} s/step -> {hist['total']} steps in {s.minutes} min")
            if s.evaluate and (hist["step"] % s.eval_every == 0 or hist["step"] == hist["total"]):
                hist["eval"].append((hist["step"], s.evaluate()))
                bar.set_postfix(loss=f"{loss:.3f}", eval=f"{hist['eval'][-1][1]:.3f}")
            else:
                bar.set_postfix(loss=f"{loss:.3f}")
            bar.update(1)
            if hist["step"] % s.save_every == 0:
                save()
    except KeyboardInterrupt:
        save()
        bar.close()
        raise SystemExit(f"{s.name}: interrupted; saved step {hist['step']} to {ckpt}; rerun to continue")
    finally:
        signal.signal(signal.SIGTERM, old_term)
    bar.close()
    save()
    hist["sec_per_step"] = hist["seconds"] / max(1, len(hist["loss"]))
    return hist
