"""Orthrus-Qwen3 checkpoint -> orthrus-qwen3 GGUF, streaming one tensor at a time.

Headers are checked first (orthrus_gguf.checkpoint), then the GGUF header and tensor
table are written, then each tensor is read, converted and appended. Output goes to a
temporary file beside the target that is renamed at the end, so an error or Ctrl-C
never leaves a half-written GGUF behind.
"""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from gguf.quants import quantize

from ..checkpoint import Checkpoint, Source, locate
from ..errors import OrthrusError, temporary_beside
from . import schema
from .vocab import add_tokenizer

# outtype -> (GGML type of 2-D weights, general.file_type as llama.cpp numbers it)
OUTTYPES = {"f32": (QT.F32, 0), "f16": (QT.F16, 1), "bf16": (QT.BF16, 32), "q8_0": (QT.Q8_0, 7)}


def hf_to_gguf_names(ckpt: Checkpoint) -> dict[str, str]:
    names = {k: v for k, v in schema.GLOBAL_TENSORS.items() if k in ckpt.table}
    for b in range(ckpt.config.num_hidden_layers):
        for sfx, tmpl in schema.LAYER_TENSORS.items():
            names[schema.hf_layer_name(b, sfx)] = tmpl.format(bid=b)
    return names


def tensor_type(shape: tuple[int, ...], wanted: QT) -> QT:
    """Norms stay F32 (as llama.cpp converts them); rows not divisible by a quant block fall back to F16."""
    if len(shape) == 1:
        return QT.F32
    if wanted == QT.Q8_0 and shape[-1] % 32:
        return QT.F16
    return wanted


def encode(t: torch.Tensor, qt: QT) -> np.ndarray:
    if qt == QT.F32:
        return t.to(torch.float32).numpy()
    if qt == QT.F16:
        return t.to(torch.float16).numpy()
    if qt == QT.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy()  # exact bits: bf16 -> bf16 is lossless
    return quantize(t.to(torch.float32).numpy(), qt)


def nbytes(shape: tuple[int, ...], qt: QT) -> int:
    from gguf.constants import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[qt]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


@contextmanager
def gguf_writer(out: Path, tensors: list[tuple[str, tuple[int, ...], QT]], metadata):
    """A GGUFWriter whose header, metadata (`metadata(w)` adds the key-values) and tensor table
    (name, shape, type) are written; the block then writes each tensor's data in table order.
    The file is a temporary beside `out`, renamed to `out` when the block ends, and removed on
    any error or interruption, so no half-written GGUF is ever left."""
    with ExitStack() as stack:  # the temporary goes on any error or interruption
        try:
            tmp = stack.enter_context(temporary_beside(out.parent, f".{out.name}.", ".part"))
        except OSError as e:
            raise OrthrusError(f"{out.parent}: cannot write there ({e.strerror}); pick another output path") from None
        try:
            w = GGUFWriter(str(tmp), schema.ARCH)
            metadata(w)
            for name, shape, qt in tensors:
                w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, qt), raw_dtype=qt)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            yield w
            w.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it, not O_CREAT's 0600
            os.replace(tmp, out)
        except OSError as e:
            raise OrthrusError(f"{out}: writing failed ({e.strerror}); check the free space and the "
                               f"folder's permissions (nothing was left behind)") from None


def make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OrthrusError(f"{out}: cannot create its folder ({e.strerror}); pick another output path") from None


def write_hparams(w: GGUFWriter, ckpt: Checkpoint, file_type: int, src: Source) -> None:
    c = ckpt.config
    w.add_name(src.name)
    w.add_basename(src.name)
    if src.repo_id:  # general.* as llama.cpp's converter fills them from a hub id
        w.add_organization(src.repo_id.split("/", 1)[0])
        w.add_source_repo_url(f"https://huggingface.co/{src.repo_id}")
    w.add_file_type(file_type)
    w.add_quantization_version(2)
    for key, (attr, vtype) in schema.HPARAM_KEYS.items():
        value = getattr(c, attr)
        getattr(w, f"add_{vtype}")(schema.gguf_key(key), int(value) if vtype == "uint32" else float(value))


def default_outfile(src: Source, outtype: str) -> Path:
    """llama.cpp's naming: the model's name, then the type in capitals (Name-Q4_K_M.gguf)."""
    return Path(f"{src.name}-{outtype.upper()}.gguf")


def convert_checkpoint(model, out: str | Path | None = None, outtype: str = "f16",
                       force: bool = False, progress: bool = True) -> Path:
    """Convert a local checkpoint directory, hub id or Source to an orthrus-qwen3 GGUF;
    returns its path."""
    if outtype not in OUTTYPES:
        raise OrthrusError(f"unknown --outtype {outtype!r}; expected one of {', '.join(OUTTYPES)}")
    src = locate(model)
    ckpt = Checkpoint(src.path)
    out = Path(out) if out else default_outfile(src, outtype)
    if out.is_dir():
        raise OrthrusError(f"{out}: is a directory; give a file name for the GGUF")
    if out.exists() and not force:
        raise OrthrusError(f"{out}: already exists; pass --force to overwrite it")
    make_parent(out)
    wanted, file_type = OUTTYPES[outtype]
    names = hf_to_gguf_names(ckpt)

    # in file order: tensors are read file by file and written in table order
    plan = [(hf, gg, ckpt.table[hf].shape, tensor_type(ckpt.table[hf].shape, wanted))
            for hf, gg in sorted(names.items(), key=lambda kv: str(ckpt.table[kv[0]].file))]

    def metadata(w):
        write_hparams(w, ckpt, file_type, src)
        add_tokenizer(w, src.path, ckpt.config)

    with gguf_writer(out, [(gg, shape, qt) for _, gg, shape, qt in plan], metadata) as w:
        types = {hf: qt for hf, _, _, qt in plan}
        from tqdm import tqdm
        bar = tqdm(total=len(plan), desc=f"converting to {outtype}", unit="tensor", disable=not progress)
        for hf, t in ckpt.tensors([hf for hf, _, _, _ in plan]):
            w.write_tensor_data(encode(t, types[hf]))
            bar.update(1)
        bar.close()
    return out
