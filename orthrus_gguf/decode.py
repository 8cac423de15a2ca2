"""The Orthrus decoding loop over the patched llama.cpp (ORTHRUS.md, "Greedy Orthrus decoding").

    prefill(prompt); t = pick(last row)
    loop: b = policy.choose(limit)              # b = 1: a plain AR step, no draft
          draft [t, M, …, M] at p (diffusion)   # cache unchanged
          d = pick(draft rows 0..b-2)
          verify [t, d…] at p (AR)              # writes the cache
          n, next = accept(d, verify rows)
          crop the cache to < p+n+1; emit d[:n] + [next]; policy.update(drafted, n)

Greedy picks are argmaxes in C; sampling warps rows in numpy and accepts with
speculative sampling. Nothing here loops over the vocabulary in Python.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .native import NativeModel
from .sampling import Sampler


@dataclass
class Stats:
    mode: str
    prompt_tokens: int = 0
    tokens: int = 0
    steps: int = 0
    forwards: int = 0
    t_prefill: float = 0.0
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_python: float = 0.0
    t_total: float = 0.0
    blocks: list[int] = field(default_factory=list)
    drafted: list[list[int]] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)  # forwards of each step that reused a kept graph

    @property
    def decode_time(self) -> float:
        return self.t_draft + self.t_verify + self.t_python

    def summary(self) -> dict:
        per_step = [a + 1 for a in self.accepted]
        n_drafted = sum(len(d) for d in self.drafted)
        return {
            "mode": self.mode, "prompt_tokens": self.prompt_tokens, "tokens": self.tokens,
            "steps": self.steps, "forwards": self.forwards,
            "tokens_per_step": (self.tokens - 1) / self.steps if self.steps else 0.0,
            "tokens_per_step_histogram": dict(sorted(Counter(per_step).items())),
            "tokens_per_forward": (self.tokens - 1) / self.forwards if self.forwards else 0.0,
            "draft_acceptance": sum(self.accepted) / n_drafted if n_drafted else 0.0,
            "time_prefill_s": self.t_prefill, "time_draft_s": self.t_draft,
            "time_verify_s": self.t_verify, "time_python_s": self.t_python,
            "time_total_s": self.t_total,
            # the first token comes from the prefill; decode speed counts the rest
            "tokens_per_second": (self.tokens - 1) / self.decode_time if self.decode_time > 0 else 0.0,
            "step_over_forwards": self.decode_time / max(1e-12, self.t_draft + self.t_verify),
            "graphs_reused_per_step": sum(self.reused) / self.steps if self.steps else 0.0,
        }


def _first_mismatch(d: np.ndarray, a: np.ndarray) -> int:
    bad = np.flatnonzero(d != a[: d.size])
    return int(bad[0]) if bad.size else int(d.size)


def decode(nm: NativeModel, prompt: list[int], max_tokens: int, sampler: Sampler, policy,
           is_eog: Callable[[int], bool], stats: Stats) -> Iterator[list[int]]:
    """Yield the tokens of each step; `policy` (policy.py) picks each step's block, ARPolicy
    giving plain AR decoding (one token per forward)."""
    clock = time.perf_counter
    start = clock()
    try:
        yield from _loop(nm, prompt, max_tokens, sampler, policy, is_eog, stats, clock, start)
    finally:
        stats.t_total = clock() - start


def _loop(nm, prompt, max_tokens, sampler, policy, is_eog, stats, clock, start):
    nm.clear()
    nm.prefill(prompt)
    t = int(nm.argmax(1)[0]) if sampler.greedy else int(sampler.draw(sampler.probs(nm.logits(1)))[0])
    stats.prompt_tokens, stats.t_prefill = len(prompt), clock() - start
    stats.tokens = 1
    yield [t]
    p = len(prompt)
    while not is_eog(t) and stats.tokens < max_tokens:
        t0 = clock()
        reused0 = nm.n_reused
        b = policy.choose(max_tokens - stats.tokens)
        d, q = np.empty(0, dtype=np.int32), None
        t1 = t0
        if b >= 2:
            nm.draft(t, p, b)
            t1 = clock()
            stats.t_draft += t1 - t0
            if sampler.greedy:
                d = nm.argmax(b - 1)
            else:
                q = sampler.probs(nm.logits(b - 1))
                d = sampler.draw(q).astype(np.int32)
        t2 = clock()
        nm.verify(np.concatenate([[t], d]).astype(np.int32), p)
        t3 = clock()
        stats.t_verify += t3 - t2
        if sampler.greedy:
            a = nm.argmax(d.size + 1)
            n = _first_mismatch(d, a)
            nxt = int(a[n])
        else:
            n, nxt = sampler.accept(d, q, sampler.probs(nm.logits(d.size + 1)))  # no drafts: a plain sample
        if n < d.size:
            nm.seq_rm(p + n + 1)  # drop the rejected drafts' cells
        new = [int(x) for x in d[:n]] + [nxt]
        for i, tok in enumerate(new):  # stop at the first end-of-generation token
            if is_eog(tok):
                new = new[: i + 1]
                break
        new = new[: max_tokens - stats.tokens]
        policy.update(int(d.size), n)
        stats.steps += 1
        stats.forwards += 2 if b >= 2 else 1
        stats.tokens += len(new)
        stats.blocks.append(b)
        stats.drafted.append(d.tolist())
        stats.accepted.append(n)
        stats.reused.append(nm.n_reused - reused0)
        stats.t_python += (clock() - t0) - (t1 - t0) - (t3 - t2)  # t1 == t0 without a draft
        yield new
        p, t = p + n + 1, new[-1]
