"""A GGUF with the real Qwen3.5-35B-A3B shapes and Q4_K_M-like types, filled fast with random
bytes, for I/O and throughput benchmarks.

Quantized tensors are tiles of one random block of bytes whose f16 scale fields are
overwritten with small finite values, so every weight dequantizes to a finite number.
F32 (and fallback F16) tensors get real values, drawn chunk by chunk. With `float_type`
every weight matrix gets real F16 (or F32) values instead: a source for llama.cpp's quantizer. Memory use stays near
`pool_bytes` plus one chunk whatever the file size.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import numpy as np

from ..gguf.constants import BLOCK_SIZES, FILE_TYPE_OF, FileType, GGMLType, Role, Tensors
from ..gguf.writer import plan_file
from .config import SyntheticConfig, qwen35_4b, qwen35moe_35b_a3b
from .layout import SyntheticTensor, TensorSlot, fits_blocks, tensor_layout
from .metadata import model_kv
from .synthetic import draw_values

T = GGMLType
# Byte offsets of each block's f16 scale fields, and the typical size given to them.
SCALE_FIELDS: dict[GGMLType, tuple[tuple[int, ...], float]] = {
    T.Q4_K: ((0, 2), 2e-4),  # d, dmin
    T.Q5_K: ((0, 2), 1e-4),  # d, dmin
    T.Q6_K: ((208,), 4e-5),  # d
}
# dmin / d that zeroes a block's mean when its 6-bit scales and mins are uniform: the mean quant.
CENTERING: dict[GGMLType, float] = {T.Q4_K: 7.5, T.Q5_K: 15.5}
_CHUNK_BYTES = 8 << 20
_DENSE_CHUNK_ELEMS = 1 << 22


def _use_more_bits(i: int, n: int) -> bool:
    """llama-quantize's rule for which layers of a Q4_K_M file get Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_tensors(config: SyntheticConfig) -> list[SyntheticTensor]:
    """The layout of `config` with types modelled on llama-quantize's Q4_K_M recipe:
    Q4_K by default; Q6_K for output and for attn_v / ffn_down* in the "more bits" layers;
    Q5_K for attn_qkv; F32 for 1-D tensors, ssm_conv1d and the router; F16 where rows don't fit."""
    roles = config.layer_roles()
    attn_layers = [i for i, r in enumerate(roles) if r != Role.RECURRENT]
    out = []
    for s in tensor_layout(config):
        if not s.is_matrix or s.kind == "ffn_gate_inp":
            t = T.F32
        elif s.kind == "output":
            t = T.Q6_K
        elif s.kind == "attn_qkv":
            t = T.Q5_K
        elif s.kind == "attn_v":
            assert s.layer is not None
            t = T.Q6_K if _use_more_bits(attn_layers.index(s.layer), len(attn_layers)) else T.Q4_K
        elif s.kind in ("ffn_down", "ffn_down_exps", "ffn_down_shexp"):
            assert s.layer is not None
            t = T.Q6_K if _use_more_bits(s.layer, config.block_count) else T.Q4_K
        else:
            t = T.Q4_K
        out.append(SyntheticTensor(s, t if fits_blocks(s.shape, t) else T.F16, t))
    return out


def float_tensors(config: SyntheticConfig, ggml_type: GGMLType) -> list[SyntheticTensor]:
    """The layout of `config` with every weight matrix in `ggml_type` (F16 or F32) and the
    router, ssm_conv1d and 1-D tensors in F32, as a converter's F16 output has them."""
    out = []
    for s in tensor_layout(config):
        t = ggml_type if s.is_matrix and s.kind != "ffn_gate_inp" else T.F32
        out.append(SyntheticTensor(s, t, t))
    return out


def large_config(n_layer: int = 8, **overrides: Any) -> SyntheticConfig:
    """`qwen35moe_35b_a3b` with n_expert_used capped at n_expert (for reduced expert counts)."""
    n_expert = overrides.get("n_expert", 256)
    overrides.setdefault("n_expert_used", min(8, n_expert))
    return qwen35moe_35b_a3b(n_layer, **overrides)


def write_large_random(
    path: str | os.PathLike[str],
    n_layer: int = 8,
    *,
    n_vocab: int = 248320,
    n_expert: int = 256,
    mtp: bool = False,
    seed: int = 0,
    pool_bytes: int = 64 << 20,
    router_skew: float = 0.0,
    centered: bool = False,
    dense: bool = False,
    float_type: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a Qwen3.5-35B-A3B-shaped GGUF of `n_layer` trunk layers and return its path.

    Full size is about 0.5 GB per layer plus 0.7 GB for embeddings and output; reduce
    `n_vocab` / `n_expert` (or any `SyntheticConfig` field via `overrides`) for small files.
    `router_skew` > 0 scales each router row (one per expert) by `router_row_scales`, so some
    experts are routed to far more often than others; 0 writes the plain random routers.
    Without `centered`, Q4_K/Q5_K weights (dmin = d) all have a positive mean, so every token's
    residual stream points the same way and routing is the same for every token; `centered`
    sets dmin = d times the mean quant (`CENTERING`), making weights zero-mean.
    `dense` writes the dense Qwen3.5-4B-like shapes (`qwen35_4b`) instead. `float_type` ("F16"
    or "F32") writes every weight matrix in that type with real values (`draw_values`: centred,
    std ~0.5 / sqrt(fan_in)) instead of the Q4_K_M-like mix; about 2 GB a layer in F16.
    Deterministic for a given set of arguments.
    """
    path = Path(path)
    if dense:
        cfg = qwen35_4b(n_layer, n_vocab=n_vocab, mtp=mtp, seed=seed, **overrides)
    else:
        cfg = large_config(n_layer, n_vocab=n_vocab, n_expert=n_expert, mtp=mtp, seed=seed, **overrides)
    if float_type is None:
        specs, ftype = q4_k_m_tensors(cfg), FileType.MOSTLY_Q4_K_M
    else:
        ft = T[float_type.upper()]
        if ft not in (T.F16, T.F32):
            raise ValueError(f"float_type must be F16 or F32, got {float_type!r}")
        specs, ftype = float_tensors(cfg, ft), FILE_TYPE_OF[ft]
    plan = plan_file(model_kv(cfg, ftype), [(t.name, t.shape, t.ggml_type) for t in specs])
    rng = np.random.default_rng([seed, 0x4C415247])
    n_words = max(int(pool_bytes), 1 << 16) // 8
    pool = rng.integers(0, 1 << 64, n_words, dtype=np.uint64, endpoint=False).view(np.uint8)
    with open(path, "wb") as f:
        f.write(plan.padded_header())
        for t, pt in zip(specs, plan.tensors):
            f.seek(plan.data_offset + pt.offset)
            if t.ggml_type in SCALE_FIELDS:
                dmin = CENTERING.get(t.ggml_type, 1.0) if centered else 1.0
                _write_tiled(f, pool, t.name, t.ggml_type, pt.n_bytes, seed, dmin)
            else:
                scales = None
                if router_skew and t.slot.kind == "ffn_gate_inp" and t.slot.layer is not None:
                    scales = router_row_scales(cfg.n_expert, t.slot.layer, router_skew, seed)
                _write_dense(f, t.slot, t.ggml_type, seed, scales)
        f.truncate(plan.size)
    return path


def router_row_scales(n_expert: int, layer: int, skew: float, seed: int = 0) -> np.ndarray:
    """Per-expert router row scales [X]: exp(skew) for a hot set of 3/32 of the experts (24 of 256),
    drawn per layer, 1 for the rest.

    A larger row scale widens that expert's logit distribution, so it lands in the top-k more
    often. A hot set over a uniform tail (rather than, say, log-normal scales) gives the flat
    LRU hit curve of real MoE decoding: about 65% hits with 64 of 256 experts cached, 80% with 128.
    """
    hot = np.random.default_rng([seed, 0x534B4557, layer]).permutation(n_expert)[: n_expert * 3 // 32]
    s = np.ones(n_expert, np.float32)
    s[hot] = np.exp(skew)
    return s


def project_routers(path: str | os.PathLike[str], directions: Mapping[int, np.ndarray]) -> None:
    """Rewrite, in place, each layer's router so its rows are orthogonal to `directions[layer]` [E]:
    routing then ignores the router input's component along it (the part all tokens share)."""
    from ..gguf.reader import GGUFReader

    with GGUFReader(path) as r:
        where = {}
        for layer, c in directions.items():
            t = r.tensor_map[Tensors.FFN_GATE_INP.format(bid=layer)]
            if t.ggml_type != T.F32:
                raise ValueError(f"{t.name}: router must be F32 to be projected, is {t.ggml_type.name}")
            where[layer] = (t.data_start, np.array(r.tensor_array(t.name), dtype=np.float64))  # [X, E]
    with open(path, "r+b") as f:
        for layer, (start, w) in where.items():
            c = np.asarray(directions[layer], dtype=np.float64)
            c = c / np.linalg.norm(c)
            f.seek(start)
            f.write((w - np.outer(w @ c, c)).astype("<f4").tobytes())


def _write_tiled(f: BinaryIO, pool: np.ndarray, name: str, ggml_type: GGMLType, n_bytes: int, seed: int,
                 dmin_factor: float = 1.0) -> None:
    """Stream `n_bytes` of `pool` (whole blocks, starting at a name-dependent block) with sane scales;
    a second scale field (dmin) is `dmin_factor` times the first (d)."""
    ts = BLOCK_SIZES[ggml_type][1]
    pool_len = len(pool) // ts * ts
    offsets, mag = SCALE_FIELDS[ggml_type]
    chunk = max(ts, min(_CHUNK_BYTES, pool_len) // ts * ts)
    srng = np.random.default_rng([seed, int(ggml_type)])
    d = mag * srng.uniform(0.5, 1.5, chunk // ts)
    fields = [(d * (dmin_factor if i else 1.0)).astype("<f2").view(np.uint8).reshape(-1, 2) for i in range(len(offsets))]
    pos = zlib.crc32(name.encode()) % (pool_len // ts) * ts
    left = n_bytes
    while left:
        take = min(left, chunk)
        first = pool[pos : pos + take]
        buf = np.concatenate([first, pool[: take - len(first)]]) if len(first) < take else first.copy()
        blocks = buf.reshape(-1, ts)
        for off, scales in zip(offsets, fields):
            blocks[:, off : off + 2] = scales[: len(blocks)]
        f.write(memoryview(buf))
        pos = (pos + take) % pool_len
        left -= take


def _write_dense(f: BinaryIO, slot: TensorSlot, ggml_type: GGMLType, seed: int,
                 row_scales: np.ndarray | None = None) -> None:
    """Stream real F32/F16 values, drawn in chunks along the outermost numpy axis; each row i of
    that axis is multiplied by `row_scales[i]` when given."""
    dtype = {T.F32: "<f4", T.F16: "<f2"}[ggml_type]
    np_shape = tuple(reversed(slot.shape))
    row = int(np.prod(np_shape[1:], dtype=np.int64))
    step = max(1, _DENSE_CHUNK_ELEMS // max(row, 1))
    crc = zlib.crc32(slot.name.encode())
    for i in range(0, np_shape[0], step):
        k = min(step, np_shape[0] - i)
        rng = np.random.default_rng([seed, crc, i])
        v = draw_values(slot.init, rng, (k, *np_shape[1:]), slot.shape[0])
        if row_scales is not None:
            v = v * row_scales[i : i + k].reshape(-1, *([1] * (v.ndim - 1)))
        f.write(v.astype(dtype).tobytes())
