"""Engine: runs a model (Qwen3.5, Gemma 3) from a WeightStore, fully loaded or streamed a layer at a time.

* Full-load mode (the model fits `max_memory`, or no budget given): every block is built once.
* Streaming mode: the shared weights stay resident, plus as many blocks as the budget has
  room for beyond one streamed block (pinned, in playlist order); every other block is read,
  run and dropped before the next one is read. With a budget of shared + largest block, at
  most shared + one layer is held.

Prefill is layer-major: a prompt chunk goes through block 0, then block 1, ... so each
layer is read once per chunk. The run order is a playlist of source block indices
(default: every trunk block once); state is kept per playlist position, so a block that
appears twice has two independent caches. A playlist entry may also be `(donor, block)`:
block `block` of another model (a path or WeightStore) with the same block hyper-parameters.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

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

# A block of this model, or (donor model path or WeightStore, block index).
PlaylistEntry = Union[int, tuple[Any, int]]
# ModelArgs fields that describe the layer layout, not a block: a donor may differ in them.
_LAYOUT_FIELDS = frozenset({"block_count", "n_layer", "nextn_predict_layers", "recurrent", "swa", "n_vocab",
                            "full_attention_interval"})


def block_args(args: Any) -> dict[str, Any]:
    """The hyper-parameters a block computes with: a donor's must equal the model's."""
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in _LAYOUT_FIELDS}


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
    ):
        if threads is not None:
            torch.set_num_threads(threads)
        self.store = model if isinstance(model, WeightStore) else WeightStore(model)
        # The family (general.architecture) supplies the args, blocks, shared weights and caches.
        self.family = family(self.store.metadata)
        self.args = self.family.ModelArgs.from_gguf(self.store.metadata)
        # Donor key (resolved path or the WeightStore) -> (store, its args).
        self._donors: dict[Any, tuple[WeightStore, Any]] = {}
        self.playlist = self._entries(playlist if playlist is not None else range(self.args.n_layer))
        if prefill_chunk < 1:
            raise LemonsliceError("prefill_chunk must be >= 1")
        self.prefill_chunk = prefill_chunk
        unique = list(dict.fromkeys(self.playlist))
        self.weight_bytes = self.store.nbytes(None) + sum(self._store_of(e).nbytes(self._layer_of(e)) for e in unique)
        self.streaming = max_memory is not None and self.weight_bytes > max_memory
        log.info(
            "%s mode: %d weight bytes, budget %s", "streaming" if self.streaming else "full-load",
            self.weight_bytes, max_memory,
        )
        if self.streaming:
            _return_large_frees_to_os()
            self.store.map_experts = True
            for store, _ in self._donors.values():
                store.map_experts = True
        self.shared = self.family.Shared(self.args, self.store.load_shared())
        self.max_memory = max_memory
        self._blocks: dict[PlaylistEntry, Any] = {}
        if not self.streaming:
            self._blocks = {e: self._build(e) for e in unique}
        else:
            self._pin()
        self.caches: list[Any] = []
        self.stats = RunStats()
        self.reset()

    def close(self) -> None:
        self.store.close()
        for store, _ in self._donors.values():
            store.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_vocab(self) -> int:
        return self.shared.n_vocab

    def set_playlist(self, playlist: Sequence[PlaylistEntry]) -> None:
        """Run another order of the same blocks (no weights are re-read in full-load mode); resets state."""
        self.playlist = self._entries(playlist)
        if not self.streaming:
            for e in dict.fromkeys(self.playlist):
                if e not in self._blocks:
                    self._blocks[e] = self._build(e)
        else:
            self._pin()
        self.reset()

    def _pin(self) -> None:
        """Streaming: keep resident the blocks the budget has room for, in playlist order, so that
        shared + pinned + the largest block still streamed stays within `max_memory`."""
        sizes = {e: self._store_of(e).nbytes(self._layer_of(e)) for e in dict.fromkeys(self.playlist)}
        room = self.max_memory - self.store.nbytes(None)
        keep: list[Any] = []
        used = 0
        for e in sizes:
            rest = [n for x, n in sizes.items() if x != e and x not in keep]
            if used + sizes[e] + max(rest, default=0) <= room:
                keep.append(e)
                used += sizes[e]
        self._blocks = {e: self._blocks.get(e) or self._build(e) for e in keep}
        log.info("streaming: %d of %d blocks pinned (%d bytes)", len(keep), len(sizes), used)

    @property
    def pinned(self) -> int:
        """Blocks kept resident in streaming mode (all of them in full-load mode)."""
        return len(self._blocks)

    def _entries(self, playlist: Sequence[PlaylistEntry]) -> list[Any]:
        """Checked entries: an int for a block of this model, (donor key, block) for a donor's."""
        out: list[Any] = []
        bad: list[Any] = []
        for e in playlist:
            if isinstance(e, tuple) and len(e) == 2:
                key = self._donor(e[0])
                out.append((key, int(e[1])))
                ok = 0 <= int(e[1]) < self._donors[key][1].n_layer
            else:
                out.append(int(e))
                ok = 0 <= int(e) < self.args.n_layer
            if not ok:
                bad.append(e)
        if bad or not out:
            raise LemonsliceError(f"playlist needs trunk block indices in [0, {self.args.n_layer}) "
                                  f"(or a donor's), got {bad or 'none'}")
        return out

    def _donor(self, src: Any) -> Any:
        """Open a donor model once; its blocks must compute as this model's would (same family and sizes)."""
        key = src if isinstance(src, WeightStore) else str(Path(src).resolve())
        if key not in self._donors:
            store = src if isinstance(src, WeightStore) else WeightStore(src)
            fam = family(store.metadata)
            args = fam.ModelArgs.from_gguf(store.metadata)
            if fam is not self.family or block_args(args) != block_args(self.args):
                raise LemonsliceError(f"donor {src}: its blocks differ from {self.store.path}'s "
                                      "(architecture or hyper-parameters)")
            store.map_experts = self.store.map_experts
            self._donors[key] = (store, args)
        return key

    def _store_of(self, e: Any) -> WeightStore:
        return self._donors[e[0]][0] if isinstance(e, tuple) else self.store

    def _args_of(self, e: Any) -> Any:
        return self._donors[e[0]][1] if isinstance(e, tuple) else self.args

    @staticmethod
    def _layer_of(e: Any) -> int:
        return e[1] if isinstance(e, tuple) else e

    def _build(self, e: Any) -> Any:
        layer = self._layer_of(e)
        return self.family.Block(self._args_of(e), layer, self._store_of(e).load_layer(layer))

    def reset(self) -> None:
        """Forget the sequence: fresh state for every playlist position."""
        self.caches = [None] * len(self.playlist)
        self.n_past = 0

    def _block(self, entry: Any) -> Any:
        block = self._blocks.get(entry)
        return block if block is not None else self._build(entry)

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Append `ids` to the sequence; logits [T, V] of every new position, or [1, V] of the last."""
        x = self.forward_hidden(ids)  # [T, E]
        return self.shared.logits(x if all_logits else x[-1:])

    def _run_blocks(self, x: torch.Tensor, inputs: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        """x [T, E] through the playlist, advancing each position's state; `inputs[pos]` collects
        what position `pos` was given (speculative decoding replays it to roll recurrent state back)."""
        for pos, layer in enumerate(self.playlist):
            block = self._block(layer)
            if self.caches[pos] is None:
                self.caches[pos] = self.family.make_cache(self._args_of(layer), block)
            if inputs is not None:
                inputs[pos].append(x)
            x = block(x, self.caches[pos])
            # Drop the block before the next is read, so streaming holds one layer at a time.
            del block
        return x

    @torch.inference_mode()
    def forward_hidden(self, ids: Sequence[int], inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Append `ids` to the sequence; the last block's output [T, E] at every new position (before
        the final norm). `inputs`, if given, is filled with each playlist position's input [T, E]."""
        ids_t = torch.as_tensor(list(ids), dtype=torch.long)
        if ids_t.numel() == 0:
            raise LemonsliceError("no token ids given")
        seen: list[list[torch.Tensor]] | None = [[] for _ in self.playlist] if inputs is not None else None
        out = [self._run_blocks(self.shared.embed(ids_t[s : s + self.prefill_chunk]), seen)
               for s in range(0, ids_t.numel(), self.prefill_chunk)]
        if inputs is not None:
            inputs[:] = [torch.cat(xs) for xs in seen]
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
