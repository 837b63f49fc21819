"""Qwen3.5 (`qwen35moe`, `qwen35`): blocks, embedding/head and per-layer caches.

A block is x += mixer(RMSNorm(x; attn_norm)); x += FFN(RMSNorm(x; post_attention_norm)).
The mixer is a Gated DeltaNet or gated full attention, the FFN a routed MoE with a shared
expert (qwen35moe) or a dense SwiGLU (qwen35). A block decides its kinds once, from the
tensors it is given, and checks them against the metadata. No I/O here: the engine hands
the weights in.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ..errors import LemonsliceError
from ..gguf.constants import Role
from ..gguf.constants import Tensors as TN
from ..ops import linear
from .common import SharedWeights, make_cache  # noqa: F401  (make_cache is part of the family API)
from .qwen35_args import ModelArgs
from .qwen35_layers import (
    Attention,
    AttentionCache,
    DeltaNetCache,
    DenseFFN,
    GatedDeltaNet,
    MoE,
    Weights,
    as_float,
    new_deltanet_cache,
    rms_norm,
)

LayerCache = Union[AttentionCache, DeltaNetCache]

__all__ = [
    "AttentionCache", "Block", "DeltaNetCache", "LayerCache", "ModelArgs", "Shared", "make_cache", "new_cache",
]


def new_cache(args: ModelArgs, layer: int) -> LayerCache:
    """Fresh state for a position running block `layer`, from the hyper-parameters alone
    (`recurrent` says the block's kind; a built block checks its tensors against it)."""
    if args.recurrent[layer]:
        return new_deltanet_cache(args)
    return AttentionCache.empty(args.n_head_kv, args.head_dim)


class Block:
    """One trunk block. `role` is Role.RECURRENT or Role.ATTENTION, `moe` says which FFN."""

    def __init__(self, args: ModelArgs, bid: int, weights: Weights):
        if not 0 <= bid < args.n_layer:
            raise LemonsliceError(f"block {bid} is not a trunk block (0..{args.n_layer - 1})")
        self.args = args
        self.bid = bid
        has = lambda t: t.format(bid=bid) in weights  # noqa: E731
        if has(TN.SSM_A) or has(TN.ATTN_QKV):
            self.role = Role.RECURRENT
            self.mixer: GatedDeltaNet | Attention = GatedDeltaNet(args, bid, weights)
        elif has(TN.ATTN_Q):
            self.role = Role.ATTENTION
            self.mixer = Attention(args, bid, weights)
        else:
            raise LemonsliceError(f"block {bid} has neither Gated DeltaNet nor attention tensors")
        if (self.role == Role.RECURRENT) != args.recurrent[bid]:
            want = "recurrent" if args.recurrent[bid] else "attention"
            raise LemonsliceError(f"block {bid}: tensors say {self.role.value}, metadata says {want}")
        self.moe = has(TN.FFN_GATE_INP)
        if self.moe:
            self.ffn: MoE | DenseFFN = MoE(args, bid, weights)
        elif has(TN.FFN_GATE):
            self.ffn = DenseFFN.from_templates(weights, bid, TN.FFN_GATE, TN.FFN_UP, TN.FFN_DOWN)
        else:
            raise LemonsliceError(f"block {bid} has no FFN tensors")
        self.attn_norm = as_float(weights, TN.ATTN_NORM, bid)  # [E]
        self.ffn_norm = as_float(weights, TN.ATTN_POST_NORM, bid)  # [E], post_attention_norm is the pre-FFN norm

    def new_cache(self) -> LayerCache:
        return self.mixer.new_cache()

    def expected_experts(self, x: torch.Tensor) -> list[int]:
        """The routed experts this block's FFN would pick for x [N, E] if the mixer added nothing:
        a guess, made before the mixer runs, of which experts to start reading."""
        if not isinstance(self.ffn, MoE):
            return []
        # The router's logits alone: softmax and renormalising do not change the top k.
        logits = linear(rms_norm(x, self.ffn_norm, self.args.rms_eps), self.ffn.router)  # [N, X]
        return torch.unique(logits.topk(self.args.n_expert_used, dim=-1).indices).tolist()

    def __call__(self, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """x [T, E] -> [T, E]; advances `cache` by T positions."""
        return self.run(x, [cache], [x.shape[0]])

    def run(self, x: torch.Tensor, caches: Sequence[LayerCache], lengths: Sequence[int]) -> torch.Tensor:
        """Sequences laid end to end, x [N, E] (lengths[i] rows for caches[i]) -> [N, E]: every
        weight (and each routed expert) is used once for all rows."""
        eps = self.args.rms_eps
        x = x + self.mixer.run(rms_norm(x, self.attn_norm, eps), caches, lengths)
        return x + self.ffn(rms_norm(x, self.ffn_norm, eps))


class Shared(SharedWeights):
    """Token embedding, final norm and LM head (output.weight, or token_embd when tied)."""
