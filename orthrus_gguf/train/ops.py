"""Batched, differentiable forwards of the two views, built from the reference modules.

The reference model decodes one sequence at a time; training needs batches [N, T], the
AR keys/values of every position, and many diffusion blocks per sequence in one pass.
"""
from __future__ import annotations

import torch

from ..reference import AR, DIFFUSION, OrthrusModel


def ar_forward(model: OrthrusModel, ids: torch.Tensor, past: list | None = None):
    """AR view over ids [N, T] after `past` (per-layer (k, v), or None): logits [N, T, V]
    and the per-layer (k, v) of past + ids, normed and rotated as the cache holds them."""
    n, t = ids.shape
    p = past[0][0].shape[2] if past else 0
    pos = torch.arange(p, p + t, device=ids.device)
    mask = None if t == 1 else torch.ones(t, p + t, dtype=torch.bool, device=ids.device).tril(p)
    h = model.model.embed_tokens(ids)
    kvs = []
    for i, layer in enumerate(model.model.layers):
        def attn(x, i=i, a=layer.self_attn):
            q, k, v = a.qkv(x, pos, AR)
            if past:
                k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            kvs.append((k, v))
            return a.attend(q, k, v, mask, AR)
        h = model.layer_forward(layer, h, attn)
    return model.head(h), kvs


def block_layout(starts: torch.Tensor, block: int, t: int):
    """Positions [K*B] of K blocks starting at `starts` [K], and the diffusion mask
    [K*B, T + K*B]: a block token sees AR keys before its block start and its own block."""
    k = starts.shape[0]
    ar = torch.arange(block, device=starts.device)
    pos = (starts[:, None] + ar).reshape(-1)
    blk = torch.arange(k, device=starts.device).repeat_interleave(block)
    see_ar = torch.arange(t, device=starts.device)[None, :] < starts[blk][:, None]
    see_block = blk[:, None] == blk[None, :]
    return pos, torch.cat([see_ar, see_block], 1)


def diffusion_forward(model: OrthrusModel, ids: torch.Tensor, starts: torch.Tensor, kvs: list):
    """Diffusion view of K blocks [x_p, M, …, M] per sequence of ids [N, T], each at its
    start p in `starts` [K], over the AR keys/values `kvs` of ids: logits [N, K, B, V]."""
    c = model.config
    n, t = ids.shape
    k, b = starts.shape[0], c.block_size
    tok = torch.full((n, k, b), c.mask_token_id, dtype=ids.dtype, device=ids.device)
    tok[:, :, 0] = ids[:, starts]
    pos, mask = block_layout(starts, b, t)
    h = model.model.embed_tokens(tok.view(n, k * b))
    for i, layer in enumerate(model.model.layers):
        def attn(x, i=i, a=layer.self_attn):
            q, kd, vd = a.qkv(x, pos, DIFFUSION)
            kk, vv = torch.cat([kvs[i][0], kd], 2), torch.cat([kvs[i][1], vd], 2)
            return a.attend(q, kk, vv, mask, DIFFUSION)
        h = model.layer_forward(layer, h, attn)
    return model.head(h).view(n, k, b, -1)


@torch.no_grad()
def greedy_continue(model: OrthrusModel, prefix: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy AR continuations [N, P + n_new] of prefixes [N, P] (one batched cache)."""
    logits, past = ar_forward(model, prefix)
    out = [prefix, logits[:, -1:].argmax(-1)]
    for _ in range(n_new - 1):
        logits, past = ar_forward(model, out[-1], past)
        out.append(logits[:, -1:].argmax(-1))
    return torch.cat(out, 1)
