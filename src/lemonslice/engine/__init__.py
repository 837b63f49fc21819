"""Running models: weight store, streaming, caches, generation."""

from .engine import Engine, RunStats
from .store import Metadata, WeightStore

__all__ = ["Engine", "Metadata", "RunStats", "WeightStore"]
