"""`prepare`: corpus -> tokenizer -> token streams, in one small directory.

Run where the corpus is (this interpreter's stdlib); `fit` then needs only this directory.
Files: train.npy / val.npy (uint16 token streams, documents separated by <|endoftext|>),
tokenizer.json, heldout_prompts.json, manifest.json, meta.json.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np

from ..tokenizer import train_bpe
from . import corpus

N_TOKENS = 4000  # BPE tokens incl. the 256 bytes; 5 chat tokens follow, then the mask row
VOCAB_ROWS = 4096


def encode_stream(tok, texts: list[str], eos: int) -> np.ndarray:
    out = []
    for enc in tok.encode_batch(texts):
        out += enc.ids + [eos]
    return np.asarray(out, dtype=np.uint16)


def prepare(out: str | Path, n_tokens: int = N_TOKENS, vocab_rows: int = VOCAB_ROWS,
            n_math: int = 24000, seed: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    c = corpus.build(n_math=n_math)
    docs = c["code"] + c["math"]
    tok = train_bpe(docs, n_tokens)
    n_ids = tok.get_vocab_size()  # BPE + <|endoftext|> <|im_start|> <|im_end|> <think> </think>
    base_tokens = tok.token_to_id("<|endoftext|>")
    eos = base_tokens
    random.Random(seed).shuffle(docs)
    train = encode_stream(tok, docs, eos)
    val = encode_stream(tok, c["val"], eos)
    math_tokens = sum(len(e.ids) + 1 for e in tok.encode_batch(c["math"]))
    np.save(out / "train.npy", train)
    np.save(out / "val.npy", val)
    tok.save(str(out / "tokenizer.json"))
    (out / "heldout_prompts.json").write_text(json.dumps(c["prompts"], indent=1))
    manifest = c["manifest"]
    manifest["tokens"] = {"train": int(len(train)), "val_heldout_code": int(len(val)),
                          "generated_math": int(math_tokens),
                          "generated_math_share": round(math_tokens / len(train), 4)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    meta = {"n_tokens": base_tokens, "tokenizer_ids": n_ids, "mask_token_id": n_ids,
            "vocab_size": vocab_rows, "prepare_seconds": round(time.perf_counter() - t0, 1)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return {**meta, **manifest["tokens"]}
