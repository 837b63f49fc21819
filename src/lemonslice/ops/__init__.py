"""Torch kernels: dequantization and quantized linear layers."""

from .dequant import TORCH_TYPES, as_uint8, dequantize
from .qlinear import QuantWeight, gathered_linear, gathered_linear_ref, linear, linear_ref

__all__ = [
    "QuantWeight", "TORCH_TYPES", "as_uint8", "dequantize", "gathered_linear", "gathered_linear_ref",
    "linear", "linear_ref",
]
