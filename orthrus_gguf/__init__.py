"""orthrus-gguf: lossless Orthrus self-speculative decoding for Qwen3 GGUFs on llama.cpp."""
from .errors import OrthrusError

__all__ = ["Orthrus", "OrthrusDraft", "OrthrusError", "Piece", "Result", "Step"]

_LAZY = {"Orthrus": "api", "Result": "api", "Piece": "api", "Step": "decode", "OrthrusDraft": "llama_draft"}


def __getattr__(name):  # lazy: importing the package needs no llama.cpp build
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
