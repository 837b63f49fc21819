"""Engine: runs a model (Qwen3.5, Gemma 3) from a WeightStore, fully loaded or streamed a layer at a time.

* Full-load mode (the model fits `max_memory`, or no budget given): every block is built once.
* Streaming mode: only the shared weights stay resident; each block is read, run and
  dropped before the next one is read, so at most shared + one layer is held.

Prefill is layer-major: a prompt chunk goes through block 0, then block 1, ... so each
layer is read once per chunk. The run order is a playlist of source block indices
(default: every trunk block once); state is kept per playlist position, so a block that
appears twice has two independent caches.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import LemonsliceError
from ..models import family
from .store import WeightStore

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3


def _return_large_frees_to_os() -> None:
    """Serve allocations over 1 MiB by mmap so freed layer scratch leaves the process.

    glibc otherwise raises its mmap threshold after each large free and keeps later
    scratch on the heap, which adds tens of MB to a streaming run's peak.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass

# Prompt tokens per layer-major prefill chunk: bounds activation memory (the attention
# scores of one chunk are [H, chunk, context]).
PREFILL_CHUNK = 512


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
        playlist: Sequence[int] | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        if threads is not None:
            torch.set_num_threads(threads)
        self.store = model if isinstance(model, WeightStore) else WeightStore(model)
        # The family (general.architecture) supplies the args, blocks, shared weights and caches.
        self.family = family(self.store.metadata)
        self.args = self.family.ModelArgs.from_gguf(self.store.metadata)
        self.playlist = list(playlist) if playlist is not None else list(range(self.args.n_layer))
        bad = [i for i in self.playlist if not 0 <= i < self.args.n_layer]
        if bad or not self.playlist:
            got = bad or "none"
            raise LemonsliceError(f"playlist needs trunk block indices in [0, {self.args.n_layer}), got {got}")
        if prefill_chunk < 1:
            raise LemonsliceError("prefill_chunk must be >= 1")
        self.prefill_chunk = prefill_chunk
        unique = sorted(set(self.playlist))
        self.weight_bytes = self.store.nbytes(None) + sum(self.store.nbytes(i) for i in unique)
        self.streaming = max_memory is not None and self.weight_bytes > max_memory
        log.info(
            "%s mode: %d weight bytes, budget %s", "streaming" if self.streaming else "full-load",
            self.weight_bytes, max_memory,
        )
        if self.streaming:
            _return_large_frees_to_os()
            self.store.map_experts = True
        self.shared = self.family.Shared(self.args, self.store.load_shared())
        self._blocks: dict[int, Any] = {}
        if not self.streaming:
            self._blocks = {i: self.family.Block(self.args, i, self.store.load_layer(i)) for i in unique}
        self.caches: list[Any] = []
        self.stats = RunStats()
        self.reset()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_vocab(self) -> int:
        return self.shared.n_vocab

    def set_playlist(self, playlist: Sequence[int]) -> None:
        """Run another order of the same blocks (no weights are re-read in full-load mode); resets state."""
        playlist = list(playlist)
        bad = [i for i in playlist if not 0 <= i < self.args.n_layer]
        if bad or not playlist:
            raise LemonsliceError(f"playlist needs trunk block indices in [0, {self.args.n_layer}), got {bad or 'none'}")
        self.playlist = playlist
        if not self.streaming:
            for i in sorted(set(playlist) - set(self._blocks)):
                self._blocks[i] = self.family.Block(self.args, i, self.store.load_layer(i))
        self.reset()

    def reset(self) -> None:
        """Forget the sequence: fresh state for every playlist position."""
        self.caches = [None] * len(self.playlist)
        self.n_past = 0

    def _block(self, layer: int) -> Any:
        if self.streaming:
            return self.family.Block(self.args, layer, self.store.load_layer(layer))
        return self._blocks[layer]

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Append `ids` to the sequence; logits [T, V] of every new position, or [1, V] of the last."""
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        if ids_t.numel() == 0:
            raise LemonsliceError("no token ids given")
        out = []
        for start in range(0, ids_t.numel(), self.prefill_chunk):
            x = self.shared.embed(ids_t[start : start + self.prefill_chunk])  # [T, E]
            for pos, layer in enumerate(self.playlist):
                block = self._block(layer)
                if self.caches[pos] is None:
                    self.caches[pos] = self.family.make_cache(self.args, block)
                x = block(x, self.caches[pos])
                # Drop the block before the next is read, so streaming holds one layer at a time.
                del block
            last_chunk = start + self.prefill_chunk >= ids_t.numel()
            if all_logits or last_chunk:
                out.append(self.shared.logits(x if all_logits else x[-1:]))
        self.n_past += ids_t.numel()
        return torch.cat(out)

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Teacher forcing from a fresh state: logits [T, V] (float32) at every position."""
        self.reset()
        t0 = time.perf_counter()
        out = self.forward(ids, all_logits=True)
        self.stats = RunStats(len(ids), time.perf_counter() - t0)
        return out

    def generate(self, ids: Sequence[int], n: int) -> list[int]:
        """Greedy decoding from a fresh state: the `n` tokens that follow `ids`."""
        self.reset()
        stats = RunStats()
        t0 = time.perf_counter()
        last = self.forward(ids)[-1]
        stats.prefill_tokens, stats.prefill_seconds = len(ids), time.perf_counter() - t0
        new: list[int] = []
        t0 = time.perf_counter()
        while len(new) < n:
            new.append(int(torch.argmax(last)))
            if len(new) < n:
                last = self.forward(new[-1:])[-1]
                stats.decode_tokens += 1
        stats.decode_seconds = time.perf_counter() - t0
        self.stats = stats
        return new
