"""`orthrus-gguf info`: what a GGUF file holds, from its header alone."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import OrthrusError

SHOWN = ("context_length", "embedding_length", "block_count", "feed_forward_length",
         "attention.head_count", "attention.head_count_kv", "attention.key_length",
         "rope.freq_base", "vocab_size", "diffusion.block_size", "diffusion.mask_token_id")


def check_gguf_file(path: str | Path) -> Path:
    """The path, if it is a file that starts with the GGUF magic; else a clear error."""
    import os
    if not isinstance(path, (str, os.PathLike)):
        raise OrthrusError(f"the model path must be a str or a path, got {type(path).__name__} {path!r:.60}")
    path = Path(path)
    if path.is_dir():
        raise OrthrusError(f"{path} is a directory, not a GGUF file (a checkpoint directory converts "
                           "with `orthrus-gguf convert`)")
    if path.exists() and not path.is_file():
        raise OrthrusError(f"{path} is not a regular file (expected a .gguf model)")
    if not path.is_file():
        raise OrthrusError(f"{path}: no such file (expected a .gguf model)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise OrthrusError(f"{path}: not a GGUF file (bad magic)")
    return path


def read_gguf(path: str | Path):
    from gguf import GGUFReader
    path = check_gguf_file(path)
    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise OrthrusError(f"{path}: cannot read GGUF: the file is truncated or corrupt "
                           f"({type(e).__name__}: {e})") from None


# llama.cpp asserts (aborts the process) on some impossible hyperparameters instead of
# failing the load; these are checked before it sees the file.
LLAMA_MAX_LAYERS = 512  # src/llama-hparams.h


def preflight(path: str | Path) -> Path:
    """A GGUF that llama.cpp can be handed without risking an abort: it parses, and a
    qwen3-family model's layer and head counts are possible. Returns the path."""
    r = read_gguf(path)
    arch = field_value(r, "general.architecture")
    if arch not in ("qwen3", "orthrus-qwen3"):
        return Path(path)

    def count(key: str, lo: int, hi: int) -> None:
        v = field_value(r, f"{arch}.{key}")
        if v is not None and (not isinstance(v, int) or not lo <= v <= hi):
            raise OrthrusError(f"{path}: {arch}.{key} is {v!r}, not in [{lo}, {hi}]; the file is damaged "
                               f"(convert the checkpoint again)")
    count("block_count", 1, LLAMA_MAX_LAYERS)
    for key in ("embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
                "attention.key_length", "attention.value_length", "context_length"):
        count(key, 1, 2**31 - 1)
    if arch == "orthrus-qwen3":  # a draft needs a real block and a real mask token
        from ..config import MAX_BLOCK_SIZE
        tokens = r.fields.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens.data) if tokens is not None else field_value(r, f"{arch}.vocab_size")
        block, mask = (field_value(r, f"{arch}.diffusion.{k}") for k in ("block_size", "mask_token_id"))
        if not isinstance(block, int) or not 2 <= block <= MAX_BLOCK_SIZE:
            bad = f"orthrus-qwen3.diffusion.block_size is {block!r}, not in [2, {MAX_BLOCK_SIZE}]"
        elif mask is None:
            bad = "it has no orthrus-qwen3.diffusion.mask_token_id (the diffusion view's mask token)"
        elif not isinstance(mask, int) or not isinstance(n_vocab, int) or not 0 <= mask < n_vocab:
            bad = f"orthrus-qwen3.diffusion.mask_token_id is {mask!r}, not a token of the vocabulary [0, {n_vocab})"
        else:
            bad = None
        if bad:
            raise OrthrusError(f"{path}: {bad}; the file is damaged or was not written by "
                               f"`orthrus-gguf convert` (convert the checkpoint again)")
    return Path(path)


def field_value(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.contents()
    return v


def gguf_info(path: str | Path) -> dict:
    r = read_gguf(path)
    arch = field_value(r, "general.architecture")
    info = {"file": str(path), "architecture": arch, "name": field_value(r, "general.name"),
            "file_size": Path(path).stat().st_size, "tensor_count": len(r.tensors),
            "tensor_types": dict(Counter(t.tensor_type.name for t in r.tensors).most_common())}
    for k in SHOWN:
        v = field_value(r, f"{arch}.{k}")
        if v is not None:
            info[k] = v
    tokens = r.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        info["n_tokens"] = len(tokens.data)
    return info


def format_info(info: dict) -> str:
    size = info["file_size"]
    lines = [f"{k:>26}: {v}" for k, v in info.items() if k not in ("file_size", "tensor_types")]
    lines.append(f"{'file_size':>26}: {size} bytes ({size / 2**20:.1f} MiB)")
    lines.append(f"{'tensor_types':>26}: " + ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items()))
    return "\n".join(lines)
