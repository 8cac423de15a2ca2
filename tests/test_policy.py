"""The draft-length policy: decisions from costs and acceptance, in Python and in C++.

orthrus_gguf/policy.py (the Python loop's) and native/src/llama-orthrus-policy.cpp (the
server's, bound through libllama) must give every value of tests/data/policy_vectors.json,
whose expectations were worked out by hand, and must agree with each other step by step on
random histories.
"""
import ctypes
import json
from pathlib import Path

import numpy as np
import pytest

from orthrus_gguf.errors import OrthrusError
from orthrus_gguf.policy import (CALIBRATION_PASSES, ARPolicy, AutoPolicy, FixedPolicy, calibration_cost,
                                 warm_widths)

VECTORS = json.loads((Path(__file__).parent / "data" / "policy_vectors.json").read_text())
CASES = {c["name"]: c for c in VECTORS["cases"]}


def costs_of(case):
    return ({int(k): v for k, v in case["cost_draft"].items()}, {int(k): v for k, v in case["cost_verify"].items()})


class CPolicy:
    """llama_orthrus_policy_* of the patched libllama, shaped like AutoPolicy."""

    def __init__(self, max_block, cost_draft, cost_verify):
        from orthrus_gguf import native
        self.n = native.load()
        ws = c_warm_widths(max_block)
        d = (ctypes.c_double * len(ws))(*[cost_draft.get(w, 0.0) for w in ws])
        v = (ctypes.c_double * len(ws))(*[cost_verify[w] for w in ws])
        self.h = self.n.orthrus_policy_init(max_block, d, v)
        assert self.h, "llama_orthrus_policy_init refused valid costs"

    def choose(self, limit):
        return self.n.orthrus_policy_choose(self.h, limit)

    def update(self, drafted, accepted):
        self.n.orthrus_policy_update(self.h, drafted, accepted)

    def close(self):
        self.n.orthrus_policy_free(self.h)


def c_warm_widths(max_block):
    from orthrus_gguf import native
    n = native.load()
    k = n.orthrus_warm_widths(max_block, None, 0)
    out = (ctypes.c_int32 * k)()
    assert n.orthrus_warm_widths(max_block, out, k) == k
    return list(out)


IMPLEMENTATIONS = {"python": AutoPolicy, "cpp": CPolicy}


def replay(policy, events):
    """Run the case's events; returns [(event index, got, expected)] of every choose."""
    seen = []
    for i, ev in enumerate(events):
        if ev[0] == "update":
            _, drafted, accepted, times = ev
            for _ in range(times):
                policy.update(drafted, accepted)
        else:
            _, limit, expected = ev
            seen.append((i, policy.choose(limit), expected))
    return seen


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", CASES)
def test_policy_vectors(impl, name):
    case = CASES[name]
    p = IMPLEMENTATIONS[impl](case["max_block"], *costs_of(case))
    try:
        seen = replay(p, case["events"])
    finally:
        getattr(p, "close", lambda: None)()
    assert [got for _, got, _ in seen] == [want for _, _, want in seen], (impl, name, seen)


@pytest.mark.parametrize("impl", ("python", "cpp"))
def test_warm_widths_and_calibration_vectors(impl):
    from orthrus_gguf import native
    for v in VECTORS["warm_widths"]:
        got = warm_widths(v["max_block"]) if impl == "python" else c_warm_widths(v["max_block"])
        assert list(got) == v["widths"], (impl, v)
    for v in VECTORS["calibration"]:
        if impl == "python":
            got = calibration_cost(v["samples"])
        else:
            arr = (ctypes.c_double * len(v["samples"]))(*v["samples"])
            got = native.load().orthrus_calibration_cost(arr, len(v["samples"]))
        assert got == v["cost"], (impl, v)
    passes = CALIBRATION_PASSES if impl == "python" else native.load().orthrus_calibration_passes()
    assert passes == VECTORS["calibration_passes"]


def test_python_and_cpp_agree_on_random_histories():
    """Random costs and random step sequences: the same choice at every step."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        max_block = int(rng.choice([2, 3, 5, 8, 16, 24, 32]))
        ws = warm_widths(max_block)
        v1 = 1.0
        verify = {w: v1 * (1 + rng.uniform(0, 0.5) * (w - 1) ** rng.uniform(0.3, 1.2)) for w in ws}
        draft = {w: verify[w] * rng.uniform(0.05, 1.2) for w in ws if w > 1}
        py, cpp = AutoPolicy(max_block, draft, verify), CPolicy(max_block, draft, verify)
        accept = rng.uniform(0, 1)
        try:
            for step in range(300):
                limit = int(rng.choice([1, 2, 3, 7, 1000]))
                b = py.choose(limit)
                assert b == cpp.choose(limit), (trial, step, limit)
                assert b in ws and b <= max(1, limit)
                drafted = b - 1
                n = 0
                while n < drafted and rng.random() < accept:
                    n += 1
                py.update(drafted, n)
                cpp.update(drafted, n)
        finally:
            cpp.close()


def test_stuck_in_ar_regression_as_reported():
    """The issue's reproduction: after training, choose(1) must not pin later choices to 1."""
    p = AutoPolicy(32, {w: 0.1 for w in (2, 4, 8, 16, 32)}, {w: 1.0 for w in (1, 2, 4, 8, 16, 32)})
    for _ in range(50):
        p.update(31, 20)
    best = p.choose(1000)
    assert best == 32
    assert p.choose(1) == 1
    assert p.choose(1000) == best


def test_choice_is_a_pure_function_of_the_state():
    """choose() changes nothing: asking twice, or with other limits in between, gives the same."""
    p = AutoPolicy(32, {w: 0.2 for w in (2, 4, 8, 16, 32)}, {w: 1.0 for w in (1, 2, 4, 8, 16, 32)})
    for _ in range(30):
        p.update(31, 6)
    first = [p.choose(lim) for lim in (1000, 1, 5, 17, 1000)]
    assert first == [p.choose(lim) for lim in (1000, 1, 5, 17, 1000)]


def test_no_width_pays_means_no_probe_ever():
    """Where draft(b) + verify(b) >= b one-token forwards for every b, auto never drafts."""
    cpu = {w: float(w) for w in warm_widths(32)}
    p = AutoPolicy(32, {w: 0.9 * c for w, c in cpu.items() if w > 1}, cpu)
    assert not p.pays
    picks = []
    for _ in range(2000):
        picks.append(p.choose(1000))
        p.update(0, 0)
    assert set(picks) == {1}


# the calibrations (policy.measure_costs, ms by warm width) that `bench` recorded on this
# project's 2-core CPUs, and whether some width could pay there with every draft accepted
# (draft(w) + verify(w) < w verify(1); read off the files: 16 and 32 cost 0.57-0.92 of
# their width in the three that can, every width 1.24-2.21 in f16's demo run)
MEASURED = Path(__file__).parent.parent / "docs" / "measurements"
CPU_CALIBRATIONS = {("costs_cpu_2core_amd.json", ()): True, ("costs_cpu_2core_intel.json", ()): True,
                    ("demo_cpu_2core.json", ("f16",)): False, ("demo_cpu_2core.json", ("q4_k_m",)): True}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("source", CPU_CALIBRATIONS, ids=lambda s: "-".join((s[0].split(".")[0],) + s[1]))
def test_measured_cpu_costs_decode_plain_ar(impl, source):
    """On the CPUs measured here a wide step could pay only with nearly every draft accepted,
    which a width-4 probe can never show: a fresh auto policy never drafts, not even a probe,
    in 2,000 steps (before, it probed after 16, 32, ... AR steps, each probe a loss)."""
    name, keys = source
    rep = json.loads((MEASURED / name).read_text())
    for k in keys:
        rep = rep[k]
    ms = rep["forward_cost_ms"]
    draft = {int(w): c for w, c in ms["draft"].items()}
    verify = {int(w): c for w, c in ms["verify"].items()}
    p = IMPLEMENTATIONS[impl](32, draft, verify)
    try:
        if impl == "python":
            assert p.pays is CPU_CALIBRATIONS[source]
        picks = set()
        for _ in range(2000):
            picks.add(p.choose(1000))
            p.update(0, 0)
        assert picks == {1}
    finally:
        getattr(p, "close", lambda: None)()


def test_probe_skipped_only_where_it_cannot_pay():
    """The same costs, two acceptance histories: a probe is due after 16 AR steps. Where the
    widths beyond the probe were seen rejected, drafts 1..3 alone cannot make any width pay
    (E(4) <= 4 at cost 5.2): no probe. Where they were seen accepted, they can: a probe."""
    costs = {1: 1.0, 2: 2.6, 4: 5.2, 8: 6.0, 16: 6.5, 32: 7.0}  # draft + verify
    draft, verify = {w: c - 1.0 for w, c in costs.items() if w > 1}, {w: 1.0 for w in costs}
    for accepted_later, want in ((False, 1), (True, 4)):
        p = AutoPolicy(32, draft, verify)
        p.hit[1:4] = 0.0  # drafts 1..3: seen rejected (AR wins now) ...
        p.miss[1:4] = 50.0
        p.hit[4:], p.miss[4:] = (50.0, 0.5) if accepted_later else (0.5, 50.0)  # ... 4..31: as given
        assert p.choose(1000) == 1
        for _ in range(16):
            p.update(0, 0)
        assert p.choose(1000) == want, accepted_later


def test_only_warm_widths_are_chosen():
    gpu = {w: 1.0 + 0.01 * w for w in warm_widths(32)}
    p = AutoPolicy(32, {w: 0.2 for w in gpu if w > 1}, gpu)
    rng = np.random.default_rng(0)
    chosen = set()
    for _ in range(500):
        b = p.choose(int(rng.integers(1, 40)))
        chosen.add(b)
        p.update(b - 1, int(rng.integers(0, b)))
    assert chosen <= set(warm_widths(32)) and len(chosen) > 2


def test_missing_costs_are_an_error():
    with pytest.raises(OrthrusError, match="no measured cost for widths \\[16, 32\\]"):
        AutoPolicy(32, {2: 0.1, 4: 0.1, 8: 0.1}, {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0})


def test_fixed_and_ar_policies():
    p = FixedPolicy(32)
    assert p.choose(100) == 32 and p.choose(5) == 5
    a = ARPolicy()
    assert [a.choose(x) for x in (1, 2, 1000)] == [1, 1, 1]


def test_update_counts_conditional_acceptance():
    gpu = {w: 1.0 for w in warm_widths(8)}
    p = AutoPolicy(8, {w: 0.1 for w in gpu if w > 1}, gpu, prior=(0.0, 0.0))
    p.DECAY = 1.0
    p.update(7, 3)  # drafts 1..3 accepted, 4 rejected, 5..7 unseen
    assert p.hit.tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert p.miss.tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    p.update(0, 0)  # an AR step changes no acceptance count
    assert p.hit.sum() == 3 and p.miss.sum() == 1
