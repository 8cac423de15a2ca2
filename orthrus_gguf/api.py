"""`Orthrus`: a llama-cpp-python-shaped generate/stream/chat API with Orthrus drafting.

    m = Orthrus("model.gguf", n_ctx=4096, n_gpu_layers=-1)
    r = m.generate("def fib(n):", max_tokens=64)            # greedy: identical to mode="ar"
    r.text, r.tokens, r.finish_reason, r.stats
    for piece in m.stream("…", temperature=0.7): print(piece, end="")
    m.create_chat_completion(messages=[{"role": "user", "content": "hi"}])
"""
from __future__ import annotations

import codecs
import ctypes
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .convert.info import check_gguf_file
from .decode import Stats, decode
from .errors import OrthrusError
from .native import NativeModel
from .policy import CALIBRATION_PASSES, ARPolicy, AutoPolicy, FixedPolicy, calibration_cost, warm_widths
from .sampling import Sampler

MODES = ("orthrus", "ar")


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end-of-generation token or stop string) or "length"
    stats: dict


class Orthrus:
    def __init__(self, model_path: str | Path, *, n_ctx: int = 4096, n_gpu_layers: int = 0,
                 n_threads: int | None = None, n_batch: int = 512, block_size: int | str | None = None,
                 exact: bool | None = None):
        path = check_gguf_file(model_path)
        # exact: batch-invariant CPU kernels, so a verify batch gives bit for bit the logits of
        # one-token forwards and greedy Orthrus equals greedy AR (docs/NUMERICS.md). On by
        # default on the CPU; it does not reach GPU kernels.
        self.nm = NativeModel(path, n_ctx=n_ctx, n_batch=max(n_batch, 64), n_threads=n_threads,
                              n_gpu_layers=n_gpu_layers,
                              batch_invariant=n_gpu_layers == 0 if exact is None else exact)
        lc = self.nm.n.llama_cpp
        self._lc, self._vocab = lc, lc.llama_model_get_vocab(self.nm._model)
        self._eog: dict[int, bool] = {}
        self.block_size = self._check_block(block_size)
        self._costs: tuple[dict, dict] | None = None
        self._auto: AutoPolicy | None = None

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        self.nm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def exact(self) -> bool:
        """Whether verify forwards run on the batch-invariant CPU kernels (NativeModel.exact)."""
        return self.nm.exact

    @property
    def arch(self) -> str:
        return self.nm.arch

    # ------------------------------------------------------------ text
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        raw = text.encode()
        n_max = len(raw) + 8
        buf = (ctypes.c_int32 * n_max)()
        n = self._lc.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, False, special)
        if n < 0:
            raise OrthrusError(f"tokenize failed for a text of {len(raw)} bytes")
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        if token not in self._eog:
            self._eog[token] = bool(self._lc.llama_vocab_is_eog(self._vocab, token))
        return self._eog[token]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        tmpl = self._lc.llama_model_chat_template(self.nm._model, None)
        if not tmpl:
            raise OrthrusError(f"{self.nm.path}: the GGUF has no chat template (tokenizer.chat_template)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(tmpl.decode()).render(messages=messages,
                                                      add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------ policy
    def _check_block(self, block) -> int | str:
        if not self.nm.is_orthrus:
            return 1
        gguf_b = self.nm.block_size
        if block is None:
            return gguf_b
        if block == "auto":
            return block
        if isinstance(block, str):
            if not block.isdigit():
                raise OrthrusError(f"block_size must be an integer or 'auto', got {block!r}")
            block = int(block)
        if not 2 <= block <= gguf_b:
            raise OrthrusError(f"block_size must be in [2, {gguf_b}] (the GGUF's block size) or 'auto', "
                               f"got {block}")
        return block

    def calibrate(self) -> tuple[dict[int, float], dict[int, float]]:
        """Seconds of a diffusion pass and of a verify forward at each warm width on this
        machine, by the policy's statistic (policy.calibration_cost, shared with the server)."""
        if self._costs is None:
            nm = self.nm
            ctx_tokens = np.arange(64, dtype=np.int32) % max(2, nm.mask_token)
            nm.clear()
            nm.prefill(ctx_tokens)
            p = len(ctx_tokens)
            draft, verify = {1: 0.0}, {}
            for w in warm_widths(nm.block_size):
                toks = np.full(w, 1, dtype=np.int32)
                ts_d, ts_v = [], []
                for _ in range(CALIBRATION_PASSES):
                    t0 = time.perf_counter()
                    if w >= 2:
                        nm.draft(1, p, w)
                    t1 = time.perf_counter()
                    nm.verify(toks, p)
                    t2 = time.perf_counter()
                    nm.seq_rm(p)
                    ts_d.append(t1 - t0)
                    ts_v.append(t2 - t1)
                if w >= 2:
                    draft[w] = calibration_cost(ts_d)
                verify[w] = calibration_cost(ts_v)
            nm.clear()
            self._costs, self._auto = (draft, verify), None
        return self._costs

    def _policy(self, mode: str, block):
        if mode == "ar":
            return ARPolicy()
        if not self.nm.is_orthrus:
            raise OrthrusError(f"{self.nm.path}: architecture {self.arch!r} has no diffusion view; "
                               f"Orthrus mode needs an orthrus-qwen3 GGUF (mode='ar' works)")
        block = self.block_size if block is None else self._check_block(block)
        if block == "auto":  # one per model: acceptance learnt on earlier calls carries over
            if self._auto is None:
                self._auto = AutoPolicy(self.nm.block_size, *self.calibrate())
            return self._auto
        return FixedPolicy(block)

    # ------------------------------------------------------------ generation
    def _prepare(self, prompt, max_tokens, mode):
        if mode not in MODES:
            raise OrthrusError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise OrthrusError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise OrthrusError("the prompt is empty")
        if len(ids) + max_tokens > self.nm.n_ctx:
            raise OrthrusError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                               f"context of {self.nm.n_ctx} tokens; shorten the prompt, lower "
                               f"max_tokens or raise n_ctx")
        return ids

    def _run(self, prompt, max_tokens=256, temperature=0.0, top_k=20, top_p=0.8, seed=None,
             stop=None, mode="orthrus", block_size=None, rule="speculative"
             ) -> Iterator[tuple[str, list[int], Stats]]:
        """Yield (new text, new tokens, stats) per step; sets self.finish_reason."""
        ids = self._prepare(prompt, max_tokens, mode)
        sampler = Sampler(temperature, top_k, top_p, seed, rule)
        policy = self._policy(mode, block_size)
        stats = Stats(mode)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        hold = max((len(s) for s in stops), default=1) - 1
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, sent = "", 0
        self.finish_reason = "length"
        for new in decode(self.nm, ids, max_tokens, sampler, policy, self.is_eog, stats):
            if self.is_eog(new[-1]):
                self.finish_reason = "stop"
            text += utf8.decode(b"".join(self.token_bytes(t) for t in new if not self.is_eog(t)))
            cut = min((i for i in (text.find(s, max(0, sent - hold)) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self.finish_reason = "stop"
                yield text[sent:cut], new, stats
                return
            upto = len(text) if self.finish_reason == "stop" else max(sent, len(text) - hold)
            yield text[sent:upto], new, stats
            sent = upto
        text += utf8.decode(b"", final=True)
        if len(text) > sent:
            yield text[sent:], [], stats

    def generate(self, prompt, max_tokens: int = 256, temperature: float = 0.0, top_k: int = 20,
                 top_p: float = 0.8, seed: int | None = None, stop=None, mode: str = "orthrus",
                 block_size=None, rule: str = "speculative") -> Result:
        """Complete `prompt` (text or token ids). Greedy (temperature 0) is lossless: the tokens
        equal mode="ar"; temperature > 0 samples exactly the AR distribution (`rule`:
        "speculative" sampling, or "match", which accepts fewer drafts)."""
        pieces, tokens, stats = [], [], None
        for piece, new, stats in self._run(prompt, max_tokens, temperature, top_k, top_p, seed,
                                           stop, mode, block_size, rule):
            pieces.append(piece)
            tokens.extend(new)
        return Result("".join(pieces), tokens, self.finish_reason, stats.summary() | {
            "steps_detail": [{"block": b, "drafted": d, "accepted": a, "reused": r}
                             for b, d, a, r in zip(stats.blocks, stats.drafted, stats.accepted, stats.reused)]})

    def stream(self, prompt, **kw) -> Iterator[str]:
        for piece, _, _ in self._run(prompt, **kw):
            if piece:
                yield piece

    def create_chat_completion(self, messages: list[dict], stream: bool = False, max_tokens: int = 256,
                               **kw):
        prompt = self.apply_chat_template(messages)
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), self.nm.path.name
        if stream:
            return self._chat_chunks(prompt, cid, created, model, max_tokens, kw)
        r = self.generate(prompt, max_tokens=max_tokens, **kw)
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text},
                         "finish_reason": r.finish_reason}],
            "usage": {"prompt_tokens": r.stats["prompt_tokens"], "completion_tokens": len(r.tokens),
                      "total_tokens": r.stats["prompt_tokens"] + len(r.tokens)},
            "orthrus": {k: v for k, v in r.stats.items() if k != "steps_detail"},
        }

    def _chat_chunks(self, prompt, cid, created, model, max_tokens, kw):
        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        yield chunk({"role": "assistant"})
        for piece in self.stream(prompt, max_tokens=max_tokens, **kw):
            yield chunk({"content": piece})
        yield chunk({}, self.finish_reason)
