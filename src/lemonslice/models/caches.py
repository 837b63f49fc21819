"""Per-sequence state of one layer: the kinds of cache a family's blocks keep.

A cache is created from hyper-parameters alone (no weights) and can be copied, and cut back
to an earlier length, without the layer's weights:

* `AttentionCache`: post-RoPE keys and values in a KV type (`set_kv_types`, see ops.kv);
  cutting back forgets the tail; a sliding-window layer keeps only its window.
* `DeltaNetCache`: the conv inputs and the delta-rule state. A recurrent state cannot be
  rewound by itself, so `mark()` keeps the state of that moment plus what every later token
  fed the delta rule; `truncate(n)` then rebuilds the state at any length since the mark
  from those records, without re-running a projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import LemonsliceError
from ..ops import kv
from .gated_delta import pick_rule


def spans(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges [start, end) of sequences laid end to end: [2, 3] -> [(0, 2), (2, 5)]."""
    out, s = [], 0
    for n in lengths:
        out.append((s, s + n))
        s += n
    return out


_kv_types: list[str] = [kv.DEFAULT_KV_TYPE, kv.DEFAULT_KV_TYPE]


def held_rows(n_positions: int, window: int, chunk: int) -> int:
    """Rows an attention cache holds for a context of `n_positions`: all of them for a global
    layer; for a sliding-window one its window plus `chunk`, the positions a prefill chunk adds
    before the window's clean-up."""
    return min(n_positions, window + chunk) if window else n_positions


def set_kv_types(k_type: str, v_type: str) -> None:
    """Storage types of the keys and values of attention caches made from now on (ops.kv)."""
    _kv_types[:] = [kv.check_kv_type(k_type), kv.check_kv_type(v_type)]


def kv_types() -> tuple[str, str]:
    return _kv_types[0], _kv_types[1]


@dataclass(frozen=True)
class KVRows:
    """Stored keys and values of consecutive positions from `start`, one row each (ops.kv)."""

    k: torch.Tensor
    v: torch.Tensor
    start: int
    types: tuple[str, str]
    n_head_kv: int
    head_dim: int

    def float(self, lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions max(lo, start).. as float32 [S, Hkv, D]."""
        i = max(0, lo - self.start)
        return (kv.decode(self.k[i:], self.types[0], self.n_head_kv, self.head_dim),
                kv.decode(self.v[i:], self.types[1], self.n_head_kv, self.head_dim))


@dataclass
class AttentionCache:
    """Post-RoPE keys and values, one row per position from `start`, stored as `types`.

    A sliding-window layer (window > 0) keeps only what later queries can see: when its buffer
    is full, positions older than the window (and than the window before a mark, for a rewind)
    are dropped and the rest moved down, so it holds at most about twice the window plus a chunk.
    """

    k: torch.Tensor
    v: torch.Tensor
    n_head_kv: int
    head_dim: int
    types: tuple[str, str]
    window: int = 0
    length: int = 0
    start: int = 0
    _mark: int | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, n_head_kv: int, head_dim: int, window: int = 0,
              types: tuple[str, str] | None = None) -> "AttentionCache":
        types = types or kv_types()
        return cls(kv.empty_rows(types[0], 0, n_head_kv, head_dim), kv.empty_rows(types[1], 0, n_head_kv, head_dim),
                   n_head_kv, head_dim, types, window)

    @property
    def rows(self) -> int:
        return self.length - self.start

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (not of spare capacity)."""
        return self.rows * sum(kv.bytes_per_position(t, self.n_head_kv, self.head_dim) for t in self.types)

    def _oldest_needed(self) -> int:
        """The oldest position a later query, or a query after a rewind to the mark, can see."""
        if not self.window:
            return 0
        oldest = self.length if self._mark is None else min(self.length, self._mark)
        return max(0, oldest - self.window + 1)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> KVRows:
        """Add k, v [T, Hkv, D] float32 at positions length..; return the stored rows the new
        positions' queries may need (from `start`, which may be older than their window)."""
        T, used = k.shape[0], self.rows
        drop = self._oldest_needed() - self.start
        if used + T > self.k.shape[0] and drop > 0:
            self.k[: used - drop] = self.k[drop:used].clone()
            self.v[: used - drop] = self.v[drop:used].clone()
            self.start += drop
            used -= drop
        end = used + T
        if end > self.k.shape[0]:
            cap = max(end, 2 * self.k.shape[0])
            grow = lambda t, name: torch.cat((t[:used], kv.empty_rows(name, cap - used, self.n_head_kv,  # noqa: E731
                                                                       self.head_dim)))
            self.k, self.v = grow(self.k, self.types[0]), grow(self.v, self.types[1])
        self.k[used:end] = kv.encode(k, self.types[0])
        self.v[used:end] = kv.encode(v, self.types[1])
        self.length += T
        return KVRows(self.k[:end], self.v[:end], self.start, self.types, self.n_head_kv, self.head_dim)

    def reserve(self, n_positions: int, chunk: int) -> None:
        """Claim (and touch) room for a context of `n_positions` now, as llama.cpp clears its KV
        buffer at load: memory is taken at the start, not part-way through a reply. A sliding-
        window layer needs its window plus one chunk of `chunk` positions."""
        cap = held_rows(n_positions, self.window, chunk)
        if cap <= self.k.shape[0]:
            return
        used = self.rows
        fresh = lambda t, name: torch.cat((t[:used], kv.empty_rows(name, cap - used, self.n_head_kv,  # noqa: E731
                                                                    self.head_dim).zero_()))
        self.k, self.v = fresh(self.k, self.types[0]), fresh(self.v, self.types[1])

    def copy(self) -> "AttentionCache":
        return AttentionCache(self.k[: self.rows].clone(), self.v[: self.rows].clone(), self.n_head_kv,
                              self.head_dim, self.types, self.window, self.length, self.start, self._mark)

    def mark(self) -> None:
        """Keep what a rewind to this length needs until `commit`."""
        self._mark = self.length

    def commit(self) -> None:
        self._mark = None

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise LemonsliceError(f"cannot cut an attention cache of {self.length} positions back to {n}")
        if self.window and max(0, n - self.window + 1) < self.start:
            raise LemonsliceError(f"a sliding-window cache at {self.length} keeps positions from {self.start} "
                                  f"only: it cannot go back to {n}")
        self.length = n
        self._mark = None


@dataclass
class DeltaNetCache:
    """The last K-1 conv inputs [K-1, conv_dim] and the delta-rule state [Hv, Dk, Dv] (float32)."""

    conv: torch.Tensor
    state: torch.Tensor
    length: int = 0
    # Set by `mark`: (conv, state, length) then, and per forward since, the conv inputs and
    # the delta rule's inputs (qkv [T, C], q, k [T, Hv, Dk], v [T, Hv, Dv], g, beta [T, Hv]).
    _mark: tuple[torch.Tensor, torch.Tensor, int] | None = field(default=None, repr=False)
    _trace: list[tuple[torch.Tensor, ...]] | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, conv_kernel: int, conv_dim: int, n_head_v: int, d_key: int, d_value: int) -> "DeltaNetCache":
        return cls(torch.zeros(conv_kernel - 1, conv_dim), torch.zeros(n_head_v, d_key, d_value))

    def copy(self) -> "DeltaNetCache":
        return DeltaNetCache(self.conv.clone(), self.state.clone(), self.length)

    def mark(self) -> None:
        """Remember this point; `truncate` may later go back to any length from here on."""
        # The mixer replaces conv and state with new tensors, never writes into them, so
        # keeping references is enough.
        self._mark = (self.conv, self.state, self.length)
        self._trace = []

    def commit(self) -> None:
        """Forget the mark and its records."""
        self._mark = self._trace = None

    @property
    def marked(self) -> bool:
        return self._mark is not None

    def record(self, qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
               beta: torch.Tensor) -> None:
        """Called by the mixer for each forward: kept only while marked."""
        if self._trace is not None:
            self._trace.append((qkv, q, k, v, g, beta))

    def truncate(self, n: int) -> None:
        """Cut back to the first `n` positions; n must lie between the mark and now."""
        if n == self.length:
            self.commit()
            return
        if self._mark is None or not self._mark[2] <= n < self.length:
            raise LemonsliceError(f"a Gated DeltaNet state at {self.length} goes back only to a mark, not to {n}")
        conv, state, start = self._mark
        keep = n - start
        qkv, q, k, v, g, beta = ((parts[0] if len(parts) == 1 else torch.cat(parts))[:keep] for parts in zip(*self._trace))
        n_keep = conv.shape[0]
        xs = torch.cat((conv, qkv))  # as causal_conv keeps its last K-1 inputs
        self.conv = xs[xs.shape[0] - n_keep :].clone()
        if keep:
            # The rule a forward over these `keep` tokens would have picked.
            _, self.state = pick_rule(keep)(q, k, v, g, beta, state)
        else:
            self.state = state
        self.length = n
        self.commit()
