"""orthrus-gguf: lossless Orthrus self-speculative decoding for Qwen3 GGUFs on llama.cpp."""
from .errors import OrthrusError

__all__ = ["Orthrus", "OrthrusError", "Result"]


def __getattr__(name):  # lazy: importing the package needs no llama.cpp build
    if name in ("Orthrus", "Result"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
