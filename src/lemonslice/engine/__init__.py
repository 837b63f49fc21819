"""Running models: residency (weights under a plan), sequence state, batched compute, generation."""

from . import runtime
from .compute import Compute
from .engine import Engine, RunStats
from .residency import Budget, FullLoad, Pinned, Plan, Residency, Streamed
from .state import SequenceState, StateSnapshot
from .store import Metadata, WeightStore

__all__ = [
    "Budget", "Compute", "Engine", "FullLoad", "Metadata", "Pinned", "Plan", "Residency", "RunStats", "SequenceState",
    "StateSnapshot", "Streamed", "WeightStore", "runtime",
]
