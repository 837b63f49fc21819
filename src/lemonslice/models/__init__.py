"""Model families (torch). Each takes its weights as handed in; no I/O here."""

from .qwen35 import AttentionCache, Block, DeltaNetCache, LayerCache, ModelArgs, Shared, make_cache

__all__ = ["AttentionCache", "Block", "DeltaNetCache", "LayerCache", "ModelArgs", "Shared", "make_cache"]
