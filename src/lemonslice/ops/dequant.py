"""Dequantization of ggml tensor data to float32, in torch.

Each kernel maps uint8 blocks [nb, type_size] to float32 [nb, block_size] and repeats
gguf-py's float32 arithmetic step by step (same products, same order), so the results
equal `gguf.quants.dequantize` bit for bit. Types without a kernel go through gguf-py.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import LemonsliceError
from ..gguf.constants import BLOCK_SIZES, GGMLType

RawData = torch.Tensor | np.ndarray | bytes | bytearray | memoryview

QK_K = 256

# Non-linear 4-bit values of IQ4_NL and IQ4_XS.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# e2m1 values doubled; the e8m0 scale is halved to match.
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def as_uint8(raw: RawData) -> torch.Tensor:
    """`raw` as a uint8 tensor, sharing memory where it can."""
    if isinstance(raw, torch.Tensor):
        return raw if raw.dtype == torch.uint8 else _view(raw, torch.uint8)
    if isinstance(raw, np.ndarray):
        arr = np.ascontiguousarray(raw).view(np.uint8)
    else:
        arr = np.frombuffer(raw, dtype=np.uint8)
    with warnings.catch_warnings():
        # Memory-mapped weights are read-only; they are only ever read, so no copy.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the bytes of `t` as `dtype`; copies only when the layout forbids a view."""
    size = torch.empty((), dtype=dtype).element_size()
    if not t.is_contiguous() or t.data_ptr() % size:
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(dtype)


def _f16(blocks: torch.Tensor, off: int) -> torch.Tensor:
    """The f16 field at byte `off` of every block, as float32 [nb, 1]."""
    return _view(blocks[:, off : off + 2], torch.float16).to(torch.float32)


def _shifts(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2, n]: all low nibbles, then all high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 8, n]: bit i of every byte in row i."""
    return (b.unsqueeze(-2) >> _shifts(range(8), b.device).view(8, 1)) & 1


def _crumbs(b: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 4, n]: 2-bit fields, lowest first."""
    return (b.unsqueeze(-2) >> _shifts((0, 2, 4, 6), b.device).view(4, 1)) & 3


def _lut(values: Sequence[int], idx: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(values, dtype=torch.float32, device=idx.device)
    return table[idx.long()]


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return _view(blocks, torch.float32).clone()  # [n, 1]


def _f16_plain(blocks: torch.Tensor) -> torch.Tensor:
    return _view(blocks, torch.float16).to(torch.float32)  # [n, 1]


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    # Shift the bits into the high half of a float32 (keeps NaN payloads, like gguf-py).
    hi = _view(blocks, torch.int16).to(torch.int32) << 16  # [n, 1]
    return hi.view(torch.float32)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # [nb, 1]
    x = _view(blocks[:, 2:], torch.int8).to(torch.float32)  # [nb, 32]
    return x * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # [nb, 1]
    q = _nibbles(blocks[:, 2:]).reshape(-1, 32).to(torch.float32) - 8  # [nb, 32]
    return d * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # [nb, 1]
    q = _nibbles(blocks[:, 4:]).reshape(-1, 32).to(torch.float32)  # [nb, 32]
    return d * q + m


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit values [nb, 32] from qh [nb, 4] (bit i = high bit of element i) and qs [nb, 16]."""
    hi = _bits(qh).transpose(-1, -2).reshape(-1, 32)  # [nb, 32]: byte i//8, bit i%8
    lo = _nibbles(qs).reshape(-1, 32)  # [nb, 32]
    return lo | (hi << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # [nb, 1]
    q = _q5(blocks[:, 2:6], blocks[:, 6:]).to(torch.float32) - 16  # [nb, 32]
    return d * q


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # [nb, 1]
    q = _q5(blocks[:, 4:8], blocks[:, 8:]).to(torch.float32)  # [nb, 32]
    return d * q + m


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    nb = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)  # [nb, 1]
    dl = (d * (scales & 0x0F).to(torch.float32)).view(nb, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(nb, 16, 1)
    # Each 32-byte half holds 4 groups of 32 values, one per 2-bit shift.
    q = _crumbs(qs.reshape(nb, 2, 32)).reshape(nb, 16, 16).to(torch.float32)  # [nb, 16, 16]
    return (dl * q - ml).reshape(nb, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    nb = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)  # [nb, 1]
    # 16 6-bit scales: low 4 bits in bytes 0..7 (low then high nibbles), top 2 bits in 8..11.
    lo = _nibbles(scales[:, :8]).reshape(nb, 16)
    hi = _crumbs(scales[:, 8:]).reshape(nb, 16)
    sc = (lo | (hi << 4)).to(torch.float32) - 32  # [nb, 16]
    dl = (d * sc).view(nb, 16, 1)
    ql = _crumbs(qs.reshape(nb, 2, 32)).reshape(nb, 16, 16)
    qh = _bits(hmask).reshape(nb, 16, 16)
    # A clear hmask bit means "subtract 4".
    q = ql.to(torch.float32) - ((qh ^ 1) << 2).to(torch.float32)  # [nb, 16, 16]
    return (dl * q).reshape(nb, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte scale field of Q4_K/Q5_K into 8 6-bit scales and 8 6-bit mins."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]  # [nb, 4]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)  # [nb, 8]
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)  # [nb, 8]
    return sc, mn


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    nb = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [nb, 1]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.to(torch.float32)).view(nb, 8, 1)
    ml = (dmin * mn.to(torch.float32)).view(nb, 8, 1)
    q = _nibbles(blocks[:, 16:].reshape(nb, 4, 32)).reshape(nb, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(nb, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    nb = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)  # [nb, 1]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.to(torch.float32)).view(nb, 8, 1)
    ml = (dmin * mn.to(torch.float32)).view(nb, 8, 1)
    ql = _nibbles(blocks[:, 48:].reshape(nb, 4, 32)).reshape(nb, 8, 32)
    qh = _bits(blocks[:, 16:48]).reshape(nb, 8, 32)
    q = (ql | (qh << 4)).to(torch.float32)  # [nb, 8, 32]
    return (dl * q - ml).reshape(nb, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    nb = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    sc = _view(blocks[:, 192:208], torch.int8).to(torch.float32)  # [nb, 16]
    d = _f16(blocks, 208)  # [nb, 1]
    dl = (d * sc).view(nb, 16, 1)
    lo = _nibbles(ql.reshape(nb, 2, 64)).reshape(nb, 8, 32)
    hi = _crumbs(qh.reshape(nb, 2, 32)).reshape(nb, 8, 32)
    q = ((lo | (hi << 4)).to(torch.float32) - 32).reshape(nb, 16, 16)
    return (dl * q).reshape(nb, QK_K)


def _iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)  # [nb, 1]
    q = _lut(IQ4_NL_VALUES, _nibbles(blocks[:, 2:]).reshape(-1, 32))  # [nb, 32]
    return d * q


def _iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    nb = blocks.shape[0]
    d = _f16(blocks, 0)  # [nb, 1]
    # 8 6-bit scales: low nibbles in bytes 4..7 (sub-block 2j low, 2j+1 high), top bits
    # as 2-bit fields of the little-endian u16 at bytes 2..3.
    lo = _nibbles(blocks[:, 4:8]).transpose(-1, -2).reshape(nb, 8)
    hi = _crumbs(blocks[:, 2:4]).transpose(-1, -2).reshape(nb, 8)
    sc = (lo | (hi << 4)).to(torch.float32) - 32  # [nb, 8]
    dl = (d * sc).view(nb, 8, 1)
    q = _lut(IQ4_NL_VALUES, _nibbles(blocks[:, 8:].reshape(nb, 8, 16)).reshape(nb, 8, 32))
    return (dl * q).reshape(nb, QK_K)


def _mxfp4(blocks: torch.Tensor) -> torch.Tensor:
    e = blocks[:, :1].to(torch.int32)  # [nb, 1]
    # Half of 2^(e-127) as float32 bits; e < 2 lands in the subnormal range.
    # Clamp both shift inputs so the unused branch of the where stays well-defined.
    sub = torch.full_like(e, 0x00200000) << e.clamp(max=1)
    bits = torch.where(e < 2, sub, (e.clamp(min=1) - 1) << 23)
    d = bits.view(torch.float32)
    q = _lut(MXFP4_VALUES, _nibbles(blocks[:, 1:]).reshape(-1, 32))  # [nb, 32]
    return d * q


_KERNELS: dict[GGMLType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLType.F32: _f32,
    GGMLType.F16: _f16_plain,
    GGMLType.BF16: _bf16,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
    GGMLType.IQ4_NL: _iq4_nl,
    GGMLType.IQ4_XS: _iq4_xs,
    GGMLType.MXFP4: _mxfp4,
}

TORCH_TYPES = frozenset(_KERNELS)


def _fallback(data: torch.Tensor, ggml_type: GGMLType, out_shape: tuple[int, ...]) -> torch.Tensor:
    import gguf.quants

    block, type_size = BLOCK_SIZES[ggml_type]
    row_bytes = out_shape[-1] // block * type_size if out_shape else type_size
    rows = data.reshape(-1, row_bytes).cpu().numpy()
    out = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(int(ggml_type)))
    return torch.from_numpy(np.asarray(out, dtype=np.float32)).reshape(out_shape).to(data.device)


@lru_cache(maxsize=None)
def runnable(ggml_type: GGMLType | int) -> bool:
    """Whether `dequantize` (so every op) takes this type: a torch kernel here, or gguf-py's
    dequantization (asked once with one zero block)."""
    t = GGMLType(ggml_type)
    if t in _KERNELS:
        return True
    import gguf.quants

    try:
        gguf.quants.dequantize(np.zeros(BLOCK_SIZES[t][1], np.uint8), gguf.GGMLQuantizationType(int(t)))
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def check_runnable(tensors: Iterable[tuple[str, GGMLType]]) -> None:
    """One-line LemonsliceError naming the first (name, type) that lemonslice cannot run, so a
    model is refused before any weight is read."""
    for name, t in tensors:
        if not runnable(t):
            raise LemonsliceError(f"tensor {name} has type {GGMLType(t).name}, which lemonslice cannot run")


def dequantize(
    raw: RawData, ggml_type: GGMLType | int, shape: Sequence[int] | None = None
) -> torch.Tensor:
    """ggml tensor data -> float32 tensor, on the device of `raw`.

    `shape` is in ggml order (ne0, the row length, first); the result has torch order,
    `reversed(shape)`. Without `shape`, `raw` must be shaped [..., row_bytes] and the
    result is [..., row_elements].
    """
    ggml_type = GGMLType(ggml_type)
    data = as_uint8(raw)
    block, type_size = BLOCK_SIZES[ggml_type]
    if shape is None:
        if data.dim() == 0 or data.shape[-1] % type_size:
            raise ValueError(f"{ggml_type.name}: rows of {tuple(data.shape)} bytes are not whole blocks")
        out_shape = (*data.shape[:-1], data.shape[-1] // type_size * block)
    else:
        out_shape = tuple(int(n) for n in reversed(tuple(shape)))
        if out_shape and out_shape[-1] % block:
            raise ValueError(f"{ggml_type.name}: row length {out_shape[-1]} is not a multiple of {block}")
        n_bytes = math.prod(out_shape) // block * type_size
        if data.numel() != n_bytes:
            raise ValueError(
                f"{ggml_type.name} shape {tuple(shape)} needs {n_bytes} bytes, got {data.numel()}"
            )
    kernel = _KERNELS.get(ggml_type)
    if kernel is None:
        return _fallback(data, ggml_type, out_shape)
    return kernel(data.reshape(-1, type_size)).reshape(out_shape)
