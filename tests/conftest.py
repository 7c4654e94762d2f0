import os

import pytest
import torch

# tiny models: one thread avoids thread-pool overhead (and contention on a busy 2-core box)
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Saved tiny transformers checkpoints, one per architecture, built once per session."""
    from moelens.testing import save_tiny

    cache = {}

    def get(name: str, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(name)
            hf = save_tiny(name, d, **kwargs)
            cache[key] = (d, hf)
        return cache[key]

    return get


@pytest.fixture()
def tiny_copy(tiny_dirs, tmp_path):
    """A writable copy of a tiny checkpoint (``tiny_copy("mixtral")`` -> its directory), for tests
    that edit its config or files (``moelens.testing.edit_config``)."""
    import shutil

    def make(name: str, **kwargs):
        d, _ = tiny_dirs(name, **kwargs)
        out = tmp_path / f"{name}_ckpt"
        shutil.copytree(d, out)
        return out

    return make


@pytest.fixture(scope="session")
def mixtral_tok_dir(tmp_path_factory):
    """A tiny 3-layer Mixtral (vocab 32000) saved with the real Mixtral tokenizer beside it."""
    import shutil
    from pathlib import Path

    from moelens.testing import save_tiny

    d = tmp_path_factory.mktemp("mixtral_tok")
    save_tiny("mixtral", d, vocab_size=32000, num_hidden_layers=3)
    for f in (Path(__file__).parent / "data" / "mixtral_tokenizer").iterdir():
        shutil.copy(f, d / f.name)
    return d
