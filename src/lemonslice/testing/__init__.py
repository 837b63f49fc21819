"""Deterministic synthetic Qwen3.5 GGUF files for tests and benchmarks.

* `write_synthetic(path, config)`: a small model with real values (quantized with gguf-py),
  e.g. `write_synthetic(tmp / "m.gguf", tiny_qwen35moe(mtp=True, default_type="Q4_0"))`.
* `write_large_random(path, n_layer)`: the real Qwen3.5-35B-A3B shapes with Q4_K_M-like types,
  filled with random bytes, streamed to disk.
"""

from .config import (
    ARCHES,
    KIND_GROUPS,
    MATRIX_KINDS,
    QUANTIZABLE_TYPES,
    SyntheticConfig,
    qwen35_4b,
    qwen35moe_35b_a3b,
    tiny_qwen35,
    tiny_qwen35moe,
)
from .large import large_config, q4_k_m_tensors, write_large_random
from .layout import SyntheticTensor, TensorSlot, fallbacks, synthetic_tensors, tensor_layout
from .metadata import SPECIAL_TOKENS, Vocab, build_vocab, byte_unicode
from .synthetic import draw_values, encode_tensor, tensor_values, write_synthetic

__all__ = [
    "ARCHES", "KIND_GROUPS", "MATRIX_KINDS", "QUANTIZABLE_TYPES", "SPECIAL_TOKENS", "SyntheticConfig",
    "SyntheticTensor", "TensorSlot", "Vocab", "build_vocab", "byte_unicode", "draw_values", "encode_tensor",
    "fallbacks", "large_config", "q4_k_m_tensors", "qwen35_4b", "qwen35moe_35b_a3b", "synthetic_tensors", "tensor_layout",
    "tensor_values", "tiny_qwen35", "tiny_qwen35moe", "write_large_random", "write_synthetic",
]
