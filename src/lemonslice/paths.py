"""Where lemonslice keeps files it can rebuild: compiled kernels, built tokenizers."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$LEMONSLICE_CACHE, else ~/.cache/lemonslice."""
    return Path(os.environ.get("LEMONSLICE_CACHE") or Path.home() / ".cache" / "lemonslice")
