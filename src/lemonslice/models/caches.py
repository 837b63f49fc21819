"""Per-sequence state of one layer: the kinds of cache a family's blocks keep.

A cache is created from hyper-parameters alone (no weights) and can be copied, and cut back
to an earlier length, without the layer's weights:

* `AttentionCache`: post-RoPE keys and values; cutting back just forgets the tail.
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
from .gated_delta import pick_rule


def spans(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges [start, end) of sequences laid end to end: [2, 3] -> [(0, 2), (2, 5)]."""
    out, s = [], 0
    for n in lengths:
        out.append((s, s + n))
        s += n
    return out


@dataclass
class AttentionCache:
    """Post-RoPE keys and values of every position so far, float32 [capacity, Hkv, D]."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, n_head_kv: int, head_dim: int) -> "AttentionCache":
        empty = torch.zeros(0, n_head_kv, head_dim)
        return cls(empty, empty.clone())

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [T, Hkv, D]; return all keys and values [length, Hkv, D]."""
        end = self.length + k.shape[0]
        if end > self.k.shape[0]:
            cap = max(end, 2 * self.k.shape[0])
            grow = lambda t: torch.cat((t[: self.length], t.new_empty((cap - self.length, *t.shape[1:]))))  # noqa: E731
            self.k, self.v = grow(self.k), grow(self.v)
        self.k[self.length : end] = k
        self.v[self.length : end] = v
        self.length = end
        return self.k[:end], self.v[:end]

    def copy(self) -> "AttentionCache":
        return AttentionCache(self.k[: self.length].clone(), self.v[: self.length].clone(), self.length)

    def mark(self) -> None:
        """Nothing to keep: any earlier length can be cut back to."""

    def commit(self) -> None:
        pass

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise LemonsliceError(f"cannot cut an attention cache of {self.length} positions back to {n}")
        self.length = n


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
        qkv, q, k, v, g, beta = (torch.cat(parts)[:keep] for parts in zip(*self._trace))
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
