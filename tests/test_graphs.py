"""Kept graphs (patch 0008, native/src/llama-orthrus-graphs.cpp) and exact verify forwards.

llama.cpp counts every forward that reused its previous graph (llama_perf_context().n_reused);
with a graph kept per (attention view, width), a steady Orthrus loop at a fixed block reuses
both of its forwards every step, where upstream's single graph reused none.

ORTHRUS_TEST_GPU_LAYERS=-1 (the device check) runs them offloaded: the kept graphs are for
the GPU, where each kind keeps its own CUDA graph.
"""
import numpy as np
import pytest

from orthrus_gguf.api import Orthrus
from orthrus_gguf.native import NativeModel
from test_native import GPU_LAYERS

BLOCK = 8
# a short prompt and 120 tokens stay inside one 256-cell KV view: no step grows it
PROMPT = [5, 6, 7, 8, 9]


def steady_steps(r):
    """Per-step reuse counts of the steps at the full block, after the first one."""
    steps = [s for s in r.stats["steps_detail"] if s["block"] == BLOCK]
    return [s["reused"] for s in steps[1:]]


@pytest.fixture(scope="module")
def model_path(tiny_gguf):
    return tiny_gguf("f32", tied=False)


def test_steady_loop_reuses_both_graphs_every_step(model_path):
    with Orthrus(model_path, n_ctx=512, n_threads=2, block_size=BLOCK, n_gpu_layers=GPU_LAYERS) as m:
        kept = m.generate(PROMPT, max_tokens=120)
        m.native.set_graph_slots(0)  # upstream's single graph: the alternating views rebuild it
        m.reset()
        single = m.generate(PROMPT, max_tokens=120)
    reused = steady_steps(kept)
    assert len(reused) >= 10
    assert np.mean(reused) >= 1.9, reused
    assert set(reused) == {2}, reused
    assert kept.tokens == single.tokens  # same output either way
    assert sum(steady_steps(single)) == 0  # without kept graphs nothing is reused: the count has power


def test_kept_graphs_give_bit_identical_logits(model_path):
    """A reused graph computes what a rebuilt one does: draft and verify rows bit for bit."""
    def rows(slots):
        with NativeModel(model_path, n_ctx=512, n_batch=64, n_threads=2, n_gpu_layers=GPU_LAYERS) as nm:
            nm.set_graph_slots(slots)
            nm.prefill(np.arange(20, dtype=np.int32) + 3)
            out = []
            for w in (2, 8, 8, 4, 8, 2, 8):
                nm.draft(7, 20, w)
                out.append(nm.logits(w).copy())
                nm.verify(np.arange(w, dtype=np.int32) + 11, 20)
                out.append(nm.logits(w).copy())
                nm.seq_rm(20)
            return out, nm.n_reused, nm.graph_slots()
    kept, reused_kept, (n_slots, nbytes) = rows(16)
    single, reused_single, (n0, b0) = rows(0)
    assert all(np.array_equal(a, b) for a, b in zip(kept, single))
    # 3 widths x 2 views built once each, the other 8 of 14 forwards reused
    assert reused_kept == 8 and reused_single == 0
    # kinds: 3 widths x 2 views, plus the 20-token prompt
    assert n_slots == 7 and nbytes > 0 and (n0, b0) == (0, 0)


def test_least_recently_used_kinds_are_dropped(model_path):
    with NativeModel(model_path, n_ctx=512, n_batch=128, n_threads=2, n_gpu_layers=GPU_LAYERS) as nm:
        nm.set_graph_slots(3)
        nm.prefill(np.arange(100, dtype=np.int32) % 200 + 3)  # > 64 tokens: the context's own graph
        assert nm.graph_slots()[0] == 0
        for w in (2, 3, 4, 5):
            nm.verify(np.full(w, 9, dtype=np.int32), 100)
            nm.seq_rm(100)
        assert nm.graph_slots()[0] == 3
        nm.set_graph_slots(1)
        assert nm.graph_slots()[0] == 1
        r0 = nm.n_reused
        nm.verify(np.full(5, 9, dtype=np.int32), 100)  # the one kept: width 5
        assert nm.n_reused == r0 + 1


def test_exact_mode_prefills_on_the_fast_kernels(model_path, monkeypatch):
    """exact=True makes the verify forwards batch-invariant and leaves the prompt as llama.cpp
    computes it: its prompt logits equal a non-exact context's bit for bit, and differ from a
    context whose every forward runs on the batch-invariant CPU kernels (GGML_CPU_USE_REF=1
    and op offload off, what exact mode used to do; 100 tokens take the tiled flash attention
    on the fast path, 3e-4 apart here), which shows the comparison can fail. Op offload is
    llama.cpp's default in the first two: on a build with a GPU backend and every layer on the
    CPU, it takes the 100-token products to the GPU in both (before, exact mode turned it off
    for the whole context, and this prompt ran on the CPU instead)."""
    prompt = np.arange(100, dtype=np.int32) * 7 % 250 + 3

    def prefill_logits(exact, op_offload=None):
        with NativeModel(model_path, n_ctx=256, n_batch=128, n_threads=1, exact=exact,
                         op_offload=op_offload) as nm:
            nm.prefill(prompt)
            return nm.logits(1)[0].copy()
    exact, fast = prefill_logits(True), prefill_logits(False)
    monkeypatch.setenv("GGML_CPU_USE_REF", "1")  # read when the context's CPU backend starts
    everything_ref = prefill_logits(False, op_offload=False)
    assert np.array_equal(exact, fast)
    assert not np.array_equal(exact, everything_ref)


@pytest.mark.parametrize("slots,width,via", [(16, 32, "verify"), (0, 32, "verify"), (16, 80, "verify"),
                                             (16, 32, "decode"), (16, 32, "plain-qwen3")])
def test_exact_verify_of_a_full_block_stays_on_the_cpu(model_path, tmp_path, slots, width, via):
    """A verify under exact="verify", every layer on the CPU, gives bit for bit the logits of
    one-token forwards. On a build with a GPU backend this needs llama.cpp's op offload off for
    the verify: it sends the products of CPU-resident weights in batches of >= 32 rows
    (GGML_OP_OFFLOAD_MIN_BATCH) to the GPU's kernels, which are not batch-invariant. Exact
    verifies get schedulers without it: a kept slot (32 tokens), or, where no slot takes the
    batch (no slots kept; 80 > LLAMA_ORTHRUS_GRAPH_SLOT_TOKENS), one of their own. "decode":
    the llama_decode after a draft (how llama_decode-based loops verify), whose last row the
    prefill keeps. "plain-qwen3": the same weights as a plain Qwen3 GGUF (no kept graphs for
    other architectures; exact verifies are exact there too)."""
    prompt = np.arange(30, dtype=np.int32) * 7 % 250 + 3
    toks = np.arange(width, dtype=np.int32) * 13 % 250 + 40
    path = model_path
    if via == "plain-qwen3":
        from test_native import plain_qwen3_copy
        path = plain_qwen3_copy(model_path, tmp_path / "plain.gguf")
    with NativeModel(path, n_ctx=256, n_batch=128, n_threads=2, exact="verify") as nm:
        nm.set_graph_slots(slots)
        nm.prefill(prompt)
        if via != "decode":
            nm.verify(toks, 30)
            batch = nm.logits(width).copy()
        else:
            nm.draft(int(toks[0]), 30, 8)
            nm.prefill(toks, 30)
            batch = nm.logits(1).copy()
        nm.seq_rm(30)
        singles = []
        for i, t in enumerate(toks):
            nm.decode_ar([int(t)], 30 + i)
            singles.append(nm.logits(1)[0].copy())
    assert np.array_equal(batch, np.array(singles if via != "decode" else singles[-1:]))


def test_random_speed_model_loads_and_decodes(tmp_path):
    """write_random_gguf (the device check's 1.7B / 8B stand-ins), at a small shape: Q4_K_M's
    tensor types, a 151,936-row vocabulary, and finite logits from both views."""
    from orthrus_gguf.convert.info import gguf_info
    from orthrus_gguf.testing import write_random_gguf
    path = write_random_gguf(tmp_path / "r.gguf", "test", block_size=8)
    info = gguf_info(path)
    assert info["n_tokens"] == 151936 and info["diffusion.block_size"] == 8
    with NativeModel(path, n_ctx=256, n_batch=64, n_threads=2, n_gpu_layers=GPU_LAYERS) as nm:
        nm.prefill(np.arange(10, dtype=np.int32) + 3)
        assert np.isfinite(nm.logits(1)).all()
        nm.draft(5, 10, 8)
        assert np.isfinite(nm.logits(8)).all()
