"""Orthrus-Qwen3 in plain PyTorch: the oracle for the llama.cpp path, and the training model.

Two attention views share every other weight of a Qwen3 layer. The AR view is plain
causal Qwen3 attention and owns the KV cache. The diffusion view drafts a block
[t, M, …, M] at positions p..p+B-1: each block token attends, without a causal mask, to
the cached AR keys/values of positions < p and to the block's own diffusion keys/values,
which are then thrown away. Module names match the Hugging Face checkpoint, so
`state_dict()` round-trips with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import OrthrusConfig

AR, DIFFUSION = "ar", "diffusion"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x, pos, theta: float):
    """NEOX-style rotary embedding. x [..., T, D], pos [T] (or broadcastable [..., T])."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.to(torch.float32)[..., None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x.float().chunk(2, -1)
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: OrthrusConfig):
        super().__init__()
        self.c = c
        h, d = c.hidden_size, c.head_dim
        q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
        for sfx in ("", "_diff"):
            setattr(self, f"q_proj{sfx}", nn.Linear(h, q, bias=False))
            setattr(self, f"k_proj{sfx}", nn.Linear(h, kv, bias=False))
            setattr(self, f"v_proj{sfx}", nn.Linear(h, kv, bias=False))
            setattr(self, f"o_proj{sfx}", nn.Linear(q, h, bias=False))
            setattr(self, f"q_norm{sfx}", RMSNorm(d, c.rms_norm_eps))
            setattr(self, f"k_norm{sfx}", RMSNorm(d, c.rms_norm_eps))

    def qkv(self, x, pos, view: str):
        """q [N,H,T,D], k and v [N,Hkv,T,D] of one view, normed and rotated at `pos`."""
        sfx = "_diff" if view == DIFFUSION else ""
        n, t, _ = x.shape
        d = self.c.head_dim
        q = getattr(self, f"q_proj{sfx}")(x).view(n, t, -1, d).transpose(1, 2)
        k = getattr(self, f"k_proj{sfx}")(x).view(n, t, -1, d).transpose(1, 2)
        v = getattr(self, f"v_proj{sfx}")(x).view(n, t, -1, d).transpose(1, 2)
        q = rope(getattr(self, f"q_norm{sfx}")(q), pos, self.c.rope_theta)
        k = rope(getattr(self, f"k_norm{sfx}")(k), pos, self.c.rope_theta)
        return q, k, v

    def attend(self, q, k, v, mask, view: str):
        """softmax(q kᵀ/√d + mask) v, GQA by repeating kv heads; mask [T,S] bool (True = see)."""
        rep = self.c.num_attention_heads // self.c.num_key_value_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(self.c.head_dim))
        n, _, t, _ = o.shape
        sfx = "_diff" if view == DIFFUSION else ""
        return getattr(self, f"o_proj{sfx}")(o.transpose(1, 2).reshape(n, t, -1))


class MLP(nn.Module):
    def __init__(self, c: OrthrusConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: OrthrusConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)


class Backbone(nn.Module):
    def __init__(self, c: OrthrusConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


@dataclass
class KVCache:
    """Per-layer AR keys/values [1, Hkv, T, D] of one sequence."""
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def crop(self, n: int) -> None:
        self.k = [x[:, :, :n] for x in self.k]
        self.v = [x[:, :, :n] for x in self.v]


class OrthrusModel(nn.Module):
    def __init__(self, config: OrthrusConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=torch.float32) -> "OrthrusModel":
        from .checkpoint import Checkpoint
        ckpt = Checkpoint(path)
        cfg = ckpt.config
        cfg.tie_word_embeddings = ckpt.tied  # a missing lm_head means tied, whatever the flag says
        m = cls(cfg)
        m.load_state_dict(ckpt.state_dict(dtype), strict=True)
        return m.to(dtype).eval()

    def head(self, h):
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.model.norm(h), w)

    def layer_forward(self, layer: Layer, h, attn):
        """Pre-norm residual block; `attn(x)` is the attention of whichever view is running."""
        h = h + attn(layer.input_layernorm(h))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    @torch.no_grad()
    def forward_ar(self, ids: torch.Tensor, cache: KVCache | None = None, write: bool = True):
        """AR view over ids [T] at positions len(cache)..; appends to the cache; logits [T, V]."""
        cache = KVCache() if cache is None else cache
        p, t = len(cache), ids.shape[-1]
        pos = torch.arange(p, p + t)
        mask = torch.ones(t, p + t, dtype=torch.bool).tril(p)
        h = self.model.embed_tokens(ids.view(1, t))
        new_k, new_v = [], []
        for i, layer in enumerate(self.model.layers):
            def attn(x, i=i, a=layer.self_attn):
                q, k, v = a.qkv(x, pos, AR)
                if p:
                    k, v = torch.cat([cache.k[i], k], 2), torch.cat([cache.v[i], v], 2)
                new_k.append(k)
                new_v.append(v)
                return a.attend(q, k, v, mask, AR)
            h = self.layer_forward(layer, h, attn)
        if write:
            cache.k, cache.v = new_k, new_v
        return self.head(h)[0]

    @torch.no_grad()
    def forward_diffusion(self, ids: torch.Tensor, cache: KVCache):
        """Diffusion view over a block ids [B] at positions len(cache)..; the cache is unchanged."""
        p, b = len(cache), ids.shape[-1]
        pos = torch.arange(p, p + b)
        h = self.model.embed_tokens(ids.view(1, b))
        for i, layer in enumerate(self.model.layers):
            def attn(x, i=i, a=layer.self_attn):
                q, k, v = a.qkv(x, pos, DIFFUSION)
                if p:
                    k, v = torch.cat([cache.k[i], k], 2), torch.cat([cache.v[i], v], 2)
                return a.attend(q, k, v, None, DIFFUSION)  # no mask: the block sees itself whole
            h = self.layer_forward(layer, h, attn)
        return self.head(h)[0]


# ---------------------------------------------------------------- decoding

def warp(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities of rows of logits [..., V] in llama.cpp's order: top-k, then top-p (on
    the untempered probabilities), then the temperature (sampling.py's chain without
    min-p, bias and penalties)."""
    x = logits.double()
    if 0 < top_k < x.shape[-1]:
        kth = x.topk(top_k, -1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if top_p < 1.0:
        sp, idx = x.softmax(-1).sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp >= top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False
        x = x.scatter(-1, idx, x.gather(-1, idx).masked_fill(drop, -math.inf))
    return (x / temperature).softmax(-1).to(logits.dtype)


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits):
        return warp(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, logits) -> int:
        if self.greedy:
            return int(logits.argmax(-1))
        return int(torch.multinomial(self.probs(logits), 1, generator=self.generator))


@dataclass
class Step:
    drafted: list[int]
    accepted: int


@dataclass
class Output:
    tokens: list[int]
    steps: list[Step] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per draft/verify step (the first token comes from the prefill)."""
        return (len(self.tokens) - 1) / max(1, len(self.steps))


def _finish(out: list[int], eos: set[int], max_tokens: int) -> tuple[list[int], bool]:
    """Cut at the first EOS (kept) or at max_tokens; True when generation is over."""
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1], True
    return out[:max_tokens], len(out) >= max_tokens


@torch.no_grad()
def generate_ar(model: OrthrusModel, prompt: list[int], max_tokens: int, eos=(),
                sampling: Sampling | None = None) -> Output:
    s, eos = sampling or Sampling(), set(eos)
    cache = KVCache()
    t = s.pick(model.forward_ar(torch.tensor(prompt), cache)[-1])
    out = [t]
    while t not in eos and len(out) < max_tokens:
        t = s.pick(model.forward_ar(torch.tensor([t]), cache)[-1])
        out.append(t)
    return Output(out)


def speculative_accept(d: list[int], q: torch.Tensor, p: torch.Tensor, s: Sampling) -> tuple[int, int]:
    """Accepted count n and the next token, for drafts d[0..k-1] with draft probs q[k,V]
    and AR probs p[k+1,V] (row k is the bonus row). Leviathan et al. 2023."""
    for i, tok in enumerate(d):
        r = torch.rand((), generator=s.generator)
        if r * q[i, tok] <= p[i, tok]:  # accept with min(1, p/q)
            continue
        res = (p[i] - q[i]).clamp_min(0)
        res = res / res.sum() if res.sum() > 1e-12 else p[i]
        return i, int(torch.multinomial(res, 1, generator=s.generator))
    return len(d), int(torch.multinomial(p[len(d)], 1, generator=s.generator))


@torch.no_grad()
def generate_orthrus(model: OrthrusModel, prompt: list[int], max_tokens: int, eos=(),
                     sampling: Sampling | None = None, block_size: int | None = None) -> Output:
    """Orthrus decoding as in docs/ALGORITHM.md: draft a block with the diffusion view, verify it
    with one AR forward, keep the agreeing prefix plus one AR token, crop the cache."""
    s, eos = sampling or Sampling(), set(eos)
    B, M = block_size or model.config.block_size, model.config.mask_token_id
    cache = KVCache()
    t = s.pick(model.forward_ar(torch.tensor(prompt), cache)[-1])
    out, steps = [t], []
    done = t in eos or max_tokens <= 1
    while not done:
        b = min(B, max_tokens - len(out))
        p = len(cache)
        if b >= 2:
            dl = model.forward_diffusion(torch.tensor([t] + [M] * (b - 1)), cache)[: b - 1]
            if s.greedy:
                d = dl.argmax(-1).tolist()
            else:
                q = s.probs(dl)
                d = torch.multinomial(q, 1, generator=s.generator)[:, 0].tolist()
        else:
            d, q = [], None
        vl = model.forward_ar(torch.tensor([t] + d), cache)
        if s.greedy:
            a = vl.argmax(-1).tolist()
            n = 0
            while n < len(d) and d[n] == a[n]:
                n += 1
            nxt = a[n]
        else:
            n, nxt = speculative_accept(d, q, s.probs(vl), s)
        cache.crop(p + n + 1)
        steps.append(Step(d, n))
        out, done = _finish(out + d[:n] + [nxt], eos, max_tokens)
        t = nxt
    return Output(out, steps)
