"""OrthrusDraft: Orthrus drafting inside llama_cpp.Llama, through its `draft_model` hook.

    from orthrus_gguf import OrthrusDraft
    llm = OrthrusDraft.llama("model.gguf", n_ctx=4096)    # a llama_cpp.Llama, drafting
    llm.create_chat_completion(messages=[...])             # every Llama feature

or, building the Llama yourself:

    draft = OrthrusDraft()
    llm = Llama(model_path="model.gguf", draft_model=draft)
    draft.bind(llm)

Llama hands a draft model only the token ids, so OrthrusDraft is bound to its Llama: each
call runs one diffusion pass on that Llama's own context at its current position (the KV
cache is left as it was) and returns the argmax of the block's rows. Llama then verifies
the drafts with one batched decode and keeps those its own sampler reproduces (token
matching), so the output is Llama's. Under exact="verify" (the CPU default) that decode runs
on the batch-invariant kernels (patch 0008: the first decode after a draft is its verify).
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import native
from .errors import OrthrusError
from .policy import AutoPolicy, FixedPolicy, measure_costs, warm_widths

_n = native.load()  # before llama_cpp is imported here: it must load the patched libllama

from llama_cpp import Llama  # noqa: E402
from llama_cpp.llama_speculative import LlamaDraftModel  # noqa: E402

_EMPTY = np.empty(0, dtype=np.intc)


class OrthrusDraft(LlamaDraftModel):
    """A LlamaDraftModel drafting with the diffusion view of an orthrus-qwen3 GGUF.

    block_size: "auto" (the draft length that pays on this machine, learnt from acceptance;
    plain AR where no length can pay) or a fixed block in [2, the GGUF's block size].
    exact: which forwards of the Llama's context run on the batch-invariant CPU kernels:
    None (default: "verify" on the CPU, "off" with GPU layers), "off", "verify", "all"."""

    def __init__(self, block_size: int | str = "auto", exact: bool | str | None = None):
        if block_size != "auto" and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                     or block_size < 2):
            raise OrthrusError(f"block_size must be an integer >= 2 or 'auto', got {block_size!r}")
        self.block_size = block_size
        self._exact = None if exact is None else native.exact_mode(exact)
        self._llm: Llama | None = None
        self._policy = None
        self._last: tuple[int, np.ndarray] | None = None  # (len(input_ids), drafts) of the last call
        self.drafts = 0      # calls that drafted
        self.drafted = 0     # tokens drafted
        self.accepted = 0    # of which the Llama kept

    # ------------------------------------------------------------ binding
    @classmethod
    def llama(cls, model_path: str, *, block_size: int | str = "auto", exact: bool | str | None = None,
              **llama_kwargs) -> Llama:
        """A llama_cpp.Llama of model_path (any Llama arguments) drafting with OrthrusDraft."""
        from .convert.info import preflight
        path = preflight(model_path)  # a clear error for what llama.cpp would only call "failed to load"
        draft = cls(block_size, exact)
        llm = Llama(model_path=str(path), draft_model=draft, **llama_kwargs)
        try:
            return draft.bind(llm)
        except OrthrusError:
            llm.close()
            raise

    def bind(self, llm: Llama) -> Llama:
        """Draft on llm's context; llm must have been built with draft_model=self (Llama then
        keeps the logits of every verified row). Returns llm."""
        if getattr(llm, "draft_model", None) is not self:
            raise OrthrusError("bind() needs the Llama built with this draft model: "
                               "Llama(model_path, draft_model=draft), then draft.bind(llm)")
        block = _n.model_orthrus_block_size(llm.model)
        if block <= 0:
            arch = llm.metadata.get("general.architecture", "?")
            raise OrthrusError(f"{llm.model_path}: architecture {arch!r} has no diffusion view; "
                               f"OrthrusDraft needs an orthrus-qwen3 GGUF (`orthrus-gguf convert`)")
        n_ubatch = _n.llama_cpp.llama_n_ubatch(llm.ctx)
        if block > n_ubatch:
            raise OrthrusError(f"n_ubatch ({n_ubatch}) must be at least the GGUF's block size ({block}): "
                               f"pass n_ubatch={block} or more to Llama")
        if self.block_size != "auto" and self.block_size > block:
            raise OrthrusError(f"block_size must be in [2, {block}] (the GGUF's block size), "
                               f"got {self.block_size}")
        mode = self._exact or ("off" if native.offloads(llm.model_params.n_gpu_layers) else "verify")
        native.check(_n.orthrus_set_exact(llm.ctx, native.EXACT_MODES[mode]), f"set exact {mode}")
        self._llm, self._gguf_block, self.exact = llm, block, mode
        self._policy = FixedPolicy(self.block_size) if self.block_size != "auto" else None
        return llm

    @property
    def stats(self) -> dict:
        return {"drafts": self.drafts, "drafted": self.drafted, "accepted": self.accepted,
                "draft_acceptance": self.accepted / self.drafted if self.drafted else 0.0}

    # ------------------------------------------------------------ drafting
    def _calibrate(self, t: int, p: int) -> tuple[dict, dict]:
        """The policy's costs, measured on the live sequence beyond its end (left as it was)."""
        ctx, mem = self._llm.ctx, _n.llama_cpp.llama_get_memory(self._llm.ctx)

        rows = {w: np.full(w, t, dtype=np.int32) for w in warm_widths(self._gguf_block)}  # outside the timing
        ptrs = {w: r.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) for w, r in rows.items()}

        def verify(w):
            native.check(_n.orthrus_verify(ctx, 0, ptrs[w], w, p), f"calibration verify of {w} tokens")
        return measure_costs(self._gguf_block,
                             lambda w: native.check(_n.orthrus_draft(ctx, 0, t, p, w), f"diffusion pass of {w} tokens"),
                             verify, lambda: _n.llama_cpp.llama_memory_seq_rm(mem, 0, p, -1))

    def __call__(self, input_ids: np.ndarray, /, **kwargs) -> np.ndarray:
        llm = self._llm
        if llm is None:
            raise OrthrusError("OrthrusDraft is not bound to a Llama: call draft.bind(llm) after "
                               "Llama(..., draft_model=draft), or use OrthrusDraft.llama(path)")
        p, n = llm.n_tokens, len(input_ids)
        if n != p + 1:  # Llama drafts after one new token; anything else: no draft
            return _EMPTY
        if self._last is not None:  # what became of the last drafts: tokens Llama kept
            n0, d = self._last
            k = n - n0 - 1
            if 0 <= k <= d.size and np.array_equal(input_ids[n0:n - 1], d[:k]):
                self.accepted += k
                if self._policy is not None:
                    self._policy.update(int(d.size), k)
            self._last = None
        room = llm.n_ctx() - p
        if room < 2:
            return _EMPTY
        t = int(input_ids[-1])
        if self._policy is None:  # auto: measured once, here
            if room < 2 * self._gguf_block:
                return _EMPTY
            self._policy = AutoPolicy(self._gguf_block, *self._calibrate(t, p))
        b = min(self._policy.choose(room - 1), room - 1)
        if b < 2:
            self._policy.update(0, 0)
            return _EMPTY
        native.check(_n.orthrus_draft(llm.ctx, 0, t, p, b), f"diffusion pass of {b} tokens at {p}")
        d = np.empty(b - 1, dtype=np.int32)
        native.check(_n.orthrus_argmax(llm.ctx, b - 1, d.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))),
                     "argmax of the draft rows")
        self._last = (n, d)
        self.drafts += 1
        self.drafted += d.size
        return d.astype(np.intc)


def set_exact(llm: Llama, mode: bool | str) -> None:
    """Which forwards of any Llama's context (of the patched build) run on the batch-invariant
    CPU kernels: "off", "verify", "all" (e.g. to compare a plain Llama bit for bit)."""
    m = native.exact_mode(mode)
    native.check(_n.orthrus_set_exact(llm.ctx, native.EXACT_MODES[m]), f"set exact {m}")
