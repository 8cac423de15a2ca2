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
