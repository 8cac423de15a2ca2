"""The llama-cpp-python side: OrthrusDraft inside llama_cpp.Llama, the prefix cache, the
OpenAI shapes and logprobs of Orthrus, and the typed step stream."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from orthrus_gguf import Orthrus, OrthrusDraft, OrthrusError, Step
from orthrus_gguf.demo import converted, embedded_model
from orthrus_gguf.llama_draft import set_exact

from llama_cpp import Llama  # after orthrus_gguf: either order works (test_import_order)


@pytest.fixture(scope="module")
def tiny_path():
    return converted(embedded_model(), "f16")


@pytest.fixture(scope="module")
def prompts():
    p = json.loads((embedded_model() / "heldout_prompts.json").read_text())
    return p["code"][:5] + p["math"][:5]


# ---- OrthrusDraft: Llama(draft_model=OrthrusDraft())

def test_orthrus_draft_equals_plain_llama(tiny_path, prompts):
    """Greedy text of Llama with Orthrus drafting = plain Llama, on 10 held-out prompts, with
    both contexts on the exact CPU kernels (batched and one-token forwards then agree bit for
    bit), and drafts were really kept."""
    llm = OrthrusDraft.llama(tiny_path, block_size=8, exact="all", n_ctx=512, n_threads=2, verbose=False)
    plain = Llama(model_path=str(tiny_path), n_ctx=512, n_threads=2, verbose=False)
    set_exact(plain, "all")
    try:
        for p in prompts:
            ours = llm.create_completion(p, max_tokens=48, temperature=0)["choices"][0]["text"]
            theirs = plain.create_completion(p, max_tokens=48, temperature=0)["choices"][0]["text"]
            assert ours == theirs, p
        st = llm.draft_model.stats
        assert st["drafts"] > 0 and st["accepted"] > 0, st
    finally:
        llm.close()
        plain.close()


def test_orthrus_draft_chat_stream_and_auto(tiny_path):
    """create_chat_completion and stream=True run with drafting; the default (auto length,
    exact verify) gives the same chat text as the same Llama drafting a fixed block."""
    msgs = [{"role": "user", "content": "Q: 12 + 35 = ?"}]
    auto = OrthrusDraft.llama(tiny_path, n_ctx=512, n_threads=2, verbose=False)
    fixed = OrthrusDraft.llama(tiny_path, block_size=4, n_ctx=512, n_threads=2, verbose=False)
    try:
        assert auto.draft_model.exact == "verify"
        a = auto.create_chat_completion(msgs, max_tokens=24, temperature=0)
        f = fixed.create_chat_completion(msgs, max_tokens=24, temperature=0)
        assert a["choices"][0]["message"]["content"] == f["choices"][0]["message"]["content"]
        chunks = list(fixed.create_chat_completion(msgs, max_tokens=24, temperature=0, stream=True))
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == f["choices"][0]["message"]["content"]
        assert fixed.draft_model.stats["accepted"] > 0
    finally:
        auto.close()
        fixed.close()


def test_orthrus_draft_refuses_a_plain_gguf_and_an_unbound_call(tiny_gguf, tmp_path):
    from test_native import plain_qwen3_copy
    plain = plain_qwen3_copy(tiny_gguf("f32", tied=False), tmp_path / "plain.gguf")
    with pytest.raises(OrthrusError, match="architecture 'qwen3' has no diffusion view; OrthrusDraft needs"):
        OrthrusDraft.llama(plain, n_ctx=256, verbose=False)
    with pytest.raises(OrthrusError, match="not bound to a Llama"):
        OrthrusDraft()(np.array([1, 2], dtype=np.intc))
    with pytest.raises(OrthrusError, match="block_size must be an integer >= 2 or 'auto'"):
        OrthrusDraft(block_size=1)


def test_import_order(tiny_path):
    """`import llama_cpp` before orthrus_gguf finds the patched build (orthrus-gguf build links
    it into llama_cpp/lib), in a fresh interpreter without LLAMA_CPP_LIB_PATH."""
    code = ("import llama_cpp\nfrom orthrus_gguf import OrthrusDraft\n"
            f"llm = OrthrusDraft.llama({str(tiny_path)!r}, block_size=4, n_ctx=256, n_threads=1, verbose=False)\n"
            "print(llm('Q: 1 + 1 = ?', max_tokens=8, temperature=0)['choices'][0]['text'] != '', "
            "llm.draft_model.drafts > 0)\n")
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True"]


# ---- the prefix cache

@pytest.fixture(scope="module")
def m(tiny_path):
    with Orthrus(tiny_path, n_ctx=1024, n_threads=2, block_size=8) as m:
        yield m


def test_an_extended_prompt_prefills_only_the_new_tokens(m, prompts):
    p = m.tokenize(prompts[0])
    m.reset()
    r1 = m.generate(p, max_tokens=20)
    assert r1.stats["cached_tokens"] == 0 and r1.stats["prefilled_tokens"] == len(p)
    extra = m.tokenize(" # and then")
    p2 = p + r1.tokens + extra
    r2 = m.generate(p2, max_tokens=20)
    # the cache held the prompt and the output but its last token (never decoded)
    assert r2.stats["cached_tokens"] == len(p) + len(r1.tokens) - 1
    assert r2.stats["prefilled_tokens"] == len(extra) + 1
    # a prompt that leaves the cached one after 5 tokens reuses those 5 only
    r3 = m.generate(p[:5] + extra, max_tokens=4)
    assert r3.stats["cached_tokens"] == 5
    # the same prompt again: all but its last token, whose logits the first pick needs
    r4 = m.generate(p[:5] + extra, max_tokens=4)
    assert r4.stats["cached_tokens"] == 4 + len(extra)
    m.reset()
    assert m.generate(p, max_tokens=2).stats["cached_tokens"] == 0


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, seed=3)])
def test_a_cached_call_is_a_call_from_that_state(m, prompts, sampling):
    """From the same cached state (the same first call), a cached Orthrus call returns token
    for token what mode="ar" returns (greedy), and is reproducible (seeded sampling)."""
    def second(mode):
        m.reset()
        r1 = m.generate(prompts[1], max_tokens=24)
        r2 = m.generate(m.tokenize(prompts[1]) + r1.tokens + m.tokenize("\n"), max_tokens=32, mode=mode,
                        **sampling)
        assert r2.stats["cached_tokens"] > 0
        return r2.tokens
    o = second("orthrus")
    assert o == second("orthrus")
    if not sampling:
        assert o == second("ar")


def test_exact_prefill_makes_a_cached_call_a_fresh_call(tiny_path, prompts):
    """exact="all": every forward on the batch-invariant kernels, so a prompt decoded partly
    from the cache gives what a fresh object gives (greedy and seeded), token for token."""
    with Orthrus(tiny_path, n_ctx=1024, n_threads=2, exact="all") as a, \
            Orthrus(tiny_path, n_ctx=1024, n_threads=2, exact="all") as b:
        for p in prompts[:4]:
            r1 = a.generate(p, max_tokens=24)
            p2 = a.tokenize(p) + r1.tokens + a.tokenize("\nQ:")
            for kw in (dict(), dict(temperature=0.8, seed=11)):
                cached = a.generate(p2, max_tokens=24, **kw)
                b.reset()
                fresh = b.generate(p2, max_tokens=24, **kw)
                assert cached.stats["cached_tokens"] > 0 and fresh.stats["cached_tokens"] == 0
                assert cached.tokens == fresh.tokens, (p, kw)


# ---- Llama's shapes on Orthrus

def test_create_completion_shapes_and_logprobs(m, prompts):
    """__call__ = create_completion, Llama's return shape; logprobs are the log-softmax of the
    verify rows, the same numbers mode="ar" reports from one-token forwards."""
    m.reset()
    r = m(prompts[2], max_tokens=12, temperature=0, logprobs=3)
    assert r["object"] == "text_completion" and r["choices"][0]["finish_reason"] in ("stop", "length")
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == r["usage"]["completion_tokens"]
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert all(len(t) >= 3 and max(t.values()) <= 0 for t in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    m.reset()
    ar = m(prompts[2], max_tokens=12, temperature=0, logprobs=3, mode="ar")["choices"][0]["logprobs"]
    assert ar["tokens"] == lp["tokens"]
    assert np.allclose(ar["token_logprobs"], lp["token_logprobs"], atol=1e-5)
    chunks = list(m(prompts[2], max_tokens=12, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == r["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]
    json.dumps(r)
    with pytest.raises(OrthrusError, match="echo is not supported by Orthrus; llama_cpp.Llama with draft_model"):
        m(prompts[2], echo=True)
    with pytest.raises(OrthrusError, match="unknown argument 'bogus'"):
        m(prompts[2], bogus=1)


def test_chat_logprobs(m):
    r = m.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
                                 logprobs=True, top_logprobs=2)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)


def test_the_step_stream_folds_into_generate(m, prompts):
    """steps() yields typed records; generate is their fold; the finish reason lives in the
    stream; a paused stream whose cache another call took refuses to go on (no wrong text)."""
    pieces = list(m.steps(prompts[3], max_tokens=30))
    assert all(isinstance(p.step, Step) for p in pieces)
    assert pieces[0].step.block == 0 and pieces[0].step.prefilled + pieces[0].step.cached > 0
    assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    r = m.generate(prompts[3], max_tokens=30)
    assert [t for p in pieces for t in p.step.tokens] == r.tokens
    assert "".join(p.text for p in pieces) == r.text and pieces[-1].finish_reason == r.finish_reason
    assert sum(p.step.accepted for p in pieces) == sum(s["accepted"] for s in r.stats["steps_detail"])
    a = m.steps(prompts[3], max_tokens=30)
    next(a)
    assert list(m.steps(prompts[4], max_tokens=5))[-1].finish_reason == "length"
    with pytest.raises(OrthrusError, match="another generation ran on this model while this one was paused"):
        next(a)
    assert m.generate(prompts[3], max_tokens=30).tokens == r.tokens  # and the object still works


def test_constructor_parity(tiny_path):
    with Orthrus(tiny_path, n_ctx=512, n_batch=128, n_ubatch=64, flash_attn=False, type_k="q8_0",
                 type_v="f16", seed=5, n_threads=2) as a:
        assert (a.native.n_batch, a.native.n_ubatch) == (128, 64)
        assert a.native.n_outputs_max == a.block_size == 32  # reserves logits for a block, not n_batch
        t1 = a.generate("Q: 1 + 2 = ?", max_tokens=8, temperature=1.0).tokens
    with Orthrus(tiny_path, n_ctx=512, seed=5, n_threads=2) as b:
        assert b.generate("Q: 1 + 2 = ?", max_tokens=8, temperature=1.0).tokens == t1  # the seed carries
    with pytest.raises(OrthrusError, match="n_ubatch \\(16\\) must be at least the GGUF's block size"):
        Orthrus(tiny_path, n_ubatch=16)
    with pytest.raises(OrthrusError, match="KV cache type must be one of"):
        Orthrus(tiny_path, type_k="q3")
    assert Orthrus(tiny_path, n_ctx=256).tokenize(b"abc") == Orthrus(tiny_path, n_ctx=256).tokenize("abc")


def test_defaults_are_llamas():
    """Orthrus' Llama-shaped methods take llama_cpp.Llama's defaults."""
    import inspect
    for name in ("create_completion", "create_chat_completion"):
        ours = inspect.signature(getattr(Orthrus, name)).parameters
        theirs = inspect.signature(getattr(Llama, name)).parameters
        for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "frequency_penalty",
                  "presence_penalty", "max_tokens", "seed"):
            assert ours[k].default == theirs[k].default, (name, k)


GRAMMAR = r'''root ::= "The answer is " [0-9]+ ("." [0-9])? "\n" [a-z ]+'''


def test_grammar_constrains_and_matches_llama(tiny_path):
    """A GBNF grammar: Orthrus keeps drafts by token matching and its greedy text equals
    mode="ar" and llama_cpp.Llama with the same grammar (exact kernels on both)."""
    from llama_cpp import LlamaGrammar
    prompt = "Q: 97 * 30 = ?\nA:"
    with Orthrus(tiny_path, n_ctx=512, n_threads=2, exact="all", block_size=8) as o:
        ours = o.generate(prompt, max_tokens=24, grammar=GRAMMAR)
        o.reset()
        ar = o.generate(prompt, max_tokens=24, grammar=LlamaGrammar.from_string(GRAMMAR, verbose=False), mode="ar")
        sampled = o.generate(prompt, max_tokens=24, grammar=GRAMMAR, temperature=1.0, seed=1)
        with pytest.raises(OrthrusError, match="does not parse as llama.cpp GBNF"):
            o.generate(prompt, max_tokens=4, grammar="root ::= (")
    assert ours.text.startswith("The answer is ") and ours.text[14].isdigit(), ours.text
    assert sampled.text.startswith("The answer is ")
    assert ours.tokens == ar.tokens
    assert any(s["block"] >= 2 for s in ours.stats["steps_detail"])
    plain = Llama(model_path=str(tiny_path), n_ctx=512, n_threads=2, verbose=False)
    set_exact(plain, "all")
    try:
        theirs = plain.create_completion(prompt, max_tokens=24, temperature=0,
                                         grammar=LlamaGrammar.from_string(GRAMMAR, verbose=False))
    finally:
        plain.close()
    assert theirs["choices"][0]["text"] == ours.text
    llm = OrthrusDraft.llama(tiny_path, block_size=8, exact="all", n_ctx=512, n_threads=2, verbose=False)
    try:  # and Llama with Orthrus drafting under the same grammar
        drafted = llm.create_completion(prompt, max_tokens=24, temperature=0,
                                        grammar=LlamaGrammar.from_string(GRAMMAR, verbose=False))
    finally:
        llm.close()
    assert drafted["choices"][0]["text"] == ours.text
