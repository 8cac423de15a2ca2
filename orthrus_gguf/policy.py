"""How long a draft to ask for: fixed, or chosen per step from measured costs and acceptance.

A step with block b costs draft(b) + verify(b) and emits E(b) = 1 + sum_{i<b} prod_{j<=i} a_j
tokens, where a_j is the running probability that draft j is accepted given that drafts
1..j-1 were. A plain AR step costs verify(1) and emits 1 token. `auto` takes the b with
the best tokens per second, b = 1 (no draft) included; while it runs AR steps it still
probes a short draft now and then (at doubling intervals) so acceptance stays measured.
"""
from __future__ import annotations

import numpy as np


class FixedPolicy:
    def __init__(self, block: int):
        self.block = block

    def choose(self, limit: int) -> int:
        return min(self.block, limit)

    def update(self, drafted: int, accepted: int) -> None:
        pass


class AutoPolicy:
    PROBE_MIN, PROBE_MAX = 16, 512
    DECAY = 0.98

    def __init__(self, max_block: int, cost_draft: dict[int, float], cost_verify: dict[int, float],
                 prior: tuple[float, float] = (1.0, 1.0)):
        self.max_block = max_block
        widths = np.arange(max_block + 1)
        self.cd = self._interp(cost_draft, widths)
        self.cv = self._interp(cost_verify, widths)
        # Beta counts of "draft j accepted | drafts < j accepted", j = 1..max_block-1
        self.hit = np.full(max_block, prior[0])
        self.miss = np.full(max_block, prior[1])
        self.since_probe, self.probe_every = 0, self.PROBE_MIN
        self._best: int | None = None

    @staticmethod
    def _interp(costs: dict[int, float], widths: np.ndarray) -> np.ndarray:
        xs = np.array(sorted(costs), dtype=float)
        return np.interp(widths, xs, [costs[int(x)] for x in xs])

    def rates(self, limit: int) -> np.ndarray:
        """Expected tokens per second for b = 1..limit (index b-1)."""
        a = self.hit[1:] / (self.hit[1:] + self.miss[1:])
        expected = 1 + np.concatenate([[0.0], np.cumsum(np.cumprod(a))])  # E(b), b = 1..max_block
        b = np.arange(1, self.max_block + 1)
        cost = self.cv[b] + np.where(b > 1, self.cd[b], 0.0)
        return (expected / cost)[:limit]

    def choose(self, limit: int) -> int:
        limit = min(limit, self.max_block)
        if self._best is None or self._best > limit:  # rates change only in update()
            self._best = int(np.argmax(self.rates(limit))) + 1
        b = self._best
        if b == 1 and limit >= 2:
            self.since_probe += 1
            if self.since_probe >= self.probe_every:  # refresh the acceptance estimate cheaply
                self.since_probe, self.probe_every = 0, min(2 * self.probe_every, self.PROBE_MAX)
                return min(4, limit)
        return b

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:  # a plain AR step says nothing about acceptance
            return
        self._best = None
        self.hit *= self.DECAY  # old evidence fades: acceptance changes with the text
        self.miss *= self.DECAY
        self.hit[1:accepted + 1] += 1
        if accepted < drafted:
            self.miss[accepted + 1] += 1
