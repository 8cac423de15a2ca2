"""Tokens per step of greedy Orthrus decoding (the reference loop) on held-out prompts."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import OrthrusConfig
from ..reference import OrthrusModel, generate_ar, generate_orthrus

MAX_TOKENS = {"code": 128, "math": 128}


def load_exported(path: str | Path) -> OrthrusModel:
    """The exported folder as an fp32 OrthrusModel (no checkpoint validator: that needs the
    converter package, which a bare PYTHONPATH=. checkout on a GPU box may not resolve)."""
    from safetensors.torch import load_file
    path = Path(path)
    cfg = OrthrusConfig.from_file(path / "config.json")
    m = OrthrusModel(cfg)
    sd = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    m.load_state_dict(sd, strict=True)
    return m.eval()


def eos_ids(tok) -> list[int]:
    return [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]


def measure(model: OrthrusModel, tok, prompts: dict[str, list[str]], check_ar: bool = True) -> dict:
    """Per kind: mean tokens per step (accepted drafts + 1, over all steps), its per-prompt
    spread, and how often the Orthrus output equals greedy AR token for token."""
    torch.set_grad_enabled(False)
    res = {}
    for kind, texts in prompts.items():
        steps, same, t0, per_prompt, samples = [], 0, time.perf_counter(), [], []
        for text in texts:
            ids = tok.encode(text).ids
            o = generate_orthrus(model, ids, MAX_TOKENS.get(kind, 128), eos_ids(tok))
            steps += [s.accepted + 1 for s in o.steps]
            per_prompt.append(sum(s.accepted + 1 for s in o.steps) / max(1, len(o.steps)))
            if check_ar:
                same += generate_ar(model, ids, MAX_TOKENS.get(kind, 128), eos_ids(tok)).tokens == o.tokens
            if len(samples) < 3:
                samples.append({"prompt": text, "output": tok.decode(o.tokens, skip_special_tokens=False)})
        res[kind] = {
            "prompts": len(texts), "steps": len(steps),
            "mean_tokens_per_step": sum(steps) / max(1, len(steps)),
            "per_prompt_min": min(per_prompt), "per_prompt_max": max(per_prompt),
            "identical_to_ar": f"{same}/{len(texts)}" if check_ar else None,
            "seconds": time.perf_counter() - t0, "samples": samples,
        }
    return res


if __name__ == "__main__":  # python -m orthrus_gguf.train.measure MODEL_DIR
    import sys
    from tokenizers import Tokenizer
    d = Path(sys.argv[1])
    r = measure(load_exported(d), Tokenizer.from_file(str(d / "tokenizer.json")),
                json.loads((d / "heldout_prompts.json").read_text()))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in r.items()}, indent=2))
