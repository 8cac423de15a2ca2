"""The Orthrus decoding loop over the patched llama.cpp (docs/ALGORITHM.md, "Greedy decoding").

    reuse the cached prefix; prefill the rest of the prompt; t = pick(last row)
    loop: b = policy.choose(limit)              # b = 1: a plain AR step, no draft
          draft [t, M, …, M] at p (diffusion)   # cache unchanged
          d = pick(draft rows 0..b-2)
          verify [t, d…] at p (AR)              # writes the cache
          n, next = accept(d, verify rows)
          crop the cache to < p+n+1; emit d[:n] + [next]; policy.update(drafted, n)

Each iteration yields a Step record; callers fold them (Stats, the API's text). Plain greedy
picks are argmaxes, in C or, with backend sampling, on the GPU (then no logits come back);
anything else runs llama.cpp's sampler chain in numpy (sampling.py) and accepts with
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


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of an emitted token, and the n most likely at its position
    (raw logits of the row that predicted it, as llama-cpp-python reports them)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Step:
    tokens: list[int]          # emitted by the step (the prefill step: the first token)
    block: int                 # 0: the prefill; 1: a plain AR step; b >= 2: a drafted block of b
    drafted: list[int] = field(default_factory=list)
    accepted: int = 0
    reused: int = 0            # forwards of the step that reused a kept graph
    t_draft: float = 0.0
    t_verify: float = 0.0      # the prefill step: the prefill
    t_python: float = 0.0
    prefilled: int = 0         # the prefill step: prompt tokens decoded ...
    cached: int = 0            # ... and prompt tokens reused from the cache
    logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def forwards(self) -> int:
        return 0 if self.block == 0 else 2 if self.block >= 2 else 1


@dataclass
class Stats:
    """A fold of a step stream: Stats(mode).add(step) for each step, then summary()."""
    mode: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    tokens: int = 0
    steps: int = 0
    forwards: int = 0
    t_prefill: float = 0.0
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_python: float = 0.0
    blocks: list[int] = field(default_factory=list)
    drafted: list[list[int]] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)

    def add(self, s: Step) -> "Stats":
        self.tokens += len(s.tokens)
        if s.block == 0:
            self.prompt_tokens, self.cached_tokens = s.prefilled + s.cached, s.cached
            self.t_prefill += s.t_verify
            self.t_python += s.t_python
            return self
        self.steps += 1
        self.forwards += s.forwards
        self.t_draft += s.t_draft
        self.t_verify += s.t_verify
        self.t_python += s.t_python
        self.blocks.append(s.block)
        self.drafted.append(s.drafted)
        self.accepted.append(s.accepted)
        self.reused.append(s.reused)
        return self

    @property
    def decode_time(self) -> float:
        return self.t_draft + self.t_verify + self.t_python

    def summary(self) -> dict:
        per_step = [a + 1 for a in self.accepted]
        n_drafted = sum(len(d) for d in self.drafted)
        return {
            "mode": self.mode, "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "prefilled_tokens": self.prompt_tokens - self.cached_tokens, "tokens": self.tokens,
            "steps": self.steps, "forwards": self.forwards,
            "tokens_per_step": (self.tokens - 1) / self.steps if self.steps else 0.0,
            "tokens_per_step_histogram": dict(sorted(Counter(per_step).items())),
            "tokens_per_forward": (self.tokens - 1) / self.forwards if self.forwards else 0.0,
            "draft_acceptance": sum(self.accepted) / n_drafted if n_drafted else 0.0,
            "time_prefill_s": self.t_prefill, "time_draft_s": self.t_draft,
            "time_verify_s": self.t_verify, "time_python_s": self.t_python,
            "time_total_s": self.t_prefill + self.decode_time,
            # the first token comes from the prefill; decode speed counts the rest
            "tokens_per_second": (self.tokens - 1) / self.decode_time if self.decode_time > 0 else 0.0,
            "step_over_forwards": self.decode_time / max(1e-12, self.t_draft + self.t_verify),
            "graphs_reused_per_step": sum(self.reused) / self.steps if self.steps else 0.0,
        }


def _first_mismatch(d: np.ndarray, a: np.ndarray) -> int:
    bad = np.flatnonzero(d != a[: d.size])
    return int(bad[0]) if bad.size else int(d.size)


def _logprobs(nm: NativeModel, tokens: list[int], n_top: int) -> tuple[TokenLogprob, ...]:
    """Log-softmax of the first len(tokens) rows of the last decode (vectorised)."""
    x = nm.logits(len(tokens)).astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    k = min(n_top, lp.shape[-1])
    top = np.argsort(-lp, axis=-1, kind="stable")[:, :k] if k else np.empty((len(tokens), 0), dtype=np.int64)
    return tuple(TokenLogprob(int(t), float(lp[i, t]), tuple((int(j), float(lp[i, j])) for j in top[i]))
                 for i, t in enumerate(tokens))


def _matched(sampler: Sampler, grammar, rows: np.ndarray, hist: list[int], d: np.ndarray) -> tuple[int, int]:
    """Token matching under a grammar: row i's token, chosen from the tokens the grammar
    allows after d[:i], keeps draft i if equal; returns (accepted, next token)."""
    for i in range(d.size + 1):
        x = sampler.choose(rows[i], hist, [int(v) for v in d[:i]], grammar.allowed())
        grammar.accept(x)
        if i == d.size or x != d[i]:
            return i, x
    raise AssertionError("unreachable")


def decode(nm: NativeModel, prompt: list[int], max_tokens: int, sampler: Sampler, policy,
           is_eog: Callable[[int], bool], logprobs: int | None = None, grammar=None) -> Iterator[Step]:
    """Yield one Step per forward pair; `policy` (policy.py) picks each step's block,
    ARPolicy giving plain AR decoding (one token per forward). The cache keeps what it held
    of `prompt` (NativeModel.reuse_prefix) and ends holding prompt + output but the last token.
    `grammar` (native.Grammar): only tokens it allows, drafts kept by token matching."""
    clock = time.perf_counter
    t0 = clock()
    with nm.exclusive():  # each step holds the model: another thread's call is refused
        lease = nm.lease()
        # plain greedy needs only each row's argmax: on the device where the model can (no
        # logits come back); logprobs, grammars and samplers read the logits
        nm.set_backend_sampling(sampler.plain and grammar is None and logprobs is None)
        cached = nm.reuse_prefix(prompt)
        nm.prefill(prompt[cached:], cached)
        t1 = clock()
        hist = list(prompt)
        if grammar is not None:
            t = sampler.choose(nm.logits(1)[0], hist, allowed=grammar.allowed())
            grammar.accept(t)
        elif sampler.plain:
            t = int(nm.argmax(1)[0])
        else:
            t = int(sampler.sample_rows(nm.logits(1), hist, 1)[0][0])
        hist.append(t)
        n_out = 1
        lps = _logprobs(nm, [t], logprobs) if logprobs is not None else None
    yield Step([t], 0, t_verify=t1 - t0, t_python=clock() - t1, prefilled=len(prompt) - cached,
               cached=cached, logprobs=lps)
    p = len(prompt)
    while not is_eog(t) and n_out < max_tokens:
        with nm.exclusive(lease):
            step = _step(nm, t, p, max_tokens - n_out, sampler, policy, is_eog, logprobs, grammar, hist, clock)
        n_out += len(step.tokens)
        yield step
        p, t = p + step.accepted + 1, step.tokens[-1]


def _step(nm, t, p, remaining, sampler, policy, is_eog, logprobs, grammar, hist, clock) -> Step:
    """One draft + verify pair (or one AR forward) after token t at position p."""
    t0 = clock()
    reused0 = nm.n_reused
    b = policy.choose(remaining)
    d, q = np.empty(0, dtype=np.int32), None
    t1 = t0
    if b >= 2:
        nm.draft(t, p, b)
        t1 = clock()
        if sampler.plain or grammar is not None:  # token matching takes any proposal
            d = nm.argmax(b - 1)
        else:
            d, q = sampler.sample_rows(nm.logits(b - 1), hist, b - 1)
            d = d.astype(np.int32)
    t2 = clock()
    nm.verify(np.concatenate([[t], d]).astype(np.int32), p)
    t3 = clock()
    if grammar is not None:
        n, nxt = _matched(sampler, grammar, nm.logits(d.size + 1), hist, d)
    elif sampler.plain:
        a = nm.argmax(d.size + 1)
        n = _first_mismatch(d, a)
        nxt = int(a[n])
    elif sampler.greedy:
        a = sampler.pick(nm.logits(d.size + 1), hist, d)
        n = _first_mismatch(d, a)
        nxt = int(a[n])
    else:  # no drafts: a plain sample
        n, nxt = sampler.accept(d, q, sampler.probs(nm.logits(d.size + 1), hist, d))
    new = [int(x) for x in d[:n]] + [nxt]
    for i, tok in enumerate(new):  # stop at the first end-of-generation token
        if is_eog(tok):
            new = new[: i + 1]
            break
    new = new[:remaining]
    lps = _logprobs(nm, new, logprobs) if logprobs is not None else None
    if n < d.size:
        nm.seq_rm(p + n + 1)  # drop the rejected drafts' cells
    policy.update(int(d.size), n)
    hist.extend(new)
    return Step(new, b, d.tolist(), n, nm.n_reused - reused0, t1 - t0, t3 - t2,
                (clock() - t0) - (t1 - t0) - (t3 - t2), logprobs=lps)
