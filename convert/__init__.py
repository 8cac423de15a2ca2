"""Converter: Orthrus-Qwen3 Hugging Face checkpoints to orthrus-qwen3 GGUF files."""
from __future__ import annotations

from pathlib import Path


def convert(model: str | Path, out: str | Path | None = None, outtype: str = "f16",
            force: bool = False, progress: bool = True) -> Path:
    """Convert MODEL (directory or hub id) to OUT; outtype f32/f16/bf16/q8_0 or a llama-quantize type."""
    from .writer import OUTTYPES, convert_checkpoint
    if outtype in OUTTYPES:
        return convert_checkpoint(model, out, outtype, force, progress)
    from .quantize import convert_quantized
    return convert_quantized(model, out, outtype, force, progress)
