"""The expert cache: routed experts read one by one from disk, kept under a byte budget.

An expert (its gate, up and down slices together) is the unit of reading and caching. Reads
go through a small thread pool with O_DIRECT into page-aligned anonymous memory, so they
neither fill the page cache (which a memory cgroup charges to the process) nor cost a copy;
where O_DIRECT is refused the read is buffered and its pages are dropped right after.

A MoE layer asks its `CachedExperts` for the experts its router picked: cached ones come
back at once, misses as their reads complete, so the first experts compute while the others
are still being read. `prefetch` starts reads for experts a layer is expected to need soon.
The cache counts lookups, hits, bytes read, and the time reads were in flight and the time
compute waited for them.
"""

from __future__ import annotations

import heapq
import logging
import mmap
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Hashable, Iterator, Sequence

import numpy as np
import torch

from ..errors import LemonsliceError
from ..gguf.constants import GGMLType
from ..ops import QuantWeight

log = logging.getLogger(__name__)

_ALIGN = 4096  # O_DIRECT wants file offsets, lengths and buffers aligned to the device block
POLICIES = ("lru", "lfu")


@dataclass(frozen=True)
class ExpertPart:
    """One routed-expert tensor of a layer: expert e's bytes are [start + e*stride, +stride)."""

    path: str
    start: int
    stride: int
    ggml_type: GGMLType
    shape: tuple[int, int]  # ggml order (in, out) of one expert


@dataclass(frozen=True)
class ExpertLayout:
    """Where one layer's experts lie: its parts in the order the MoE takes them."""

    key: Hashable  # identifies the layer (store, block) across the cache
    layer: int  # for statistics: the block index
    parts: tuple[ExpertPart, ...]
    n_expert: int

    @property
    def nbytes(self) -> int:
        """Bytes of one expert (all parts), as stored."""
        return sum(p.stride for p in self.parts)

    @property
    def slot_bytes(self) -> int:
        """Memory one cached expert takes: each part in whole pages, room for any alignment."""
        return sum(_part_room(p.stride) for p in self.parts)


def _part_room(n: int) -> int:
    """Whole pages that hold n bytes starting anywhere within a page."""
    return -(-(n + _ALIGN - 1) // _ALIGN) * _ALIGN


def _span(start: int, n: int) -> tuple[int, int, int]:
    """(aligned start, offset of `start` in it, aligned length) of the byte range [start, start+n)."""
    a0 = start - start % _ALIGN
    a1 = -(-(start + n) // _ALIGN) * _ALIGN
    return a0, start - a0, a1 - a0


class DirectFiles:
    """Descriptors per file: O_DIRECT where the filesystem allows it, else buffered."""

    def __init__(self) -> None:
        self._fds: dict[str, tuple[int, bool]] = {}
        self._lock = threading.Lock()

    def get(self, path: str) -> tuple[int, bool]:
        with self._lock:
            if path not in self._fds:
                try:
                    self._fds[path] = (os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), True)
                except OSError:
                    self._fds[path] = (os.open(path, os.O_RDONLY), False)
            return self._fds[path]

    def buffered(self, path: str) -> None:
        """Fall back to buffered reads for `path` (its filesystem refused an O_DIRECT read)."""
        with self._lock:
            fd, direct = self._fds[path]
            if direct:
                os.close(fd)
                self._fds[path] = (os.open(path, os.O_RDONLY), False)

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


class ExpertReader:
    """Reads experts on a thread pool; counts bytes and the wall time reads were in flight."""

    def __init__(self, threads: int = 4):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lemonslice-read")
        self._files = DirectFiles()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy_since = 0.0
        self.busy_seconds = 0.0
        self.bytes_read = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._files.close()

    def submit(self, layout: ExpertLayout, e: int, slot: "_Slot") -> "Future[tuple[QuantWeight, ...]]":
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        return self._pool.submit(self._read, layout, e, slot)

    def _done(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n
            self._in_flight -= 1
            if self._in_flight == 0:
                self.busy_seconds += time.perf_counter() - self._busy_since

    def _read(self, layout: ExpertLayout, e: int, slot: "_Slot") -> tuple[QuantWeight, ...]:
        """Expert e of a layer into `slot`, each part in its own page-aligned stretch of it."""
        out, at, total = [], 0, 0
        try:
            for p in layout.parts:
                a0, off, n = _span(p.start + e * p.stride, p.stride)
                total += self._pread(p.path, slot.view[at : at + n], a0, off + p.stride)
                out.append(QuantWeight(slot.data[at + off : at + off + p.stride], p.ggml_type, p.shape))
                at += _part_room(p.stride)
        finally:
            self._done(total)
        return tuple(out)

    def _pread(self, path: str, view: memoryview, offset: int, need: int) -> int:
        """Fill `view` from `offset` (at least `need` bytes: a file may end inside the last page)."""
        fd, direct = self._files.get(path)
        done = 0
        while done < need:
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as err:
                if not direct or err.errno != 22:
                    raise
                self._files.buffered(path)
                fd, direct = self._files.get(path)
                continue
            if got <= 0:
                raise LemonsliceError(f"{path}: file ended while reading an expert at {offset}")
            done += got
        if not direct:
            # Buffered: the page cache copy is not needed again (the cache keeps the bytes).
            os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        return done


@dataclass
class _Slot:
    """One expert's room in an arena."""

    size: int  # the arena's slot size (its class)
    data: torch.Tensor  # uint8 view of the slot
    view: memoryview


class _Arena:
    """`n` slots of `size` bytes in one private anonymous mapping, made once: a miss reuses an
    evicted expert's slot instead of mapping and unmapping memory per read."""

    def __init__(self, size: int, n: int, cache: int):
        self.size, self.n = size, n
        self.cache = cache  # slots that may hold cached experts; the rest are for reads in flight
        self.cached = 0
        self._buf = mmap.mmap(-1, size * n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._data = torch.frombuffer(self._buf, dtype=torch.uint8)
        # Touched now: the cache's memory is taken at the start (a budget that cannot hold it
        # fails at once, not tokens later) and the process's peak is what the plan said.
        self._data.zero_()
        self._view = memoryview(self._buf)
        self.free = [self._slot(i) for i in reversed(range(n))]

    def _slot(self, i: int) -> _Slot:
        a = i * self.size
        return _Slot(self.size, self._data[a : a + self.size], self._view[a : a + self.size])


@dataclass
class LayerStats:
    """Per layer: uses and hits of each expert."""

    uses: np.ndarray  # [n_expert] int64
    hits: np.ndarray  # [n_expert] int64


class ExpertCache:
    """Experts of every layer in fixed arenas of slots, one arena per slot size, evicted by
    `policy` ("lru", or "lfu": least often used so far, ties by age).

    `slots` maps a slot size (`ExpertLayout.slot_bytes`) to how many slots of it to make;
    `reserve` more per size hold reads in flight. The expert being computed with is never
    evicted; a slot goes back to its arena when its expert is."""

    def __init__(self, slots: dict[int, int], policy: str = "lru", reader: ExpertReader | None = None,
                 lookahead: int = 4):
        if policy not in POLICIES:
            raise LemonsliceError(f"expert cache policy must be one of {', '.join(POLICIES)}, got {policy}")
        self.policy = policy
        self.reader = reader or ExpertReader()
        self.lookahead = max(1, lookahead)  # misses in flight per fetch
        reserve = 2 * self.lookahead + 1
        self._arenas = {size: _Arena(size, n + reserve, n) for size, n in slots.items()}
        self.capacity = sum(size * n for size, n in slots.items())
        self.arena_bytes = sum(a.size * a.n for a in self._arenas.values())
        self._entries: OrderedDict[tuple[Hashable, int], tuple[tuple[QuantWeight, ...], _Slot]] = OrderedDict()
        # Reads started and not yet handed out: key -> (future, its slot).
        self._pending: dict[tuple[Hashable, int], tuple[Future, _Slot]] = {}
        # Experts a fetch has handed out or promised and the caller may still be using.
        self._in_use: set[tuple[Hashable, int]] = set()
        self._freq: dict[tuple[Hashable, int], int] = {}
        # LFU: per slot size a heap of (rows routed, last use, key), stale items skipped when popped.
        self._heaps: dict[int, list[tuple[int, int, tuple[Hashable, int]]]] = {size: [] for size in slots}
        self._last: dict[tuple[Hashable, int], int] = {}
        self._tick = 0
        self.stats: dict[int, LayerStats] = {}
        self.lookups = 0
        self.hits = 0
        self.wait_seconds = 0.0
        self.prefetched = 0
        self.prefetch_used = 0

    @property
    def used(self) -> int:
        return sum(slot.size for _, slot in self._entries.values())

    def close(self) -> None:
        self.drain()
        self.reader.close()
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    # ---- entries ----------------------------------------------------------------------

    def _get(self, key: tuple[Hashable, int]) -> tuple[QuantWeight, ...] | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def _slot_for(self, layout: ExpertLayout) -> _Slot:
        """A free slot of the layout's size, evicting an expert of that size if none is free."""
        arena = self._arenas.get(layout.slot_bytes)
        if arena is None:
            raise LemonsliceError(f"the expert cache has no slots of {layout.slot_bytes} bytes")
        self._trim(arena)
        if not arena.free:
            self._evict(arena.size)
        return arena.free.pop()

    def _trim(self, arena: _Arena) -> None:
        """Evict while more experts are cached than the cache's share of the arena."""
        while arena.cached > arena.cache and self._evict(arena.size, strict=False):
            pass

    def _touch(self, key: tuple[Hashable, int]) -> None:
        """Note a use of a cached expert (its LFU heap item is renewed)."""
        self._tick += 1
        self._last[key] = self._tick
        if self.policy == "lfu" and key in self._entries:
            heap = self._heaps[self._entries[key][1].size]
            heapq.heappush(heap, (self._freq.get(key, 0), self._tick, key))
            if len(heap) > 4 * len(self._entries) + 64:
                self._heaps[self._entries[key][1].size] = heap = [
                    (self._freq.get(k, 0), self._last[k], k) for k, (_, sl) in self._entries.items()
                    if sl.size == self._entries[key][1].size]
                heapq.heapify(heap)

    def _lfu_victim(self, size: int) -> tuple[Hashable, int] | None:
        """Least rows routed so far, among equals the least recently used; skips experts in use."""
        heap, kept, victim = self._heaps[size], [], None
        while heap:
            item = heapq.heappop(heap)
            f, t, k = item
            if k not in self._entries or self._last.get(k) != t or self._freq.get(k, 0) != f:
                continue  # stale: the expert was used again, or evicted
            if k in self._in_use:
                kept.append(item)
                continue
            victim = k
            break
        for item in kept:
            heapq.heappush(heap, item)
        return victim

    def _evict(self, size: int, strict: bool = True) -> bool:
        if self.policy == "lru":
            victim = next((k for k, (_, slot) in self._entries.items() if slot.size == size and k not in self._in_use),
                          None)
        else:
            victim = self._lfu_victim(size)
        if victim is None:
            if strict:
                raise LemonsliceError("the expert cache has no slot left to evict (too many reads in flight)")
            return False
        slot = self._entries.pop(victim)[1]
        arena = self._arenas[size]
        arena.free.append(slot)
        arena.cached -= 1
        return True

    def _put(self, key: tuple[Hashable, int], parts: tuple[QuantWeight, ...], slot: _Slot) -> None:
        arena = self._arenas[slot.size]
        if key in self._entries:
            arena.free.append(slot)
            return
        self._entries[key] = (parts, slot)
        arena.cached += 1
        self._touch(key)
        self._trim(arena)

    def _count(self, layout: ExpertLayout, e: int, hit: bool, rows: int = 1) -> None:
        st = self.stats.get(layout.layer)
        if st is None:
            st = self.stats[layout.layer] = LayerStats(np.zeros(layout.n_expert, np.int64),
                                                       np.zeros(layout.n_expert, np.int64))
        st.uses[e] += 1
        st.hits[e] += hit
        self.lookups += 1
        self.hits += hit
        key = (layout.key, e)
        self._freq[key] = self._freq.get(key, 0) + rows  # LFU: rows routed to it, so prefill counts too
        self._touch(key)

    # ---- reading ----------------------------------------------------------------------

    def prefetch(self, layout: ExpertLayout, ids: Sequence[int]) -> None:
        """Start reading experts of a layer that are neither cached nor already on their way
        (at most `lookahead` of them, so the reads in flight fit the arenas' reserve)."""
        for e in list(ids)[: self.lookahead]:
            key = (layout.key, e)
            if key not in self._entries and key not in self._pending:
                self._start(layout, e)
                self.prefetched += 1

    def fetch(self, layout: ExpertLayout, ids: Sequence[int], counts: Sequence[int] | None = None
              ) -> Iterator[tuple[int, tuple[QuantWeight, ...]]]:
        """Each of `ids` once: cached experts first, then misses as their reads finish. The
        reads of the first misses start now, so the caller can compute something else before
        it iterates. An expert stays in memory until the caller asks for the next one after
        it. `counts`: rows routed to each (LFU's frequency)."""
        bad = [e for e in ids if not 0 <= e < layout.n_expert]
        if bad:
            raise IndexError(f"expert ids must lie in [0, {layout.n_expert}), got {bad[0]}")
        hits, misses = [], []
        self._in_use.clear()  # one layer at a time: an earlier fetch is done (or abandoned)
        for i, e in enumerate(ids):
            parts = self._get((layout.key, e))
            self._count(layout, e, parts is not None, counts[i] if counts is not None else 1)
            if parts is not None:
                hits.append((e, parts))
                self._in_use.add((layout.key, e))
            else:
                misses.append(e)
        for e in misses[: self.lookahead]:
            self._start(layout, e, asked=True)
        return self._deliver(layout, hits, misses)

    def _deliver(self, layout: ExpertLayout, hits: list[tuple[int, tuple[QuantWeight, ...]]],
                 misses: list[int]) -> Iterator[tuple[int, tuple[QuantWeight, ...]]]:
        try:
            for e, parts in hits:
                yield e, parts
                self._in_use.discard((layout.key, e))
            for i, e in enumerate(misses):
                if i + self.lookahead < len(misses):
                    self._start(layout, misses[i + self.lookahead], asked=True)
                key = (layout.key, e)
                fut, slot = self._pending.pop(key)
                if not fut.done():
                    t0 = time.perf_counter()
                    fut.result()
                    self.wait_seconds += time.perf_counter() - t0
                parts = fut.result()
                self._in_use.add(key)
                self._put(key, parts, slot)
                yield e, parts
                self._in_use.discard(key)
        finally:
            self._in_use.difference_update((layout.key, e) for e, _ in hits)
            self._in_use.difference_update((layout.key, e) for e in misses)
        self._settle(layout.key)

    def _start(self, layout: ExpertLayout, e: int, asked: bool = False) -> None:
        key = (layout.key, e)
        if key in self._pending:
            self.prefetch_used += asked
        else:
            slot = self._slot_for(layout)
            self._pending[key] = (self.reader.submit(layout, e, slot), slot)

    def _settle(self, layer_key: Hashable, wait: bool = False) -> None:
        """Prefetched experts of a layer that its router did not pick: cache those already read
        (or all, with `wait`)."""
        for key, (fut, slot) in list(self._pending.items()):
            if (key[0] == layer_key or wait) and (wait or fut.done()):
                del self._pending[key]
                self._put(key, fut.result(), slot)

    def drain(self) -> None:
        """Wait for every read still in flight and cache what it read."""
        self._settle(None, wait=True)

    def summary(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "used": self.used, "entries": len(self._entries),
                "policy": self.policy, "lookups": self.lookups, "hits": self.hits,
                "bytes_read": self.reader.bytes_read, "read_seconds": self.reader.busy_seconds,
                "wait_seconds": self.wait_seconds, "prefetched": self.prefetched,
                "prefetch_used": self.prefetch_used}


class CachedExperts:
    """A MoE layer's `Experts`, served from the shared cache (models/protocol.Experts)."""

    resident = False  # a slot may be reused once the caller asks for the next expert

    def __init__(self, cache: ExpertCache, layout: ExpertLayout):
        self.cache = cache
        self.layout = layout

    def fetch(self, ids: Sequence[int], counts: Sequence[int] | None = None
              ) -> Iterator[tuple[int, tuple[QuantWeight, ...]]]:
        return self.cache.fetch(self.layout, ids, counts)

    def prefetch(self, ids: Sequence[int]) -> None:
        self.cache.prefetch(self.layout, ids)
