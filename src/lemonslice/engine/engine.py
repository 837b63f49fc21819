"""Engine: a loaded model (Qwen3.5, Gemma 3) with one default sequence, over the three parts.

    Residency (residency.py)   the weights, under a plan: full load, streamed, pinned
    SequenceState (state.py)   one sequence's caches per playlist position; any number of them
    Compute (compute.py)       a batch of states through playlist positions [a, b)

`Engine(model, max_memory=...)` opens the model once, plans residency (full load when the
weights fit `max_memory` or no budget is given, else streaming within it), loads the shared
weights, and keeps one `state` for the single-sequence calls (`forward`, `logits`,
`generate`). `new_state()` and `compute.forward` serve any number of other sequences on the
same weights. The run order is a playlist of source block indices (default: every trunk
block once), state is kept per playlist position, so a block that appears twice has two
independent caches. A playlist entry may also be `(donor, block)`: block `block` of another
model (a path or WeightStore) with the same block hyper-parameters.

`Engine(model, positions=(a, b))` is one stage of a pipeline: it opens and plans only the
entries at playlist positions [a, b) (their layer files, within `max_memory`), the embedding
only when a == 0 and the final norm and head only when b ends the playlist; its states keep
caches for [a, b) alone. `forward_batch` then takes token ids (first stage) or hidden states
[T, E] and returns hidden states, or logits on the last stage.

Process-wide settings (threads, allocator) belong to `runtime.setup`, called by the program.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import LemonsliceError
from ..models import Family
from ..models.protocol import Args, Head, LayerCache
from . import runtime
from .budget import available_memory, cgroup_room, human
from .compute import PREFILL_CHUNK, Compute, Input, Logits
from .residency import Plan, PlaylistEntry, Residency, block_args
from .state import SequenceState
from .store import WeightStore

log = logging.getLogger(__name__)

__all__ = ["PREFILL_CHUNK", "Engine", "PlaylistEntry", "RunStats", "block_args"]


@dataclass
class RunStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Engine:
    def __init__(
        self,
        model: str | os.PathLike[str] | WeightStore,
        *,
        max_memory: int | None = None,
        threads: int | None = None,
        playlist: Sequence[PlaylistEntry] | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        plan: Plan | None = None,
        positions: tuple[int, int] | None = None,
    ):
        if threads is not None:
            # Kept for old callers; process-wide, so it belongs to the program's runtime.setup.
            warnings.warn("Engine(threads=...) is deprecated: call lemonslice.engine.runtime.setup(threads=...)",
                          DeprecationWarning, stacklevel=2)
            runtime.setup(threads=threads)
        self.store = model if isinstance(model, WeightStore) else WeightStore(model)
        self.family: Family = self.store.family
        self.args: Args = self.store.args
        self.max_memory = max_memory
        self.residency = Residency(self.store, playlist, plan=plan, max_memory=max_memory, positions=positions)
        self.compute = Compute(self.residency, prefill_chunk)
        self.weight_bytes = self.residency.weight_bytes
        log.info("%s mode: %d weight bytes, budget %s", "streaming" if self.streaming else "full-load",
                 self.weight_bytes, max_memory)
        if self.residency.embeds or self.residency.heads:
            self.residency.shared  # noqa: B018  (this engine embeds or decodes: load what it uses now)
        self.stats = RunStats()
        self.reset()

    def close(self) -> None:
        self.residency.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what is loaded -----------------------------------------------------------------

    @property
    def shared(self) -> Head:
        return self.residency.shared

    @property
    def n_vocab(self) -> int:
        return self.shared.n_vocab

    @property
    def streaming(self) -> bool:
        return self.residency.streaming

    @property
    def pinned(self) -> int:
        """Blocks kept resident in streaming mode (all of them in full-load mode)."""
        return self.residency.pinned

    @property
    def playlist(self) -> list[Any]:
        return self.residency.playlist

    @property
    def positions(self) -> tuple[int, int]:
        """The playlist positions [a, b) this engine runs (the whole playlist unless it is a stage)."""
        return self.residency.positions

    @property
    def prefill_chunk(self) -> int:
        return self.compute.prefill_chunk

    def set_playlist(self, playlist: Sequence[PlaylistEntry]) -> None:
        """Run another order of the same blocks (no weights are re-read in full-load mode); resets state."""
        self.residency.set_playlist(playlist)
        self.reset()

    # ---- sequences ----------------------------------------------------------------------

    def new_state(self) -> SequenceState:
        """A fresh sequence state for the current playlist; it shares this engine's weights."""
        return self.compute.new_state()

    def reserve_context(self, n_positions: int) -> None:
        """From now on every new sequence claims its attention caches for `n_positions` at once;
        the default sequence starts afresh with that room. Refused, before any is claimed, when
        the memory free now (MemAvailable, and the cgroup's limit less its usage) cannot hold it."""
        need = self.new_state().reserve_bytes(n_positions, self.prefill_chunk)
        free = [n for n in (available_memory(), cgroup_room()) if n is not None]
        if free and need > min(free):
            raise LemonsliceError(f"a context of {n_positions} tokens needs {human(need)} of KV cache; "
                                  f"{human(min(free))} of memory is free")
        self.compute.reserve = n_positions
        self.reset()

    def reset(self) -> None:
        """Forget the default sequence: fresh state for every playlist position."""
        self.state = self.new_state()

    @property
    def caches(self) -> list[LayerCache]:
        """The default sequence's cache per playlist position."""
        return self.state.caches

    @property
    def n_past(self) -> int:
        return self.state.n_past

    def forward_batch(self, states: Sequence[SequenceState], inputs: Sequence[Input], *, start: int | None = None,
                      stop: int | None = None, logits: Logits | None = None) -> list[torch.Tensor]:
        """`Compute.forward`: a batch of sequences through playlist positions [start, stop) (default:
        this engine's positions)."""
        return self.compute.forward(states, inputs, start=start, stop=stop, logits=logits)

    # ---- the default sequence -----------------------------------------------------------

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Append `ids` to the sequence; logits [T, V] of every new position, or [1, V] of the last."""
        return self.compute.forward([self.state], [ids], logits="all" if all_logits else "last")[0]

    @torch.inference_mode()
    def forward_hidden(self, ids: Sequence[int]) -> torch.Tensor:
        """Append `ids` to the sequence; the last block's output [T, E] at every new position (before
        the final norm)."""
        return self.compute.forward([self.state], [ids])[0]

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Teacher forcing from a fresh state: logits [T, V] (float32) at every position."""
        self.reset()
        t0 = time.perf_counter()
        out = self.forward(ids, all_logits=True)
        self.stats = RunStats(len(ids), time.perf_counter() - t0)
        return out

    def generate(self, ids: Sequence[int], n: int) -> list[int]:
        """Greedy decoding from a fresh state: the `n` tokens that follow `ids` (through
        `generation.decode`, the one decode loop; statistics in `self.stats`)."""
        from .generation import Session
        from .sampling import Sampler, SamplingParams

        session = Session(self)
        new = list(session.generate(ids, Sampler(SamplingParams(temperature=0.0)), n))
        self.stats = session.stats
        return new
