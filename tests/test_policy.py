"""The draft-length policy: decisions from costs and acceptance, without llama.cpp."""
import numpy as np

from orthrus_gguf.policy import AutoPolicy, FixedPolicy

WIDTHS = (1, 2, 4, 8, 16, 32)
CPU = {w: c for w, c in zip(WIDTHS, (1.0, 1.35, 2.05, 4.1, 4.8, 11.0))}  # LLAMA_CPP.md, 1.7B Q4_K_M
GPU = {w: c for w, c in zip(WIDTHS, (1.0, 1.05, 1.1, 1.15, 1.2, 1.3))}


def trained(policy, accept_prob, steps=400, seed=0):
    """Feed the policy steps where each draft is accepted with accept_prob (given the earlier ones)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        k = policy.max_block - 1
        n = 0
        while n < k and rng.random() < accept_prob:
            n += 1
        policy.update(k, n)
    return policy


def test_fixed_policy_respects_the_limit():
    p = FixedPolicy(32)
    assert p.choose(100) == 32 and p.choose(5) == 5


def test_gpu_costs_and_high_acceptance_draft_long_blocks():
    p = trained(AutoPolicy(32, {**GPU, 1: 0.0}, GPU), 0.9)
    assert p.choose(1000) >= 16


def test_cpu_costs_fall_back_to_plain_ar():
    """Two forwards of width b cost ~2 × b single decodes on a CPU: even 60% acceptance loses."""
    p = trained(AutoPolicy(32, {**CPU, 1: 0.0}, CPU), 0.6)
    assert p.choose(1000) == 1
    assert p.rates(32)[0] == max(p.rates(32))


def test_ar_steps_probe_at_doubling_intervals():
    p = trained(AutoPolicy(32, {**CPU, 1: 0.0}, CPU), 0.1)
    picks = [p.choose(1000) for _ in range(16 + 32 + 64)]
    probes = [i for i, b in enumerate(picks) if b > 1]
    assert probes == [15, 15 + 32, 15 + 32 + 64]
    assert all(picks[i] == 4 for i in probes)


def test_update_counts_conditional_acceptance():
    p = AutoPolicy(8, {**GPU, 1: 0.0}, GPU, prior=(0.0, 0.0))
    p.DECAY = 1.0
    p.update(7, 3)  # drafts 1..3 accepted, 4 rejected, 5..7 unseen
    assert p.hit.tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert p.miss.tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    p.update(0, 0)  # an AR step changes nothing
    assert p.hit.sum() == 3 and p.miss.sum() == 1
