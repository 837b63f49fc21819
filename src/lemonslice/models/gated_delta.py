"""Gated DeltaNet kernels: the causal depthwise convolution and the gated delta rule.

The delta rule keeps one state S [Dk, Dv] per value head. For each token t:

    S <- exp(g_t) * S
    S <- S + beta_t * k_t (v_t - S^T k_t)^T
    o_t = S^T q_t

`delta_rule_chunked` (prefill) computes the same thing a chunk of tokens at a time with
triangular solves; `delta_rule_recurrent` is its step-by-step reference twin and the
decode path. Both take q already L2-normalised and scaled by 1/sqrt(Dk), and k normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import kernels

# Tokens per chunk of the chunked form: large enough for matmul efficiency, small enough
# that the [L, L] decay matrices stay cheap.
CHUNK = 64


def causal_conv(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over time with carried state.

    x [T, C]; state [K-1, C] (the previous K-1 inputs, zeros at the start); weight [C, K].
    Returns y [T, C] with y[t, c] = sum_j weight[c, j] * xs[t + j, c] where xs = [state; x],
    and the new state [K-1, C].
    """
    T, n_keep = x.shape[0], weight.shape[1] - 1
    xs = torch.cat((state, x), dim=0)  # [K-1+T, C]
    # K shifted multiply-adds; torch's depthwise conv1d is far slower on CPU at these shapes.
    # The taps as contiguous rows [K, C]: a strided column weight[:, j] made each product 8x slower.
    taps = weight.t().contiguous()
    y = xs[0:T] * taps[0]
    for j in range(1, n_keep + 1):
        y.add_(xs[j : j + T] * taps[j])
    return y, xs[xs.shape[0] - n_keep :].clone()


def l2_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (eps inside the root, as FLA and transformers do)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def delta_rule_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at a time. q, k [T, H, Dk]; v [T, H, Dv]; g, beta [T, H]; state [H, Dk, Dv].

    Returns o [T, H, Dv] and the new state [H, Dk, Dv]; all float32.
    """
    s = state.to(torch.float32)
    out = v.new_empty(v.shape, dtype=torch.float32)
    decay = g.to(torch.float32).exp()  # [T, H]
    for t in range(q.shape[0]):
        s = s * decay[t, :, None, None]
        kv = torch.einsum("hk,hkv->hv", k[t], s)  # [H, Dv] what S already predicts for k_t
        delta = (v[t] - kv) * beta[t, :, None]  # [H, Dv]
        s = s + k[t].unsqueeze(-1) * delta.unsqueeze(-2)
        out[t] = torch.einsum("hk,hkv->hv", q[t], s)
    return out, s


# Without the C kernels, up to this many tokens (decode, an MTP verify pass) the rule runs token
# by token in torch, and longer prompts in chunks. With them, every forward runs token by token in
# C: 2.3x the chunked form's speed at 64 tokens and 2.6x at 256 (32 heads of 128 x 128, 2 threads).
STEP_MAX = 16


def delta_rule_steps(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`delta_rule_recurrent` (its twin) in one C call, where the kernels are built."""
    if kernels.library() is None or q.device.type != "cpu" or v.shape[-1] > 1024:
        return delta_rule_recurrent(q, k, v, g, beta, state)
    return kernels.delta_rule(q, k, v, g, beta, state)


def pick_rule(T: int):  # noqa: ANN201
    """The rule a forward over T tokens uses (and a rewind replays, to get the same state)."""
    return delta_rule_steps if T <= STEP_MAX or kernels.library() is not None else delta_rule_chunked


def delta_rule_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor,
    chunk_size: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as `delta_rule_recurrent`, a chunk of L tokens at a time.

    Inside a chunk, with c_i the cumulative log decay and S0 the state before it, the
    corrections u_i = beta_i (v_i - (decayed state)^T k_i) solve a unit lower-triangular
    system (I + A) U = beta V - beta exp(c) K S0, A_ij = beta_i exp(c_i - c_j) k_i.k_j (j < i).
    """
    T, H, Dk = k.shape
    Dv = v.shape[-1]
    L = max(1, min(chunk_size, T))  # a short prompt is one unpadded chunk
    pad = (-T) % L
    n = (T + pad) // L

    def chunks(x: torch.Tensor) -> torch.Tensor:
        # [T, H, ...] -> [H, n, L, ...]; padded tokens have k = v = 0, g = beta = 0, so they change nothing.
        x = x.to(torch.float32).movedim(0, 1)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 3 else F.pad(x, (0, pad))
        return x.reshape(H, n, L, *x.shape[2:])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)  # [H, n, L, D]
    gc, bc = chunks(g), chunks(beta)  # [H, n, L]
    cum = gc.cumsum(-1)  # [H, n, L] log decay from the chunk start to each token
    incl = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    # c_i - c_j for j <= i as the segment sum g_{j+1} + ... + g_i ([H, n, L, L]): the difference of
    # two cumulative sums would carry |c| * eps of absolute error into every exponent, and with
    # strong decays |c| reaches the thousands within a chunk.
    seg = gc.unsqueeze(-1).expand(*gc.shape, L).masked_fill(~incl.tril(-1), 0).cumsum(-2)
    # exp(c_i - c_j) for j <= i, 0 above the diagonal; masked before exp so nothing overflows.
    pair = seg.masked_fill(~incl, float("-inf")).exp()  # [H, n, L, L]
    kb = kc * bc.unsqueeze(-1)  # [H, n, L, Dk]
    a = (kb @ kc.transpose(-1, -2)) * pair  # [H, n, L, L]; the diagonal is ignored by the unit solve
    w_v = torch.linalg.solve_triangular(a, vc * bc.unsqueeze(-1), upper=False, unitriangular=True)  # [H, n, L, Dv]
    w_k = torch.linalg.solve_triangular(a, kb * cum.exp().unsqueeze(-1), upper=False, unitriangular=True)
    attn = (qc @ kc.transpose(-1, -2)) * pair  # [H, n, L, L]
    q_dec = qc * cum.exp().unsqueeze(-1)  # reads of the chunk's initial state
    k_dec = kc * seg[..., -1, :].exp().unsqueeze(-1)  # writes, decayed to the chunk end: exp(c_last - c_j)
    last = cum[..., -1].exp()  # [H, n]

    s = state.to(torch.float32)
    out = qc.new_empty((H, n, L, Dv))
    for i in range(n):
        u = w_v[:, i] - w_k[:, i] @ s  # [H, L, Dv]
        out[:, i] = q_dec[:, i] @ s + attn[:, i] @ u
        s = s * last[:, i, None, None] + k_dec[:, i].transpose(-1, -2) @ u
    return out.reshape(H, n * L, Dv)[:, :T].movedim(0, 1), s
