"""Storage types of the attention KV cache: f32 (the default), f16 (llama.cpp's default), bf16, q8_0.

A cache row holds one position's keys (or values) for all KV heads, [Hkv, D] values, stored as:

* f32, f16, bf16: a torch tensor of that dtype, [Hkv, D] per row, rounded to nearest even;
* q8_0: uint8 ggml Q8_0 blocks, [Hkv * D / 32 * 34] per row, quantized by gguf-py as ggml
  quantizes them (codes round(x * 127 / amax) half away from zero, f16 scale).

`encode` and `decode` are the reference codec; the C attention kernel reads rows in place.
"""

from __future__ import annotations

import gguf
import torch

from ..errors import LemonsliceError
from ..gguf.constants import GGMLType
from .dequant import dequantize

KV_TYPES: dict[str, GGMLType] = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16,
                                 "q8_0": GGMLType.Q8_0}
DEFAULT_KV_TYPE = "f32"
_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def check_kv_type(name: str) -> str:
    """`name` if it is a KV-cache type, else a one-line error naming the choices."""
    if name not in KV_TYPES:
        raise LemonsliceError(f"unknown KV cache type {name!r}; choose one of {', '.join(KV_TYPES)}")
    return name


def bytes_per_position(name: str, n_head_kv: int, head_dim: int) -> int:
    """Bytes one position's keys (or values) take in a cache of type `name`."""
    n = n_head_kv * head_dim
    if name == "q8_0":
        return n // 32 * 34
    return n * _DTYPES[check_kv_type(name)].itemsize


def empty_rows(name: str, rows: int, n_head_kv: int, head_dim: int) -> torch.Tensor:
    """Uninitialised storage for `rows` positions."""
    if name == "q8_0":
        if head_dim % 32:
            raise LemonsliceError(f"a q8_0 KV cache needs a head size divisible by 32, got {head_dim}")
        return torch.empty((rows, n_head_kv * head_dim // 32 * 34), dtype=torch.uint8)
    return torch.empty((rows, n_head_kv, head_dim), dtype=_DTYPES[check_kv_type(name)])


def encode(x: torch.Tensor, name: str) -> torch.Tensor:
    """Keys or values x [T, Hkv, D] float32 -> storage rows of type `name`."""
    if name == "q8_0":  # gguf-py's quantizer: ggml's rounding, and faster than torch here
        rows = x.reshape(x.shape[0], -1).to(torch.float32).numpy()
        return torch.from_numpy(gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q8_0))
    return x.to(_DTYPES[check_kv_type(name)])


def decode(rows: torch.Tensor, name: str, n_head_kv: int, head_dim: int) -> torch.Tensor:
    """Storage rows [S, ...] of type `name` -> float32 [S, Hkv, D]."""
    if name == "q8_0":
        return dequantize(rows, GGMLType.Q8_0).reshape(rows.shape[0], n_head_kv, head_dim)
    return rows.to(torch.float32)
