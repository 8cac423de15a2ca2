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


# ------------------------------------------------------------------ speed-test models

# real Orthrus-Qwen3 shapes (docs/ALGORITHM.md): layers, hidden, heads, kv heads, ffn
SHAPES = {
    "1.7b": dict(n_layers=28, hidden=2048, n_heads=16, n_kv_heads=8, ffn=6144, tied=True),
    "8b": dict(n_layers=36, hidden=4096, n_heads=32, n_kv_heads=8, ffn=12288, tied=False),
    "test": dict(n_layers=2, hidden=256, n_heads=2, n_kv_heads=1, ffn=512, tied=False),  # for the tests
}


def write_random_gguf(path: str | Path, shape: str = "1.7b", block_size: int = 32, seed: int = 0) -> Path:
    """An orthrus-qwen3 GGUF of a published model's shape with random weights, for speed only.

    Weights are written straight as quantized blocks, Q4_K_M's layout (Q6_K for the output
    head and for attn_v / ffn_down of the layers llama-quantize gives more bits, Q4_K
    elsewhere, norms F32): random codes with a small fixed scale, so that no float weights
    are made and an 8B shape takes seconds. The tokenizer is a tiny one, padded to the
    published 151,936-row vocabulary, so the output head costs what the real one costs."""
    import tempfile
    from types import SimpleNamespace

    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from gguf.constants import GGML_QUANT_SIZES

    from .config import OrthrusConfig
    from .convert import schema
    from .convert.vocab import add_tokenizer
    from .checkpoint import Source
    from .convert.writer import gguf_writer, write_hparams

    s = SHAPES[shape]
    n_tok = 300
    cfg = tiny_config(n_layers=s["n_layers"], hidden=s["hidden"], n_heads=s["n_heads"],
                      n_kv_heads=s["n_kv_heads"], head_dim=128, ffn=s["ffn"], vocab_size=151936,
                      n_tokens=n_tok, block_size=block_size, tied=s["tied"])
    config = OrthrusConfig.from_dict(cfg)
    h, hd, nh, nkv, ffn, L = s["hidden"], 128, s["n_heads"], s["n_kv_heads"], s["ffn"], s["n_layers"]
    tensors = [("token_embd.weight", (151936, h), QT.Q4_K), ("output_norm.weight", (h,), QT.F32)]
    if not s["tied"]:
        tensors.append(("output.weight", (151936, h), QT.Q6_K))
    for b in range(L):
        more_bits = b < L // 8 or b >= 7 * L // 8 or (b - L // 8) % 3 == 2  # llama-quantize's use_more_bits
        big = QT.Q6_K if more_bits else QT.Q4_K
        for name, shp, qt in (("attn_norm", (h,), QT.F32), ("ffn_norm", (h,), QT.F32),
                              ("attn_q", (nh * hd, h), QT.Q4_K), ("attn_k", (nkv * hd, h), QT.Q4_K),
                              ("attn_v", (nkv * hd, h), big), ("attn_output", (h, nh * hd), QT.Q4_K),
                              ("attn_q_norm", (hd,), QT.F32), ("attn_k_norm", (hd,), QT.F32),
                              ("ffn_gate", (ffn, h), QT.Q4_K), ("ffn_up", (ffn, h), QT.Q4_K),
                              ("ffn_down", (h, ffn), big),
                              ("attn_q_diff", (nh * hd, h), QT.Q4_K), ("attn_k_diff", (nkv * hd, h), QT.Q4_K),
                              ("attn_v_diff", (nkv * hd, h), QT.Q4_K), ("attn_output_diff", (h, nh * hd), QT.Q4_K),
                              ("attn_q_norm_diff", (hd,), QT.F32), ("attn_k_norm_diff", (hd,), QT.F32)):
            tensors.append((f"blk.{b}.{name}.weight", shp, qt))
    rng = np.random.default_rng(seed)
    scale = np.array([0.002], dtype=np.float16).view(np.uint8)

    def data(shp, qt):
        if qt == QT.F32:
            return np.ones(shp, dtype=np.float32)
        block, size = GGML_QUANT_SIZES[qt]
        rows = int(np.prod(shp[:-1]))
        raw = np.frombuffer(rng.bytes(rows * (shp[-1] // block) * size), dtype=np.uint8).reshape(-1, size).copy()
        if qt == QT.Q4_K:  # d, dmin (f16) lead the block
            raw[:, 0:2] = scale
            raw[:, 2:4] = 0
        else:  # Q6_K: d (f16) ends it; int8 scales kept small
            raw[:, -2:] = scale
            raw[:, 192:208] &= 0x0F
        return raw.reshape(rows, -1)

    path = Path(path)
    with tempfile.TemporaryDirectory() as tok_dir:
        save_hf_tokenizer(tiny_tokenizer(n_tok), tok_dir)

        def metadata(w):
            write_hparams(w, SimpleNamespace(config=config), 15, Source(Path(path), f"random-{shape}"))  # 15: MOSTLY_Q4_K_M
            add_tokenizer(w, Path(tok_dir), config)

        with gguf_writer(path, tensors, metadata) as w:
            for _, shp, qt in tensors:
                w.write_tensor_data(data(shp, qt))
    return path
