"""Stage 2: the diffusion attention (the `_diff` weights), distilled from the frozen base.

For a sequence, one no-grad AR pass gives the keys/values of every position and the AR
distributions; then K blocks [x_p, M, …, M] (random starts p) run through the diffusion
view in one forward, each seeing AR keys before p and its own block only. Row j of a
block is trained toward the AR distribution at p+j (which predicts p+j+1): KL, plus CE
toward the AR argmax, which is what greedy verification accepts. Rows 0..B-2 only: the
last row's prediction is never used as a draft.

Most training sequences are the base's own greedy continuations of corpus prefixes, so
the blocks see contexts like the ones decoding produces.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..reference import OrthrusModel
from .base import autocast, copy_ar_to_diff, windows
from .loop import Stage
from .ops import ar_forward, diffusion_forward, greedy_continue


def self_generate(model: OrthrusModel, data: np.ndarray, n: int, length: int, device, *,
                  batch: int = 64, min_prefix: int = 8, max_prefix: int = 96, seed: int = 0) -> np.ndarray:
    """n sequences [n, length]: a corpus prefix followed by the base's greedy continuation."""
    gen, out = np.random.default_rng(seed), []
    for i in tqdm(range(0, n, batch), desc="self-generate", dynamic_ncols=True):
        p = int(gen.integers(min_prefix, max_prefix + 1))
        prefix = windows(data, min(batch, n - i), p, gen).to(device)
        with autocast(device):
            out.append(greedy_continue(model, prefix, length - p).cpu().numpy().astype(np.uint16))
    return np.concatenate(out)


def block_starts(k: int, t: int, b: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct block starts in [1, t-b] (p >= 1: decoding always has a prompt)."""
    return (torch.randperm(t - b, generator=gen)[:k] + 1).sort().values


def row_weights(b: int, decay: float, device) -> torch.Tensor:
    """Weight of block row j (mean 1): exp(-j/decay), or uniform when decay <= 0. A draft
    only counts while every draft before it matched, so early rows can be made to matter more."""
    j = torch.arange(b - 1, device=device, dtype=torch.float32)
    w = torch.exp(-j / decay) if decay > 0 else torch.ones_like(j)
    return w / w.mean()


def head_loss(model: OrthrusModel, ids: torch.Tensor, starts: torch.Tensor, ce_weight: float,
              decay: float = 0.0) -> tuple:
    """(loss, KL, CE) of the diffusion view on blocks at `starts` of sequences ids [N, T]."""
    b = model.config.block_size
    with torch.no_grad():
        ar_logits, kvs = ar_forward(model, ids)
    rows = (starts[:, None] + torch.arange(b - 1, device=ids.device)).reshape(-1)  # p+j, j < B-1
    target = ar_logits[:, rows].float()  # [N, K*(B-1), V]
    logits = diffusion_forward(model, ids, starts, kvs)[:, :, : b - 1].flatten(1, 2).float()
    logq = logits.log_softmax(-1)
    logp = target.log_softmax(-1)
    w = row_weights(b, decay, ids.device).repeat(starts.shape[0])  # [K*(B-1)]
    kl = ((logp.exp() * (logp - logq)).sum(-1) * w).mean()
    ce = (F.cross_entropy(logits.transpose(1, 2), target.argmax(-1), reduction="none") * w).mean()
    return kl + ce_weight * ce, kl, ce


def heads_stage(model: OrthrusModel, selfgen: np.ndarray, corpus: np.ndarray, device, *, batch: int,
                blocks: int, steps: int | None, minutes: float | None, corpus_frac: float = 0.25,
                ce_weight: float = 1.0, decay: float = 0.0, lr: float = 1e-3, seed: int = 0,
                fresh: bool = True) -> Stage:
    """Only the _diff weights train; on a fresh start they begin as copies of the AR ones."""
    if fresh:
        copy_ar_to_diff(model)
    params = {n: p for n, p in model.named_parameters() if "_diff" in n}
    for n, p in model.named_parameters():
        p.requires_grad_("_diff" in n)
    t = selfgen.shape[1]
    n_corpus = int(round(batch * corpus_frac))
    stats: dict[str, list] = {"kl": [], "ce": []}

    def loss(step: int) -> torch.Tensor:
        gen = np.random.default_rng((seed, step))
        ids = torch.from_numpy(selfgen[gen.integers(0, len(selfgen), batch - n_corpus)].astype(np.int64))
        if n_corpus:
            ids = torch.cat([ids, windows(corpus, n_corpus, t, gen)])
        ids = ids.to(device)
        starts = block_starts(blocks, t, model.config.block_size,
                              torch.Generator().manual_seed(seed * 1_000_003 + step)).to(device)
        with autocast(device):
            total, kl, ce = head_loss(model, ids, starts, ce_weight, decay)
        stats["kl"].append(float(kl.detach()))
        stats["ce"].append(float(ce.detach()))
        return total

    s = Stage("heads", params, loss, steps=steps, minutes=minutes, lr=lr, weight_decay=0.0,
              warmup=100, extra=stats)
    return s
