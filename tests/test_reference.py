"""The PyTorch reference: views, and Orthrus decoding against plain AR decoding."""
import numpy as np
import pytest
import torch

from orthrus_gguf import reference as ref
from orthrus_gguf.config import OrthrusConfig
from orthrus_gguf.reference import KVCache, OrthrusModel, Sampling, generate_ar, generate_orthrus
from orthrus_gguf.testing import random_state_dict, tiny_config

PROMPTS = [[5], [1, 2, 3], list(range(10, 50)), [7, 7, 7, 7, 9], list(range(100, 117))]


def model_from(seed=0, **kw):
    cfg = tiny_config(**kw)
    m = OrthrusModel(OrthrusConfig.from_dict(cfg))
    m.load_state_dict(random_state_dict(cfg, seed), strict=False)
    return m.eval()


def test_incremental_ar_equals_full_forward():
    m = model_from(tied=False)
    ids = torch.arange(3, 30)
    full = m.forward_ar(ids)
    cache = KVCache()
    parts = [m.forward_ar(ids[:10], cache), m.forward_ar(ids[10:11], cache), m.forward_ar(ids[11:], cache)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-5)


def test_diffusion_view_with_ar_weights_and_one_token_is_the_ar_view():
    """A one-token block has nothing to be non-causal about: with the AR weights copied
    into the _diff ones, the diffusion view must give the AR logits exactly."""
    m = model_from()
    for layer in m.model.layers:
        a = layer.self_attn
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            getattr(a, n + "_diff").load_state_dict(getattr(a, n).state_dict())
    cache = KVCache()
    m.forward_ar(torch.arange(20), cache)
    diff = m.forward_diffusion(torch.tensor([42]), cache)
    assert len(cache) == 20  # the diffusion pass never writes the cache
    ar = m.forward_ar(torch.tensor([42]), cache)
    torch.testing.assert_close(diff, ar, rtol=0, atol=1e-6)


def test_diffusion_block_is_not_causal():
    m = model_from()
    cache = KVCache()
    m.forward_ar(torch.arange(12), cache)
    a = m.forward_diffusion(torch.tensor([1, 2, 3, 4]), cache)
    b = m.forward_diffusion(torch.tensor([1, 2, 3, 9]), cache)
    assert not torch.allclose(a[0], b[0])  # row 0 sees token 3 of its block


@pytest.mark.parametrize("kw", [dict(tied=True), dict(tied=False, n_kv_heads=1), dict(block_size=4, head_dim=8)])
def test_greedy_orthrus_equals_greedy_ar(kw):
    m = model_from(seed=3, **kw)
    for prompt in PROMPTS:
        for max_tokens in (1, 2, 7, 40):
            a = generate_ar(m, prompt, max_tokens, eos=[302])
            o = generate_orthrus(m, prompt, max_tokens, eos=[302])
            assert o.tokens == a.tokens, (prompt, max_tokens)
            assert len(o.tokens) <= max_tokens


def test_greedy_orthrus_accepts_drafts_when_the_views_agree():
    """A model whose argmax is always token 11 (attention and MLP outputs zeroed, a head that
    only reads the constant first coordinate): every draft must be accepted, which makes the
    bookkeeping of n, the cache crop and the emitted tokens visible."""
    m = model_from(seed=1, block_size=8, tied=False)
    with torch.no_grad():
        for layer in m.model.layers:
            for lin in (layer.self_attn.o_proj, layer.self_attn.o_proj_diff, layer.mlp.down_proj):
                lin.weight.zero_()
        m.model.embed_tokens.weight[:, 0] = 1.0
        m.lm_head.weight.zero_()
        m.lm_head.weight[11, 0] = 1.0
    a = generate_ar(m, [3, 4], 30)
    o = generate_orthrus(m, [3, 4], 30)
    assert o.tokens == a.tokens == [11] * 30
    assert [s.accepted for s in o.steps] == [7, 7, 7, 4]  # 1 + 8+8+8+5 = 30 tokens
    assert o.tokens_per_step == 29 / 4


def test_eos_stops_and_nothing_follows():
    m = model_from(seed=3)
    a = generate_ar(m, list(range(10, 50)), 40)
    eos = a.tokens[9]
    o = generate_orthrus(m, list(range(10, 50)), 40, eos=[eos])
    assert o.tokens == a.tokens[: a.tokens.index(eos) + 1]


# ---- sampling: Orthrus must sample from exactly the AR distribution

V = 8
SAMPLING_MODEL = dict(vocab_size=V, n_tokens=2, hidden=32, n_heads=2, n_kv_heads=1, head_dim=16,
                      ffn=64, n_layers=1, block_size=4)


def sampling_model():
    """Logits scaled to about 1.3-1.7 nats of entropy per token: peaked enough that the
    draft and AR distributions differ, flat enough that every cell gets samples."""
    m = model_from(seed=5, **SAMPLING_MODEL)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(0.2)
    return m


def exact_ar_distribution(m, prompt, s: Sampling):
    """P(x1, x2, x3) under AR sampling, enumerated exactly: [V, V, V]."""
    def fork(c):
        return KVCache(list(c.k), list(c.v))
    cache = KVCache()
    p1 = s.probs(m.forward_ar(torch.tensor(prompt), cache)[-1]).double()
    joint = torch.zeros(V, V, V, dtype=torch.float64)
    for x1 in range(V):
        c1 = fork(cache)
        p2 = s.probs(m.forward_ar(torch.tensor([x1]), c1)[-1]).double()
        for x2 in range(V):
            p3 = s.probs(m.forward_ar(torch.tensor([x2]), fork(c1))[-1]).double()
            joint[x1, x2] = p1[x1] * p2[x2] * p3
    return joint


def sampled_triples(m, prompt, s, n):
    """Orthrus samples of (x1, x2, x3): x1 from the prefill, x2 and x3 drafted in one step
    (block min(4, 3) = 3), so both go through the acceptance rule."""
    counts = np.zeros((V, V, V))
    for _ in range(n):
        t = generate_orthrus(m, prompt, 3, sampling=s, block_size=4).tokens
        counts[t[0], t[1], t[2]] += 1
    return counts


def fit_pvalues(counts, exact):
    """p-values of the (x1, x2) joint and of the x3 marginal."""
    return chi2_pvalue(counts.sum(2), exact.sum(2)), chi2_pvalue(counts.sum((0, 1)), exact.sum((0, 1)))


def chi2_pvalue(counts, probs):
    n, e = counts.sum(), probs.numpy().ravel() * counts.sum()
    keep = e > 5  # pool the sparse cells, so the chi-square approximation holds
    obs = np.append(counts.ravel()[keep], counts.ravel()[~keep].sum())
    exp = np.append(e[keep], e[~keep].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1  # chi-square survival function: Q(dof/2, stat/2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def wrong_accept_argmax(d, q, p, s):
    """Wrong rule: accept a draft whenever it is the AR argmax."""
    for i, tok in enumerate(d):
        if tok != int(p[i].argmax()):
            return i, int(torch.multinomial(p[i], 1, generator=s.generator))
    return len(d), int(torch.multinomial(p[len(d)], 1, generator=s.generator))


def wrong_accept_no_residual(d, q, p, s):
    """Wrong rule: min(1, p/q) acceptance, but the replacement comes from p, not max(0, p-q)."""
    for i, tok in enumerate(d):
        if torch.rand((), generator=s.generator) * q[i, tok] > p[i, tok]:
            return i, int(torch.multinomial(p[i], 1, generator=s.generator))
    return len(d), int(torch.multinomial(p[len(d)], 1, generator=s.generator))


@pytest.mark.parametrize("warp", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_sampled_orthrus_matches_ar_distribution(warp, monkeypatch):
    """Chi-square goodness of fit of 3000 Orthrus samples of (x1, x2) against the exact AR
    joint. x2 is always a draft-or-correction token, so it exercises the acceptance rule.
    p > 1e-3 must hold for the right rule (a false alarm about 1 run in 500: two fits) and,
    at T=1, fail for two wrong rules, which shows the test has the power to catch them
    (measured: p < 1e-12 and p < 3e-4)."""
    torch.manual_seed(0)
    m = sampling_model()
    prompt = [1, 2, 3]
    exact = exact_ar_distribution(m, prompt, Sampling(**warp))
    s = Sampling(**warp, generator=torch.Generator().manual_seed(1))
    assert min(fit_pvalues(sampled_triples(m, prompt, s, 3000), exact)) > 1e-3
    if "top_k" in warp:
        return  # warped this hard, draft and AR agree too often for the wrong rules to show
    for wrong in (wrong_accept_argmax, wrong_accept_no_residual):
        monkeypatch.setattr(ref, "speculative_accept", wrong)
        s = Sampling(**warp, generator=torch.Generator().manual_seed(2))
        assert min(fit_pvalues(sampled_triples(m, prompt, s, 3000), exact)) < 1e-3, wrong.__name__


def test_warp_top_k_top_p():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    p = ref.warp(logits, 1.0, top_k=3)
    assert (p[3:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)
    p = ref.warp(logits, 1.0, top_p=0.9)
    k = int((full.cumsum(0) < 0.9).sum()) + 1  # smallest prefix reaching 0.9
    assert (p[:k] > 0).all() and (p[k:] == 0).all()
