"""python -m orthrus_gguf.train {prepare,fit,all} — argparse only, so a bare GPU box runs it."""
from __future__ import annotations

import argparse
import json

# Defaults per device: (base minutes, base step cap, base batch, self-generated sequences,
# head minutes, head batch). CPU: the ~100-minute recipe on 2 cores; CUDA: ~8 minutes.
PRESETS = {
    "cpu": dict(base_minutes=55.0, base_cap=None, base_batch=16, selfgen=1024, head_minutes=30.0, head_batch=8),
    "cuda": dict(base_minutes=3.0, base_cap=5000, base_batch=64, selfgen=8192, head_minutes=2.5, head_batch=32),
}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m orthrus_gguf.train", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="corpus + tokenizer + token streams into DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--math", type=int, default=24000, help="generated arithmetic problems")
    for name in ("fit", "all"):
        f = sub.add_parser(name, help="base + heads + export + measurement" if name == "fit"
                           else "prepare into --data, then fit")
        f.add_argument("--data", required=True)
        f.add_argument("--out", required=True)
        f.add_argument("--work", help="checkpoints (default: build/NAME-work)")
        f.add_argument("--device", default="auto", help="auto, cpu, cuda")
        f.add_argument("--threads", type=int, help="torch CPU threads")
        f.add_argument("--base-steps", type=int)
        f.add_argument("--base-minutes", type=float)
        f.add_argument("--head-steps", type=int)
        f.add_argument("--head-minutes", type=float)
        f.add_argument("--base-batch", type=int)
        f.add_argument("--head-batch", type=int)
        f.add_argument("--selfgen", type=int, help="greedy sequences generated for the heads")
        f.add_argument("--ce-weight", type=float, default=1.0, help="CE toward the AR argmax, added to the KL")
        f.add_argument("--decay", type=float, default=8.0, help="block-row loss weights exp(-j/DECAY); 0: uniform")
        f.add_argument("--prompts", type=int, default=32, help="held-out prompts measured per kind")
        f.add_argument("--note", default="", help="a line about this run for the model card")
    a = ap.parse_args(argv)

    if a.cmd in ("prepare", "all"):
        from .prepare import prepare
        print(json.dumps(prepare(a.out if a.cmd == "prepare" else a.data,
                                 n_math=getattr(a, "math", 24000)), indent=1))
        if a.cmd == "prepare":
            return
    from pathlib import Path
    from .fit import Plan, fit, pick_device
    dev = pick_device(a.device)
    pre = PRESETS["cuda" if dev.type == "cuda" else "cpu"]
    plan = Plan(
        base_steps=a.base_steps, base_minutes=None if a.base_steps else (a.base_minutes or pre["base_minutes"]),
        base_cap=pre["base_cap"], base_batch=a.base_batch or pre["base_batch"],
        selfgen=a.selfgen or pre["selfgen"],
        head_steps=a.head_steps, head_minutes=None if a.head_steps else (a.head_minutes or pre["head_minutes"]),
        head_batch=a.head_batch or pre["head_batch"], ce_weight=a.ce_weight, decay=a.decay,
        n_prompts=a.prompts)
    log = fit(a.data, a.out, plan, dev, Path(a.work) if a.work else None, a.threads, a.note)
    for k, v in log["measure"].items():
        print(f"{k}: {v['mean_tokens_per_step']:.2f} tokens/step over {v['steps']} steps "
              f"({v['prompts']} prompts, identical to AR {v['identical_to_ar']})")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
