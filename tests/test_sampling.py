"""The sampler chain is llama.cpp's: the same distribution as llama.cpp's own samplers on the
same logits, exactly (within float32 rounding) and in distribution end to end."""
import ctypes
import json
import math

import numpy as np
import pytest
import torch

from orthrus_gguf import native
from orthrus_gguf.api import Orthrus
from orthrus_gguf.demo import converted, embedded_model
from orthrus_gguf.reference import warp
from orthrus_gguf.sampling import Sampler


def llama_cpp_distribution(logits, history=(), temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                           repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
                           penalty_last_n=64, logit_bias=None):
    """The distribution llama.cpp's dist sampler draws from after its own chain (logit bias,
    penalties, top-k, top-p, min-p, temperature; common/sampling.cpp's order), on one row."""
    lc = native.load().llama_cpp
    v = logits.size
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    try:
        if logit_bias:
            arr = (lc.llama_logit_bias * len(logit_bias))(*[lc.llama_logit_bias(t, b) for t, b in logit_bias.items()])
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(v, len(logit_bias), arr))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(
            v, penalty_last_n, repeat_penalty, frequency_penalty, presence_penalty))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(top_k))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(min_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(temperature))
        for t in history:
            lc.llama_sampler_accept(chain, int(t))
        data = (lc.llama_token_data * v)(*[lc.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits)])
        cur = lc.llama_token_data_array(data=data, size=v, selected=-1, sorted=False)
        lc.llama_sampler_apply(chain, ctypes.byref(cur))
        ids = np.array([cur.data[i].id for i in range(cur.size)])
        x = np.array([cur.data[i].logit for i in range(cur.size)], dtype=np.float64)
    finally:
        lc.llama_sampler_free(chain)
    p = np.zeros(v)
    x = np.where(np.isfinite(x), x, -np.inf)
    p[ids] = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    return p


def chi2_pvalue(counts, probs):
    e = probs * counts.sum()
    keep = e > 5  # pool the sparse cells, so the chi-square approximation holds
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(e[keep], e[~keep].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def temperature_first(logits, temperature, top_k, top_p):
    """The order this project used to apply (temperature, then top-k, then top-p)."""
    x = torch.tensor(logits, dtype=torch.float64) / temperature
    kth = x.topk(top_k).values[-1]
    x = x.masked_fill(x < kth, -math.inf)
    p = x.softmax(-1)
    sp, idx = p.sort(descending=True)
    sp = sp.masked_fill(sp.cumsum(-1) - sp >= top_p, 0.0)
    return (torch.zeros_like(p).scatter(-1, idx, sp) / sp.sum()).numpy()


PARAMS = [dict(temperature=0.8), dict(temperature=0.7, top_p=0.8), dict(temperature=1.5, top_k=10, top_p=0.9, min_p=0.0),
          dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1),
          dict(temperature=0.9, repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.5, penalty_last_n=8),
          dict(temperature=1.2, logit_bias={3: 2.5, 7: -1.0, 11: -math.inf}, repeat_penalty=0.8)]


@pytest.mark.parametrize("params", PARAMS)
def test_chain_equals_llama_cpp_samplers(params):
    """Sampler.probs on a row = llama.cpp's chain on the same logits (float32 there, float64
    here: 1e-6 absolute is ~10 float32 ulps of the largest probability)."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(300) * 2.5).astype(np.float32)
    history = rng.integers(0, 40, size=20)
    ours = Sampler(**params).probs(logits[None], history)[0]
    theirs = llama_cpp_distribution(logits, history, **params)
    assert np.abs(ours - theirs).max() < 1e-6
    assert (ours > 0).sum() == (theirs > 0).sum()


def test_reference_warp_is_the_same_chain():
    """The PyTorch reference warps in llama.cpp's order too (its sampling tests stay the spec)."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((4, 200)) * 3).astype(np.float32)
    for t, k, p in ((0.7, 20, 0.8), (1.5, 0, 0.9), (1.0, 5, 1.0)):
        ref = warp(torch.tensor(logits), t, top_k=k, top_p=p).double().numpy()
        ours = Sampler(temperature=t, top_k=k, top_p=p, min_p=0.0).probs(logits)
        assert np.abs(ref - ours).max() < 1e-6


def test_draft_rows_see_the_drafts_before_them_in_the_penalty_window():
    """Row i of a block follows d[:i]: its penalties count them (llama.cpp would have accepted
    them into its sampler before sampling row i), over the last penalty_last_n tokens."""
    logits = np.zeros((3, 10), dtype=np.float32) + np.arange(10, dtype=np.float32)
    s = Sampler(temperature=1.0, presence_penalty=5.0, penalty_last_n=2)
    x = s.adjust(logits, history=[1, 2, 3], drafts=[9, 8])
    assert list(x[:, 9]) == [9, 4, 4]  # 9 from row 1 on
    assert list(x[:, 8]) == [8, 8, 3]  # 8 from row 2 on
    # windows of the last 2: [2, 3], [3, 9], [9, 8]
    assert list(x[:, 2]) == [-3, 2, 2] and list(x[:, 3]) == [-2, -2, 3] and list(x[:, 1]) == [1, 1, 1]


@pytest.fixture(scope="module")
def tiny_f16():
    with Orthrus(converted(embedded_model(), "f16"), n_ctx=512, n_threads=2, seed=7, block_size=4) as m:
        yield m


def test_first_tokens_match_llama_cpp_in_both_modes(tiny_f16):
    """The same position sampled 2000 times in mode="ar" (the first token after prompt + x1)
    and in Orthrus mode (the prompt alone: x1 has probability 1 under these parameters, so the
    second token is the first one Orthrus drafts and verifies, by speculative sampling, in a
    block of 2),
    against llama.cpp's chain on that row's logits: p > 1e-3 for both (a false alarm about 1
    run in 500); against the old temperature-first order the same samples give p < 1e-6, so
    the test can tell the orders apart (their total variation here: 0.28)."""
    m, nm = tiny_f16, tiny_f16.native
    params = dict(temperature=1.5, top_k=40, top_p=0.8, min_p=0.0)
    prompt = m.tokenize(json.loads((embedded_model() / "heldout_prompts.json").read_text())["code"][0])
    nm.clear()
    nm.prefill(prompt)
    first = llama_cpp_distribution(nm.logits(1)[0].copy(), prompt, **params)
    assert first.max() == 1.0  # x1 is certain
    x1 = int(first.argmax())
    nm.clear()
    nm.prefill(prompt + [x1])
    row = nm.logits(1)[0].copy()
    want = llama_cpp_distribution(row, prompt + [x1], **params)
    old = temperature_first(row, params["temperature"], params["top_k"], params["top_p"])
    assert 0.5 * np.abs(want - old).sum() > 0.2 and (want > 0).sum() >= 3
    for mode in ("ar", "orthrus"):
        counts = np.zeros(nm.n_vocab)
        drafted = 0
        for _ in range(2000):
            if mode == "ar":
                r = m.generate(prompt + [x1], max_tokens=1, mode="ar", **params)
                counts[r.tokens[0]] += 1
            else:
                r = m.generate(prompt, max_tokens=3, **params)  # x1, then a block of 2
                assert r.tokens[0] == x1
                counts[r.tokens[1]] += 1
                drafted += r.stats["steps_detail"][0]["block"] >= 2
        assert mode == "ar" or drafted == 2000  # every second token went through the acceptance rule
        assert chi2_pvalue(counts, want) > 1e-3, mode
        assert chi2_pvalue(counts, old) < 1e-6, mode


def test_greedy_drafts_under_penalties_see_the_drafts_before_them():
    """Each drafted row is picked after the drafts before it, penalties included: with every
    row preferring token 9 and a presence penalty, the second draft is not 9 again."""
    logits = np.zeros((3, 10), dtype=np.float32) + np.arange(10, dtype=np.float32)
    s = Sampler(temperature=0.0, presence_penalty=5.0, penalty_last_n=4)
    d, q = s.sample_rows(logits, history=[1, 2], n=3)
    assert q is None and list(d) == [9, 8, 7]
