"""Backend sampling: greedy picks computed in the graph, on the output layer's device.

With a greedy sampler chain attached (llama_set_sampler, llama.cpp's backend sampling), a
forward sends back one token id per row instead of n_vocab floats, and the argmax runs where
the logits are. NativeModel turns it on for plain greedy decoding where layers are offloaded;
here it is forced on the CPU, where ggml_argmax computes the same picks as the host's argmax
on rows without ties (ggml's CPU kernel keeps the last of tied maxima, the host the first;
the rows of these random models have none, which each test checks before it compares).

ORTHRUS_TEST_GPU_LAYERS=-1 (the device check) runs the tests that are not about the CPU's
exact kernels offloaded, where the argmax runs on the GPU.
"""
import re
from pathlib import Path

import numpy as np
import pytest

from orthrus_gguf import native
from orthrus_gguf.api import Orthrus
from orthrus_gguf.errors import OrthrusError
from orthrus_gguf.native import NativeModel
from test_decode import PROMPTS, Q4_MODEL
from test_graphs import BLOCK, PROMPT, steady_steps
from test_native import GPU_LAYERS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tiny_gguf):
    return tiny_gguf("f32", tied=False)


def open_pair(path, **kw):
    kw = dict(dict(n_ctx=512, n_batch=64, n_threads=2, n_gpu_layers=GPU_LAYERS), **kw)
    return NativeModel(path, backend_sampling=True, **kw), NativeModel(path, backend_sampling=False, **kw)


def assert_no_ties(logits):
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] > top2[:, 0]).all(), "a row has tied maxima: the two rules may differ there"


def test_device_picks_are_the_host_argmax(model_path):
    dev, host = open_pair(model_path)
    with dev, host:
        assert dev.set_backend_sampling(True) and dev.backend_sampling
        prompt = np.arange(100, dtype=np.int32) * 7 % 250 + 3  # two n_batch chunks
        for m in (dev, host):
            m.prefill(prompt)
        assert_no_ties(host.logits(1))
        assert dev.argmax(1).tolist() == host.argmax(1).tolist()
        p = prompt.size
        for w in (2, 8, 5, 8):
            for m in (dev, host):
                m.draft(7, p, w)
            assert_no_ties(host.logits(w))
            assert np.array_equal(dev.argmax(w), host.argmax(w))
            toks = np.arange(w, dtype=np.int32) + 11
            for m in (dev, host):
                m.verify(toks, p)
            assert_no_ties(host.logits(w))
            assert np.array_equal(dev.argmax(w), host.argmax(w))
            assert np.array_equal(dev.argmax(2), host.argmax(2))  # a prefix of the rows
            for m in (dev, host):
                m.seq_rm(p)


def test_logits_are_refused_after_an_ids_only_decode(model_path):
    dev, host = open_pair(model_path)
    with dev, host:
        host.close()
        dev.set_backend_sampling(True)
        dev.prefill([3, 4, 5])
        with pytest.raises(OrthrusError, match=r"token ids only .*set_backend_sampling\(False\)"):
            dev.logits(1)
        with pytest.raises(OrthrusError, match="token ids only"):
            dev.margin()
        assert dev.set_backend_sampling(False) is False
        with pytest.raises(OrthrusError, match="token ids only"):  # still the same decode
            dev.logits(1)
        dev.verify(np.array([6], dtype=np.int32), 3)
        assert np.isfinite(dev.logits(1)).all()
        assert dev.argmax(1)[0] == int(np.argmax(dev.logits(1)[0]))


def test_default_only_where_the_logits_copy_is_worth_saving():
    """On by default where layers are offloaded and rows are wide: a Qwen3 vocabulary, not
    orthrus-tiny's (per row it saves n_vocab floats and adds a node and a copy)."""
    from orthrus_gguf.native import BACKEND_SAMPLING_MIN_VOCAB, default_backend_sampling
    assert default_backend_sampling(True, 151936)
    assert not default_backend_sampling(True, 4096)
    assert not default_backend_sampling(False, 151936)
    assert 4096 < BACKEND_SAMPLING_MIN_VOCAB <= 32768


def test_a_model_without_it_stays_on_the_host(model_path):
    # the default on a CPU: n_gpu_layers=0 offloads nothing, so there is no chain to attach
    with NativeModel(model_path, n_ctx=256, n_batch=64, n_threads=2, n_gpu_layers=0) as nm:
        assert nm.set_backend_sampling(True) is False and not nm.backend_sampling
        nm.prefill([3, 4, 5])
        assert np.isfinite(nm.logits(1)).all()


def test_a_bad_setting_is_an_error_before_loading(model_path):
    with pytest.raises(OrthrusError, match="backend_sampling must be True, False or None"):
        Orthrus(model_path, backend_sampling="yes")


def test_the_c_api_says_when_no_row_was_sampled(model_path):
    import ctypes
    with NativeModel(model_path, n_ctx=256, n_batch=64, n_threads=2, n_gpu_layers=0) as nm:
        nm.prefill([3, 4, 5])
        out = (ctypes.c_int32 * 4)()
        assert nm.n.orthrus_sampled(nm.ctx, 1, out) == native.ERR_NOT_SAMPLED
        assert "no backend-sampled token" in nm.n.orthrus_strerror(native.ERR_NOT_SAMPLED).decode()
        assert nm.n.orthrus_sampled(nm.ctx, 2, out) == native.ERR_ROWS  # one row of outputs
        assert nm.n.orthrus_sampled(nm.ctx, -1, out) == native.ERR_ARG


@pytest.mark.parametrize("outtype,kw", [("f32", dict(tied=False)), ("q4_k_m", Q4_MODEL)])
def test_greedy_orthrus_is_token_identical_to_ar_with_backend_sampling(tiny_gguf, outtype, kw):
    """Exact verify forwards on the CPU kernels (so on the CPU: n_gpu_layers=0 also on a GPU
    machine), the argmax in the graph for AR and Orthrus alike, and the same tokens as the
    host's argmax gives."""
    path = tiny_gguf(outtype, **kw)
    with Orthrus(path, n_ctx=512, n_threads=2, n_gpu_layers=0, backend_sampling=True) as dev, \
            Orthrus(path, n_ctx=512, n_threads=2, n_gpu_layers=0) as host:
        for prompt in PROMPTS[::3]:
            dev.reset()
            ar = dev.generate(prompt, max_tokens=48, mode="ar")
            assert dev.native.backend_sampling
            dev.reset()
            o = dev.generate(prompt, max_tokens=48)
            assert o.tokens == ar.tokens, (outtype, prompt)
            host.reset()
            assert host.generate(prompt, max_tokens=48).tokens == o.tokens
            assert not host.native.backend_sampling


def test_steady_loop_still_reuses_both_graphs(model_path):
    with Orthrus(model_path, n_ctx=512, n_threads=2, block_size=BLOCK, n_gpu_layers=GPU_LAYERS,
                 backend_sampling=True) as m:
        r = m.generate(PROMPT, max_tokens=120)
        assert m.native.backend_sampling
    reused = steady_steps(r)
    assert len(reused) >= 10 and set(reused) == {2}, reused


def test_logprobs_and_samplers_read_logits(model_path):
    with Orthrus(model_path, n_ctx=512, n_threads=2, n_gpu_layers=GPU_LAYERS, backend_sampling=True) as m:
        greedy = m.generate(PROMPT, max_tokens=20)
        assert m.native.backend_sampling
        m.reset()
        with_lp = m.generate(PROMPT, max_tokens=20, logprobs=2)
        assert not m.native.backend_sampling
        assert with_lp.tokens == greedy.tokens and len(with_lp.logprobs) == len(greedy.tokens)
        sampled = m.generate(PROMPT, max_tokens=10, temperature=0.8, seed=1)
        assert len(sampled.tokens) == 10 and not m.native.backend_sampling
        m.reset()
        assert m.generate(PROMPT, max_tokens=20).tokens == greedy.tokens  # and back on
        assert m.native.backend_sampling


def test_status_codes_match_the_patched_header():
    """native.py's copy of the LLAMA_ORTHRUS_ERR_* codes against patch 0004's llama.h."""
    text = (ROOT / "patches" / "0004-c-api.patch").read_text()
    header = {name: int(v) for name, v in re.findall(r"^\+#define LLAMA_ORTHRUS_(OK|ERR_\w+)\s+(-?\d+)", text, re.M)}
    assert len(header) >= 16
    assert header == {name: getattr(native, name) for name in header}


def test_bench_times_every_run_with_backend_sampling_and_measures_margins_after(model_path, monkeypatch):
    """bench on a model with backend sampling: no timed run has it switched off in between
    (the margin of a differing run needs logits, and each switch drops the kept graphs), the
    report says it was on, and each first difference gets its margin afterwards: the AR
    top-1 minus top-2 logit, relative to |top-1|, after the common prefix, as numpy computes
    it from the logits."""
    from orthrus_gguf import bench
    events = []
    generate, switch = Orthrus.generate, NativeModel.set_backend_sampling

    def spy_generate(self, prompt, max_tokens=256, **kw):
        events.append("run")
        r = generate(self, prompt, max_tokens, **kw)
        if kw.get("mode") == "orthrus" and prompt == "a" and max_tokens == 12:  # a made-up difference
            r.tokens[5] = (r.tokens[5] + 1) % self.native.n_vocab
        return r

    def spy_switch(self, on):
        if self.backend_sampling and not on:
            events.append("off")
        return switch(self, on)
    monkeypatch.setattr(Orthrus, "generate", spy_generate)
    monkeypatch.setattr(NativeModel, "set_backend_sampling", spy_switch)
    rep = bench.run_bench(model_path, {"g": ["a", "b"]}, max_tokens=12, block_sizes=(8,), n_threads=2,
                          backend_sampling=True)
    assert rep["backend_sampling"] is True
    assert events == ["run"] * (2 + 2 * 2) + ["off"], events  # warm-ups, then AR + Orthrus per prompt
    o = rep["groups"]["g"]["orthrus"]["8"]
    assert o["identical"] == "1/2" and len(o["first_diff_margins"]) == 1
    monkeypatch.undo()
    with Orthrus(model_path, n_threads=2) as m:
        common = generate(m, "a", 5, mode="ar").tokens
        m.native.clear()
        m.native.prefill(m.tokenize("a", special=True) + common)
        row = np.sort(m.native.logits(1)[0])
    assert o["first_diff_margins"][0] == pytest.approx((row[-1] - row[-2]) / abs(row[-1]), rel=1e-6)
