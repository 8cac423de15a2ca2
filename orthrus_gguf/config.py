"""OrthrusConfig: the fields of an Orthrus-Qwen3 config.json, named as in the file."""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from .errors import OrthrusError

DTYPES = ("bfloat16", "float16", "float32")
MAX_BLOCK_SIZE = 256


def read_json(path: Path, want: type = dict):
    """A checkpoint's JSON file, which must hold a `want` (object by default)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OrthrusError(f"{path}: not valid JSON ({e}); re-download the checkpoint") from None
    except OSError as e:
        raise OrthrusError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(d, want):
        raise OrthrusError(f"{path}: expected a JSON {'object' if want is dict else want.__name__}"
                           f"{' of model settings' if Path(path).name == 'config.json' else ''}, "
                           f"got a JSON {type(d).__name__}")
    return d


@dataclass
class OrthrusConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    block_size: int
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "OrthrusConfig":
        if not isinstance(d, dict):
            raise OrthrusError(f"{source}: expected a JSON object of model settings, got a JSON "
                               f"{type(d).__name__}")
        d = dict(d)
        # Newer transformers write `dtype` and may nest rope_theta in rope_parameters.
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d["dtype"]
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            if "rope_theta" in d["rope_parameters"]:
                d["rope_theta"] = d["rope_parameters"]["rope_theta"]
        if "head_dim" not in d and "hidden_size" in d and "num_attention_heads" in d:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            hint = ""
            if {"block_size", "mask_token_id"} & set(missing) and "model_type" in d:
                hint = f" (model_type is {d['model_type']!r}: is this an Orthrus checkpoint?)"
            raise OrthrusError(f"{source}: missing key(s) {', '.join(missing)}{hint}")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "OrthrusConfig":
        path = Path(path)
        if not path.is_file():
            raise OrthrusError(f"{path}: not found (an Orthrus checkpoint needs config.json)")
        return cls.from_dict(read_json(path), str(path))

    def validate(self, source: str = "config.json") -> None:
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OrthrusError(f"{source}: {k} must be a positive integer, got {v!r}")
        for k in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise OrthrusError(f"{source}: {k} must be a positive number, got {v!r}")
        v = self.max_position_embeddings
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OrthrusError(f"{source}: max_position_embeddings must be a positive integer, got {v!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise OrthrusError(f"{source}: tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise OrthrusError(f"{source}: num_attention_heads ({self.num_attention_heads}) is not "
                               f"a multiple of num_key_value_heads ({self.num_key_value_heads})")
        if not isinstance(self.block_size, int) or not 2 <= self.block_size <= MAX_BLOCK_SIZE:
            raise OrthrusError(f"{source}: block_size must be an integer in [2, {MAX_BLOCK_SIZE}], "
                               f"got {self.block_size!r}")
        if not isinstance(self.mask_token_id, int) or not 0 <= self.mask_token_id < self.vocab_size:
            raise OrthrusError(f"{source}: mask_token_id must be in [0, vocab_size={self.vocab_size}), "
                               f"got {self.mask_token_id!r}")
        if self.torch_dtype not in DTYPES:
            raise OrthrusError(f"{source}: unknown dtype {self.torch_dtype!r}; "
                               f"expected one of {', '.join(DTYPES)}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
