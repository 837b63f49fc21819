"""Fixtures shared across test files."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_refs import gemma_gguf


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI package."""
    return gemma_gguf()
