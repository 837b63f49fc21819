"""Quantized linear layers: the seam between model code and weight kernels.

Model code calls `linear` and `gathered_linear`. Each has a `_ref` twin with the same
signature that dequantizes the weight a few rows at a time in torch and multiplies in
float32. The fast path uses the C kernels (ops/kernels.c).

By default, for the types the kernels cover with 8-bit activations (Q4_0, Q5_0, Q8_0,
IQ4_NL, MXFP4, Q2_K .. Q6_K, IQ4_XS, IQ2_XXS/XS/S, IQ3_XXS/S, IQ1_S/M), the activations are
rounded to int8 per block and multiplied in integers, as llama.cpp does; the twin of that
path is `linear_q8_ref`. `set_exact(True)` (or LEMONSLICE_EXACT=1) keeps float activations
everywhere: a fused decode-and-dot for a few activation rows, and C dequantization of row
chunks + BLAS for many. F16/BF16 weights are converted inside a C dot product.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import LemonsliceError
from ..gguf.constants import BLOCK_SIZES, GGMLType
from . import kernels
from .dequant import RawData, as_uint8, dequantize

# Most bytes of float32 weight the reference expands at once (read at call time). Dequantizing
# makes a few temporaries of this size, so it sets the op's scratch memory.
CHUNK_BYTES = 2 << 20

# Values per activation scale on the 8-bit path, by weight type (the C kernels' blocks).
Q8_BLOCK = {GGMLType.Q4_0: 32, GGMLType.Q5_0: 32, GGMLType.Q8_0: 32, GGMLType.IQ4_NL: 32, GGMLType.MXFP4: 32,
            GGMLType.Q2_K: 256, GGMLType.Q3_K: 256, GGMLType.Q4_K: 256, GGMLType.Q5_K: 256, GGMLType.Q6_K: 256,
            GGMLType.IQ4_XS: 256, GGMLType.IQ2_XXS: 256, GGMLType.IQ2_XS: 256, GGMLType.IQ2_S: 256,
            GGMLType.IQ3_XXS: 256, GGMLType.IQ3_S: 256, GGMLType.IQ1_S: 256, GGMLType.IQ1_M: 256}
# Float weights that the C kernels convert inside the dot product.
HALF_TYPES = (GGMLType.F16, GGMLType.BF16)


# None until first asked: LEMONSLICE_EXACT is read then, so a bad value is a one-line error
# where the program asks (runtime.setup), not an exception while importing.
_exact: bool | None = None


def set_exact(exact: bool) -> None:
    """Process-wide: float activations everywhere (True), or 8-bit ones where the kernels have them."""
    global _exact
    _exact = bool(exact)


def is_exact() -> bool:
    """The process-wide setting; until `set_exact`, LEMONSLICE_EXACT (0 or 1, default 0)."""
    global _exact
    if _exact is None:
        value = os.environ.get("LEMONSLICE_EXACT", "0")
        if value not in ("0", "1"):
            raise LemonsliceError(f"LEMONSLICE_EXACT must be 0 or 1, got {value!r}")
        _exact = value == "1"
    return _exact


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A weight kept as its raw ggml blocks.

    `shape` is in ggml order: (in_features, out_features) or, for MoE experts,
    (in_features, out_features, n_expert). `raw` is uint8 [out, row_bytes] or
    [n_expert, out, row_bytes]; it is never expanded whole.
    """

    raw: torch.Tensor
    ggml_type: GGMLType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        ggml_type = GGMLType(self.ggml_type)
        shape = tuple(int(n) for n in self.shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"a weight has 2 or 3 dimensions, got shape {shape}")
        block, type_size = BLOCK_SIZES[ggml_type]
        if shape[0] % block:
            raise ValueError(f"{ggml_type.name}: row length {shape[0]} is not a multiple of {block}")
        raw = as_uint8(self.raw)
        raw_shape = (*reversed(shape[1:]), shape[0] // block * type_size)
        if raw.numel() != math.prod(raw_shape):
            raise ValueError(
                f"{ggml_type.name} shape {shape} needs {math.prod(raw_shape)} bytes, got {raw.numel()}"
            )
        object.__setattr__(self, "raw", raw.reshape(raw_shape))
        object.__setattr__(self, "ggml_type", ggml_type)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def from_buffer(cls, buf: RawData, ggml_type: GGMLType, shape: tuple[int, ...]) -> "QuantWeight":
        """Wrap bytes (e.g. a memory-mapped tensor) without copying them."""
        return cls(as_uint8(buf), ggml_type, shape)

    @property
    def in_features(self) -> int:
        return self.shape[0]

    @property
    def out_features(self) -> int:
        return self.shape[1]

    @property
    def n_expert(self) -> int | None:
        return self.shape[2] if len(self.shape) == 3 else None

    @property
    def row_bytes(self) -> int:
        return self.raw.shape[-1]

    def expert(self, index: int) -> "QuantWeight":
        """Expert `index` of a 3-D weight, as a 2-D view of its byte range."""
        if self.n_expert is None:
            raise ValueError("expert() needs a 3-D weight")
        return QuantWeight(self.raw[index], self.ggml_type, self.shape[:2])

    def to(self, device: torch.device | str) -> "QuantWeight":
        return QuantWeight(self.raw.to(device), self.ggml_type, self.shape)


def _matmul_rows(xf: torch.Tensor, raw: torch.Tensor, ggml_type: GGMLType, n_in: int) -> torch.Tensor:
    """xf [N, in] float32 times the weight rows raw [rows, row_bytes] -> [N, rows] float32."""
    rows = raw.shape[0]
    step = max(1, CHUNK_BYTES // (4 * n_in))
    out = xf.new_empty((xf.shape[0], rows))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        # Only this chunk's bytes move to the activations' device.
        w = dequantize(raw[r0:r1].to(xf.device), ggml_type, (n_in, r1 - r0))  # [r1-r0, in]
        out[:, r0:r1] = xf @ w.T.to(xf.dtype)
    return out


def _fast_rows(xf: torch.Tensor, raw: torch.Tensor, ggml_type: GGMLType, n_in: int) -> torch.Tensor:
    """`_matmul_rows` through the C kernels where they cover the type and device."""
    if xf.device.type != "cpu" or not kernels.supported(ggml_type):
        return _matmul_rows(xf, raw, ggml_type, n_in)
    if ggml_type == GGMLType.F32 and raw.data_ptr() % 4 == 0 and raw.stride(-1) == 1:
        w = raw.view(torch.float32)  # already float: no copy at all
        # BLAS when exact (as before); else a C dot per output, the same for any batch size
        return xf @ w.T if is_exact() else kernels.matmul_f32(xf.contiguous(), w)
    if ggml_type in HALF_TYPES and (not is_exact() or xf.shape[0] <= kernels.MAX_ROWS):
        # one C dot per output for any batch (as F32), or BLAS below for exact prefill
        return kernels.matmul_half(xf, raw, ggml_type, n_in)
    if BLOCK_SIZES[ggml_type][0] == 1:
        return _matmul_rows(xf, raw, ggml_type, n_in)
    if not is_exact() and kernels.q8_supported(ggml_type):
        return kernels.qmatmul_q8(xf, raw, ggml_type, n_in)
    if xf.shape[0] <= kernels.MAX_ROWS:
        return kernels.qmatmul(xf, raw, ggml_type, n_in)
    rows = raw.shape[0]
    step = max(1, CHUNK_BYTES // (4 * n_in))
    out = xf.new_empty((xf.shape[0], rows))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out[:, r0:r1] = xf @ kernels.dequant(raw[r0:r1], ggml_type, n_in).T
    return out


def round_activations(xf: torch.Tensor, block: int) -> torch.Tensor:
    """xf [N, in] float32 as the 8-bit path sees it: per block of `block` values, int8 codes
    round_half_even(x * 127 / amax) times amax / 127, returned in float64 (exact)."""
    xb = xf.reshape(xf.shape[0], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)  # [N, in/block, 1]
    # A tensor divided by a tensor: `127.0 / amax` would be computed as reciprocal(amax) * 127,
    # rounded twice, and differ from the kernel's 127.0f / amax by an ulp now and then.
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(xb * inv)  # float32 product, rounded half to even as the C kernel does
    return (codes.double() * (amax / 127.0).double()).reshape(xf.shape)


def _q8_rows_ref(xf: torch.Tensor, raw: torch.Tensor, ggml_type: GGMLType, n_in: int) -> torch.Tensor:
    """Twin of the 8-bit kernel: rounded activations times the dequantized weight, in float64."""
    if ggml_type not in Q8_BLOCK:
        return _matmul_rows(xf, raw, ggml_type, n_in)
    return _matmul_rows(round_activations(xf, Q8_BLOCK[ggml_type]), raw, ggml_type, n_in).to(torch.float32)


def _check_2d(x: torch.Tensor, w: QuantWeight) -> None:
    if w.n_expert is not None:
        raise ValueError(f"linear needs a 2-D weight, got shape {w.shape}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, weight expects {w.in_features}")


def linear_ref(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out], in float32, returned in x's dtype."""
    _check_2d(x, w)
    xf = x.reshape(-1, w.in_features).to(torch.float32)
    y = _matmul_rows(xf, w.raw, w.ggml_type, w.in_features)
    return y.reshape(*x.shape[:-1], w.out_features).to(x.dtype)


def linear_q8_ref(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """`linear_ref` with the activations rounded as the 8-bit path rounds them (the twin of
    `linear` when not exact; types without an 8-bit path multiply exactly)."""
    _check_2d(x, w)
    xf = x.reshape(-1, w.in_features).to(torch.float32)
    y = _q8_rows_ref(xf, w.raw, w.ggml_type, w.in_features)
    return y.reshape(*x.shape[:-1], w.out_features).to(x.dtype)


def _bound_q8(w: QuantWeight):  # noqa: ANN202
    """The weight's 8-bit C product, resolved on first use and kept on the weight (None when
    exact, or when the weight has no such path)."""
    run = w.__dict__.get("_q8")
    if run is None:
        ok = w.n_expert is None and w.raw.device.type == "cpu" and kernels.q8_supported(w.ggml_type)
        run = kernels.bind_q8(w.raw, w.ggml_type, w.in_features) if ok else False
        object.__setattr__(w, "_q8", run)
    return None if is_exact() or not run else run


def linear(x: torch.Tensor, w: QuantWeight) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out]; the op model code calls."""
    run = _bound_q8(w)
    if run is not None and x.dtype == torch.float32 and x.device.type == "cpu":
        if x.shape[-1] != w.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, weight expects {w.in_features}")
        return run(x.reshape(-1, w.in_features)).reshape(*x.shape[:-1], w.out_features)
    _check_2d(x, w)
    xf = x.reshape(-1, w.in_features).to(torch.float32)
    y = _fast_rows(xf, w.raw, w.ggml_type, w.in_features)
    return y.reshape(*x.shape[:-1], w.out_features).to(x.dtype)


def take_rows_ref(w: QuantWeight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [T] of a 2-D weight as float32 [T, in] (an embedding lookup), dequantized in torch."""
    return dequantize(w.raw[ids], w.ggml_type)


def take_rows(w: QuantWeight, ids: torch.Tensor) -> torch.Tensor:
    """`take_rows_ref` through the C dequantization (bit for bit the same) where it has the type."""
    rows = w.raw[ids]
    if rows.device.type == "cpu" and kernels.supported(w.ggml_type) and BLOCK_SIZES[w.ggml_type][0] > 1:
        return kernels.dequant(rows, w.ggml_type, w.in_features)
    return dequantize(rows, w.ggml_type)


def _check_gathered(x: torch.Tensor, w: QuantWeight, expert_ids: torch.Tensor) -> None:
    if w.n_expert is None:
        raise ValueError(f"gathered_linear needs a 3-D weight, got shape {w.shape}")
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"input must be [T, {w.in_features}], got {tuple(x.shape)}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"expert_ids must be [{x.shape[0]}, k], got {tuple(expert_ids.shape)}")


def _gathered(x: torch.Tensor, w: QuantWeight, expert_ids: torch.Tensor, rows_fn) -> torch.Tensor:  # noqa: ANN001
    _check_gathered(x, w, expert_ids)
    k = expert_ids.shape[1]
    xf = x.to(torch.float32)
    flat = expert_ids.reshape(-1).to(x.device)
    out = xf.new_empty((flat.shape[0], w.out_features))
    experts = torch.unique(flat).tolist()
    if experts and not (0 <= experts[0] and experts[-1] < w.n_expert):
        raise IndexError(f"expert ids must lie in [0, {w.n_expert}), got {experts[0]}..{experts[-1]}")
    for e in experts:
        pos = (flat == e).nonzero(as_tuple=True)[0]  # [n_e] slots routed to expert e
        out[pos] = rows_fn(xf[pos // k], w.raw[e], w.ggml_type, w.in_features)
    return out.reshape(x.shape[0], k, w.out_features).to(x.dtype)


def gathered_linear_ref(x: torch.Tensor, w: QuantWeight, expert_ids: torch.Tensor) -> torch.Tensor:
    """x [T, in], expert_ids [T, k] -> [T, k, out]: row t, slot j uses expert expert_ids[t, j].

    Only the selected experts' byte ranges are dequantized, one expert at a time.
    """
    return _gathered(x, w, expert_ids, _matmul_rows)


def gathered_linear_q8_ref(x: torch.Tensor, w: QuantWeight, expert_ids: torch.Tensor) -> torch.Tensor:
    """`gathered_linear_ref` with 8-bit activations: the twin of `gathered_linear` when not exact."""
    return _gathered(x, w, expert_ids, _q8_rows_ref)


def gathered_linear(x: torch.Tensor, w: QuantWeight, expert_ids: torch.Tensor) -> torch.Tensor:
    """x [T, in], expert_ids [T, k] -> [T, k, out]; the MoE op model code calls."""
    return _gathered(x, w, expert_ids, _fast_rows)


def _swiglu(x: torch.Tensor, parts: tuple[QuantWeight, ...], lin) -> torch.Tensor:  # noqa: ANN001
    """down(silu(gate x) * up x) through `lin`; parts = (gate, up, down) or (gate_up, down)."""
    if len(parts) == 2:
        gate, up = lin(x, parts[0]).chunk(2, dim=-1)  # [n, F] each
    else:
        gate, up = lin(x, parts[0]), lin(x, parts[1])
    return lin(F.silu(gate) * up, parts[-1])


def _per_expert(x: torch.Tensor, counts: Sequence[int], parts: Sequence[tuple[QuantWeight, ...]], lin
                ) -> torch.Tensor:  # noqa: ANN001
    if len(counts) != len(parts) or sum(counts) != x.shape[0]:
        raise ValueError(f"{len(counts)} experts with {sum(counts)} rows for {len(parts)} weights and {x.shape[0]} rows")
    outs, s = [], 0
    for n, p in zip(counts, parts):
        outs.append(_swiglu(x[s : s + n], p, lin))
        s += n
    return torch.cat(outs) if len(outs) != 1 else outs[0]


def swiglu_experts_ref(x: torch.Tensor, counts: Sequence[int], parts: Sequence[tuple[QuantWeight, ...]]
                       ) -> torch.Tensor:
    """x [N, E], rows grouped by expert (counts[j] rows for expert parts[j]) -> [N, E]: each
    row through its SwiGLU expert, with float activations."""
    return _per_expert(x, counts, parts, linear_ref)


def swiglu_experts_q8_ref(x: torch.Tensor, counts: Sequence[int], parts: Sequence[tuple[QuantWeight, ...]]
                          ) -> torch.Tensor:
    """`swiglu_experts_ref` with 8-bit activations: the twin of `swiglu_experts` when not exact."""
    return _per_expert(x, counts, parts, linear_q8_ref)


# Per expert (a parts tuple), its fused-kernel job row and sizes, made once: an MoE step
# routes the same experts' tuples again and again. Weak references, so a streamed expert's
# buffers go when its weights do; a tuple is known again by its weights' identity.
_JOB_ROWS: dict[int, tuple[tuple[weakref.ref, ...], tuple | None]] = {}


def _job_row(p: tuple[QuantWeight, ...]) -> tuple | None:
    """(the weights' job row, gate block, down block, (E, F) of the expert or None where its
    shapes do not fit) or None where the fused kernel does not take this expert."""
    hit = _JOB_ROWS.get(id(p))
    if hit is not None and len(hit[0]) == len(p) and all(r() is w for r, w in zip(hit[0], p)):
        return hit[1]
    up = p[1] if len(p) == 3 else None
    gate_t, down_t = p[0].ggml_type, p[-1].ggml_type
    gate_b, down_b = Q8_BLOCK.get(gate_t), Q8_BLOCK.get(down_t)
    row = None
    if (gate_b is not None and down_b is not None and kernels.q8_supported(gate_t) and kernels.q8_supported(down_t)
            and (up is None or up.ggml_type == gate_t) and p[0].raw.device.type == "cpu"):
        E, F = p[-1].out_features, p[-1].in_features
        gate_rows = p[0].out_features if up is not None else p[0].out_features // 2
        fits = p[0].in_features == E and gate_rows == F and (up is None or up.shape == p[0].shape)
        row = ((int(gate_t), p[0].raw.data_ptr(), p[0].raw.stride(0),
                up.raw.data_ptr() if up is not None else 0, up.raw.stride(0) if up is not None else 0,
                int(down_t), p[-1].raw.data_ptr(), p[-1].raw.stride(0)), gate_b, down_b, (E, F) if fits else None)
    if len(_JOB_ROWS) >= 4096:
        _JOB_ROWS.clear()
    _JOB_ROWS[id(p)] = (tuple(weakref.ref(w) for w in p), row)
    return row


def _expert_jobs(x: torch.Tensor, parts: Sequence[tuple[QuantWeight, ...]]) -> list[tuple] | None:
    """Per expert `_job_row`, or None where the fused kernel does not apply."""
    if is_exact() or kernels.library() is None or not parts or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    rows = [_job_row(p if isinstance(p, tuple) else tuple(p)) for p in parts]
    # Any types with an 8-bit kernel, as long as every gate/up (and every down) shares one
    # activation block size: the kernel rounds each expert's input (and hidden) once.
    if any(r is None for r in rows) or any(r[1:3] != rows[0][1:3] for r in rows):
        return None
    return rows


def _swiglu_half(x: torch.Tensor, counts: Sequence[int], parts: Sequence[tuple[QuantWeight, ...]]
                 ) -> torch.Tensor | None:
    """F16/BF16 experts (gate, up, down, one type) in three C calls, the threads sharing every
    expert's rows; each product row as `linear` computes it. None where this does not apply."""
    if is_exact() or kernels.library() is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2:
        return None
    t = parts[0][0].ggml_type if parts and len(parts[0]) == 3 else None
    if t not in HALF_TYPES or len(counts) != len(parts) or sum(counts) != x.shape[0] or min(counts) < 1:
        return None
    E, Fe = x.shape[1], parts[0][0].out_features
    for p in parts:
        if len(p) != 3 or any(w.ggml_type != t or w.raw.device.type != "cpu" or w.raw.stride(-1) != 1 for w in p):
            return None
        if p[0].shape != (E, Fe) or p[1].shape != (E, Fe) or p[2].shape != (Fe, E):
            return None
    x = x.contiguous()
    gate, up, y = x.new_empty((x.shape[0], Fe)), x.new_empty((x.shape[0], Fe)), x.new_empty((x.shape[0], E))

    def products(k: int, src: torch.Tensor, dst: torch.Tensor) -> None:
        n_in, n_out, s, jobs = src.shape[1], dst.shape[1], 0, []
        for n, p in zip(counts, parts):
            raw = p[k].raw
            jobs.append((raw.data_ptr(), raw.stride(0), src.data_ptr() + 4 * s * n_in, n, dst.data_ptr() + 4 * s * n_out))
            s += n
        kernels.matmul_half_jobs(int(t), torch.tensor(jobs, dtype=torch.int64), n_out, n_in)

    products(0, x, gate)
    products(1, x, up)
    products(2, (F.silu(gate) * up).contiguous(), y)
    return y


def swiglu_experts(x: torch.Tensor, counts: Sequence[int], parts: Sequence[tuple[QuantWeight, ...]]
                   ) -> torch.Tensor:
    """x [N, E], rows grouped by expert (counts[j] rows for parts[j]) -> [N, E]: the MoE op
    model code calls. With 8-bit activations every expert goes through one C call (gate and
    up, SiLU, down), their rows shared by the threads; F16/BF16 experts through three;
    otherwise expert by expert."""
    rows = _expert_jobs(x, parts)
    if rows is None:
        y = _swiglu_half(x, counts, parts)
        return y if y is not None else _per_expert(x, counts, parts, linear)
    E, Fe = parts[0][-1].out_features, parts[0][-1].in_features
    if len(counts) != len(parts) or sum(counts) != x.shape[0] or x.dim() != 2 or x.shape[1] != E:
        raise ValueError(f"{len(counts)} experts with {sum(counts)} rows for {len(parts)} weights and x "
                         f"{tuple(x.shape)}")
    if min(counts) < 1:
        raise ValueError(f"every expert needs at least one row, got counts {list(counts)}")
    if any(r[3] != (E, Fe) for r in rows):
        raise ValueError(f"expert shapes do not match inputs [n, {E}] and width {Fe}")
    x = x.contiguous()
    y = torch.empty((x.shape[0], E), dtype=torch.float32)
    step, s, jobs = 4 * E, 0, []
    for r, n in zip(rows, counts):
        jobs.append((*r[0], x.data_ptr() + s * step, n, y.data_ptr() + s * step))
        s += n
    kernels.swiglu_experts_q8(torch.tensor(jobs, dtype=torch.int64), E, Fe)
    return y
