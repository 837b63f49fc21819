"""Sequence state: one sequence's caches, one per playlist position, apart from any weights.

A state is made from the model's hyper-parameters alone (`Family.new_cache`), so any number
of them can exist for one loaded model, and none needs a layer resident. Snapshot, restore,
mark and truncate work on the caches only: going back never reads a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import LemonsliceError
from ..models import AttentionCache, Family
from ..models.caches import held_rows
from ..models.protocol import Args, LayerCache
from ..ops import kv


class Unused:
    """The cache of a playlist position that an engine limited to other positions never runs."""

    length = 0

    def copy(self) -> "Unused":
        return self

    def mark(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def truncate(self, n: int) -> None:
        pass


@dataclass(frozen=True)
class StateSnapshot:
    """Copies of every position's cache at one moment."""

    caches: tuple[LayerCache, ...]

    @property
    def n_past(self) -> int:
        return max((c.length for c in self.caches), default=0)


class SequenceState:
    """The caches of one sequence: `caches[pos]` belongs to playlist position `pos`."""

    def __init__(self, caches: Sequence[LayerCache]):
        self.caches: list[LayerCache] = list(caches)

    @classmethod
    def new(cls, family: Family, specs: Sequence[tuple[Args, int]],
            positions: tuple[int, int] | None = None) -> "SequenceState":
        """Fresh caches for positions running block `layer` of a model with args `args`, per (args, layer);
        with `positions` (a, b), only positions [a, b) get one (a pipeline stage keeps no other state)."""
        a, b = positions if positions is not None else (0, len(specs))
        return cls([family.new_cache(args, layer) if a <= i < b else Unused() for i, (args, layer) in enumerate(specs)])

    def reserve_bytes(self, n_positions: int, chunk: int) -> int:
        """What `reserve(n_positions, chunk)` would add to the attention caches."""
        return sum(max(0, held_rows(n_positions, c.window, chunk) - c.k.shape[0])
                   * sum(kv.bytes_per_position(t, c.n_head_kv, c.head_dim) for t in c.types)
                   for c in self.caches if isinstance(c, AttentionCache))

    def reserve(self, n_positions: int, chunk: int) -> None:
        """Claim the attention caches' memory for a context of `n_positions` now (recurrent state
        has a fixed size already)."""
        for c in self.caches:
            if isinstance(c, AttentionCache):
                c.reserve(n_positions, chunk)

    @property
    def n_past(self) -> int:
        """Positions the state holds (a stage that ran only some playlist positions: the most of any)."""
        return max((c.length for c in self.caches), default=0)

    def snapshot(self) -> StateSnapshot:
        return StateSnapshot(tuple(c.copy() for c in self.caches))

    def restore(self, snap: StateSnapshot) -> None:
        """Back to `snap` (which stays usable for another restore)."""
        if len(snap.caches) != len(self.caches):
            raise LemonsliceError(f"a snapshot of {len(snap.caches)} positions cannot restore a state of "
                                  f"{len(self.caches)}")
        self.caches = [c.copy() for c in snap.caches]

    def mark(self) -> None:
        """Remember this point: `truncate` may go back to any length from here until `commit`."""
        for c in self.caches:
            c.mark()

    def commit(self) -> None:
        """Drop the mark (and what recurrent caches recorded since)."""
        for c in self.caches:
            c.commit()

    def truncate(self, n: int) -> None:
        """Keep the first `n` positions; a recurrent cache can go back only as far as the mark."""
        if not 0 <= n <= self.n_past:
            raise LemonsliceError(f"cannot truncate a state of {self.n_past} positions to {n}")
        for c in self.caches:
            if c.length > n:
                c.truncate(n)
            else:
                c.commit()


def kv_cache_bytes(family: Family, args: Args, n_positions: int, types: tuple[str, str], chunk: int = 0) -> int:
    """Bytes the attention caches of one sequence of `n_positions` hold with these key and value
    types: every position for a global layer, its window plus `chunk` for a sliding-window one
    (`held_rows`; a reserved cache has room for a prefill chunk beyond the window); recurrent
    state is apart."""
    total = 0
    for layer in range(args.n_layer):
        c = family.new_cache(args, layer)
        if isinstance(c, AttentionCache):
            rows = held_rows(n_positions, c.window, chunk)
            total += rows * sum(kv.bytes_per_position(t, c.n_head_kv, c.head_dim) for t in types)
    return total
