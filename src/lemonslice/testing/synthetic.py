"""Write a small, deterministic, numerically sane Qwen3.5 GGUF."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType

from ..gguf.constants import GGMLType
from ..gguf.writer import write_gguf
from .config import SyntheticConfig
from .layout import SyntheticTensor, TensorSlot, synthetic_tensors
from .metadata import model_kv


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The generator of one tensor's values; it depends on the seed and the name only, so a
    tensor has the same values whatever the rest of the config (types, MTP, layer count)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def draw_values(init: str, rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """float32 values of the given numpy `shape` for one kind of initialisation:

    * "matrix": normal * 0.5 / sqrt(fan_in), so each output has std ~0.5 for unit inputs;
    * "embd": normal * 0.05; "norm": 1 + normal * 0.05; "vector": normal / sqrt(fan_in);
    * "conv": normal * 0.5 / sqrt(fan_in) (fan_in = conv kernel);
    * "ssm_a": -uniform(1, 16) (= -exp(A_log));
    * "ssm_dt": softplus^-1 of dt, dt log-uniform in [1e-3, 1e-1].
    """
    if init in ("matrix", "conv"):
        v = rng.standard_normal(shape) * (0.5 / np.sqrt(fan_in))
    elif init == "embd":
        v = rng.standard_normal(shape) * 0.05
    elif init == "norm":
        v = 1.0 + rng.standard_normal(shape) * 0.05
    elif init == "vector":
        v = rng.standard_normal(shape) / np.sqrt(fan_in)
    elif init == "ssm_a":
        v = -rng.uniform(1.0, 16.0, shape)
    elif init == "ssm_dt":
        dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape))
        v = np.log(np.expm1(dt))
    else:
        raise ValueError(f"unknown init {init!r}")
    return v.astype(np.float32)


def tensor_values(config: SyntheticConfig, slot: TensorSlot) -> np.ndarray:
    """The float32 values of one tensor in numpy order (reversed ggml shape), before quantization."""
    rng = tensor_rng(config.seed, slot.name)
    return draw_values(slot.init, rng, tuple(reversed(slot.shape)), slot.shape[0])


def encode_tensor(values: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """`values` (numpy order) in `ggml_type`'s byte layout, via gguf-py's quantizer."""
    return gguf.quants.quantize(values, GGMLQuantizationType(int(ggml_type)))


def write_synthetic(path: str | os.PathLike[str], config: SyntheticConfig) -> Path:
    """Write the GGUF described by `config` to `path` and return the path.

    Same config, same bytes. Which tensors fell back to F16 is told by `layout.fallbacks`.
    """
    path = Path(path)
    specs: list[SyntheticTensor] = synthetic_tensors(config)
    tensors = [
        (t.name, t.shape, t.ggml_type, encode_tensor(tensor_values(config, t.slot), t.ggml_type))
        for t in specs
    ]
    write_gguf(path, model_kv(config), tensors)
    return path
