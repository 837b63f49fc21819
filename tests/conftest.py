"""Fixtures shared across test files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gguf_refs import gemma_gguf


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI package."""
    return gemma_gguf()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: with -n 2 on two cores, torch's intra-op threads only spin against each
    other (and against llama.cpp's)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Each test module that uses these defines its own session-scoped `syn_path` (a synthetic GGUF);
# module scope keeps one module's split from being served to another.
@pytest.fixture(scope="module")
def syn_split(syn_path, tmp_path_factory) -> Path:
    from lemonslice.slicing import split_gguf

    out = tmp_path_factory.mktemp("synsplit") / "split"
    split_gguf(syn_path, out)
    return out


@pytest.fixture
def syn_copy(syn_split, tmp_path) -> Path:
    """A private copy of the module's synthetic split, free to damage."""
    dst = tmp_path / "split"
    shutil.copytree(syn_split, dst)
    return dst



@pytest.fixture
def exact():
    """Float activations in every quantized product (the default rounds them to 8 bits)."""
    from lemonslice.ops import set_exact

    set_exact(True)
    yield
    set_exact(False)
