"""The Qwen3.5 multi-token-prediction (MTP, `nextn`) head: one extra block that drafts the
token after next from the trunk's last hidden state and the next token.

For a pair (h, x), h the trunk's final-normed hidden state at position t and x the token at
t + 1, the head computes (the order of llama.cpp's `graph_mtp` for qwen35moe):

    z = eh_proj([RMSNorm(embed(x); enorm), RMSNorm(h; hnorm)])    # embedding half first
    z += attn(RMSNorm(z; attn_norm))                              # gated full attention, own KV cache
    z += FFN(RMSNorm(z; post_attention_norm))                     # MoE + shared expert, or dense
    g = RMSNorm(z; nextn.shared_head_norm, else output_norm)
    logits = head(g)                                              # nextn.shared_head_head, else the LM head

`g` is also the hidden state a further draft step pairs with the drafted token. Pair t
sits at position t of the head's own cache. No I/O: the weights are handed in.
"""

from __future__ import annotations

import torch

from ..errors import LemonsliceError
from ..gguf.constants import Tensors as TN
from ..ops import linear
from .common import SharedWeights, embed_rows
from .qwen35_args import ModelArgs
from .qwen35_layers import Attention, AttentionCache, DenseFFN, MoE, Weights, as_float, as_matrix, rms_norm


class MTPHead:
    """MTP block `bid` (>= args.n_layer) with the shared embedding / head it falls back on."""

    def __init__(self, args: ModelArgs, bid: int, weights: Weights, shared: SharedWeights):
        if not args.n_layer <= bid < args.block_count:
            raise LemonsliceError(f"block {bid} is not an MTP block ({args.n_layer}..{args.block_count - 1})")
        self.args = args
        self.bid = bid
        has = lambda t: t.format(bid=bid) in weights  # noqa: E731
        if not has(TN.NEXTN_EH_PROJ):
            raise LemonsliceError(f"block {bid} has no {TN.NEXTN_EH_PROJ.format(bid=bid)}: not an MTP block")
        E = args.n_embd
        self.eh_proj = as_matrix(weights, TN.NEXTN_EH_PROJ, bid)  # ggml [2E, E]: [embedding | hidden] -> E
        if self.eh_proj.shape != (2 * E, E):
            raise LemonsliceError(f"block {bid}: nextn.eh_proj has shape {'x'.join(map(str, self.eh_proj.shape))}, "
                                  f"expected {2 * E}x{E}")
        self.enorm = as_float(weights, TN.NEXTN_ENORM, bid)  # [E]
        self.hnorm = as_float(weights, TN.NEXTN_HNORM, bid)  # [E]
        self.attn_norm = as_float(weights, TN.ATTN_NORM, bid)  # [E]
        self.ffn_norm = as_float(weights, TN.ATTN_POST_NORM, bid)  # [E]
        if not has(TN.ATTN_Q):
            raise LemonsliceError(f"block {bid}: an MTP block needs full-attention tensors")
        self.attn = Attention(args, bid, weights)
        if has(TN.FFN_GATE_INP):
            self.ffn: MoE | DenseFFN = MoE(args, bid, weights)
        elif has(TN.FFN_GATE):
            self.ffn = DenseFFN.from_templates(weights, bid, TN.FFN_GATE, TN.FFN_UP, TN.FFN_DOWN)
        else:
            raise LemonsliceError(f"block {bid} has no FFN tensors")
        # llama.cpp: the nextn copies when present, the trunk's otherwise.
        self.head_norm = as_float(weights, TN.NEXTN_SHARED_HEAD_NORM, bid) if has(TN.NEXTN_SHARED_HEAD_NORM) \
            else shared.norm
        self.head = as_matrix(weights, TN.NEXTN_SHARED_HEAD_HEAD, bid) if has(TN.NEXTN_SHARED_HEAD_HEAD) \
            else shared.output
        self.embd = as_matrix(weights, TN.NEXTN_EMBED_TOKENS, bid) if has(TN.NEXTN_EMBED_TOKENS) \
            else shared.embd

    @property
    def n_vocab(self) -> int:
        return self.head.out_features

    def new_cache(self) -> AttentionCache:
        return self.attn.new_cache()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, E] float32 (only the selected rows are dequantized)."""
        return embed_rows(self.embd, ids)

    def __call__(self, ids: torch.Tensor, h: torch.Tensor, cache: AttentionCache, logits: str | None = "all",
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """ids [T], h [T, E] (final-normed trunk states, or g of the previous draft step) ->
        (logits [T, V], or [1, V] of the last row with logits="last", or None; g [T, E]);
        advances `cache` by T positions."""
        eps = self.args.rms_eps
        if logits not in ("all", "last", None):
            raise LemonsliceError(f"MTP head: logits must be 'all', 'last' or None, not {logits!r}")
        if h.shape != (ids.shape[0], self.args.n_embd):
            raise LemonsliceError(f"MTP head: hidden states {'x'.join(map(str, h.shape))} do not match {ids.shape[0]} tokens")
        e = rms_norm(self.embed(ids), self.enorm, eps)  # [T, E]
        z = linear(torch.cat((e, rms_norm(h.to(torch.float32), self.hnorm, eps)), dim=-1), self.eh_proj)  # [T, E]
        z = z + self.attn(rms_norm(z, self.attn_norm, eps), cache)
        z = z + self.ffn(rms_norm(z, self.ffn_norm, eps))
        g = rms_norm(z, self.head_norm, eps)  # [T, E]
        if logits is None:
            return None, g
        return linear(g if logits == "all" else g[-1:], self.head), g
