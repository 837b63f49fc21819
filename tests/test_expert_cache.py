"""The expert cache on its own: bytes, eviction order worked out by hand, in-use protection.

A fake layer of 3 parts x 4 experts lives in a file of known bytes (part p of expert e is
filled with the byte 16*p + e), so every read can be checked against the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lemonslice.engine.experts import ExpertCache, ExpertLayout, ExpertPart, ExpertReader
from lemonslice.gguf.constants import GGMLType

N_EXPERT = 4
ROW = 64  # F32 values per row
SHAPE = (ROW, 3)  # ggml order: 64 inputs, 3 outputs per expert part
STRIDE = ROW * 3 * 4


@pytest.fixture
def layout(tmp_path: Path) -> ExpertLayout:
    path = tmp_path / "experts.bin"
    data = bytearray(b"\xee" * 100)  # an unaligned start, like a GGUF's tensor data
    starts = []
    for p in range(3):
        starts.append(len(data))
        for e in range(N_EXPERT):
            data += bytes([16 * p + e]) * STRIDE
    path.write_bytes(bytes(data))
    parts = tuple(ExpertPart(str(path), s, STRIDE, GGMLType.F32, SHAPE) for s in starts)
    return ExpertLayout("blk0", 0, parts, N_EXPERT)


def _cache(layout: ExpertLayout, n: int, policy: str) -> ExpertCache:
    return ExpertCache({layout.slot_bytes: n}, policy, ExpertReader(threads=2), lookahead=2)


def _take(cache: ExpertCache, layout: ExpertLayout, ids: list[int], counts: list[int] | None = None) -> list[int]:
    """Fetch ids, check every expert's bytes against the file, return the order they came in."""
    order = []
    for e, parts in cache.fetch(layout, ids, counts):
        for p, w in enumerate(parts):
            assert w.shape == SHAPE
            assert torch.equal(w.raw.reshape(-1), torch.full((STRIDE,), 16 * p + e, dtype=torch.uint8))
        order.append(e)
    return order


def test_reads_are_the_files_bytes_and_hits_come_first(layout):
    cache = _cache(layout, 2, "lru")
    assert sorted(_take(cache, layout, [0, 1, 2])) == [0, 1, 2]
    assert cache.lookups == 3 and cache.hits == 0
    assert cache.reader.bytes_read >= 3 * 3 * STRIDE
    # Two slots: LRU kept 1 and 2; 2 is cached so it comes first, then 3 as its read lands.
    assert _take(cache, layout, [2, 3]) == [2, 3]
    assert cache.hits == 1
    cache.close()


def test_lru_evicts_the_least_recently_used(layout):
    cache = _cache(layout, 2, "lru")
    _take(cache, layout, [0])
    _take(cache, layout, [1])
    _take(cache, layout, [0])  # 0 is now more recent than 1
    _take(cache, layout, [2])  # evicts 1
    hits = cache.hits
    _take(cache, layout, [0])
    assert cache.hits == hits + 1
    _take(cache, layout, [1])
    assert cache.hits == hits + 1  # 1 was evicted
    cache.close()


def test_lfu_keeps_the_experts_most_rows_went_to(layout):
    cache = _cache(layout, 2, "lfu")
    _take(cache, layout, [0, 1], counts=[5, 1])  # a prefill chunk: 5 rows to expert 0, 1 to expert 1
    _take(cache, layout, [2])  # evicts 1 (fewest rows), not 0
    hits = cache.hits
    _take(cache, layout, [0])
    assert cache.hits == hits + 1
    _take(cache, layout, [3])  # 2 (1 row) goes, 0 (6 rows) stays
    _take(cache, layout, [0, 2])
    assert cache.hits == hits + 2  # 0 hit, 2 missed
    cache.close()


def test_an_expert_in_use_is_never_evicted(layout):
    cache = _cache(layout, 1, "lru")
    _take(cache, layout, [0])
    it = cache.fetch(layout, [0, 1, 2, 3])
    e, parts = next(it)  # expert 0, a hit, in use while the other three are read
    assert e == 0
    before = [w.raw.clone() for w in parts]
    for fut, _ in list(cache._pending.values()):
        fut.result()  # the reads started for the misses have landed
    # The cache holds one expert, yet 0's bytes were not overwritten while it was in use.
    assert all(torch.equal(a, w.raw) for a, w in zip(before, parts))
    assert sorted(x for x, _ in it) == [1, 2, 3]
    cache.close()


def test_a_bad_expert_id_is_refused(layout):
    cache = _cache(layout, 1, "lru")
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        list(cache.fetch(layout, [4]))
    cache.close()
