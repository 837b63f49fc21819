"""Torch kernels: dequantization and quantized linear layers."""

from .dequant import TORCH_TYPES, as_uint8, check_runnable, dequantize, runnable
from .qlinear import (
    QuantWeight, gathered_linear, gathered_linear_q8_ref, gathered_linear_ref, is_exact, linear, linear_q8_ref,
    linear_ref, set_exact, swiglu_experts, swiglu_experts_q8_ref, swiglu_experts_ref, take_rows, take_rows_ref,
)

__all__ = [
    "QuantWeight", "TORCH_TYPES", "as_uint8", "check_runnable", "dequantize", "gathered_linear",
    "gathered_linear_q8_ref", "gathered_linear_ref", "is_exact", "linear", "linear_q8_ref", "linear_ref", "runnable", "set_exact",
    "swiglu_experts", "swiglu_experts_q8_ref", "swiglu_experts_ref", "take_rows", "take_rows_ref",
]
