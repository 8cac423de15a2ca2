"""Reading Orthrus-Qwen3 checkpoints in the Hugging Face layout, one tensor at a time.

A checkpoint is a directory with config.json and either model.safetensors or shards
listed in model.safetensors.index.json. Headers are read and cross-checked first, so a
missing, extra, wrongly shaped or truncated tensor is reported before anything is written.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import OrthrusConfig, read_json
from .errors import OrthrusError, interruption
from .convert import schema

ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.md"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path


@dataclass(frozen=True)
class Source:
    """Where a checkpoint came from: its directory, its name (the hub repo's name, or the
    directory's), and for a hub id the repo and the revision asked for."""
    path: Path
    name: str
    repo_id: str | None = None
    revision: str | None = None


def locate(model, revision: str | None = None, token: str | bool | None = None,
           cache_dir: str | Path | None = None) -> Source:
    """A local checkpoint directory, or a hub id fetched (or found in the cache) by
    huggingface_hub at `revision` (a branch, tag or commit), with `token` and `cache_dir`."""
    if isinstance(model, Source):
        return model
    model = str(model)
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise OrthrusError(f"{model}: not a directory (expected a Hugging Face checkpoint "
                               f"directory with config.json and *.safetensors, or a hub id)")
        if revision is not None:
            raise OrthrusError(f"{model}: --revision applies to hub ids, not to a local directory")
        return Source(p, p.resolve().name)
    if not HUB_ID.match(model):
        raise OrthrusError(f"{model}: no such directory, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    try:
        path = snapshot_download(repo_id=model, revision=revision, token=token,
                                 cache_dir=None if cache_dir is None else str(cache_dir),
                                 allow_patterns=HUB_PATTERNS)
    except Exception as e:  # network, auth, offline-and-not-cached: all the same to the user
        at = f" at revision {revision!r}" if revision else ""
        raise OrthrusError(f"{model}{at}: could not fetch from the Hugging Face hub "
                           f"({type(e).__name__}: {e}). Check the id, the revision, your network, "
                           f"the token or HF_HUB_OFFLINE, or pass a local directory") from None
    return Source(Path(path), model.split("/", 1)[1], model, revision)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise OrthrusError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise OrthrusError(f"{path}: truncated or corrupt safetensors file "
                               f"(header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OrthrusError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise OrthrusError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                           f"not an object); re-download the file")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, h in header.items():
        if not (isinstance(h, dict) and isinstance(h.get("dtype"), str) and isinstance(h.get("shape"), list)
                and isinstance(h.get("data_offsets"), list) and len(h["data_offsets"]) == 2
                and all(isinstance(x, int) and x >= 0 for x in h["data_offsets"] + h["shape"])):
            raise OrthrusError(f"{path}: corrupt safetensors header entry for {name!r} (needs dtype, "
                               f"shape and data_offsets); re-download the file")
        if h["dtype"] not in ST_DTYPES:
            raise OrthrusError(f"{path}: tensor {name} has unsupported dtype {h['dtype']} "
                               f"(expected one of {', '.join(ST_DTYPES)})")
        end = max(end, h["data_offsets"][1])
        out[name] = TensorInfo(name, tuple(h["shape"]), h["dtype"], path)
    if 8 + n + end > size:
        raise OrthrusError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, "
                           f"the file has {size}. Re-download it")
    return out


class Checkpoint:
    """config + a verified tensor table; `tensors()` yields (hf_name, torch.Tensor) lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise OrthrusError(f"{self.path}: not a directory")
        self.config = OrthrusConfig.from_file(self.path / "config.json")
        self.table = self._read_table()
        self._check_tensors()

    def _read_table(self) -> dict[str, TensorInfo]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise OrthrusError(f"{index}: no weight_map")
            table: dict[str, TensorInfo] = {}
            for shard in sorted(set(weight_map.values())):
                f = self.path / str(shard)
                if not isinstance(shard, str) or not f.resolve().is_relative_to(self.path.resolve()):
                    raise OrthrusError(f"{index}: lists shard {shard!r}, outside the checkpoint "
                                       f"directory; a shard must be a file in it")
                if not f.is_file():
                    raise OrthrusError(f"{index}: lists shard {shard}, which is missing")
                header = read_safetensors_header(f)
                listed = {k for k, v in weight_map.items() if v == shard}
                if set(header) != listed:
                    extra, gone = sorted(set(header) - listed), sorted(listed - set(header))
                    raise OrthrusError(f"{f}: does not match the index: "
                                       f"not in index {extra[:5]}, missing from shard {gone[:5]}")
                table.update(header)
            return table
        if single.is_file():
            return read_safetensors_header(single)
        raise OrthrusError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        h, d, q, kv = c.hidden_size, c.head_dim, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        per_layer = {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
            "self_attn.q_norm_diff.weight": (d,), "self_attn.k_norm_diff.weight": (d,),
            "mlp.gate_proj.weight": (c.intermediate_size, h), "mlp.up_proj.weight": (c.intermediate_size, h),
            "mlp.down_proj.weight": (h, c.intermediate_size),
        }
        for sfx in ("", "_diff"):
            per_layer[f"self_attn.q_proj{sfx}.weight"] = (q, h)
            per_layer[f"self_attn.k_proj{sfx}.weight"] = (kv, h)
            per_layer[f"self_attn.v_proj{sfx}.weight"] = (kv, h)
            per_layer[f"self_attn.o_proj{sfx}.weight"] = (h, q)
        out = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
        if "lm_head.weight" in self.table or not c.tie_word_embeddings:
            out["lm_head.weight"] = (c.vocab_size, h)
        for b in range(c.num_hidden_layers):
            for k, s in per_layer.items():
                out[schema.hf_layer_name(b, k)] = s
        return out

    def _check_tensors(self) -> None:
        want, have = self.expected_shapes(), self.table
        if not any("_diff." in k for k in have):
            raise OrthrusError(f"{self.path}: no diffusion tensors (*_proj_diff, *_norm_diff): this looks "
                               f"like a plain Qwen3 checkpoint, not Orthrus. Use llama.cpp's own "
                               f"convert_hf_to_gguf.py for plain Qwen3")
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing:
            raise OrthrusError(f"{self.path}: {len(missing)} tensor(s) missing: {', '.join(missing[:8])}"
                               + (" …" if len(missing) > 8 else ""))
        if extra:
            raise OrthrusError(f"{self.path}: {len(extra)} unexpected tensor(s): {', '.join(extra[:8])}"
                               + (" …" if len(extra) > 8 else ""))
        for k, s in want.items():
            if have[k].shape != s:
                raise OrthrusError(f"{have[k].file}: tensor {k} has shape {list(have[k].shape)}, "
                                   f"expected {list(s)} from config.json")

    @property
    def tied(self) -> bool:
        return "lm_head.weight" not in self.table

    def tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors one at a time (peak memory: about one tensor), file by file."""
        from safetensors import safe_open
        names = list(self.table) if names is None else names
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.table[n].file, []).append(n)
        for f, ns in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as st:
                    for n in ns:
                        yield n, st.get_tensor(n)
            except OrthrusError:
                raise
            except Exception as e:
                # a stop signal inside the reader can come back wrapped in the reader's own
                # error: the CLI's handler noted it; outside the CLI, look inside the error
                stop = interruption()
                if stop is not None:
                    raise stop from e
                if any(isinstance(x, KeyboardInterrupt) for x in (e.__cause__, e.__context__)) \
                        or "KeyboardInterrupt" in str(e):
                    raise KeyboardInterrupt from e
                raise OrthrusError(f"{f}: cannot read ({type(e).__name__}: {e})") from None

    def state_dict(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        return {n: t.to(dtype) for n, t in self.tensors()}


