"""The patched llama.cpp against the PyTorch reference, on tiny random checkpoints.

Needs `orthrus-gguf build` (CI runs it first); without a build these tests fail with the
message saying so, they do not skip.

Tolerance, measured here (max |llama.cpp - reference| / max |logit|, 2-3 layers):
- flash attention off, f32 KV cache: 0.5e-7 .. 4e-7, the size of f32 rounding (the
  reference itself moves 1e-7 .. 3e-7 between float32 and float64). We allow 1e-5.
- flash attention on (llama.cpp's default where supported): 1e-4 .. 4e-4, because ggml's
  CPU flash attention works on f16 Q/K/V (llama-graph casts an f32 cache to f16 for it),
  and f16 has a relative half-ulp of 4.9e-4. We allow 3e-3 there.
On an H100 (CUDA build, ORTHRUS_TEST_GPU_LAYERS=-1) both modes measured 6e-5 .. 1.3e-3:
ggml-cuda runs f32 GEMMs on TF32 tensor cores (10-bit mantissa). We allow 5e-3 there.
All are far below what a real bug gives (a wrong view, RoPE mode, norm or mask moves
logits by O(1) relative).
"""
from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from orthrus_gguf.errors import OrthrusError

# precision mode -> (NativeModel options, relative tolerance); see the module docstring
PRECISION = {
    "exact": (dict(flash_attn=False, kv_type="f32"), 1e-5),
    "flash-f16": (dict(flash_attn=True, kv_type="f16"), 3e-3),
}

GPU_LAYERS = int(os.environ.get("ORTHRUS_TEST_GPU_LAYERS", "0"))
if GPU_LAYERS:
    PRECISION = {k: (opts, max(tol, 5e-3)) for k, (opts, tol) in PRECISION.items()}

# (name, checkpoint kwargs): GQA, MHA-ish with head_dim 64 and an untied head, 3 layers
CONFIGS = {
    "gqa-tied-hd16": dict(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, tied=True),
    "gqa-untied-hd64": dict(n_layers=2, hidden=96, n_heads=2, n_kv_heads=1, head_dim=64, tied=False, seed=1),
    "mha-untied-hd32": dict(n_layers=3, hidden=64, n_heads=4, n_kv_heads=4, head_dim=32, tied=False, seed=2),
}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def native():
    from orthrus_gguf import native
    native.load()  # OrthrusError "run `orthrus-gguf build`" when not built
    return native


@pytest.fixture(scope="session")
def gguf_of(tiny_ckpt, tmp_path_factory):
    """gguf_of(name_or_kwargs, outtype="f32") -> (checkpoint dir, GGUF path), cached."""
    from orthrus_gguf.convert.writer import convert_checkpoint
    cache = {}

    def make(cfg, outtype="f32"):
        kw = CONFIGS[cfg] if isinstance(cfg, str) else cfg
        key = (tuple(sorted(kw.items())), outtype)
        if key not in cache:
            ckpt = tiny_ckpt(**kw)
            out = tmp_path_factory.mktemp("gguf") / f"tiny-{outtype}.gguf"
            cache[key] = (ckpt, convert_checkpoint(ckpt, out, outtype, progress=False))
        return cache[key]
    return make


@pytest.fixture(scope="session")
def reference():
    from orthrus_gguf.reference import OrthrusModel
    cache = {}

    def get(ckpt: Path):
        if ckpt not in cache:
            cache[ckpt] = OrthrusModel.from_pretrained(ckpt)
        return cache[ckpt]
    return get


def open_model(native, path, **kw):
    kw.setdefault("n_ctx", 256)
    kw.setdefault("n_batch", 64)
    kw.setdefault("n_threads", 2)
    kw.setdefault("kv_type", "f32")
    kw.setdefault("flash_attn", False)
    # ORTHRUS_TEST_GPU_LAYERS=-1 runs the same tests offloaded on a GPU build
    kw.setdefault("n_gpu_layers", GPU_LAYERS)
    # and without it every op runs on the CPU, where the CPU tolerances hold: on a GPU build,
    # llama.cpp's op offload would compute the 41-45-token prompts' products on the GPU
    # (measured on the Vulkan build, llvmpipe: 2e-4 to 2e-3 relative, above them)
    kw.setdefault("op_offload", None if GPU_LAYERS else False)
    return native.NativeModel(path, **kw)


def prompt_ids(n, vocab, seed=0):
    g = np.random.default_rng(seed)
    return g.integers(0, vocab, size=n).astype(np.int32)


def assert_close(got, want, what, rel_tol=None):
    # got must be a copy: a logits() view dies with its model, and pytest reprs the args
    rel_tol = PRECISION["exact"][1] if rel_tol is None else rel_tol
    want = np.asarray(want, dtype=np.float32)
    atol = rel_tol * float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= atol, f"{what}: max |llama.cpp - reference| = {err:.3g} > {atol:.3g}"


# ---------------------------------------------------------------- numerics vs reference

@pytest.mark.parametrize("precision", list(PRECISION))
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_ar_view_matches_reference(native, gguf_of, reference, cfg, precision):
    opts, tol = PRECISION[precision]
    from orthrus_gguf.reference import KVCache
    ckpt, path = gguf_of(cfg)
    ref = reference(ckpt)
    with open_model(native, path, **opts) as m:
        assert m.arch == "orthrus-qwen3" and m.block_size == 8
        ids = prompt_ids(45, m.n_vocab)
        cache = KVCache()
        want = ref.forward_ar(torch.from_numpy(ids).long(), cache)
        m.prefill(ids)
        assert m.n_past == 45 and m.n_outputs == 1
        assert_close(m.logits(1)[0].copy(), want[-1].numpy(), "prefill, last row", tol)

        # a multi-token batch with logits for every row
        more = prompt_ids(7, m.n_vocab, seed=1)
        want = ref.forward_ar(torch.from_numpy(more).long(), cache)
        m.decode_ar(more, 45)
        assert m.n_outputs == 7
        assert_close(m.logits(7).copy(), want.numpy(), "AR batch of 7", tol)
        assert np.array_equal(m.argmax(7), m.logits(7).argmax(axis=1))


@pytest.mark.parametrize("precision", list(PRECISION))
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_diffusion_view_matches_reference(native, gguf_of, reference, cfg, precision):
    opts, tol = PRECISION[precision]
    from orthrus_gguf.reference import KVCache
    ckpt, path = gguf_of(cfg)
    ref = reference(ckpt)
    with open_model(native, path, **opts) as m:
        ids = prompt_ids(41, m.n_vocab, seed=3)
        cache = KVCache()
        ref.forward_ar(torch.from_numpy(ids).long(), cache)
        m.prefill(ids)
        t, B = 17, m.block_size
        block = torch.tensor([t] + [m.mask_token] * (B - 1))
        want = ref.forward_diffusion(block, cache)
        # an AR batch of the same shape first: the diffusion pass must not reuse its graph
        m.decode_ar(np.arange(B, dtype=np.int32), 41)
        m.seq_rm(41)
        m.draft(t, 41, B)
        assert m.n_past == 41, "the diffusion pass left cells in the cache"
        assert m.view == native.VIEW_AR
        assert_close(m.logits(B).copy(), want.numpy(), "diffusion block", tol)
        assert np.array_equal(m.argmax(B), m.logits(B).argmax(axis=1))
        # a shorter block near the end of generation
        want = ref.forward_diffusion(block[:3], cache)
        m.draft(t, 41, 3)
        assert_close(m.logits(3).copy(), want.numpy(), "diffusion block of 3", tol)


def test_diffusion_pass_leaves_ar_bit_identical(native, gguf_of):
    """AR decodes after diffusion passes return the very bits they return without them."""
    _, path = gguf_of("gqa-tied-hd16")
    with open_model(native, path, kv_type="f16", flash_attn=None) as m:  # llama.cpp defaults
        ids = prompt_ids(40, m.n_vocab, seed=5)
        nxt = prompt_ids(8, m.n_vocab, seed=6)

        def run(with_passes: bool):
            m.clear()
            m.prefill(ids)
            if with_passes:
                m.draft(int(nxt[0]), 40, 8)
                m.draft(int(nxt[0]), 40, 5)
            m.decode_ar(nxt, 40)                 # a verify batch
            batch = m.logits(8).copy()
            m.seq_rm(41)                         # crop, as after one accepted token
            if with_passes:
                m.draft(int(nxt[1]), 41, 8)
            m.decode_ar(nxt[1:2], 41)            # then a one-token decode
            return batch, m.logits(1).copy()

        plain, after = run(False), run(True)
        assert np.array_equal(plain[0], after[0])
        assert np.array_equal(plain[1], after[1])


def test_view_flag_prevents_graph_reuse(native, gguf_of):
    """Same batch shape, same causal flag, only the view differs: llama.cpp would reuse the
    previous graph unless the view is part of its reuse check."""
    _, path = gguf_of("gqa-tied-hd16")
    with open_model(native, path) as m:
        lc = m.n.llama_cpp
        m.prefill(prompt_ids(40, m.n_vocab, seed=11))
        x = prompt_ids(8, m.n_vocab, seed=12)

        def plain_decode():  # llama_decode as any caller would, last row only
            assert lc.llama_decode(m.ctx, lc.llama_batch_get_one(x.ctypes.data_as(lc.llama_token_p), 8)) == 0
            out = m.logits(1)[0].copy()
            m.seq_rm(40)
            return out

        ar = plain_decode()
        m.view = native.VIEW_DIFFUSION
        causal_diffusion = plain_decode()
        m.view = native.VIEW_AR
        assert np.abs(causal_diffusion - ar).max() > 1e-3 * np.abs(ar).max(), "diffusion view reused the AR graph"
        assert np.array_equal(plain_decode(), ar)


def test_verify_then_crop_matches_reference_loop(native, gguf_of, reference):
    """One Orthrus step by hand: draft, verify, crop, next draft; all against the reference."""
    from orthrus_gguf.reference import KVCache
    ckpt, path = gguf_of("gqa-untied-hd64")
    ref = reference(ckpt)
    with open_model(native, path) as m:
        ids = prompt_ids(44, m.n_vocab, seed=7)
        cache = KVCache()
        ref.forward_ar(torch.from_numpy(ids).long(), cache)
        m.prefill(ids)
        p, t, B = 44, int(m.argmax(1)[0]), m.block_size
        m.draft(t, p, B)
        d = [t] + list(m.argmax(B)[:-1])
        m.decode_ar(np.array(d, dtype=np.int32), p)
        want = ref.forward_ar(torch.tensor(d), cache)
        assert_close(m.logits(B).copy(), want.numpy(), "verify")
        m.seq_rm(p + 3)
        cache.crop(p + 3)
        want = ref.forward_diffusion(torch.tensor([5] + [m.mask_token] * (B - 1)), cache)
        m.draft(5, p + 3, B)
        assert_close(m.logits(B).copy(), want.numpy(), "draft after crop")


# ---------------------------------------------------------------- argmax kernel

def _argmax_rows(native, x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.full(x.shape[0], -7, dtype=np.int32)
    rc = native.load().orthrus_argmax_rows(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), x.shape[0],
                                           x.shape[1], out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
    assert rc == 0
    return out


def _first_max(row):
    """The rule, written independently: the lowest index of the largest non-NaN value, 0 when
    there is none above -inf."""
    finite = np.where(np.isnan(row), -np.inf, row)
    m = finite.max()
    return 0 if m == -np.inf else int(np.flatnonzero(finite == m)[0])


@pytest.mark.parametrize("n_vocab", [1, 3, 15, 16, 17, 63, 64, 65, 4101, 151936])
def test_argmax_kernel_lowest_id_on_ties_and_no_nan_wins(native, n_vocab):
    """The vectorised argmax (16 lanes, then a scalar tail) against the rule on rows made to
    catch a lane mix-up: random values, many ties (small integers), the maximum only in the
    tail, at 0, repeated in every lane, NaNs, -inf and +inf."""
    g = np.random.default_rng(n_vocab)
    rows = [g.standard_normal(n_vocab), g.integers(0, 3, n_vocab).astype(np.float64),
            np.full(n_vocab, 2.0), np.full(n_vocab, -np.inf), np.full(n_vocab, np.nan)]
    tail = g.standard_normal(n_vocab)
    tail[-1] = 9.0  # in the scalar tail when n_vocab is not a multiple of 16
    at0 = g.standard_normal(n_vocab)
    at0[0] = 9.0
    lanes = g.standard_normal(n_vocab)
    lanes[n_vocab // 2::7] = 5.0  # the maximum in many lanes, the first one must win
    nan = g.standard_normal(n_vocab)
    nan[:: 5] = np.nan
    inf = g.standard_normal(n_vocab)
    inf[n_vocab // 3] = np.inf
    rows += [tail, at0, lanes, nan, inf]
    x = np.stack(rows).astype(np.float32)
    want = np.array([_first_max(r) for r in x], dtype=np.int32)
    assert np.array_equal(_argmax_rows(native, x), want)
    plain = ~np.isnan(x).any(axis=1)  # where numpy's argmax defines the answer, the same
    assert np.array_equal(_argmax_rows(native, x)[plain], x[plain].argmax(axis=1))


def test_argmax_kernel_refuses_bad_arguments(native):
    f = native.load().orthrus_argmax_rows
    out = (ctypes.c_int32 * 1)()
    buf = (ctypes.c_float * 4)()
    assert f(None, 1, 4, out) == native.ERR_ARG
    assert f(buf, 1, 0, out) == native.ERR_ARG
    assert f(buf, -1, 4, out) == native.ERR_ARG
    assert f(None, 0, 4, None) == 0  # nothing to do


# ---------------------------------------------------------------- guards

def test_guards_raise_and_leave_state(native, gguf_of):
    _, path = gguf_of("gqa-tied-hd16")
    with open_model(native, path, n_ctx=64, n_batch=16, n_ubatch=8) as m:
        ids = prompt_ids(20, m.n_vocab, seed=8)
        m.prefill(ids)
        cases = [
            (lambda: m.draft(1, 20, 9), "n_ubatch"),            # block > n_ubatch (upstream asserts)
            (lambda: m.draft(1, 19, 4), "position"),            # does not follow the cache
            (lambda: m.draft(1, 21, 4), "position"),            # leaves a hole
            (lambda: m.draft(1, 20, 1), "invalid"),             # a block of one token
            (lambda: m.draft(m.n_vocab, 20, 4), "invalid"),     # token out of range
            (lambda: m.decode_ar(np.zeros(17, np.int32), 20), "n_batch"),
            (lambda: m.decode_ar([1, 2], 0), "position"),
            (lambda: m.decode_ar([-1], 20), "invalid"),
            (lambda: m.prefill([1], 3), "position"),
            (lambda: m.argmax(5), "rows"),
            (lambda: setattr(m, "view", 2), "invalid"),
        ]
        for fn, words in cases:
            with pytest.raises(OrthrusError, match=words):
                fn()
            assert m.n_past == 20 and m.view == native.VIEW_AR
        m.prefill(prompt_ids(m.n_ctx - 4 - 20, m.n_vocab))
        with pytest.raises(OrthrusError, match="context"):
            m.decode_ar(np.zeros(8, np.int32), m.n_ctx - 4)
        assert m.n_past == m.n_ctx - 4
        # still alive and consistent
        m.seq_rm(20)
        m.draft(3, 20, 8)
        m.decode_ar([3], 20)
        assert m.n_past == 21


def test_rows_past_n_outputs_max_are_refused(native, gguf_of):
    """A context made for at most k rows of logits per decode (Orthrus: the block, which
    shrinks llama.cpp's reserved compute buffers) refuses wider passes with an error, not
    llama.cpp's abort, and decodes prompts of any length (one row each)."""
    _, path = gguf_of("gqa-tied-hd16")
    with open_model(native, path, n_ctx=128, n_batch=64, n_outputs_max=4) as m:
        assert m.n_outputs_max == 4
        m.prefill(prompt_ids(40, m.n_vocab, seed=3))
        for fn in (lambda: m.decode_ar(np.zeros(5, np.int32), 40), lambda: m.draft(1, 40, 5)):
            with pytest.raises(OrthrusError, match="n_outputs_max"):
                fn()
            assert m.n_past == 40
        m.draft(1, 40, 4)
        m.decode_ar(np.zeros(4, np.int32), 40)
        assert m.n_outputs == 4 and m.n_past == 44
    with pytest.raises(OrthrusError, match="n_outputs_max must be an integer >= 1"):
        open_model(native, path, n_outputs_max=0)
    # "block": the GGUF's block size
    with open_model(native, path, n_outputs_max="block") as m:
        assert m.n_outputs_max == m.block_size > 1


def test_block_past_context_end_is_refused(native, gguf_of):
    _, path = gguf_of("gqa-tied-hd16")
    with open_model(native, path, n_ctx=256, n_batch=64) as m:
        p = m.n_ctx - 4  # llama.cpp may round n_ctx up; use what it chose
        m.prefill(prompt_ids(p, m.n_vocab))
        with pytest.raises(OrthrusError, match="context"):
            m.draft(1, p, 8)
        m.draft(1, p, 4)
        assert m.n_past == p


# ---------------------------------------------------------------- other GGUFs

def plain_qwen3_copy(src: Path, dst: Path) -> Path:
    """The same weights as a plain `qwen3` GGUF: keys re-prefixed, *_diff tensors dropped."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter
    r = GGUFReader(src)
    w = GGUFWriter(dst, "qwen3")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or ".diffusion." in f.name:
            continue
        name = f.name.replace("orthrus-qwen3.", "qwen3.", 1)
        vtype = f.types[0]
        sub = f.types[1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        if "_diff" in t.name:
            continue
        w.add_tensor(t.name, np.asarray(t.data))  # f32: numpy order, dtype inferred
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_plain_qwen3_equals_ar_view(native, gguf_of, tmp_path):
    _, path = gguf_of("gqa-untied-hd64")
    plain = plain_qwen3_copy(path, tmp_path / "plain-qwen3.gguf")
    ids = prompt_ids(42, 500, seed=9)
    out = {}
    for name, p in (("orthrus", path), ("qwen3", plain)):
        with open_model(native, p) as m:
            m.prefill(ids)
            m.decode_ar(ids[:6], 42)
            out[name] = (m.arch, m.block_size, m.mask_token, m.logits(6).copy())
    assert out["qwen3"][:3] == ("qwen3", 0, -1)
    # the AR view is qwen3's graph: same weights, same kernels, same bits
    assert np.array_equal(out["qwen3"][3], out["orthrus"][3])
    with open_model(native, plain) as m:
        m.prefill(ids[:4])
        with pytest.raises(OrthrusError, match="not orthrus"):
            m.draft(1, 4, 4)
        with pytest.raises(OrthrusError, match="not orthrus"):
            m.view = native.VIEW_DIFFUSION


QUANT_CFG = dict(n_layers=2, hidden=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn=512,
                 vocab_size=512, tied=False, seed=4)


@pytest.mark.parametrize("qtype,min_corr", [("Q8_0", 0.999), ("Q4_K_M", 0.97)])
def test_quantized_loads_and_decodes_both_views(native, gguf_of, tmp_path, qtype, min_corr):
    from gguf import GGUFReader
    _, f32 = gguf_of(QUANT_CFG)
    out = tmp_path / f"tiny-{qtype}.gguf"
    quantize = Path(native.load().lib_dir) / "llama-quantize"
    r = subprocess.run([str(quantize), str(f32), str(out), qtype], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_q_diff.weight"] not in ("F32", "F16"), types

    ids = prompt_ids(40, 512, seed=10)
    res = {}
    for name, p in (("f32", f32), ("q", out)):
        with open_model(native, p) as m:
            m.prefill(ids)
            m.decode_ar(ids[:8], 40)
            ar = m.logits(8).copy()
            m.seq_rm(40)
            m.draft(int(ids[0]), 40, 8)
            diff = m.logits(8).copy()
            res[name] = (ar, diff)
            assert m.n_past == 40
    for i, view in enumerate(("AR", "diffusion")):
        a, b = res["f32"][i].ravel(), res["q"][i].ravel()
        assert np.isfinite(b).all()
        corr = float(np.corrcoef(a, b)[0, 1])
        assert corr >= min_corr, f"{qtype} {view} view: correlation with f32 {corr:.4f} < {min_corr}"
