"""The tokenizer as llama.cpp expects it for Qwen3: gpt2 BPE with the qwen2 pre-tokenizer."""
from __future__ import annotations

from pathlib import Path

from gguf import GGUFWriter, TokenType

from ..config import OrthrusConfig, read_json
from ..errors import OrthrusError


def _token_id(name, vocab: dict[str, int], what: str, src: Path):
    if name is None:
        return None
    if isinstance(name, dict):  # {"content": "<|im_end|>", ...}
        name = name.get("content")
    if name not in vocab:
        raise OrthrusError(f"{src}/tokenizer_config.json: {what} {name!r} is not a token of tokenizer.json")
    return vocab[name]


def read_tokenizer(src: Path, vocab_size: int) -> dict:
    tj, tc = src / "tokenizer.json", src / "tokenizer_config.json"
    for f in (tj, tc):
        if not f.is_file():
            raise OrthrusError(f"{f}: missing (the GGUF needs the tokenizer and its chat template)")
    tok, cfg = read_json(tj), read_json(tc)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise OrthrusError(f"{tj}: expected a BPE tokenizer (Qwen2/Qwen3), got {model.get('type')!r}")
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    if max(vocab.values()) >= vocab_size:
        raise OrthrusError(f"{tj}: token id {max(vocab.values())} does not fit vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(text)
        types[i] = TokenType.NORMAL if a is None else (TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    template = cfg.get("chat_template")
    jinja = src / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    return {
        "tokens": tokens, "types": types, "merges": merges, "template": template,
        "eos": _token_id(cfg.get("eos_token"), vocab, "eos_token", src),
        "pad": _token_id(cfg.get("pad_token"), vocab, "pad_token", src),
        "bos": _token_id(cfg.get("bos_token"), vocab, "bos_token", src),
        "eot": vocab.get("<|im_end|>"),
    }


def add_tokenizer(w: GGUFWriter, src: Path, config: OrthrusConfig) -> None:
    t = read_tokenizer(src, config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(t["tokens"])
    w.add_token_types(t["types"])
    w.add_token_merges(t["merges"])
    if t["eos"] is None:
        raise OrthrusError(f"{src}/tokenizer_config.json: no eos_token; generation could never stop")
    w.add_eos_token_id(t["eos"])
    if t["eot"] is not None:
        w.add_eot_token_id(t["eot"])
    if t["pad"] is not None:
        w.add_pad_token_id(t["pad"])
    if t["bos"] is not None:
        w.add_bos_token_id(t["bos"])
    w.add_add_bos_token(False)
    if t["template"]:
        w.add_chat_template(t["template"])
