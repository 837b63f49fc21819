"""Qwen3.5 token mixers (gated full attention, Gated DeltaNet) and FFNs (MoE, dense).

Every module takes one sequence x [T, E] (float32) and its layer's cache (`run`: several
sequences laid end to end, one cache each), and is built from the layer's weights as handed
in: matrices as `QuantWeight`s (multiplied through `ops.linear`, routed experts one by one,
never expanded whole), 1-D tensors as float tensors.
Norm weights already hold llama.cpp's +1, so RMSNorm is x / rms(x) * w.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

from ..errors import LemonsliceError
from ..gguf.constants import GGMLType
from ..gguf.constants import Tensors as TN
from ..ops import QuantWeight, dequantize, kernels, linear, swiglu_experts
from ..ops.kv import KV_TYPES
from .caches import AttentionCache, DeltaNetCache, KVRows, spans
from .gated_delta import causal_conv, l2_normalize, pick_rule
from .protocol import Experts
from .qwen35_args import ModelArgs

Weight = Union[QuantWeight, torch.Tensor]
Weights = Mapping[str, Weight]


def take(w: Weights, template: str, bid: int) -> Weight:
    name = template.format(bid=bid)
    if name not in w:
        raise LemonsliceError(f"layer {bid}: tensor {name} is missing")
    return w[name]


def as_matrix(w: Weights, template: str, bid: int) -> QuantWeight:
    t = take(w, template, bid)
    if not isinstance(t, QuantWeight):
        raise LemonsliceError(f"{template.format(bid=bid)}: expected a weight matrix")
    return t


def as_float(w: Weights, template: str, bid: int) -> torch.Tensor:
    """A small tensor (norm, bias, conv kernel) as float32 in torch order."""
    t = take(w, template, bid)
    if isinstance(t, QuantWeight) and t.ggml_type == GGMLType.F32:
        return t.raw.view(torch.float32).reshape(tuple(reversed(t.shape)))  # shares the loaded buffer
    if isinstance(t, QuantWeight):
        t = dequantize(t.raw, t.ggml_type, t.shape)
    return t.to(torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim (a C kernel, else torch's fused op)."""
    out = kernels.rms_norm(x, weight, eps)
    return out if out is not None else F.rms_norm(x, weight.shape, weight, eps)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """[rope_dim/2] angle per position of each rotated pair: base^(-2i/rope_dim)."""
    return _inv_freq(args.rope_base, args.rope_dim)


@lru_cache(maxsize=None)
def _inv_freq(base: float, dim: int) -> torch.Tensor:
    # One shared (read-only) tensor per (base, dim): the layers of a step share their RoPE tables.
    exponent = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    return 1.0 / (base ** exponent)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*len(inv_freq) dims of x [T, H, D] at positions pos [T].

    NEOX layout: dim i pairs with dim i + rope_dim/2 (llama.cpp's IMROPE rotates pairs this
    way too). With text positions every IMRoPE section sees the same position, so the
    sections drop out and this is plain partial RoPE.
    """
    half = inv_freq.shape[0]
    ang = pos.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, half]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]  # [T, 1, half]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


# Positions per RoPE table chunk: a step slices its rows out of one or two chunks, so every
# position's cos/sin have the same bits in decode, a verify pass and a prompt chunk.
ROPE_CHUNK = 256
_ROPE_CHUNKS: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _rope_chunk(inv_freq: torch.Tensor, c: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [ROPE_CHUNK, 1, D] for positions c*ROPE_CHUNK.. (see `rope_tables`)."""
    key = (id(inv_freq), c, D)
    hit = _ROPE_CHUNKS.get(key)
    if hit is not None and hit[2] is inv_freq:
        return hit[0], hit[1]
    half = inv_freq.shape[0]
    pos = torch.arange(c * ROPE_CHUNK, (c + 1) * ROPE_CHUNK, dtype=torch.float32)
    ang = pos[:, None] * inv_freq[None, :]  # [C, half]
    cs, sn = ang.cos(), ang.sin()
    one, zero = torch.ones(ROPE_CHUNK, D - 2 * half), torch.zeros(ROPE_CHUNK, D - 2 * half)
    cos = torch.cat((cs, cs, one), dim=-1)[:, None, :]
    sin = torch.cat((-sn, sn, zero), dim=-1)[:, None, :]
    if len(_ROPE_CHUNKS) >= 64:
        _ROPE_CHUNKS.clear()
    _ROPE_CHUNKS[key] = (cos, sin, inv_freq)  # the tensor itself kept: its id stays unique
    return cos, sin


def rope_tables(inv_freq: torch.Tensor, pos0: int, T: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [T, 1, D] for `rotate` at positions pos0..pos0+T-1: over the rotated
    dims (cos, cos) and (-sin, sin), 1 and 0 over the rest; rows of cached chunks."""
    parts = []
    for c in range(pos0 // ROPE_CHUNK, (pos0 + T - 1) // ROPE_CHUNK + 1):
        cos, sin = _rope_chunk(inv_freq, c, D)
        lo, hi = max(pos0, c * ROPE_CHUNK) - c * ROPE_CHUNK, min(pos0 + T, (c + 1) * ROPE_CHUNK) - c * ROPE_CHUNK
        parts.append((cos[lo:hi], sin[lo:hi]))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """`apply_rope` with tables from `rope_tables`: x * cos + (x2, x1, rest) * sin."""
    swapped = torch.cat((x[..., half : 2 * half], x[..., :half], x[..., 2 * half :]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


# Up to this many query positions (decode, an MTP verify pass) attend one at a time, so each
# gets the arithmetic of a one-token step: verified tokens match plain decoding bit for bit.
ONE_BY_ONE = 16


def attend_each(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, caches: Sequence[AttentionCache],
                lengths: Sequence[int], inv_freq: torch.Tensor, scale: float, window: int = 0,
                attn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None,
                ) -> torch.Tensor:
    """Sequences laid end to end, q [N, H, D], k/v [N, Hkv, D]: each is rotated at its own
    positions, appended to its own cache and attended over it (`attend_kv`; or, given `attn`,
    a float attention such as `attend_ref` over the decoded cache) -> [N, H * D]."""
    outs = []
    D, half = q.shape[-1], inv_freq.shape[0]
    for (s, e), cache in zip(spans(lengths), caches):
        pos0 = cache.length
        cos, sin = rope_tables(inv_freq, pos0, e - s, D)
        qi, ki = rotate(q[s:e], cos, sin, half), rotate(k[s:e], cos, sin, half)
        rows = cache.append(ki, v[s:e])
        if attn is None:
            o = attend_kv(qi, rows, pos0, scale, window)
        else:
            k_all, v_all = rows.float()  # [S, Hkv, D] from rows.start
            o = attn(qi, k_all, v_all, pos0 - rows.start)
        outs.append(o.reshape(e - s, -1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def attend_kv(q: torch.Tensor, rows: KVRows, q_pos0: int, scale: float, window: int = 0) -> torch.Tensor:
    """Causal GQA attention of q [T, H, D] at positions q_pos0.. over cached rows; with
    window > 0 a query at p sees keys at p-window+1..p. A few positions read the stored rows
    one by one in C (cost follows the attended length); more decode what they need and use SDPA."""
    T = q.shape[0]
    if T <= ONE_BY_ONE:
        bounds = [(max(0, e - window) if window > 0 else 0, e) for e in range(q_pos0 + 1, q_pos0 + T + 1)]
        return attend_few(q, rows, bounds, scale)
    lo = max(0, q_pos0 - window + 1) if window > 0 else 0
    k, v = rows.float(lo)  # positions max(lo, start)..
    k0 = max(lo, rows.start)
    qpos = torch.arange(T)[:, None] + q_pos0  # [T, 1]
    kpos = torch.arange(k.shape[0])[None, :] + k0  # [1, S]
    mask = kpos <= qpos  # [T, S], True = may attend
    if window > 0:
        mask &= kpos > qpos - window
    return sdpa_gqa(q, k, v, mask, scale)


# Query rows per SDPA call are cut so that one call's scores over the context stay near this.
_SDPA_SCRATCH = 32 << 20


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D] over k, v [S, Hkv, D] with mask [T, S] -> [T, H, D]. As 4-D [Hkv, rep, ., D]
    with K/V expanded (views), torch takes its fused CPU kernel, whose scratch does not grow
    with T x S (a 512 x 8192 chunk: 18 MB, against 235 MB for 3-D inputs with enable_gqa)."""
    T, H, D = q.shape
    S, Hkv = k.shape[0], k.shape[1]
    step = max(16, _SDPA_SCRATCH // (H * S * 4))
    if T > step:
        return torch.cat([sdpa_gqa(q[i : i + step], k, v, mask[i : i + step], scale) for i in range(0, T, step)])
    rep = H // Hkv
    qg = q.transpose(0, 1).reshape(Hkv, rep, T, D)
    kg = k.transpose(0, 1)[:, None].expand(Hkv, rep, S, D)
    vg = v.transpose(0, 1)[:, None].expand(Hkv, rep, S, D)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)  # [Hkv, rep, T, D]
    return o.reshape(H, T, D).transpose(0, 1)


def attend_few(q: torch.Tensor, rows: KVRows, bounds: Sequence[tuple[int, int]], scale: float) -> torch.Tensor:
    """Query positions q [T, H, D], row i over the cached positions bounds[i] = [lo, hi) (no mask:
    every one is in the past) -> [T, H, D], reading the stored rows in place, each row with the
    arithmetic of a one-position step; `attend_one_ref` row by row is its twin."""
    types = (KV_TYPES[rows.types[0]], KV_TYPES[rows.types[1]])
    spans_ = [(lo - rows.start, hi - rows.start) for lo, hi in bounds]
    out = kernels.attend_rows(q, rows.k, rows.v, spans_, scale, rows.n_head_kv, types)
    if out is not None:
        return out
    return torch.cat([attend_one_ref(q[i : i + 1], rows, lo, hi, scale) for i, (lo, hi) in enumerate(bounds)])


def attend_one(q: torch.Tensor, rows: KVRows, lo: int, hi: int, scale: float) -> torch.Tensor:
    """One query position q [1, H, D] over the cached positions [lo, hi) -> [1, H, D] (`attend_few`)."""
    return attend_few(q, rows, [(lo, hi)], scale)


def attend_one_ref(q: torch.Tensor, rows: KVRows, lo: int, hi: int, scale: float) -> torch.Tensor:
    """Twin of `attend_one`: decode, then query heads of a KV head as rows of one matmul."""
    k, v = rows.float(lo)
    k, v = k[: hi - max(lo, rows.start)], v[: hi - max(lo, rows.start)]  # [S, Hkv, D]
    H, D, Hkv = q.shape[1], q.shape[2], k.shape[1]
    qh = q.reshape(Hkv, H // Hkv, D)  # [Hkv, rep, D]
    scores = torch.matmul(qh, k.permute(1, 2, 0)) * scale  # [Hkv, rep, S]
    o = torch.matmul(scores.softmax(-1), v.transpose(0, 1))  # [Hkv, rep, D]
    return o.reshape(1, H, D)


def attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos0: int) -> torch.Tensor:
    """Causal GQA softmax attention. q [T, H, D] at positions q_pos0.. ; k, v [S, Hkv, D] at 0..S-1.

    Query head h reads KV head h // (H / Hkv). Returns [T, H, D].
    """
    T, H, D = q.shape
    rep = H // k.shape[1]
    kh = k.repeat_interleave(rep, dim=1).transpose(0, 1)  # [H, S, D]
    vh = v.repeat_interleave(rep, dim=1).transpose(0, 1)
    scores = (q.transpose(0, 1) @ kh.transpose(-1, -2)) * D**-0.5  # [H, T, S]
    qpos = torch.arange(T, device=q.device)[:, None] + q_pos0
    future = torch.arange(k.shape[0], device=q.device)[None, :] > qpos  # [T, S]
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (probs @ vh).transpose(0, 1)


def attend_floats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos0: int, scale: float,
                  window: int = 0) -> torch.Tensor:
    """`attend_kv` on float32 keys and values k, v [S, Hkv, D] at positions 0..S-1."""
    return attend_kv(q, KVRows(k, v, 0, ("f32", "f32"), k.shape[1], k.shape[2]), q_pos0, scale, window)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos0: int) -> torch.Tensor:
    """Fast twin of `attend_ref` on float32 keys and values at 0..S-1."""
    return attend_floats(q, k, v, q_pos0, q.shape[-1] ** -0.5)


class Attention:
    """Gated full attention: per-head Q/K RMSNorm, partial RoPE, GQA, output * sigmoid(gate)."""

    def __init__(self, args: ModelArgs, bid: int, w: Weights):
        self.args = args
        self.wq = as_matrix(w, TN.ATTN_Q, bid)  # rows per head: D query rows, then D gate rows
        self.wk = as_matrix(w, TN.ATTN_K, bid)
        self.wv = as_matrix(w, TN.ATTN_V, bid)
        self.wo = as_matrix(w, TN.ATTN_OUT, bid)
        self.q_norm = as_float(w, TN.ATTN_Q_NORM, bid)  # [D]
        self.k_norm = as_float(w, TN.ATTN_K_NORM, bid)  # [D]
        self.inv_freq = rope_inv_freq(args)

    def new_cache(self) -> AttentionCache:
        return AttentionCache.empty(self.args.n_head_kv, self.args.head_dim)

    def __call__(self, x: torch.Tensor, cache: AttentionCache, attn=None) -> torch.Tensor:
        """x [T, E] at positions cache.length.. -> [T, E]. `attn`: None (the cached rows in place) or a float twin such as `attend_ref`."""
        return self.run(x, [cache], [x.shape[0]], attn)

    def run(self, x: torch.Tensor, caches: Sequence[AttentionCache], lengths: Sequence[int],
            attn=None) -> torch.Tensor:
        """Sequences laid end to end, x [N, E] (lengths[i] rows for caches[i], each at its own
        positions) -> [N, E]; the projections run once over all rows."""
        a = self.args
        N, H, Hkv, D = x.shape[0], a.n_head, a.n_head_kv, a.head_dim
        qg = linear(x, self.wq).view(N, H, 2 * D)
        q, gate = qg[..., :D], qg[..., D:]  # [N, H, D] each
        q = rms_norm(q, self.q_norm, a.rms_eps)
        k = rms_norm(linear(x, self.wk).view(N, Hkv, D), self.k_norm, a.rms_eps)
        v = linear(x, self.wv).view(N, Hkv, D)
        o = attend_each(q, k, v, caches, lengths, self.inv_freq, D**-0.5, attn=attn)  # [N, H * D]
        return linear(o * torch.sigmoid(gate.reshape(N, H * D)), self.wo)


class GatedDeltaNet:
    """Linear-attention mixer: conv over [q, k, v], L2-normalised q/k, gated delta rule, gated RMSNorm."""

    def __init__(self, args: ModelArgs, bid: int, w: Weights):
        self.args = args
        self.w_qkv = as_matrix(w, TN.ATTN_QKV, bid)  # -> [q (G heads) | k (G heads) | v (Hv heads)]
        self.w_z = as_matrix(w, TN.ATTN_GATE, bid)
        self.w_beta = as_matrix(w, TN.SSM_BETA, bid)
        self.w_alpha = as_matrix(w, TN.SSM_ALPHA, bid)
        self.w_out = as_matrix(w, TN.SSM_OUT, bid)
        self.conv_w = as_float(w, TN.SSM_CONV1D, bid).reshape(args.ssm_conv_dim, args.ssm_conv_kernel)  # [C, K]
        self.dt_bias = as_float(w, TN.SSM_DT, bid).reshape(-1)  # [Hv]
        self.a = as_float(w, TN.SSM_A, bid).reshape(-1)  # [Hv], = -exp(A_log)
        self.norm = as_float(w, TN.SSM_NORM, bid).reshape(-1)  # [Dv]

    def new_cache(self) -> DeltaNetCache:
        return new_deltanet_cache(self.args)

    def __call__(self, x: torch.Tensor, cache: DeltaNetCache, rule=None) -> torch.Tensor:
        """x [T, E] -> [T, E]. `rule` forces a delta-rule kernel; by default `pick_rule(T)`."""
        return self.run(x, [cache], [x.shape[0]], rule)

    def run(self, x: torch.Tensor, caches: Sequence[DeltaNetCache], lengths: Sequence[int],
            rule=None) -> torch.Tensor:
        """Sequences laid end to end, x [N, E] (lengths[i] rows for caches[i]) -> [N, E]; the
        projections run once over all rows, conv and delta rule per sequence."""
        a = self.args
        N, Hv, Dv = x.shape[0], a.ssm_dt_rank, a.ssm_head_v_dim
        qkv = linear(x, self.w_qkv)  # [N, conv_dim]
        b, alpha = linear(x, self.w_beta), linear(x, self.w_alpha)  # [N, Hv] each
        gates = kernels.deltanet_gates(alpha, b, self.a, self.dt_bias)
        # g [N, Hv]: log decay, <= 0; beta [N, Hv]
        g, beta = gates if gates is not None else (self.a * F.softplus(alpha + self.dt_bias), torch.sigmoid(b))
        if rule is None and len(caches) > 1 and all(n == 1 for n in lengths) and not any(c.marked for c in caches):
            o = self._step_many(qkv, g, beta, caches)  # [N, Hv, Dv]
        else:
            outs = [self._recur(qkv[s:e], g[s:e], beta[s:e], c, rule) for (s, e), c in zip(spans(lengths), caches)]
            o = outs[0] if len(outs) == 1 else torch.cat(outs)  # [N, Hv, Dv]
        z = linear(x, self.w_z).view(N, Hv, Dv)
        o = rms_norm(o, self.norm, a.rms_eps) * F.silu(z)
        return linear(o.reshape(N, Hv * Dv), self.w_out)

    def _recur(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, cache: DeltaNetCache,
               rule=None) -> torch.Tensor:
        """One sequence's conv and delta rule: qkv [T, conv_dim] -> o [T, Hv, Dv]; advances `cache`."""
        a = self.args
        T, G, Hv, Dk, Dv = qkv.shape[0], a.ssm_n_group, a.ssm_dt_rank, a.ssm_d_state, a.ssm_head_v_dim
        y, conv = causal_conv(qkv, cache.conv, self.conv_w)
        y = F.silu(y)  # [T, conv_dim]
        q, k, v = y.split((G * Dk, G * Dk, Hv * Dv), dim=-1)
        q = l2_normalize(q.reshape(T, G, Dk), a.rms_eps)
        k = l2_normalize(k.reshape(T, G, Dk), a.rms_eps)
        # V heads are stored tiled (converter's reorder): value head h reads key head h % G.
        q = q.repeat(1, Hv // G, 1) * Dk**-0.5  # [T, Hv, Dk]
        k = k.repeat(1, Hv // G, 1)
        v = v.reshape(T, Hv, Dv)
        cache.record(qkv, q, k, v, g, beta)
        rule = rule or pick_rule(T)
        o, cache.state = rule(q, k, v, g, beta, cache.state)  # o [T, Hv, Dv]
        cache.conv = conv
        cache.length += T
        return o


    def _step_many(self, qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   caches: Sequence[DeltaNetCache]) -> torch.Tensor:
        """One new token of each of B sequences: qkv [B, conv_dim] -> o [B, Hv, Dv]. Row for row
        the arithmetic of B `_recur` calls (the heads of all sequences side by side in one
        delta-rule call), without B rounds of small ops."""
        a = self.args
        B, G, Hv, Dk, Dv = qkv.shape[0], a.ssm_n_group, a.ssm_dt_rank, a.ssm_d_state, a.ssm_head_v_dim
        xs = torch.cat((torch.stack([c.conv for c in caches]), qkv[:, None]), dim=1)  # [B, K, C]
        taps = self.conv_w.t().contiguous()  # [K, C]: causal_conv's products, term for term
        y = xs[:, 0] * taps[0]
        for j in range(1, xs.shape[1]):
            y.add_(xs[:, j] * taps[j])
        y = F.silu(y)  # [B, conv_dim]
        q, k, v = y.split((G * Dk, G * Dk, Hv * Dv), dim=-1)
        q = l2_normalize(q.reshape(B, G, Dk), a.rms_eps).repeat(1, Hv // G, 1) * Dk**-0.5  # [B, Hv, Dk]
        k = l2_normalize(k.reshape(B, G, Dk), a.rms_eps).repeat(1, Hv // G, 1)
        state = torch.cat([c.state for c in caches])  # [B * Hv, Dk, Dv]
        o, new = pick_rule(1)(q.reshape(1, B * Hv, Dk), k.reshape(1, B * Hv, Dk), v.reshape(1, B * Hv, Dv),
                              g.reshape(1, B * Hv), beta.reshape(1, B * Hv), state)
        for i, c in enumerate(caches):
            c.conv = xs[i, 1:].clone()
            c.state = new[i * Hv : (i + 1) * Hv]
            c.length += 1
        return o.reshape(B, Hv, Dv)


def new_deltanet_cache(args: ModelArgs) -> DeltaNetCache:
    """A fresh Gated DeltaNet state, from the hyper-parameters alone."""
    return DeltaNetCache.empty(args.ssm_conv_kernel, args.ssm_conv_dim, args.ssm_dt_rank, args.ssm_d_state,
                               args.ssm_head_v_dim)


class StackedExperts:
    """Experts held as whole 3-D tensors (read or memory-mapped): expert e is a view of each."""

    resident = True

    def __init__(self, parts: tuple[QuantWeight, ...]):
        self.parts = parts  # (gate, up, down) or (gate_up, down), each [n_expert, out, row_bytes]
        self.n_expert = parts[0].n_expert
        # Each expert's 2-D views, made on first use and kept: a decode step routes 8 of them.
        self._views: list[tuple[QuantWeight, ...] | None] = [None] * self.n_expert

    def fetch(self, ids: Sequence[int], counts: Sequence[int] | None = None
              ) -> Iterator[tuple[int, tuple[QuantWeight, ...]]]:
        bad = [e for e in ids if not 0 <= e < self.n_expert]
        if bad:
            raise IndexError(f"expert ids must lie in [0, {self.n_expert}), got {bad[0]}")
        for e in ids:
            views = self._views[e]
            if views is None:
                views = self._views[e] = tuple(p.expert(e) for p in self.parts)
            yield e, views


class MoE:
    """Softmax router, top-k renormalised, SwiGLU experts, plus a sigmoid-gated shared expert.

    Routed experts come from `self.experts` by id: the layer's own 3-D tensors when it was
    given them, else whatever the engine attaches (an expert cache)."""

    def __init__(self, args: ModelArgs, bid: int, w: Weights):
        self.args = args
        self.router = as_matrix(w, TN.FFN_GATE_INP, bid)  # [E, X] in ggml order
        # This layer's expert count, from its router's rows: surgery may prune layers unequally.
        self.n_expert = self.router.out_features
        if not 0 < args.n_expert_used <= self.n_expert:
            raise LemonsliceError(f"layer {bid}: routes to {args.n_expert_used} of its {self.n_expert} experts")
        templates = ((TN.FFN_GATE_UP_EXPS, TN.FFN_DOWN_EXPS) if TN.FFN_GATE_UP_EXPS.format(bid=bid) in w
                     else (TN.FFN_GATE_EXPS, TN.FFN_UP_EXPS, TN.FFN_DOWN_EXPS))
        # The expert tensors' names, in the order `Experts.fetch` hands their 2-D slices out.
        self.expert_names = tuple(t.format(bid=bid) for t in templates)
        present = [n in w for n in self.expert_names]
        if any(present) and not all(present):
            raise LemonsliceError(f"layer {bid}: routed-expert tensors are only partly present")
        self.experts: Experts | None = (
            StackedExperts(tuple(as_matrix(w, t, bid) for t in templates)) if all(present) else None)
        if isinstance(self.experts, StackedExperts):
            self.check_experts(self.experts.n_expert)
        self.shexp_gate = as_float(w, TN.FFN_GATE_INP_SHEXP, bid).reshape(-1)  # [E]
        # The same bytes as a one-row weight, multiplied through `linear` like the router.
        self.shexp_gate_w = QuantWeight(self.shexp_gate, GGMLType.F32, (self.shexp_gate.shape[0], 1))
        self.shexp = DenseFFN.from_templates(w, bid, TN.FFN_GATE_SHEXP, TN.FFN_UP_SHEXP, TN.FFN_DOWN_SHEXP)
        # Told the routed expert ids [T, k] of every call (the engine counts the experts' bytes).
        self.observe: Callable[[torch.Tensor], None] | None = None

    def check_experts(self, n_expert: int | None) -> None:
        """Refuse routed-expert tensors whose expert count is not the router's."""
        if n_expert != self.n_expert:
            raise LemonsliceError(f"{self.expert_names[0]}: {n_expert} experts, the router has {self.n_expert} rows")

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert across the routed-expert tensors: what routing one more expert reads."""
        if not isinstance(self.experts, StackedExperts):
            raise LemonsliceError("expert_nbytes needs the layer's own expert tensors")
        return sum(p.raw[0].numel() for p in self.experts.parts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, E] -> (weights [T, k], expert ids [T, k])."""
        probs = linear(x, self.router).to(torch.float32).softmax(-1)  # [T, X]
        w, ids = probs.topk(self.args.n_expert_used, dim=-1)
        return w / w.sum(-1, keepdim=True), ids

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        T, E = x.shape
        w, ids = self.route(x)
        if self.observe is not None:
            self.observe(ids)
        if self.experts is None:
            raise LemonsliceError(f"layer {self.expert_names[0]}: no routed experts attached")
        k = ids.shape[1]
        sorted_ids, order = ids.reshape(-1).sort(stable=True)  # [T*k] slots grouped by ascending expert
        experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        experts_l, counts_l = experts.tolist(), counts.tolist()
        arriving = self.experts.fetch(experts_l, counts_l)
        # [T*k + T, E]: each slot's input grouped by expert, then the tokens for the shared expert
        inputs = x.new_empty((T * k + T, E))
        xs = torch.index_select(x, 0, order // k, out=inputs[: T * k])
        inputs[T * k :] = x
        gate = torch.sigmoid(linear(x, self.shexp_gate_w))  # [T, 1]
        if self.experts.resident:
            # Every expert at once, the shared one as one more: one kernel call for all of them.
            got = dict(arriving)
            both = swiglu_experts(inputs, [*counts_l, T], [*(got[e] for e in experts_l), self.shexp.parts])
            ys, shared = both[: T * k], gate * both[T * k :]
        else:
            # The shared expert first: an expert cache reads the missing experts meanwhile.
            shared = gate * self.shexp(x)
            # Experts arrive in any order (cache hits first); each fills only its own rows.
            ys = torch.empty_like(xs)
            rows = dict(zip(experts_l, spans(counts_l)))
            for e, parts in arriving:
                s, t = rows[e]
                ys[s:t] = swiglu_experts(xs[s:t], [t - s], [parts])
        d = ys.index_select(0, order.argsort())  # back to slot order; the slots are summed in a fixed order below
        routed = (d.view(T, k, E) * w.unsqueeze(-1)).sum(1)  # [T, E]
        return routed + shared


class DenseFFN:
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, gate: QuantWeight, up: QuantWeight, down: QuantWeight):
        self.gate, self.up, self.down = gate, up, down
        self.parts = (gate, up, down)

    @classmethod
    def from_templates(cls, w: Weights, bid: int, gate: str, up: str, down: str) -> "DenseFFN":
        return cls(as_matrix(w, gate, bid), as_matrix(w, up, bid), as_matrix(w, down, bid))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, E] -> [T, E], as a one-expert `swiglu_experts` (one C call on the 8-bit path)."""
        return swiglu_experts(x, [x.shape[0]], [self.parts])
