"""Token choice on rows of llama.cpp logits: greedy in C, sampling vectorised in numpy.

Both views are warped the same way (temperature, then top-k, then top-p), exactly as
reference.warp does, so speculative sampling against the draft distribution is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import OrthrusError


@dataclass
class Sampler:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    rule: str = "speculative"  # or "match": sample from AR, accept while equal to the draft

    def __post_init__(self):
        if self.rule not in ("speculative", "match"):
            raise OrthrusError(f"rule must be 'speculative' or 'match', got {self.rule!r}")
        if self.temperature < 0:
            raise OrthrusError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OrthrusError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OrthrusError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Warped probabilities of rows [n, V] (float64 for exact accept ratios)."""
        x = logits.astype(np.float64) / self.temperature
        v = x.shape[-1]
        if 0 < self.top_k < v:
            kth = np.partition(x, v - self.top_k, axis=-1)[:, v - self.top_k][:, None]
            x = np.where(x < kth, -np.inf, x)
        x -= x.max(-1, keepdims=True)
        p = np.exp(x)
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1.0:
            order = np.argsort(-p, axis=-1, kind="stable")
            sp = np.take_along_axis(p, order, -1)
            drop = np.cumsum(sp, -1) - sp >= self.top_p  # keep the smallest prefix reaching top_p
            sp[drop] = 0.0
            np.put_along_axis(p, order, sp, -1)
            p /= p.sum(-1, keepdims=True)
        return p

    def draw(self, p: np.ndarray) -> np.ndarray:
        """One sample from each row of probabilities [n, V] (inverse CDF, vectorised)."""
        c = np.cumsum(p, -1)
        u = self.rng.random((p.shape[0], 1)) * c[:, -1:]
        return np.minimum((c < u).sum(-1), p.shape[-1] - 1)

    def accept(self, d: np.ndarray, q: np.ndarray, p: np.ndarray) -> tuple[int, int]:
        """Speculative sampling (Leviathan et al. 2023): accepted count n and the next token,
        for drafts d[k], draft probs q[k, V] and AR probs p[k+1, V] (row k: the bonus)."""
        if self.rule == "match":
            return self.match(d, p)
        for i, tok in enumerate(d):
            if self.rng.random() * q[i, tok] <= p[i, tok]:  # accept with min(1, p/q)
                continue
            res = np.maximum(p[i] - q[i], 0.0)
            res = res / res.sum() if res.sum() > 1e-12 else p[i]
            return i, int(self.draw(res[None])[0])
        return len(d), int(self.draw(p[len(d)][None])[0])

    def match(self, d: np.ndarray, p: np.ndarray) -> tuple[int, int]:
        """Token matching: exact too, but a draft is kept only if AR happens to sample it."""
        x = self.draw(p)
        n = int(np.flatnonzero(np.append(x[: len(d)] != d, True))[0])
        return n, int(x[n])
