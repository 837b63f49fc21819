"""Model families (torch). Each takes its weights as handed in; no I/O here.

A family module has `ModelArgs` (with `from_gguf(kv)` and `n_layer`), `Block(args, bid, weights)`,
`Shared(args, weights)` (`embed`, `logits`, `n_vocab`) and `make_cache(args, block)`.
"""

from types import ModuleType
from typing import Any, Mapping

from ..errors import LemonsliceError
from ..gguf.constants import Keys
from . import gemma3, qwen35
from .qwen35 import AttentionCache, Block, DeltaNetCache, LayerCache, ModelArgs, Shared, make_cache
from .qwen35_args import ARCHES as _QWEN35_ARCHES

FAMILIES: dict[str, ModuleType] = {**{a: qwen35 for a in _QWEN35_ARCHES}, gemma3.ARCH: gemma3}


def family(kv: Mapping[str, Any]) -> ModuleType:
    """The family module that runs a model with these GGUF metadata (by general.architecture)."""
    arch = kv.get(Keys.ARCHITECTURE)
    if arch not in FAMILIES:
        raise LemonsliceError(f"architecture {arch!r} is not supported (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[arch]


__all__ = [
    "AttentionCache", "Block", "DeltaNetCache", "FAMILIES", "LayerCache", "ModelArgs", "Shared", "family",
    "make_cache",
]
