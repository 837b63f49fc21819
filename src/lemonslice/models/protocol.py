"""What a model family provides, as typing Protocols: the engine is written against these.

A family is a module (`qwen35`, `gemma3`) with hyper-parameters read from GGUF metadata, a
block built from one layer's weights, the shared embedding / final norm / LM head, and the
per-layer cache each playlist position keeps (made from hyper-parameters alone).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class LayerCache(Protocol):
    """One layer's state for one sequence (attention KV, or Gated DeltaNet conv + recurrent state)."""

    length: int  # positions it holds

    def copy(self) -> "LayerCache": ...

    def mark(self) -> None: ...

    def commit(self) -> None: ...

    def truncate(self, n: int) -> None: ...


class Experts(Protocol):
    """Where a MoE layer gets its routed experts' weights: resident stacks, or an expert cache."""

    # True when every expert handed out stays valid for the whole call (resident stacks), so
    # all of them can be multiplied at once; False when one must be used before the next is asked.
    resident: bool

    def fetch(self, ids: Sequence[int], counts: Sequence[int] | None = None) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(expert id, its 2-D weights: (gate, up, down) or (gate_up, down)) for each of `ids`,
        in the order they become available; each id exactly once. `counts`: how many rows
        use each (a cache may keep the busiest)."""
        ...


class Args(Protocol):
    """A family's hyper-parameters (a frozen dataclass)."""

    arch: str
    n_layer: int  # trunk blocks
    n_embd: int
    rms_eps: float


class Block(Protocol):
    """One trunk block, built from its weights."""

    args: Args
    bid: int

    def __call__(self, x: torch.Tensor, cache: Any) -> torch.Tensor: ...

    def run(self, x: torch.Tensor, caches: Sequence[Any], lengths: Sequence[int]) -> torch.Tensor:
        """Sequences laid end to end, x [N, E], lengths[i] rows for caches[i] -> [N, E]."""
        ...


class Head(Protocol):
    """The shared weights: token embedding, final norm and LM head."""

    norm: torch.Tensor  # [E]

    @property
    def n_vocab(self) -> int: ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def logits(self, x: torch.Tensor) -> torch.Tensor: ...


class Family(Protocol):
    """A family module: `family(metadata)` returns one."""

    @property
    def ModelArgs(self) -> Any: ...  # noqa: N802  (a class with `from_gguf(kv)`)

    def Block(self, args: Args, bid: int, weights: Mapping[str, Any]) -> Block: ...  # noqa: N802

    def Shared(self, args: Args, weights: Mapping[str, Any]) -> Head: ...  # noqa: N802

    def make_cache(self, args: Args, block: Block) -> LayerCache: ...

    def new_cache(self, args: Args, layer: int) -> LayerCache: ...
