"""Token choice on rows of llama.cpp logits: llama.cpp's sampler chain, vectorised in numpy.

The chain and its order are llama.cpp's (common/sampling.cpp, the default `--samplers`, and
llama-cpp-python's `Llama`): logit bias, repetition penalties over the last
`penalty_last_n` tokens, top-k, top-p, min-p, then the temperature, then a draw from the
softmax of what is left. Temperature 0 is greedy: the argmax after bias and penalties.

The draft rows (q) and the verify rows (p) go through the same chain, so speculative
sampling against q is exact for p. A grammar masks the tokens it rejects after the
penalties (llama-cpp-python's place for it); with one, decode.py accepts drafts by token
matching, row by row, as llama-server does. Row i of a block [t, d0, d1, ...] predicts the token after
d[:i]: its penalty window is the history followed by d[:i]. Nothing here loops over the
vocabulary in Python.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import OrthrusError, check_int, check_number

# llama.cpp's defaults (common_params_sampling; the same in Llama.create_completion)
DEFAULTS = dict(top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, frequency_penalty=0.0,
                presence_penalty=0.0, penalty_last_n=64)
RULES = ("speculative", "match")


@dataclass
class Sampler:
    temperature: float = 0.0
    top_k: int = DEFAULTS["top_k"]              # 0: off
    top_p: float = DEFAULTS["top_p"]            # 1: off
    min_p: float = DEFAULTS["min_p"]            # 0: off
    repeat_penalty: float = DEFAULTS["repeat_penalty"]
    frequency_penalty: float = DEFAULTS["frequency_penalty"]
    presence_penalty: float = DEFAULTS["presence_penalty"]
    penalty_last_n: int = DEFAULTS["penalty_last_n"]  # -1: the whole history
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    rule: str = "speculative"  # or "match": sample from AR, accept while equal to the draft
    rng: np.random.Generator | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.rule not in RULES:
            raise OrthrusError(f"rule must be 'speculative' or 'match', got {self.rule!r}")
        self.temperature = check_number("temperature", self.temperature, 0.0)
        self.top_k = check_int("top_k", self.top_k, 0)
        self.top_p = check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        self.min_p = check_number("min_p", self.min_p, 0.0, 1.0)
        self.repeat_penalty = check_number("repeat_penalty", self.repeat_penalty, 0.0, lo_open=True)
        self.frequency_penalty = check_number("frequency_penalty", self.frequency_penalty)
        self.presence_penalty = check_number("presence_penalty", self.presence_penalty)
        self.penalty_last_n = check_int("penalty_last_n", self.penalty_last_n, -1)
        bias = self.logit_bias or {}
        if not isinstance(bias, dict):
            raise OrthrusError(f"logit_bias must be a dict of token id to bias, got {type(bias).__name__}")
        ids = [check_int("a logit_bias token id", int(k) if isinstance(k, str) and k.isdigit() else k, 0, 2**31 - 1)
               for k in bias]
        vals = [float(v) if v == -math.inf else check_number(f"logit_bias[{k}]", v) for k, v in bias.items()]
        self._bias = (np.array(ids, dtype=np.int64), np.array(vals, dtype=np.float64))
        if self.seed is not None:
            self.rng = np.random.default_rng(check_int("seed", self.seed, 0))
        elif self.rng is None:
            self.rng = np.random.default_rng()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.penalty_last_n != 0 and (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                                             or self.presence_penalty != 0.0)

    @property
    def plain(self) -> bool:
        """Greedy with no bias and no penalty: a pick is the raw argmax (computed in C)."""
        return self.greedy and not self.penalized and self._bias[0].size == 0

    def check_vocab(self, n_vocab: int) -> None:
        ids = self._bias[0]
        if ids.size and ids.max() >= n_vocab:
            raise OrthrusError(f"logit_bias names token {int(ids.max())}; the vocabulary has {n_vocab}")

    # ------------------------------------------------------------ the chain

    def adjust(self, logits: np.ndarray, history, drafts=(), allowed: np.ndarray | None = None) -> np.ndarray:
        """Rows [n, V] after logit bias, penalties and a grammar's allowed set (float64; a copy)."""
        x = np.array(logits, dtype=np.float64, ndmin=2)
        ids, vals = self._bias
        if ids.size:
            x[:, ids] += vals
        if self.penalized:
            history = self._window(history)
            seq = np.concatenate([np.asarray(history, dtype=np.int64), np.asarray(drafts, dtype=np.int64)])
            n_hist = len(seq) - len(drafts)
            for i in range(x.shape[0]):
                end = n_hist + min(i, len(drafts))
                start = 0 if self.penalty_last_n < 0 else max(0, end - self.penalty_last_n)
                tok, cnt = np.unique(seq[start:end], return_counts=True)
                row = x[i, tok]
                row = np.where(row <= 0, row * self.repeat_penalty, row / self.repeat_penalty)
                x[i, tok] = row - cnt * self.frequency_penalty - self.presence_penalty
        if allowed is not None:  # the grammar, where llama-cpp-python's chain has it
            x[:, ~allowed] = -np.inf
        return x

    def probs(self, logits: np.ndarray, history=(), drafts=(), allowed: np.ndarray | None = None) -> np.ndarray:
        """The chain's distribution for rows [n, V] (float64, for exact accept ratios)."""
        x = self.adjust(logits, history, drafts, allowed)
        v = x.shape[-1]
        if 0 < self.top_k < v:  # exactly k kept
            drop = np.argpartition(-x, self.top_k - 1, axis=-1)[:, self.top_k:]
            np.put_along_axis(x, drop, -np.inf, -1)
        if self.top_p < 1.0:  # the smallest prefix by probability that reaches top_p
            p = _softmax(x)
            order = np.argsort(-x, axis=-1, kind="stable")
            sp = np.take_along_axis(p, order, -1)
            drop = np.cumsum(sp, -1) - sp >= self.top_p
            drop[:, 0] = False
            np.put_along_axis(x, order, np.where(drop, -np.inf, np.take_along_axis(x, order, -1)), -1)
        if self.min_p > 0.0:  # p >= min_p * p_max, on logits: x >= max + log(min_p)
            x = np.where(x >= x.max(-1, keepdims=True) + math.log(self.min_p), x, -np.inf)
        return _softmax(x / self.temperature)

    def pick(self, logits: np.ndarray, history=(), drafts=(), allowed: np.ndarray | None = None) -> np.ndarray:
        """Greedy choice of each row (ties: the lowest id), after bias and penalties."""
        return self.adjust(logits, history, drafts, allowed).argmax(-1)

    def _window(self, history):
        """The end of the history a penalty sees: its last penalty_last_n tokens (-1: all)."""
        return history[-self.penalty_last_n:] if self.penalty_last_n > 0 else history

    def _context(self, history, drafts) -> list[int]:
        """What the penalties of a row after history + drafts see, as one history."""
        return [*self._window(history), *drafts] if self.penalized else []

    def choose(self, row: np.ndarray, history, drafts=(), allowed: np.ndarray | None = None) -> int:
        """One token for one row [V] after history + drafts: greedy or a draw from the chain."""
        ctx = self._context(history, drafts)
        if self.greedy:
            return int(self.pick(row[None], ctx, (), allowed)[0])
        return int(self.draw(self.probs(row[None], ctx, (), allowed))[0])

    def draw(self, p: np.ndarray) -> np.ndarray:
        """One sample from each row of probabilities [n, V] (inverse CDF, vectorised)."""
        c = np.cumsum(p, -1)
        u = self.rng.random((p.shape[0], 1)) * c[:, -1:]
        return np.minimum((c < u).sum(-1), p.shape[-1] - 1)

    def sample_rows(self, logits: np.ndarray, history, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens for the first n rows, each row after the tokens picked before it (a draft):
        (tokens, their distributions q or None when greedy)."""
        if self.plain:
            raise AssertionError("plain greedy picks are made in C")
        if not self.penalized:  # rows independent of each other: all at once
            if self.greedy:
                return self.pick(logits[:n], history), None
            q = self.probs(logits[:n], history)
            return self.draw(q), q
        toks, qs = [], []
        for i in range(n):
            if self.greedy:
                toks.append(int(self.pick(logits[i:i + 1], self._context(history, toks))[0]))
            else:
                q = self.probs(logits[i:i + 1], self._context(history, toks))
                qs.append(q[0])
                toks.append(int(self.draw(q)[0]))
        return np.array(toks, dtype=np.int64), (np.stack(qs) if qs else None)

    # ------------------------------------------------------------ acceptance

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


def _softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
    return e / e.sum(-1, keepdims=True)
