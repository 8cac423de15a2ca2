"""Orthrus decoding over the patched llama.cpp: lossless, oracle parity, sampling, API, errors."""
import json

import numpy as np
import pytest
import torch

from orthrus_gguf.api import Orthrus
from orthrus_gguf.errors import OrthrusError
from orthrus_gguf.reference import OrthrusModel, generate_ar, generate_orthrus

# 24 prompts of 1 to 90 tokens; the tiny random models of conftest have peaked outputs
# (weights std 0.5, embeddings x8), so top-2 logit margins are far above the ~1e-3 relative
# differences between batched and one-token kernels measured in docs/LLAMA_CPP.md.
PROMPTS = [list(range(3 + i, 3 + i + n)) for i, n in enumerate(
    [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 4, 6, 7, 9, 10, 12, 15, 17, 19, 25, 30, 40, 50, 70])]
Q4_MODEL = dict(hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn=512, block_size=16, tied=False)


@pytest.fixture(scope="module")
def f32_model(tiny_gguf):
    with Orthrus(tiny_gguf("f32", tied=False), n_ctx=512, n_threads=2) as m:
        yield m


@pytest.mark.parametrize("outtype,kw", [("f32", dict(tied=False)), ("q8_0", Q4_MODEL), ("q4_k_m", Q4_MODEL)])
def test_greedy_orthrus_is_token_identical_to_ar(tiny_gguf, outtype, kw):
    with Orthrus(tiny_gguf(outtype, **kw), n_ctx=512, n_threads=2) as m:
        assert m.exact == "verify"  # the CPU default: exact verify forwards, prompts on the fast kernels
        for prompt in PROMPTS:
            m.reset()  # both from an empty cache (prefix reuse has its own tests)
            ar = m.generate(prompt, max_tokens=48, mode="ar")
            m.reset()
            o = m.generate(prompt, max_tokens=48)
            assert o.tokens == ar.tokens, (outtype, prompt)
            assert len(o.tokens) == 48 or o.finish_reason == "stop"


@pytest.mark.parametrize("kw", [dict(tied=False), dict(tied=True, n_kv_heads=1, head_dim=32, n_heads=2),
                                dict(block_size=4)])
def test_same_as_the_oracle(tiny_ckpt, tiny_gguf, kw):
    """f32: the same tokens, the same drafts and the same accepted counts per step as the
    PyTorch reference."""
    ref = OrthrusModel.from_pretrained(tiny_ckpt(**kw))
    with Orthrus(tiny_gguf("f32", **kw), n_ctx=512, n_threads=2) as m:
        for prompt in PROMPTS[::4]:
            o = m.generate(prompt, max_tokens=40)
            r = generate_orthrus(ref, prompt, 40, eos=[302])
            assert o.tokens == r.tokens
            assert [s["drafted"] for s in o.stats["steps_detail"]] == [s.drafted for s in r.steps]
            assert [s["accepted"] for s in o.stats["steps_detail"]] == [s.accepted for s in r.steps]
            assert o.tokens == generate_ar(ref, prompt, 40, eos=[302]).tokens


def test_drafts_get_accepted_on_a_model_that_agrees_with_itself(tiny_ckpt, tmp_path):
    """Token 11 is always the argmax (see test_reference): every draft is accepted, so
    the loop's bookkeeping over full blocks is exercised through llama.cpp too."""
    from safetensors.torch import load_file, save_file
    from orthrus_gguf.convert import convert
    src = tiny_ckpt(tied=False, block_size=8)
    dst = tmp_path / "agree"
    import shutil
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    for k in sd:
        if k.endswith(("o_proj.weight", "o_proj_diff.weight", "down_proj.weight")):
            sd[k].zero_()
    sd["model.embed_tokens.weight"][:, 0] = 1.0
    sd["lm_head.weight"].zero_()
    sd["lm_head.weight"][11, 0] = 1.0
    save_file(sd, str(dst / "model.safetensors"))
    with Orthrus(convert(dst, tmp_path / "agree.gguf", "f32", progress=False), n_ctx=256, n_threads=2) as m:
        r = m.generate([3, 4], max_tokens=30)
    assert r.tokens == [11] * 30
    assert [s["accepted"] for s in r.stats["steps_detail"]] == [7, 7, 7, 4]
    assert r.stats["tokens_per_step"] == 29 / 4 and r.stats["forwards"] == 8


def test_auto_block_is_lossless_and_reports_costs(f32_model):
    d, v = f32_model.calibrate()
    assert set(v) >= {1, 2, 4, 8} and all(x > 0 for x in v.values())
    for prompt in PROMPTS[:6]:
        a = f32_model.generate(prompt, max_tokens=40, block_size="auto")
        assert a.tokens == f32_model.generate(prompt, max_tokens=40, mode="ar").tokens


def test_stats(f32_model):
    r = f32_model.generate(PROMPTS[5], max_tokens=40)
    s = r.stats
    assert s["tokens"] == len(r.tokens) == 40
    assert s["steps"] == len(s["steps_detail"])
    # two forwards per step, one for the last step when a single token is left to emit
    assert s["forwards"] == sum(2 if st["block"] >= 2 else 1 for st in s["steps_detail"])
    assert s["steps_detail"][-1]["block"] == min(8, 40 - sum(st["accepted"] + 1 for st in s["steps_detail"][:-1]) - 1)
    assert sum(k * v for k, v in s["tokens_per_step_histogram"].items()) == 39
    assert s["time_draft_s"] > 0 and s["time_verify_s"] > 0 and s["time_python_s"] >= 0
    ar = f32_model.generate(PROMPTS[5], max_tokens=40, mode="ar").stats
    assert ar["forwards"] == ar["steps"] == 39 and ar["time_draft_s"] == 0


def test_stream_equals_generate_and_text_roundtrip(f32_model):
    for mode in ("ar", "orthrus"):
        r = f32_model.generate("def f(x):", max_tokens=30, mode=mode)
        assert "".join(f32_model.stream("def f(x):", max_tokens=30, mode=mode)) == r.text
        assert r.text == f32_model.detokenize(r.tokens).decode("utf-8", errors="replace")


def test_max_tokens_exact_and_eos(f32_model):
    for n in (1, 2, 3, 17):
        assert len(f32_model.generate(PROMPTS[7], max_tokens=n).tokens) == n
    full = f32_model.generate(PROMPTS[7], max_tokens=40, mode="ar").tokens
    eos_tok = full[12]
    f32_model.native._eog[eos_tok] = True  # pretend this token ends generation
    try:
        r = f32_model.generate(PROMPTS[7], max_tokens=40)
    finally:
        del f32_model.native._eog[eos_tok]
    assert r.tokens == full[: full.index(eos_tok) + 1] and r.finish_reason == "stop"


def test_stop_strings(f32_model):
    text = f32_model.generate("abc", max_tokens=40, mode="ar").text
    stop = text[10:13]
    r = f32_model.generate("abc", max_tokens=40, stop=[stop])
    assert r.text == text[: text.index(stop)] and r.finish_reason == "stop"
    assert "".join(f32_model.stream("abc", max_tokens=40, stop=stop)) == r.text


def test_chat_completion(f32_model):
    msgs = [{"role": "user", "content": "hello"}]
    prompt = f32_model.apply_chat_template(msgs)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    r = f32_model.create_chat_completion(msgs, max_tokens=12, temperature=0)
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"]["content"] == f32_model.generate(prompt, max_tokens=12).text
    chunks = list(f32_model.create_chat_completion(msgs, max_tokens=12, temperature=0, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == r["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]
    json.dumps(r)


# ---- sampling through llama.cpp: exact in distribution

def exact_pairs(ref, prompt, warp_probs, support):
    from orthrus_gguf.reference import KVCache
    cache = KVCache()
    p1 = warp_probs(ref.forward_ar(torch.tensor(prompt), cache)[-1:].numpy())[0]
    joint = {}
    for x1 in np.flatnonzero(p1):
        c = KVCache(list(cache.k), list(cache.v))
        p2 = warp_probs(ref.forward_ar(torch.tensor([int(x1)]), c)[-1:].numpy())[0]
        for x2 in np.flatnonzero(p2):
            joint[(int(x1), int(x2))] = p1[x1] * p2[x2]
    return joint


def test_sampled_orthrus_matches_ar_distribution(tiny_ckpt, tiny_gguf):
    """3000 Orthrus samples of (x1, x2) with top-k 4 against the exact AR joint from the
    f32 reference (llama.cpp f32 logits agree with it to ~1e-5, far below sampling noise).
    Chi-square p > 1e-3: a false alarm about 1 run in 1000. Acceptance of speculative
    sampling and of token matching is reported (both are exact in distribution)."""
    from orthrus_gguf.sampling import Sampler
    from test_reference import chi2_pvalue
    kw = dict(tied=False, block_size=4)
    ref = OrthrusModel.from_pretrained(tiny_ckpt(**kw))
    s = Sampler(temperature=1.5, top_k=4)
    exact = exact_pairs(ref, [5, 6, 7], s.probs, 4)
    cells = sorted(exact)
    acceptance = {}
    with Orthrus(tiny_gguf("f32", **kw), n_ctx=128, n_threads=1) as m:
        for rule in ("speculative", "match"):
            counts, drafted, accepted = np.zeros(len(cells)), 0, 0
            for i in range(3000):
                r = m.generate([5, 6, 7], max_tokens=3, temperature=1.5, top_k=4, seed=i, rule=rule)
                counts[cells.index(tuple(r.tokens[:2]))] += 1
                drafted += sum(len(st["drafted"]) for st in r.stats["steps_detail"])
                accepted += sum(st["accepted"] for st in r.stats["steps_detail"])
            probs = torch.tensor([exact[c] for c in cells], dtype=torch.float64)
            assert chi2_pvalue(counts, probs) > 1e-3, rule
            acceptance[rule] = accepted / drafted
    print(f"\nacceptance at T=1.5, top-k 4: speculative {acceptance['speculative']:.3f}, "
          f"token matching {acceptance['match']:.3f}")
    assert acceptance["speculative"] >= acceptance["match"] - 0.02


# ---- bad input

def test_bad_input(f32_model, tmp_path):
    with pytest.raises(OrthrusError, match="no such file"):
        Orthrus(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(OrthrusError, match="not a GGUF file"):
        Orthrus(junk)
    m = f32_model
    for kw, msg in [(dict(temperature=-1), "temperature must be >= 0"),
                    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), r"top_p must be in"),
                    (dict(max_tokens=2.5), "max_tokens must be an integer >= 1"),
                    (dict(temperature=float("nan")), "temperature must be a finite number"),
                    (dict(top_k=2.5), "top_k must be an integer >= 0"),
                    (dict(min_p=2), r"min_p must be in \[0, 1\]"),
                    (dict(stop=5), "stop must be a string or a list of strings"),
                    (dict(logit_bias=[1]), "logit_bias must be a dict"),
                    (dict(logit_bias={10**6: 1.0}), "logit_bias names token 1000000"),
                    (dict(seed=-1), "seed must be an integer >= 0"),
                    (dict(banana=1), "unknown argument 'banana'"),
                    (dict(block_size=1), r"block_size must be an integer in \[2, 8\]"),
                    (dict(block_size=9), r"block_size must be an integer in \[2, 8\]"),
                    (dict(block_size="x"), "block_size must be an integer or 'auto'"),
                    (dict(mode="fast"), "mode must be one of"),
                    (dict(max_tokens=508), r"exceeds the context of 512 tokens")]:
        with pytest.raises(OrthrusError, match=msg):
            m.generate(PROMPTS[3], **kw)
    assert m.generate(PROMPTS[3], max_tokens=5).tokens  # still usable


def test_plain_qwen3_gguf_runs_ar_and_refuses_orthrus(tiny_gguf, tmp_path):
    from test_native import plain_qwen3_copy
    plain = plain_qwen3_copy(tiny_gguf("f32", tied=False), tmp_path / "plain.gguf")
    with Orthrus(plain, n_ctx=256, n_threads=2) as m:
        assert m.arch == "qwen3"
        ar = m.generate(PROMPTS[4], max_tokens=12, mode="ar")
        assert len(ar.tokens) == 12
        with pytest.raises(OrthrusError, match="architecture 'qwen3' has no diffusion view"):
            m.generate(PROMPTS[4], max_tokens=12)
    with Orthrus(tiny_gguf("f32", tied=False), n_ctx=256, n_threads=2) as m:
        assert m.generate(PROMPTS[4], max_tokens=12, mode="ar").tokens == ar.tokens  # same weights
