"""`Orthrus`: Orthrus decoding of an orthrus-qwen3 GGUF, shaped like llama_cpp.Llama.

    m = Orthrus("model.gguf", n_ctx=4096, n_gpu_layers=-1)
    r = m.generate("def fib(n):", max_tokens=64)            # greedy: identical to mode="ar"
    r.text, r.tokens, r.finish_reason, r.stats
    for piece in m.stream("…", temperature=0.7): print(piece, end="")
    m("Q: 2+2? A:", max_tokens=8)                           # Llama.create_completion's shape
    m.create_chat_completion(messages=[{"role": "user", "content": "hi"}])
    for p in m.steps("…"): p.text, p.step.accepted          # the typed step stream

Sampling is llama.cpp's chain (sampling.py). Each call reuses the longest prefix of the
prompt still in the KV cache (the previous prompt and output) and prefills only the rest.
"""
from __future__ import annotations

import codecs
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .convert.info import check_gguf_file
from .decode import Stats, Step, TokenLogprob, decode
from .errors import OrthrusError, check_int
from .native import Grammar, NativeModel, exact_mode, offloads, set_verbose
from .policy import ARPolicy, AutoPolicy, FixedPolicy, measure_costs, warm_widths
from .sampling import DEFAULTS, Sampler

MODES = ("orthrus", "ar")
MIN_CTX = 256  # llama.cpp's smallest context (llama_context's constructor raises smaller ones)
LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "random seed"
INT32_MAX = 2**31 - 1  # the C fields these sizes land in
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "frequency_penalty",
                 "presence_penalty", "penalty_last_n", "logit_bias", "seed", "rule")
# Llama.create_completion / create_chat_completion parameters Orthrus has no equivalent for:
# refused unless left at the value that means "off"
_UNSUPPORTED = {"suffix": None, "echo": False, "typical_p": 1.0, "tfs_z": 1.0, "mirostat_mode": 0,
                "stopping_criteria": None, "logits_processor": None,
                "functions": None, "function_call": None, "tools": None, "tool_choice": None,
                "response_format": None}


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end-of-generation token or stop string) or "length"
    stats: dict
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Piece:
    """One step of a generation: the text it adds (held back while it may start a stop
    string), the Step record, and on the last piece the finish reason."""
    text: str
    step: Step
    finish_reason: str | None = None


def _fold(pieces, mode: str, steps: list | None = None) -> tuple[Stats, str, list[TokenLogprob], str]:
    """A generation's pieces folded: stats, text, logprobs, finish reason (and its steps)."""
    stats, text, lps, finish = Stats(mode), [], [], "length"
    for piece in pieces:
        stats.add(piece.step)
        text.append(piece.text)
        lps.extend(piece.step.logprobs or ())
        finish = piece.finish_reason or finish
        if steps is not None:
            steps.append(piece.step)
    return stats, "".join(text), lps, finish


def _unsupported(kw: dict) -> None:
    for k, v in kw.items():
        if k not in _UNSUPPORTED:
            raise OrthrusError(f"unknown argument {k!r}")
        if v != _UNSUPPORTED[k] and not (k == "mirostat_mode" and v == 0):
            raise OrthrusError(f"{k} is not supported by Orthrus; llama_cpp.Llama with "
                               f"draft_model=OrthrusDraft(...) supports it (orthrus_gguf.OrthrusDraft)")


class Orthrus:
    def __init__(self, model_path: str | Path, *, n_ctx: int = 4096, n_batch: int = 512,
                 n_ubatch: int | None = None, n_threads: int | None = None, n_gpu_layers: int | str = 0,
                 flash_attn: bool | None = None, type_k: str | int = "f16", type_v: str | int | None = None,
                 seed: int = LLAMA_DEFAULT_SEED, verbose: bool = False,
                 block_size: int | str | None = None, exact: bool | str | None = None,
                 rpc_servers: str | list[str] | None = None, backend_sampling: bool | None = None):
        path = check_gguf_file(model_path)
        n_ctx = check_int("n_ctx", n_ctx, 0, INT32_MAX)  # 0: the model's training context
        n_batch = check_int("n_batch", n_batch, 1, INT32_MAX)
        n_ubatch = None if n_ubatch is None else check_int("n_ubatch", n_ubatch, 1, INT32_MAX)
        n_threads = None if n_threads is None else check_int("n_threads", n_threads, 1, 1024)
        seed = check_int("seed", seed, 0, LLAMA_DEFAULT_SEED)
        if not isinstance(verbose, (bool, np.bool_)):
            raise OrthrusError(f"verbose must be True or False, got {verbose!r}")
        if verbose:
            set_verbose(True)
        # exact: batch-invariant CPU kernels, so a verify batch gives bit for bit the logits of
        # one-token forwards and greedy Orthrus equals greedy AR (docs/NUMERICS.md): "verify"
        # (True) by default on the CPU, "all" for prompts too, "off" (False); no GPU kernels.
        mode = ("off" if offloads(n_gpu_layers) else "verify") if exact is None else exact_mode(exact)
        n_batch = max(int(n_batch), 64)
        # llama.cpp raises a context below 256 cells to 256 but clamps the batches to the size
        # asked for, which would leave a draft block no room: ask for what it will give
        n_ctx = n_ctx if n_ctx == 0 else max(n_ctx, MIN_CTX)
        self._nm = NativeModel(path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch or n_batch,
                               n_threads=n_threads, n_gpu_layers=n_gpu_layers, kv_type=type_k,
                               type_v=type_v, flash_attn=flash_attn, exact=mode, rpc_servers=rpc_servers,
                               backend_sampling=backend_sampling, n_outputs_max="block")
        nm = self._nm
        if nm.is_orthrus and nm.n_ubatch < nm.block_size:
            nm.close()
            raise OrthrusError(f"n_ubatch ({nm.n_ubatch}) must be at least the GGUF's block size "
                               f"({nm.block_size}): a draft is one micro-batch")
        self.model_path = str(path)
        self.block_size = self._check_block(block_size)
        self._rng = np.random.default_rng(None if seed == LLAMA_DEFAULT_SEED else seed)
        self._costs: tuple[dict, dict] | None = None
        self._auto: AutoPolicy | None = None

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        self._nm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def native(self) -> NativeModel:
        """The model and context underneath (positions, logits, the C API)."""
        return self._nm

    @property
    def exact(self) -> str:
        """Which forwards run on the batch-invariant CPU kernels: "off", "verify" or "all"."""
        return self._nm.exact

    @property
    def arch(self) -> str:
        return self._nm.arch

    def reset(self) -> None:
        """Drop the prefix cache: the next call prefills its whole prompt."""
        self._nm.clear()

    # ------------------------------------------------------------ text (as llama_cpp.Llama)
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._nm.tokenize(text, add_bos, special)

    def detokenize(self, tokens, special: bool = False) -> bytes:
        return self._nm.detokenize(tokens, special)

    def token_bytes(self, token: int) -> bytes:
        return self._nm.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        return self._nm.is_eog(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        tmpl = self._nm.chat_template()
        if not tmpl:
            raise OrthrusError(f"{self._nm.path}: the GGUF has no chat template (tokenizer.chat_template)")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise OrthrusError("messages must be a list of {'role': str, 'content': str} dicts")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(tmpl).render(messages=messages, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------ policy
    def _check_block(self, block) -> int | str:
        if not self._nm.is_orthrus:
            return 1
        gguf_b = self._nm.block_size
        if block is None:
            return gguf_b
        if block == "auto":
            return block
        if isinstance(block, str):
            if not block.isdigit():
                raise OrthrusError(f"block_size must be an integer or 'auto', got {block!r}")
            block = int(block)
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 2 <= block <= gguf_b:
            raise OrthrusError(f"block_size must be an integer in [2, {gguf_b}] (the GGUF's block size) "
                               f"or 'auto', got {block!r}")
        return int(block)

    def calibrate(self) -> tuple[dict[int, float], dict[int, float]]:
        """Seconds of a diffusion pass and of a verify forward at each warm width on this
        machine, by the policy's statistic (policy.calibration_cost, shared with the server).
        Drops the prefix cache."""
        if self._costs is None:
            nm = self._nm
            ctx_tokens = np.arange(64, dtype=np.int32) % max(2, nm.mask_token)
            nm.set_backend_sampling(True)  # the forwards as greedy decoding runs them
            nm.clear()
            nm.prefill(ctx_tokens)
            p = len(ctx_tokens)
            rows = {w: np.full(w, 1, dtype=np.int32) for w in warm_widths(nm.block_size)}  # outside the timing
            draft, verify = measure_costs(nm.block_size, lambda w: nm.draft(1, p, w),
                                          lambda w: nm.verify(rows[w], p), lambda: nm.seq_rm(p))
            nm.clear()
            self._costs, self._auto = (draft, verify), None
        return self._costs

    def _policy(self, mode: str, block):
        if mode == "ar":
            if block is not None:
                self._check_block(block)  # a wrong block size is an error in either mode
            return ARPolicy()
        if not self._nm.is_orthrus:
            raise OrthrusError(f"{self._nm.path}: architecture {self.arch!r} has no diffusion view; "
                               f"Orthrus mode needs an orthrus-qwen3 GGUF (mode='ar' works)")
        block = self.block_size if block is None else self._check_block(block)
        if block == "auto":  # one per model: acceptance learnt on earlier calls carries over
            if self._auto is None:
                self._auto = AutoPolicy(self._nm.block_size, *self.calibrate())
            return self._auto
        return FixedPolicy(block)

    # ------------------------------------------------------------ generation
    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            ids = self.tokenize(prompt, add_bos=True, special=True)
        else:
            try:
                items = list(prompt)
            except TypeError:
                raise OrthrusError("the prompt must be a string or a list of token ids, "
                                   f"got {type(prompt).__name__}") from None
            ids = [self._nm.token_id(t) for t in items]  # ints in the vocabulary, not 1.5 or True
        if not ids:
            raise OrthrusError("the prompt is empty")
        return ids

    def _sampler(self, kw: dict) -> Sampler:
        s = Sampler(**kw)
        if kw.get("seed") is None:
            s.rng = self._rng  # the object's generator (seeded by Orthrus(seed=...)) carries on
        s.check_vocab(self._nm.n_vocab)
        return s

    def steps(self, prompt, max_tokens: int | None = 256, *, stop=None, mode: str = "orthrus",
              block_size=None, logprobs: int | None = None, temperature: float = 0.0, grammar=None,
              **sampling) -> Iterator[Piece]:
        """The step stream: one Piece per decoding step, the finish reason on the last.
        Sampling parameters are llama.cpp's (sampling.Sampler; its defaults where not given);
        temperature 0 is greedy, where Orthrus output equals mode="ar" token for token.
        grammar: GBNF text or a llama_cpp.LlamaGrammar; drafts are then kept by token matching."""
        if mode not in MODES:
            raise OrthrusError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        for k in sampling:
            if k not in SAMPLING_KEYS:
                raise OrthrusError(f"unknown argument {k!r}")
        ids = self._prompt_ids(prompt)
        room = self._nm.n_ctx - len(ids)
        if max_tokens is None or (isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
                                  and max_tokens <= 0):
            max_tokens = room  # as Llama: until the context is full
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise OrthrusError(f"max_tokens must be an integer >= 1 (or None), got {max_tokens!r}")
        if max_tokens > room:
            raise OrthrusError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                               f"context of {self._nm.n_ctx} tokens; shorten the prompt, lower "
                               f"max_tokens or raise n_ctx")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or logprobs < 0):
            raise OrthrusError(f"logprobs must be an integer >= 0 (top tokens per position), got {logprobs!r}")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop)):
            raise OrthrusError(f"stop must be a string or a list of strings, got {stop!r}")
        stops = [s for s in stop or [] if s]  # an empty stop string would match everywhere
        sampler = self._sampler(dict(sampling, temperature=temperature))
        policy = self._policy(mode, block_size)
        if grammar is not None:
            gbnf, root = (grammar, "root") if isinstance(grammar, str) else \
                (getattr(grammar, "_grammar", None), getattr(grammar, "_root", "root"))
            grammar = Grammar(self._nm, gbnf, root)
        return self._pieces(ids, max_tokens, sampler, policy, stops, logprobs, grammar)

    def _pieces(self, ids, max_tokens, sampler, policy, stops, logprobs, grammar) -> Iterator[Piece]:
        try:
            yield from self._text(ids, max_tokens, sampler, policy, stops, logprobs, grammar)
        finally:
            if grammar is not None:
                grammar.close()

    def _text(self, ids, max_tokens, sampler, policy, stops, logprobs, grammar) -> Iterator[Piece]:
        nm = self._nm
        hold = max((len(s) for s in stops), default=1) - 1
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, sent, n_out = "", 0, 0
        for step in decode(nm, ids, max_tokens, sampler, policy, nm.is_eog, logprobs, grammar):
            n_out += len(step.tokens)
            eog = nm.is_eog(step.tokens[-1])
            text += utf8.decode(b"".join(nm.token_bytes(t) for t in step.tokens if not nm.is_eog(t)))
            cut = min((i for i in (text.find(s, max(0, sent - hold)) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                yield Piece(text[sent:cut], step, "stop")
                return
            done = eog or n_out >= max_tokens
            if done:
                text += utf8.decode(b"", final=True)
            upto = len(text) if done else max(sent, len(text) - hold)
            yield Piece(text[sent:upto], step, ("stop" if eog else "length") if done else None)
            sent = upto

    def generate(self, prompt, max_tokens: int | None = 256, **kw) -> Result:
        """Complete `prompt` (text or token ids); see steps() for the arguments. Greedy
        (temperature 0, the default) is lossless: the tokens equal mode="ar"; temperature > 0
        samples exactly the AR distribution (`rule`: "speculative" sampling, or "match")."""
        steps: list[Step] = []
        stats, text, lps, finish = _fold(self.steps(prompt, max_tokens, **kw), kw.get("mode", "orthrus"), steps)
        detail = [{"block": s.block, "drafted": s.drafted, "accepted": s.accepted, "reused": s.reused}
                  for s in steps if s.block]
        return Result(text, [t for s in steps for t in s.tokens], finish,
                      stats.summary() | {"steps_detail": detail}, lps if kw.get("logprobs") is not None else None)

    def stream(self, prompt, max_tokens: int | None = 256, **kw) -> Iterator[str]:
        for piece in self.steps(prompt, max_tokens, **kw):
            if piece.text:
                yield piece.text

    # ------------------------------------------------------------ llama_cpp.Llama shapes
    def _token_str(self, t: int) -> str:
        return self._nm.token_bytes(t).decode("utf-8", errors="ignore")

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict:
        """Llama.create_completion's `logprobs` object."""
        out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for lp in lps:
            s = self._token_str(lp.token)
            out["tokens"].append(s)
            out["text_offset"].append(offset)
            out["token_logprobs"].append(lp.logprob)
            top = {self._token_str(j): v for j, v in lp.top}
            top[s] = lp.logprob
            out["top_logprobs"].append(top)
            offset += len(s)
        return out

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> dict:
        """The OpenAI chat `logprobs` object ({"content": [...]})."""
        def entry(t, v):
            s = self._token_str(t)
            return {"token": s, "logprob": v, "bytes": list(self._nm.token_bytes(t))}
        return {"content": [entry(lp.token, lp.logprob) | {"top_logprobs": [entry(j, v) for j, v in lp.top]}
                            for lp in lps]}

    def _head(self, kind: str, model: str | None) -> dict:
        return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4()}",
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": model or self.model_path}

    @staticmethod
    def _usage(stats: Stats) -> dict:
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.tokens,
                "total_tokens": stats.prompt_tokens + stats.tokens,
                "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}

    def create_completion(self, prompt, max_tokens: int | None = 16, temperature: float = 0.8,
                          top_p: float = DEFAULTS["top_p"], min_p: float = DEFAULTS["min_p"],
                          logprobs: int | None = None, stop=None, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, repeat_penalty: float = 1.0,
                          top_k: int = DEFAULTS["top_k"], stream: bool = False, seed: int | None = None,
                          model: str | None = None, logit_bias: dict | None = None, grammar=None,
                          mode: str = "orthrus", block_size=None, **unsupported):
        """llama_cpp.Llama.create_completion's arguments (its defaults) and return shapes
        (stream=True: an iterator of chunks); `logprobs` come from the verify rows."""
        _unsupported(unsupported)
        kw = dict(stop=stop, mode=mode, block_size=block_size, logprobs=logprobs, temperature=temperature,
                  top_p=top_p, min_p=min_p, top_k=top_k, frequency_penalty=frequency_penalty,
                  presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, seed=seed,
                  logit_bias=logit_bias, grammar=grammar)
        head = self._head("text", model)
        pieces = self.steps(prompt, max_tokens, **kw)
        if stream:
            return self._completion_chunks(head, pieces, logprobs is not None)
        stats, text, lps, finish = _fold(pieces, mode)
        return head | {
            "choices": [{"text": text, "index": 0, "finish_reason": finish,
                         "logprobs": self._completion_logprobs(lps, 0) if logprobs is not None else None}],
            "usage": self._usage(stats), "orthrus": stats.summary()}

    __call__ = create_completion

    def _completion_chunks(self, head, pieces, with_logprobs):
        offset = 0
        for piece in pieces:
            lp = self._completion_logprobs(list(piece.step.logprobs or ()), offset) if with_logprobs else None
            offset += len(piece.text)
            yield head | {"choices": [{"text": piece.text, "index": 0, "logprobs": lp,
                                       "finish_reason": piece.finish_reason}]}

    def create_chat_completion(self, messages: list[dict], temperature: float = 0.2,
                               top_p: float = DEFAULTS["top_p"], top_k: int = DEFAULTS["top_k"],
                               min_p: float = DEFAULTS["min_p"], stream: bool = False, stop=None,
                               seed: int | None = None, max_tokens: int | None = None,
                               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                               repeat_penalty: float = 1.0, model: str | None = None,
                               logit_bias: dict | None = None, logprobs: bool | None = None,
                               top_logprobs: int | None = None, grammar=None, mode: str = "orthrus",
                               block_size=None, **unsupported):
        """llama_cpp.Llama.create_chat_completion's arguments (its defaults) and shapes, with
        the GGUF's chat template."""
        _unsupported(unsupported)
        prompt = self.apply_chat_template(messages)
        n_top = (top_logprobs or 0) if logprobs else None
        kw = dict(stop=stop, mode=mode, block_size=block_size, logprobs=n_top, temperature=temperature,
                  top_p=top_p, min_p=min_p, top_k=top_k, frequency_penalty=frequency_penalty,
                  presence_penalty=presence_penalty, repeat_penalty=repeat_penalty, seed=seed,
                  logit_bias=logit_bias, grammar=grammar)
        head = self._head("chat", model)
        pieces = self.steps(prompt, max_tokens, **kw)
        if stream:
            return self._chat_chunks(head, pieces, n_top is not None)
        stats, text, lps, finish = _fold(pieces, mode)
        return head | {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": self._chat_logprobs(lps) if n_top is not None else None,
                         "finish_reason": finish}],
            "usage": self._usage(stats), "orthrus": stats.summary()}

    def _chat_chunks(self, head, pieces, with_logprobs):
        head = head | {"object": "chat.completion.chunk"}
        yield head | {"choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                   "finish_reason": None}]}
        for piece in pieces:
            lp = self._chat_logprobs(list(piece.step.logprobs or ())) if with_logprobs else None
            delta = {"content": piece.text} if piece.text else {}
            if delta or lp:
                yield head | {"choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": None}]}
            if piece.finish_reason:
                yield head | {"choices": [{"index": 0, "delta": {}, "logprobs": None,
                                           "finish_reason": piece.finish_reason}]}
