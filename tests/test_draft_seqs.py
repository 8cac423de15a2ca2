"""llama_orthrus_draft_seqs: one diffusion forward for the blocks of several sequences.

Each block must come out as if drafted alone: non-causal within itself, blind to the other
sequences. Run on the batch-invariant CPU kernels (exact="all"), a row of a forward does not
depend on the other rows of its batch; what can still differ is where the blocks' cells land
in the KV cache, which changes the order in which attention sums over cells. So the rows of a
two-sequence forward must equal those of the two one-sequence forwards to f32 rounding
(measured: 3.6e-7 absolute on logits of magnitude ~1; allowed: 1e-5 of the largest |logit|,
as test_native allows), while any leak across sequences (a mask that lets one block see the
other's cells) moves them by O(0.1-1).
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from test_native import assert_close, gguf_of, native, open_model, prompt_ids  # noqa: F401 (fixtures)

MODEL = "gqa-untied-hd64"


def _i32s(values):
    return (ctypes.c_int32 * len(values))(*values)


def prefill(nm, seq, ids):
    rc = nm.n.orthrus_verify(nm._ctx, seq, _i32s(ids), len(ids), 0)
    assert rc == 0, nm.n.orthrus_strerror(rc)


def rows(nm, n):
    lc = nm.n.llama_cpp
    ptr = lc.llama_get_logits(nm._ctx)
    return np.ctypeslib.as_array(ptr, shape=(n, nm.n_vocab)).copy()


def draft_seqs(nm, seqs, ts, ps, blocks):
    return nm.n.orthrus_draft_seqs(nm._ctx, len(seqs), _i32s(seqs), _i32s(ts), _i32s(ps), _i32s(blocks))


def pos_max(nm, seq):
    return nm.n.llama_cpp.llama_memory_seq_pos_max(nm._mem, seq)


@pytest.mark.parametrize("unified", [True, False], ids=["unified-kv", "kv-per-seq"])
def test_two_sequences_in_one_forward_equal_two_drafts(native, gguf_of, unified):
    _, path = gguf_of(MODEL)
    nm = open_model(native, path, n_seq_max=2, kv_unified=unified, exact="all")
    try:
        a, b = prompt_ids(11, nm.n_vocab, seed=1), prompt_ids(7, nm.n_vocab, seed=2)
        prefill(nm, 0, a)
        prefill(nm, 1, b)
        ta, tb = 5, 9
        # alone, the reference
        assert nm.n.orthrus_draft(nm._ctx, 0, ta, len(a), 8) == 0
        ra = rows(nm, 8)
        assert nm.n.orthrus_draft(nm._ctx, 1, tb, len(b), 8) == 0
        rb = rows(nm, 8)
        # together
        assert draft_seqs(nm, [0, 1], [ta, tb], [len(a), len(b)], [8, 8]) == 0
        both = rows(nm, 16)
        assert_close(both[:8], ra, "block of seq 0 drafted with seq 1")
        assert_close(both[8:], rb, "block of seq 1 drafted with seq 0")
        assert np.abs(ra - rb).max() > 0.1  # the two blocks differ: a swap would show
        # the cache is as before: each sequence holds exactly its prompt
        assert (pos_max(nm, 0), pos_max(nm, 1)) == (len(a) - 1, len(b) - 1)
        # the other order puts the rows in the other order
        assert draft_seqs(nm, [1, 0], [tb, ta], [len(b), len(a)], [8, 8]) == 0
        swapped = rows(nm, 16)
        assert_close(swapped[:8], rb, "block of seq 1 first")
        assert_close(swapped[8:], ra, "block of seq 0 second")
    finally:
        nm.close()


def test_blocks_of_different_lengths(native, gguf_of):
    """A unified cache takes blocks of any lengths in one forward; a cache with a stream per
    sequence would split them (llama_decode cuts equal slices), so it refuses them with
    ERR_SPLIT before decoding anything."""
    _, path = gguf_of(MODEL)
    for unified in (True, False):
        nm = open_model(native, path, n_seq_max=2, kv_unified=unified, exact="all")
        try:
            a, b = prompt_ids(6, nm.n_vocab, seed=3), prompt_ids(9, nm.n_vocab, seed=4)
            prefill(nm, 0, a)
            prefill(nm, 1, b)
            assert nm.n.orthrus_draft(nm._ctx, 1, 3, len(b), 4) == 0
            rb = rows(nm, 4)
            rc = draft_seqs(nm, [0, 1], [2, 3], [len(a), len(b)], [8, 4])
            if unified:
                assert rc == 0
                assert_close(rows(nm, 12)[8:], rb, "block of 4 beside a block of 8")
            else:
                assert rc == native.ERR_SPLIT
                assert "split" in nm.n.orthrus_strerror(rc).decode()
            assert (pos_max(nm, 0), pos_max(nm, 1)) == (len(a) - 1, len(b) - 1)
        finally:
            nm.close()


def test_bad_requests_are_refused_and_leave_the_cache(native, gguf_of):
    _, path = gguf_of(MODEL)
    nm = open_model(native, path, n_seq_max=2, kv_unified=True, n_batch=16)
    try:
        a = prompt_ids(5, nm.n_vocab, seed=5)
        prefill(nm, 0, a)
        prefill(nm, 1, a)
        cases = {
            "one sequence twice": ([0, 0], [1, 1], [5, 5], [4, 4], native.ERR_ARG),
            "wrong position": ([0, 1], [1, 1], [5, 4], [4, 4], native.ERR_POS),
            "sequence out of range": ([0, 2], [1, 1], [5, 5], [4, 4], native.ERR_SEQ),
            "block of one": ([0, 1], [1, 1], [5, 5], [4, 1], native.ERR_ARG),
            "token out of vocab": ([0, 1], [1, nm.n_vocab], [5, 5], [4, 4], native.ERR_ARG),
            "more than n_ubatch": ([0, 1], [1, 1], [5, 5], [10, 10], native.ERR_SPLIT),
        }
        for what, (seqs, ts, ps, blocks, want) in cases.items():
            assert draft_seqs(nm, seqs, ts, ps, blocks) == want, what
            assert (pos_max(nm, 0), pos_max(nm, 1)) == (4, 4), what
        assert nm.n.orthrus_draft_seqs(nm._ctx, 0, None, None, None, None) == native.ERR_ARG
    finally:
        nm.close()
