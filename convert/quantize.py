"""k-quants and the other llama-quantize types: convert losslessly, then run the patched llama-quantize.

The six `_diff` tensors are named so that llama-quantize's per-tensor bumps (which match
`attn_v.weight`, `attn_output.weight`, …) skip them: they get the ftype's base type. The
diffusion view only drafts; its quantization error can lower acceptance, never change the
output, so the bits are better spent on the AR view that decides every token.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from ..checkpoint import Checkpoint, locate
from ..errors import OrthrusError, temporary_beside
from .writer import convert_checkpoint

# llama-quantize's ftype names (lower case) that need no importance matrix.
QUANT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l",
               "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0")
# and those llama-quantize makes only with one (--imatrix)
IMATRIX_TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m")
LOSSLESS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def llama_quantize() -> Path:
    from ..build import binary
    return binary("llama-quantize", "k-quants of orthrus-qwen3 need the patched quantizer")


def check_imatrix(imatrix) -> Path:
    """An importance matrix file (llama-imatrix's output) that exists and can be read."""
    p = Path(imatrix)
    if not p.is_file() or not os.access(p, os.R_OK):
        raise OrthrusError(f"--imatrix {imatrix}: no such readable file; make one with "
                           "`llama-imatrix -m MODEL-f16.gguf -f calibration.txt -o imatrix.gguf`")
    return p


def convert_quantized(model, out, qtype: str, force: bool = False, progress: bool = True,
                      threads: int | None = None, imatrix: str | Path | None = None) -> Path:
    """MODEL converted losslessly, then quantized by llama-quantize to qtype, with the
    importance matrix `imatrix` if given (required by the IQ1/IQ2/IQ3 types)."""
    if qtype in IMATRIX_TYPES and imatrix is None:
        raise OrthrusError(f"--outtype {qtype} needs an importance matrix: pass --imatrix FILE "
                           "(made by llama-imatrix on the f16 GGUF)")
    if qtype not in QUANT_TYPES + IMATRIX_TYPES:
        from .writer import OUTTYPES
        raise OrthrusError(f"unknown --outtype {qtype!r}; expected one of "
                           f"{', '.join(list(OUTTYPES) + list(QUANT_TYPES))} (with --imatrix also "
                           f"{', '.join(IMATRIX_TYPES)})")
    imatrix = check_imatrix(imatrix) if imatrix is not None else None
    from .writer import default_outfile
    src = locate(model)
    out = Path(out) if out else default_outfile(src, qtype)
    if out.exists() and not force:
        raise OrthrusError(f"{out}: already exists; pass --force to overwrite it")
    tool = llama_quantize()  # before any work: a missing build is the first thing to say
    base_type = LOSSLESS[Checkpoint(src.path).config.torch_dtype]
    from .writer import make_parent
    make_parent(out)
    with temporary_beside(out.parent, ".orthrus-quant-", directory=True) as tmp:
        base = convert_checkpoint(src, tmp / f"base-{base_type}.gguf", base_type, progress=progress)
        part = tmp / "quantized.gguf"
        cmd = [str(tool), *(["--imatrix", str(imatrix)] if imatrix else []),
               str(base), str(part), qtype.upper(), str(threads or os.cpu_count() or 1)]
        rc, log = run_with_progress(cmd, f"quantizing to {qtype}", progress)
        if rc != 0 or not part.is_file():
            tail = "\n".join(log[-15:])
            raise OrthrusError(f"llama-quantize failed (exit {rc}) for {qtype}:\n{tail}")
        os.replace(part, out)
    return out


_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")  # llama-quantize: "[  12/ 311]  blk.0.ffn_up.weight ..."


def run_with_progress(cmd: list[str], desc: str, progress: bool) -> tuple[int, list[str]]:
    """Run llama-quantize, a progress bar over its "[ i/ N]" tensor lines; (exit code, log)."""
    from tqdm import tqdm
    log: list[str] = []
    bar = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        try:
            for line in proc.stdout:
                log.append(line.rstrip("\n"))
                m = _TENSOR_LINE.match(line)
                if m and progress:
                    if bar is None:
                        bar = tqdm(total=int(m.group(2)), desc=desc, unit="tensor")
                    bar.update(int(m.group(1)) - bar.n)  # redrawn at tqdm's own pace
        except BaseException:
            proc.kill()  # a signal or Ctrl-C: the child goes too
            raise
        finally:
            if bar is not None:
                bar.close()
    return proc.returncode, log
