import pytest

from orthrus_gguf.testing import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Factory of cached tiny random checkpoints: tiny_ckpt(tied=False, shards=2, ...)."""
    cache = {}

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), **kw)
        return cache[key]
    return make


def pytest_configure(config):
    # Tiny models: threading only adds contention (CI has 2 cores, shared with llama.cpp).
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_ckpt, tmp_path_factory):
    """Factory of cached GGUF conversions: tiny_gguf("q4_k_m", hidden=256, ...)."""
    from orthrus_gguf.convert import convert
    cache = {}

    def make(outtype="f32", **kw):
        key = (outtype, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("gguf") / f"tiny-{outtype}.gguf"
            cache[key] = convert(tiny_ckpt(**kw), out, outtype, progress=False)
        return cache[key]
    return make
