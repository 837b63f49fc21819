"""Pieces every model family shares: the embedding / final norm / LM head, and cache creation."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LemonsliceError
from ..gguf.constants import Tensors as TN
from ..ops import QuantWeight, linear, take_rows
from .qwen35_layers import Weights, as_float, as_matrix, rms_norm


def embed_rows(embd: QuantWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [T] of an embedding table -> [T, E] float32 (only those rows dequantized)."""
    ids = ids.to(torch.long)
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < embd.out_features):
        raise LemonsliceError(f"token ids must lie in [0, {embd.out_features})")
    return take_rows(embd, ids)


class SharedWeights:
    """Token embedding, final norm and LM head (output.weight, or token_embd when tied)."""

    def __init__(self, args: Any, weights: Weights):
        self.args = args
        self.embd = as_matrix(weights, TN.TOKEN_EMBD, 0)
        self.norm = as_float(weights, TN.OUTPUT_NORM, 0)  # [E]
        self.output = as_matrix(weights, TN.OUTPUT, 0) if TN.OUTPUT in weights else self.embd
        if self.embd.in_features != args.n_embd:
            raise LemonsliceError(f"token_embd rows have {self.embd.in_features} values, n_embd is {args.n_embd}")

    @property
    def n_vocab(self) -> int:
        return self.output.out_features

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, E] float32; only the selected rows are dequantized."""
        return embed_rows(self.embd, ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, E] -> [T, V]."""
        return linear(rms_norm(x, self.norm, self.args.rms_eps), self.output)


def make_cache(args: Any, layer: Any) -> Any:
    """Fresh state for one playlist position running `layer` (the block knows its kind)."""
    if layer.args != args:
        raise LemonsliceError("make_cache: the block was built for other model args")
    return layer.new_cache()
