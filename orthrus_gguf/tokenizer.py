"""Qwen2-style byte-level BPE tokenizers in the Hugging Face file layout."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# The Qwen2 pre-tokenizer split (llama.cpp's "qwen2" pre-tokenizer implements the same).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added, not special, as in Qwen3
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen2_tokenizer(vocab: dict[str, int] | None = None, merges: list | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False) if vocab else models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (incl. 256 bytes), then the chat tokens after it."""
    tok = qwen2_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(THINK_TOKENS)
    return tok


def save_hf_tokenizer(tok: Tokenizer, out: str | Path, chat_template: str = CHAT_TEMPLATE) -> None:
    out = Path(out)
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "special": t in SPECIAL_TOKENS, "lstrip": False,
                                       "rstrip": False, "normalized": False, "single_word": False}
             for t in SPECIAL_TOKENS + THINK_TOKENS}
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "errors": "replace", "model_max_length": 131072,
        "added_tokens_decoder": added, "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
