"""Tiny random Orthrus-Qwen3 checkpoints in exactly the published Hugging Face layout."""
from __future__ import annotations

import inspect
import json
import string
from pathlib import Path

import torch

from .tokenizer import save_hf_tokenizer, train_bpe

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TOKENIZERS: dict[int, object] = {}


def tiny_tokenizer(n_tokens: int):
    """A BPE with n_tokens base tokens trained on a fixed text (cached per size)."""
    if n_tokens not in _TOKENIZERS:
        text = inspect.getsource(string) + inspect.getsource(json.decoder)
        _TOKENIZERS[n_tokens] = train_bpe([text], n_tokens)
    return _TOKENIZERS[n_tokens]


def tiny_config(*, n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=128,
                vocab_size=512, n_tokens=300, block_size=8, tied=True, dtype="float32",
                rope_theta=10000.0) -> dict:
    """config.json as the published checkpoints write it (both dtype and rope spellings)."""
    return {
        "architectures": ["OrthrusLM"], "model_type": "orthrus",
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "use_sliding_window": False, "sliding_window": None,
        "layer_types": ["full_attention"] * n_layers,
        "tie_word_embeddings": tied, "torch_dtype": dtype, "dtype": dtype,
        "bos_token_id": n_tokens, "eos_token_id": n_tokens + 2,  # <|endoftext|>, <|im_end|>
        "block_size": block_size, "mask_token_id": n_tokens + 5,  # first row past the tokenizer
        "transformers_version": "4.57.0",
    }


def random_state_dict(cfg: dict, seed: int = 0, std: float = 0.5) -> dict[str, torch.Tensor]:
    """Random weights of every tensor of an Orthrus checkpoint of config `cfg` (float32).

    The std is large enough that logits are far from ties: tiny models with 0.02-std weights
    have near-uniform outputs, where any rounding flips an argmax."""
    from .config import OrthrusConfig
    from .reference import OrthrusModel
    g = torch.Generator().manual_seed(seed)
    model = OrthrusModel(OrthrusConfig.from_dict(cfg))
    sd = {}
    for name, p in model.state_dict().items():
        if "norm" in name:
            sd[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            sd[name] = std * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * (
                8.0 if name.endswith("embed_tokens.weight") else 1.0)
    return sd


def write_checkpoint(path: str | Path, cfg: dict, state_dict: dict[str, torch.Tensor], *,
                     shards: int = 1, tokenizer=None) -> Path:
    """Write config, safetensors (sharded with an index when shards > 1) and tokenizer files."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[cfg.get("torch_dtype") or cfg["dtype"]]
    sd = {k: v.to(dtype).contiguous() for k, v in state_dict.items()}
    if cfg.get("tie_word_embeddings"):
        sd.pop("lm_head.weight", None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": cfg["bos_token_id"], "eos_token_id": [cfg["eos_token_id"], cfg["bos_token_id"]],
        "pad_token_id": cfg["bos_token_id"], "do_sample": True, "temperature": 0.6, "top_k": 20,
        "top_p": 0.95, "transformers_version": cfg.get("transformers_version", "4.57.0")}, indent=2))
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(sd, str(path / "model.safetensors"), metadata=meta)
    else:
        names = list(sd)
        groups = [names[i::shards] for i in range(shards)]
        weight_map = {}
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: sd[k] for k in group}, str(path / fname), metadata=meta)
            weight_map.update({k: fname for k in group})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    save_hf_tokenizer(tokenizer or tiny_tokenizer(cfg["bos_token_id"]), path)
    return path


def write_tiny_checkpoint(path: str | Path, *, seed: int = 0, shards: int = 1, std: float = 0.5,
                          **config) -> Path:
    """A random Orthrus checkpoint; keyword arguments go to `tiny_config`."""
    cfg = tiny_config(**config)
    return write_checkpoint(path, cfg, random_state_dict(cfg, seed, std), shards=shards)
