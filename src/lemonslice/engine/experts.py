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
        """Anonymous memory one cached expert takes (each part padded to whole pages)."""
        return sum(_span(p.start, p.stride)[2] + _ALIGN for p in self.parts)


def _span(start: int, n: int) -> tuple[int, int, int]:
    """(aligned start, offset of `start` in it, aligned length) of the byte range [start, start+n)."""
    a0 = start - start % _ALIGN
    a1 = -(-(start + n) // _ALIGN) * _ALIGN
    return a0, start - a0, a1 - a0


class _Files:
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
        self._files = _Files()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy_since = 0.0
        self.busy_seconds = 0.0
        self.bytes_read = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._files.close()

    def submit(self, layout: ExpertLayout, e: int) -> "Future[tuple[QuantWeight, ...]]":
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        return self._pool.submit(self._read, layout, e)

    def _done(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n
            self._in_flight -= 1
            if self._in_flight == 0:
                self.busy_seconds += time.perf_counter() - self._busy_since

    def _read(self, layout: ExpertLayout, e: int) -> tuple[QuantWeight, ...]:
        """Expert e of a layer, each part in its own page-aligned stretch of one anonymous map."""
        spans = [_span(p.start + e * p.stride, p.stride) for p in layout.parts]
        buf = mmap.mmap(-1, sum(n for _, _, n in spans))
        data = torch.frombuffer(buf, dtype=torch.uint8)  # keeps `buf` alive as long as any view
        out, at, total = [], 0, 0
        try:
            for p, (a0, off, n) in zip(layout.parts, spans):
                total += self._pread(p.path, memoryview(buf)[at : at + n], a0, off + p.stride)
                out.append(QuantWeight(data[at + off : at + off + p.stride], p.ggml_type, p.shape))
                at += n
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
class LayerStats:
    """Per layer: uses and hits of each expert."""

    uses: np.ndarray  # [n_expert] int64
    hits: np.ndarray  # [n_expert] int64


class ExpertCache:
    """Experts of every layer under one byte budget, evicted by `policy` ("lru" or "lfu": least
    often used so far, ties by age)."""

    def __init__(self, capacity: int, policy: str = "lru", reader: ExpertReader | None = None,
                 lookahead: int = 8):
        if policy not in POLICIES:
            raise LemonsliceError(f"expert cache policy must be one of {', '.join(POLICIES)}, got {policy}")
        self.capacity = max(0, int(capacity))
        self.policy = policy
        self.reader = reader or ExpertReader()
        self.lookahead = max(1, lookahead)  # misses in flight per fetch: bounds the transient memory
        self._entries: OrderedDict[tuple[Hashable, int], tuple[tuple[QuantWeight, ...], int]] = OrderedDict()
        # Reads started and not yet handed out: key -> (future, the layer's slot bytes).
        self._pending: dict[tuple[Hashable, int], tuple[Future, int]] = {}
        self._freq: dict[tuple[Hashable, int], int] = {}
        self.used = 0
        self.stats: dict[int, LayerStats] = {}
        self.lookups = 0
        self.hits = 0
        self.wait_seconds = 0.0
        self.prefetched = 0
        self.prefetch_used = 0

    def close(self) -> None:
        self.drain()
        self.reader.close()
        self._entries.clear()
        self.used = 0

    def __len__(self) -> int:
        return len(self._entries)

    # ---- entries ----------------------------------------------------------------------

    def _get(self, key: tuple[Hashable, int]) -> tuple[QuantWeight, ...] | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def _put(self, key: tuple[Hashable, int], parts: tuple[QuantWeight, ...], n: int) -> None:
        if key in self._entries or n > self.capacity:
            return
        while self.used + n > self.capacity and self._entries:
            self._evict()
        self._entries[key] = (parts, n)
        self.used += n

    def _evict(self) -> None:
        if self.policy == "lru":
            victim = next(iter(self._entries))
        else:
            # Least used so far; among equals the least recently used (dict order is recency).
            victim = min(self._entries, key=lambda k: self._freq.get(k, 0))
        self.used -= self._entries.pop(victim)[1]

    def _count(self, layout: ExpertLayout, e: int, hit: bool) -> None:
        st = self.stats.get(layout.layer)
        if st is None:
            st = self.stats[layout.layer] = LayerStats(np.zeros(layout.n_expert, np.int64),
                                                       np.zeros(layout.n_expert, np.int64))
        st.uses[e] += 1
        st.hits[e] += hit
        self.lookups += 1
        self.hits += hit
        key = (layout.key, e)
        self._freq[key] = self._freq.get(key, 0) + 1

    # ---- reading ----------------------------------------------------------------------

    def prefetch(self, layout: ExpertLayout, ids: Sequence[int]) -> None:
        """Start reading experts of a layer that are neither cached nor already on their way."""
        for e in ids:
            key = (layout.key, e)
            if key not in self._entries and key not in self._pending:
                self._pending[key] = (self.reader.submit(layout, e), layout.slot_bytes)
                self.prefetched += 1

    def fetch(self, layout: ExpertLayout, ids: Sequence[int]) -> Iterator[tuple[int, tuple[QuantWeight, ...]]]:
        """Each of `ids` once: cached experts first, then misses as their reads finish."""
        bad = [e for e in ids if not 0 <= e < layout.n_expert]
        if bad:
            raise IndexError(f"expert ids must lie in [0, {layout.n_expert}), got {bad[0]}")
        misses = []
        for e in ids:
            parts = self._get((layout.key, e))
            self._count(layout, e, parts is not None)
            if parts is not None:
                yield e, parts
            else:
                misses.append(e)
        queue = list(misses)
        for e in queue[: self.lookahead]:
            self._start(layout, e)
        for i, e in enumerate(misses):
            if i + self.lookahead < len(queue):
                self._start(layout, queue[i + self.lookahead])
            key = (layout.key, e)
            fut = self._pending.pop(key)[0]
            if fut.done():
                parts = fut.result()
            else:
                t0 = time.perf_counter()
                parts = fut.result()
                self.wait_seconds += time.perf_counter() - t0
            self._put(key, parts, layout.slot_bytes)
            yield e, parts
        self._settle(layout.key)

    def _start(self, layout: ExpertLayout, e: int) -> None:
        key = (layout.key, e)
        if key in self._pending:
            self.prefetch_used += 1
        else:
            self._pending[key] = (self.reader.submit(layout, e), layout.slot_bytes)

    def _settle(self, layer_key: Hashable, wait: bool = False) -> None:
        """Prefetched experts of a layer that its router did not pick: cache those already read
        (or all, with `wait`), so every byte in memory is under the cache's budget."""
        for key, (fut, n) in list(self._pending.items()):
            if (key[0] == layer_key or wait) and (wait or fut.done()):
                del self._pending[key]
                self._put(key, fut.result(), n)

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

    def __init__(self, cache: ExpertCache, layout: ExpertLayout):
        self.cache = cache
        self.layout = layout

    def fetch(self, ids: Sequence[int]) -> Iterator[tuple[int, tuple[QuantWeight, ...]]]:
        return self.cache.fetch(self.layout, ids)

    def prefetch(self, ids: Sequence[int]) -> None:
        self.cache.prefetch(self.layout, ids)
