"""Stage 1: the Qwen3 base (the AR view of OrthrusModel) from scratch, next-token CE."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import OrthrusConfig
from ..reference import OrthrusModel
from ..testing import tiny_config
from .loop import Stage
from .ops import ar_forward

# orthrus-tiny: 6 layers, hidden 256, 4 query heads over 2 kv heads of 64, FFN 3x, tied.
TINY = dict(n_layers=6, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn=768)
CONTEXT = 256


def model_config(n_tokens: int, vocab_size: int, block_size: int = 32, context: int = CONTEXT,
                 dtype: str = "bfloat16", **arch) -> dict:
    """config.json of orthrus-tiny: the published layout, mask id = first row past the tokenizer."""
    cfg = tiny_config(**{**TINY, **arch}, vocab_size=vocab_size, n_tokens=n_tokens,
                      block_size=block_size, tied=True, dtype=dtype, rope_theta=10000.0)
    cfg["max_position_embeddings"] = context
    return cfg


def init_model(cfg: dict, seed: int = 0) -> OrthrusModel:
    """GPT-2 style init (std 0.02, residual outputs scaled by depth); _diff = copies of AR."""
    torch.manual_seed(seed)
    m = OrthrusModel(OrthrusConfig.from_dict(cfg))
    std, depth = 0.02, (2 * m.config.num_hidden_layers) ** -0.5
    for name, p in m.named_parameters():
        if p.ndim >= 2:
            torch.nn.init.normal_(p, 0.0, std * (depth if name.endswith(("o_proj.weight", "down_proj.weight")) else 1))
    copy_ar_to_diff(m)
    return m


@torch.no_grad()
def copy_ar_to_diff(m: OrthrusModel) -> None:
    for layer in m.model.layers:
        a = layer.self_attn
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            getattr(a, n + "_diff").weight.copy_(getattr(a, n).weight)


def windows(data: np.ndarray, n: int, length: int, gen: np.random.Generator) -> torch.Tensor:
    """n random windows [n, length] of a token stream."""
    starts = gen.integers(0, len(data) - length, n)
    return torch.from_numpy(np.stack([data[s:s + length] for s in starts]).astype(np.int64))


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 on CPU (CPU bf16 matmuls are slower there)."""
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def ce_loss(model: OrthrusModel, w: torch.Tensor) -> torch.Tensor:
    logits, _ = ar_forward(model, w[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten())


def base_stage(model: OrthrusModel, train: np.ndarray, val: np.ndarray, device: torch.device, *,
               batch: int, steps: int | None, minutes: float | None, max_steps: int | None = None, lr: float = 2e-3,
               context: int = CONTEXT, seed: int = 0) -> Stage:
    """Next-token CE on random windows; every weight but the _diff ones trains."""
    params = {n: p for n, p in model.named_parameters() if "_diff" not in n}
    for n, p in model.named_parameters():
        p.requires_grad_("_diff" not in n)
    val_w = windows(val, 16, context + 1, np.random.default_rng(1234)).to(device)

    def loss(step: int) -> torch.Tensor:
        w = windows(train, batch, context + 1, np.random.default_rng((seed, step))).to(device)
        with autocast(device):
            return ce_loss(model, w)

    @torch.no_grad()
    def evaluate() -> float:
        with autocast(device):
            return float(ce_loss(model, val_w))

    return Stage("base", params, loss, steps=steps, minutes=minutes, max_steps=max_steps, lr=lr, evaluate=evaluate,
                 warmup=100)
