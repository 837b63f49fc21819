"""Model families (torch). Each takes its weights as handed in; no I/O here.

A family module has `ModelArgs` (with `from_gguf(kv)` and `n_layer`), `Block(args, bid, weights)`,
`Shared(args, weights)` (`embed`, `logits`, `n_vocab`), `new_cache(args, layer)` and
`make_cache(args, block)`: the `Family` protocol of `models.protocol`.
"""

from typing import Any, Mapping, cast

from ..errors import LemonsliceError
from ..gguf.constants import Keys
from . import gemma3, qwen35
from .protocol import Family
from .qwen35 import AttentionCache, Block, DeltaNetCache, LayerCache, ModelArgs, Shared, make_cache, new_cache
from .qwen35_args import ARCHES as _QWEN35_ARCHES

# The family modules satisfy the Family protocol structurally.
FAMILIES: dict[str, Family] = {
    **{a: cast(Family, qwen35) for a in _QWEN35_ARCHES}, gemma3.ARCH: cast(Family, gemma3),
}


def family(kv: Mapping[str, Any]) -> Family:
    """The family module that runs a model with these GGUF metadata (by general.architecture)."""
    arch = kv.get(Keys.ARCHITECTURE)
    if arch not in FAMILIES:
        raise LemonsliceError(f"architecture {arch!r} is not supported (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[arch]


__all__ = [
    "AttentionCache", "Block", "DeltaNetCache", "FAMILIES", "Family", "LayerCache", "ModelArgs", "Shared", "family",
    "make_cache", "new_cache",
]
