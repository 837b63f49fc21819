"""Gemma 3 text model (`gemma3`): blocks, embedding/head and per-layer KV caches.

A block is
    h = x + RMSNorm(attn(RMSNorm(x; attn_norm)); post_attention_norm)
    y = h + RMSNorm(GeGLU(RMSNorm(h; ffn_norm)); post_ffw_norm)
Attention has per-head Q/K RMSNorm, NEOX RoPE and GQA. Most layers are local: they attend
to the last `sliding_window` positions and rotate with base `freq_base_swa` (10000); every
`sliding_window_pattern`-th layer is global, with base `rope.freq_base`. The embedding is
scaled by sqrt(n_embd) and the LM head is tied to it unless the file has `output.weight`.
llama.cpp's converter stores every `*norm.weight` with Gemma's +1 already added, so RMSNorm
is x / rms(x) * w here. No I/O: the engine hands the weights in.
"""

from __future__ import annotations

import math
from functools import lru_cache
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LemonsliceError
from ..gguf.constants import Keys, arch_key
from ..gguf.constants import Tensors as TN
from ..ops import linear
from .common import SharedWeights, make_cache  # noqa: F401  (make_cache is part of the family API)
from .qwen35_layers import AttentionCache, Weights, as_float, as_matrix, attend_each, attend_floats, rms_norm

ARCH = "gemma3"
_REQUIRED = object()
# llama.cpp's defaults for Gemma 3 when the file does not say.
DEFAULT_SWA_PATTERN = 6
_DEFAULT_SWA_BASE = 10000.0

LayerCache = AttentionCache

__all__ = ["ARCH", "DEFAULT_SWA_PATTERN", "AttentionCache", "Block", "LayerCache", "ModelArgs", "Shared",
           "make_cache", "new_cache", "positional_swa"]


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_base: float  # global layers
    rope_base_swa: float  # sliding-window layers
    sliding_window: int  # 0: no layer is local
    swa: tuple[bool, ...]  # per layer: local (True) or global
    attn_scale: float  # multiplies Q·K
    final_softcap: float  # 0: none
    n_vocab: int | None  # from the tokenizer; None when the file has none

    @classmethod
    def from_gguf(cls, kv: Mapping[str, Any]) -> "ModelArgs":
        """Read the `gemma3.*` keys llama.cpp reads, with its defaults."""
        arch = kv.get(Keys.ARCHITECTURE)
        if arch != ARCH:
            raise LemonsliceError(f"architecture {arch!r} is not {ARCH!r}")

        def get(template: str, default: Any = _REQUIRED) -> Any:
            key = arch_key(template, arch)
            if key in kv:
                return kv[key]
            if default is _REQUIRED:
                raise LemonsliceError(f"GGUF metadata lacks {key}")
            return default

        n_layer = int(get(Keys.BLOCK_COUNT))
        n_embd = int(get(Keys.EMBEDDING_LENGTH))
        n_head = int(get(Keys.HEAD_COUNT))
        head_dim = int(get(Keys.KEY_LENGTH, n_embd // n_head))
        scaling = get(Keys.ROPE_SCALING_TYPE, "none")
        if scaling not in ("none", "linear") or float(get(Keys.ROPE_SCALING_FACTOR, 1.0)) not in (0.0, 1.0):
            raise LemonsliceError(f"RoPE scaling {scaling!r} is not supported")
        window = int(get(Keys.SLIDING_WINDOW, 0))
        # Without a window every layer is global.
        swa = (False,) * n_layer
        if window > 0:
            swa = _swa_layers(get(Keys.SLIDING_WINDOW_PATTERN, DEFAULT_SWA_PATTERN), n_layer)
        # llama.cpp scales queries by 1/sqrt(key_length), except for the 27B model (62 layers),
        # whose query_pre_attn_scalar is n_embd / n_head.
        scale_dim = n_embd // n_head if n_layer == 62 else head_dim
        tokens = kv.get(Keys.TOKENIZER_TOKENS)
        args = cls(
            arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=int(get(Keys.FEED_FORWARD_LENGTH)), n_head=n_head,
            n_head_kv=int(get(Keys.HEAD_COUNT_KV, n_head)), head_dim=head_dim, rms_eps=float(get(Keys.RMS_EPS)),
            rope_base=float(get(Keys.ROPE_FREQ_BASE, 10000.0)),
            rope_base_swa=float(get(Keys.ROPE_FREQ_BASE_SWA, _DEFAULT_SWA_BASE)), sliding_window=window,
            swa=swa, attn_scale=1.0 / math.sqrt(scale_dim),
            final_softcap=float(get(Keys.FINAL_LOGIT_SOFTCAPPING, 0.0)),
            n_vocab=len(tokens) if tokens is not None else None,
        )
        args._validate(int(get(Keys.VALUE_LENGTH, head_dim)), int(get(Keys.ROPE_DIMENSION_COUNT, head_dim)))
        return args

    def _validate(self, value_length: int, rope_dim: int) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise LemonsliceError(f"{self.arch}: {msg}")

        need(value_length == self.head_dim, "attention value_length must equal key_length")
        need(rope_dim == self.head_dim and rope_dim % 2 == 0, "rope.dimension_count must equal key_length")
        need(self.n_head % self.n_head_kv == 0, "head_count must be a multiple of head_count_kv")


def _swa_layers(pattern: Any, n_layer: int) -> tuple[bool, ...]:
    """Per-layer local flags from `sliding_window_pattern`, as llama.cpp's `load_swa_pattern`
    reads it: an array with one flag per layer (nonzero: sliding window), or a period."""
    if isinstance(pattern, (list, tuple, np.ndarray)):
        flags = tuple(bool(f) for f in np.asarray(pattern).reshape(-1))
        if len(flags) != n_layer:
            raise LemonsliceError(f"sliding_window_pattern has {len(flags)} entries, expected {n_layer}")
        return flags
    return positional_swa(int(pattern), n_layer)


def positional_swa(period: int, n_layer: int) -> tuple[bool, ...]:
    """The layout without a per-layer array: the last layer of every `period` is global
    (0: every layer local)."""
    return tuple(period == 0 or i % period < period - 1 for i in range(n_layer))


@lru_cache(maxsize=None)
def inv_freq(base: float, dim: int) -> torch.Tensor:
    """[dim/2] angle per position of each rotated pair: base^(-2i/dim). One shared (read-only)
    tensor per (base, dim), so the layers of a step share their RoPE tables."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def attend_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos0: int, scale: float,
                  window: int) -> torch.Tensor:
    """Causal GQA attention on float32 keys; with window > 0 a query at p sees keys at
    p-window+1..p. q [T, H, D] at positions q_pos0.. ; k, v [S, Hkv, D] at 0..S-1 -> [T, H, D]."""
    return attend_floats(q, k, v, q_pos0, scale, window)


class Attention:
    """Q/K RMSNorm per head, NEOX RoPE (local or global base), GQA, optional sliding window."""

    def __init__(self, args: ModelArgs, bid: int, w: Weights):
        self.args = args
        self.local = args.swa[bid]
        self.window = args.sliding_window if self.local else 0
        self.wq = as_matrix(w, TN.ATTN_Q, bid)
        self.wk = as_matrix(w, TN.ATTN_K, bid)
        self.wv = as_matrix(w, TN.ATTN_V, bid)
        self.wo = as_matrix(w, TN.ATTN_OUT, bid)
        self.q_norm = as_float(w, TN.ATTN_Q_NORM, bid)  # [D]
        self.k_norm = as_float(w, TN.ATTN_K_NORM, bid)  # [D]
        self.inv_freq = inv_freq(args.rope_base_swa if self.local else args.rope_base, args.head_dim)
        widths = (self.wq.out_features, self.wk.out_features)
        if widths != (args.n_head * args.head_dim, args.n_head_kv * args.head_dim):
            raise LemonsliceError(f"block {bid}: attn_q/attn_k widths do not match the head counts")

    def new_cache(self) -> AttentionCache:
        return AttentionCache.empty(self.args.n_head_kv, self.args.head_dim, self.window)

    def __call__(self, x: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        """x [T, E] at positions cache.length.. -> [T, E]."""
        return self.run(x, [cache], [x.shape[0]])

    def run(self, x: torch.Tensor, caches: Sequence[AttentionCache], lengths: Sequence[int]) -> torch.Tensor:
        """Sequences laid end to end, x [N, E] (lengths[i] rows for caches[i], each at its own
        positions) -> [N, E]; the projections run once over all rows."""
        a = self.args
        N, H, Hkv, D = x.shape[0], a.n_head, a.n_head_kv, a.head_dim
        q = rms_norm(linear(x, self.wq).view(N, H, D), self.q_norm, a.rms_eps)  # [N, H, D]
        k = rms_norm(linear(x, self.wk).view(N, Hkv, D), self.k_norm, a.rms_eps)  # [N, Hkv, D]
        v = linear(x, self.wv).view(N, Hkv, D)
        o = attend_each(q, k, v, caches, lengths, self.inv_freq, a.attn_scale, self.window)
        return linear(o, self.wo)  # o [N, H * D]


class GeGLU:
    """down(gelu_tanh(gate x) * up x)."""

    def __init__(self, w: Weights, bid: int):
        self.gate = as_matrix(w, TN.FFN_GATE, bid)
        self.up = as_matrix(w, TN.FFN_UP, bid)
        self.down = as_matrix(w, TN.FFN_DOWN, bid)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.gelu(linear(x, self.gate), approximate="tanh") * linear(x, self.up), self.down)


class Block:
    """One Gemma 3 block; `local` says whether its attention is sliding-window."""

    def __init__(self, args: ModelArgs, bid: int, weights: Weights):
        if not 0 <= bid < args.n_layer:
            raise LemonsliceError(f"block {bid} is not a trunk block (0..{args.n_layer - 1})")
        for t in (TN.ATTN_Q, TN.ATTN_POST_NORM, TN.FFN_POST_NORM, TN.FFN_GATE):
            if t.format(bid=bid) not in weights:
                raise LemonsliceError(f"block {bid} lacks {t.format(bid=bid)}: not a Gemma 3 block")
        self.args = args
        self.bid = bid
        self.attn = Attention(args, bid, weights)
        self.local = self.attn.local
        self.ffn = GeGLU(weights, bid)
        self.attn_norm = as_float(weights, TN.ATTN_NORM, bid)  # [E]
        self.attn_post_norm = as_float(weights, TN.ATTN_POST_NORM, bid)  # [E]
        self.ffn_norm = as_float(weights, TN.FFN_NORM, bid)  # [E]
        self.ffn_post_norm = as_float(weights, TN.FFN_POST_NORM, bid)  # [E]

    def new_cache(self) -> AttentionCache:
        return self.attn.new_cache()

    def __call__(self, x: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        """x [T, E] -> [T, E]; advances `cache` by T positions."""
        return self.run(x, [cache], [x.shape[0]])

    def run(self, x: torch.Tensor, caches: Sequence[AttentionCache], lengths: Sequence[int]) -> torch.Tensor:
        """Sequences laid end to end, x [N, E] (lengths[i] rows for caches[i]) -> [N, E]."""
        eps = self.args.rms_eps
        h = x + rms_norm(self.attn.run(rms_norm(x, self.attn_norm, eps), caches, lengths), self.attn_post_norm, eps)
        return h + rms_norm(self.ffn(rms_norm(h, self.ffn_norm, eps)), self.ffn_post_norm, eps)


def new_cache(args: ModelArgs, layer: int) -> AttentionCache:
    """Fresh state for a position running block `layer`: a global block keeps every position's
    KV, a sliding-window block only the last `sliding_window` (and what a rewind needs)."""
    return AttentionCache.empty(args.n_head_kv, args.head_dim, args.sliding_window if args.swa[layer] else 0)


class Shared(SharedWeights):
    """Scaled token embedding, final norm, LM head (output.weight, or token_embd when tied), softcap."""

    def __init__(self, args: ModelArgs, weights: Weights):
        super().__init__(args, weights)
        # sqrt(n_embd) rounded to float32 once, as both llama.cpp and transformers apply it.
        self.embed_scale = torch.tensor(math.sqrt(args.n_embd), dtype=torch.float32)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return super().embed(ids) * self.embed_scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = super().logits(x)
        cap = self.args.final_softcap
        return torch.tanh(out / cap) * cap if cap else out
