"""Converter: Orthrus-Qwen3 Hugging Face checkpoints to orthrus-qwen3 GGUF files."""
from __future__ import annotations

from pathlib import Path


def convert(model: str | Path, out: str | Path | None = None, outtype: str = "f16",
            force: bool = False, progress: bool = True, revision: str | None = None,
            token: str | bool | None = None, cache_dir: str | Path | None = None,
            imatrix: str | Path | None = None) -> Path:
    """Convert MODEL (directory or hub id, at `revision`, with `token` and `cache_dir` for the
    hub) to OUT (default: NAME-OUTTYPE.gguf, NAME the repo's or directory's name); outtype
    f32/f16/bf16/q8_0, "auto" (the checkpoint's own float type) or a llama-quantize type,
    which takes an importance matrix from llama-imatrix (`imatrix`)."""
    from ..checkpoint import Checkpoint, locate
    from ..errors import OrthrusError
    from .quantize import LOSSLESS, check_imatrix
    from .writer import OUTTYPES, convert_checkpoint
    if out is not None and not str(out).strip():
        raise OrthrusError("the output path is empty: name a .gguf file, or leave -o out for NAME-OUTTYPE.gguf")
    if imatrix is not None:
        check_imatrix(imatrix)  # before any download or conversion
    src = locate(model, revision, token, cache_dir)
    if outtype == "auto":
        outtype = LOSSLESS.get(Checkpoint(src.path).config.torch_dtype, "f16")
    if outtype in OUTTYPES:
        if imatrix is not None:
            raise OrthrusError(f"--imatrix applies to llama-quantize types (q4_k_m, iq3_xxs, …), "
                               f"not to {outtype}, which is written without quantizing")
        return convert_checkpoint(src, out, outtype, force, progress)
    from .quantize import convert_quantized
    return convert_quantized(src, out, outtype, force, progress, imatrix=imatrix)
