"""Fixtures shared across test files."""

from __future__ import annotations

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
