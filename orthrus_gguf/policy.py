"""How long a draft to ask for: none (AR), fixed, or chosen per step from costs and acceptance.

A step with block b costs draft(b) + verify(b) and emits E(b) = 1 + sum_{i<b} prod_{j<=i} a_j
tokens, where a_j is the running probability that draft j is accepted given that drafts
1..j-1 were. A plain AR step costs verify(1) and emits 1 token. `auto` takes the b with the
best tokens per second among the warm widths (1, then 2, 4, 8, ... below the GGUF's block
size, and the block size): the patched llama.cpp keeps a graph per attention view and
width, so a small fixed set of widths keeps every forward on a kept graph.

While AR wins, auto still probes a short draft now and then (after 16, then 32, ... up to
512 AR steps) so that acceptance stays measured, but only where a probe could change the
choice: a probe of width P measures drafts 1..P-1 alone, so it is skipped unless some width
would beat AR with those drafts always accepted and the others as estimated. Where no width
could pay even if every draft were accepted (draft(b) + verify(b) >= b * verify(1) for every
b), or only wide widths could, and only with nearly every draft accepted (as on the 2-core CPUs
measured here: the best 16- or 32-wide step costs 0.72-0.90 of its width in one-token
forwards), it never probes: it is plain AR.

The server's drafter has a C++ copy of this policy (native/src/llama-orthrus-policy.cpp);
both are checked against tests/data/policy_vectors.json.
"""
from __future__ import annotations

import numpy as np

from .errors import OrthrusError

# calibration: CALIBRATION_PASSES timed passes per width, the first a warm-up; the cost is
# the fastest of the others (the least disturbed by the rest of the machine)
CALIBRATION_PASSES = 4


def warm_widths(max_block: int) -> tuple[int, ...]:
    """The widths auto chooses among: 1, the powers of two below max_block, max_block."""
    if max_block < 1:
        raise OrthrusError(f"the block size must be >= 1, got {max_block}")
    ws, w = [1], 2
    while w < max_block:
        ws.append(w)
        w *= 2
    if max_block > 1:
        ws.append(max_block)
    return tuple(ws)


def calibration_cost(samples) -> float:
    """Seconds of a forward from CALIBRATION_PASSES timings: the fastest after the warm-up."""
    samples = list(samples)
    if len(samples) < 2:
        raise OrthrusError(f"calibration needs a warm-up and at least one timed pass, got {len(samples)}")
    return float(min(samples[1:]))


def measure_costs(max_block: int, draft, verify, rewind) -> tuple[dict[int, float], dict[int, float]]:
    """Seconds of a diffusion pass and of a verify forward at each warm width, by the
    calibration statistic: draft(w) and verify(w) run one forward of width w, rewind() drops
    what the verify cached. Width 1 has no draft (cost 0)."""
    import time
    cost_draft, cost_verify = {1: 0.0}, {}
    for w in warm_widths(max_block):
        ts_d, ts_v = [], []
        for _ in range(CALIBRATION_PASSES):
            t0 = time.perf_counter()
            if w >= 2:
                draft(w)
            t1 = time.perf_counter()
            verify(w)
            t2 = time.perf_counter()
            rewind()
            ts_d.append(t1 - t0)
            ts_v.append(t2 - t1)
        if w >= 2:
            cost_draft[w] = calibration_cost(ts_d)
        cost_verify[w] = calibration_cost(ts_v)
    return cost_draft, cost_verify


class ARPolicy:
    """Plain AR decoding: one token per forward, never a draft."""
    name = "ar"

    def choose(self, limit: int) -> int:
        return 1

    def update(self, drafted: int, accepted: int) -> None:
        pass


class FixedPolicy:
    """The same block every step (fewer near the token limit)."""
    name = "fixed"

    def __init__(self, block: int):
        self.block = block

    def choose(self, limit: int) -> int:
        return min(self.block, limit)

    def update(self, drafted: int, accepted: int) -> None:
        pass


class AutoPolicy:
    """The block with the best expected tokens per second, among the warm widths."""
    name = "auto"
    PROBE_MIN, PROBE_MAX = 16, 512
    PROBE_WIDTH = 4
    DECAY = 0.98

    def __init__(self, max_block: int, cost_draft: dict[int, float], cost_verify: dict[int, float],
                 prior: tuple[float, float] = (1.0, 1.0)):
        self.max_block = max_block
        self.widths = np.array(warm_widths(max_block))
        missing = [int(w) for w in self.widths if w not in cost_verify or (w > 1 and w not in cost_draft)]
        if missing:
            raise OrthrusError(f"auto policy: no measured cost for widths {missing}")
        self.cost = np.array([cost_verify[int(w)] + (cost_draft[int(w)] if w > 1 else 0.0) for w in self.widths])
        # can any width pay if every draft were accepted?
        self.pays = bool(np.any(self.cost[1:] < self.widths[1:] * self.cost[0]))
        # Beta counts of "draft j accepted | drafts < j accepted", index j = 1..max_block-1
        self.hit = np.full(max_block, float(prior[0]))
        self.miss = np.full(max_block, float(prior[1]))
        self.since_probe, self.probe_every = 0, self.PROBE_MIN
        self._rates: np.ndarray | None = None  # tokens per second by warm width; None: stale
        self._best_all: int | None = None  # best() where every warm width fits; None: stale
        self._probe_helps: bool | None = None  # probe_helps(); None: stale

    def _rates_of(self, a: np.ndarray) -> np.ndarray:
        """Tokens per second of each warm width given a[j-1] = P(draft j accepted | drafts < j were)."""
        expected = 1 + np.concatenate([[0.0], np.cumsum(np.cumprod(a))])  # E(b), b = 1..max_block
        return expected[self.widths - 1] / self.cost

    def rates(self) -> np.ndarray:
        """Expected tokens per second of each warm width (self.widths)."""
        if self._rates is None:
            self._rates = self._rates_of(self.hit[1:] / (self.hit[1:] + self.miss[1:]))
        return self._rates

    def probe_helps(self) -> bool:
        """Whether probes could ever make a width beat AR: with the probe's drafts (1..P-1 for
        the probe width P) always accepted, and the later ones as estimated."""
        if self._probe_helps is None:
            a = self.hit[1:] / (self.hit[1:] + self.miss[1:])
            a[: self.best_probe(self.max_block) - 1] = 1.0
            r = self._rates_of(a)
            self._probe_helps = bool(np.any(r[1:] > r[0]))
        return self._probe_helps

    def best(self, limit: int) -> int:
        """The warm width <= limit with the best expected rate (ties: the narrower)."""
        if limit >= self.max_block:  # most steps: kept until the counts change (an AR step's
            if self._best_all is None:  # update leaves them), so it costs no numpy call
                self._best_all = int(self.widths[int(np.argmax(self.rates()))])
            return self._best_all
        n = int(np.searchsorted(self.widths, limit, side="right"))
        return int(self.widths[int(np.argmax(self.rates()[:max(n, 1)]))])

    def choose(self, limit: int) -> int:
        if not self.pays or limit < 2:
            return 1
        b = self.best(limit)
        if b == 1 and self.since_probe >= self.probe_every and self.probe_helps():
            return self.best_probe(limit)  # refresh the acceptance estimate cheaply
        return b

    def best_probe(self, limit: int) -> int:
        """The probe's width: the widest warm width <= min(limit, PROBE_WIDTH)."""
        return int(max(w for w in self.widths if w <= max(2, min(limit, self.PROBE_WIDTH))))

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:  # a plain AR step says nothing about acceptance
            self.since_probe += 1
            return
        # a draft after probe_every AR steps was a probe: the next one waits twice as long;
        # any other draft means drafting pays, and probing starts afresh when it stops paying
        probe = self.since_probe >= self.probe_every
        self.probe_every = min(2 * self.probe_every, self.PROBE_MAX) if probe else self.PROBE_MIN
        self.since_probe = 0
        self._rates = self._best_all = self._probe_helps = None
        self.hit *= self.DECAY  # old evidence fades: acceptance changes with the text
        self.miss *= self.DECAY
        self.hit[1:accepted + 1] += 1
        if accepted < drafted:
            self.miss[accepted + 1] += 1
