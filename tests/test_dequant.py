"""Torch dequantization against gguf-py (bit for bit) and the quantized-linear seam."""

from __future__ import annotations

import importlib

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from lemonslice.gguf.constants import BLOCK_SIZES, GGMLType
from lemonslice.ops import (
    TORCH_TYPES,
    QuantWeight,
    dequantize,
    gathered_linear,
    gathered_linear_ref,
    linear,
    linear_ref,
)

# The package re-exports the function `linear`, which hides the submodule attribute.
linear_mod = importlib.import_module("lemonslice.ops.qlinear")

ROWS, COLS = 8, 1024

T = GGMLType
# Types gguf-py can quantize: tested on real quantized data as well as random bytes.
QUANTIZABLE = [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4]
# Byte offsets of each block's f16 scale fields, overwritten so random blocks stay finite.
F16_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.MXFP4: (), T.TQ2_0: (64,),
    T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,), T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,),
}
TORCH_LISTED = [
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K,
    T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.MXFP4,
]


def gg(t: GGMLType) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType(int(t))


def quantized(t: GGMLType, rows: int, cols: int, seed: int) -> np.ndarray:
    """gguf-py quantization of random floats, as uint8 [rows, row_bytes]."""
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3, (rows, 1))).astype(np.float32)
    return np.ascontiguousarray(gguf.quants.quantize(data, gg(t))).view(np.uint8)


def random_blocks(t: GGMLType, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes as uint8 [rows, row_bytes], with finite f16 scales."""
    rng = np.random.default_rng(seed)
    block, type_size = BLOCK_SIZES[t]
    nb = rows * cols // block
    b = rng.integers(0, 256, (nb, type_size), dtype=np.uint8)
    for off in F16_FIELDS.get(t, ()):
        scale = rng.standard_normal(nb) * np.exp2(rng.integers(-12, 4, nb))
        b[:, off : off + 2] = scale.astype(np.float16).view(np.uint8).reshape(nb, 2)
    if t == T.IQ1_M:  # its f16 scale is the top nibbles of the four u16 at bytes 48..55
        d = (rng.standard_normal(nb) * np.exp2(rng.integers(-12, 4, nb))).astype(np.float16).view(np.uint16)
        for i in range(4):
            b[:, 49 + 2 * i] = (b[:, 49 + 2 * i] & 0x0F) | (((d >> (4 * i)) & 0xF) << 4).astype(np.uint8)
    return b.reshape(rows, -1)


def reference(raw: np.ndarray, t: GGMLType) -> np.ndarray:
    # Random MXFP4 exponents reach inf on purpose; torch must produce the same inf.
    with np.errstate(over="ignore"):
        return np.asarray(gguf.quants.dequantize(raw, gg(t)), dtype=np.float32)


def assert_bit_equal(got: torch.Tensor, want: np.ndarray) -> None:
    assert got.dtype == torch.float32
    g = got.numpy()
    assert g.shape == want.shape
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(g), nan)
    assert np.array_equal(g.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


def test_torch_kernels_cover_the_listed_types():
    assert set(TORCH_LISTED) <= TORCH_TYPES


@pytest.mark.parametrize("t", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_quantized_data(t):
    raw = quantized(t, ROWS, COLS, seed=int(t))
    assert_bit_equal(dequantize(torch.from_numpy(raw), t, (COLS, ROWS)), reference(raw, t))


@pytest.mark.parametrize("t", TORCH_LISTED, ids=lambda t: t.name)
def test_dequantize_random_blocks(t):
    raw = random_blocks(t, ROWS, COLS, seed=100 + int(t))
    assert_bit_equal(dequantize(torch.from_numpy(raw), t, (COLS, ROWS)), reference(raw, t))


@pytest.mark.parametrize("t", [T.Q4_K, T.F16, T.MXFP4], ids=lambda t: t.name)
def test_dequantize_input_forms_and_shapes(t):
    raw = random_blocks(t, 6, 512, seed=7)
    want = reference(raw, t)
    # bytes, numpy and torch input; ggml-order shape or the rows' own shape.
    assert_bit_equal(dequantize(raw.tobytes(), t, (512, 6)), want)
    assert_bit_equal(dequantize(raw, t), want)
    assert_bit_equal(dequantize(torch.from_numpy(raw), t), want)
    assert_bit_equal(dequantize(raw.tobytes(), t, (512, 3, 2)), want.reshape(2, 3, 512))
    # A block-unaligned start (odd byte offset) still decodes.
    shifted = np.empty(raw.size + 1, np.uint8)
    shifted[1:] = raw.ravel()
    assert_bit_equal(dequantize(torch.from_numpy(shifted)[1:], t, (512, 6)), want)


def test_dequantize_f32_returns_a_copy():
    x = np.arange(256, dtype=np.float32)
    y = dequantize(torch.from_numpy(x.view(np.uint8)), T.F32, (256,))
    y += 1
    assert x[0] == 0


def test_dequantize_falls_back_to_gguf_py():
    assert T.TQ2_0 not in TORCH_TYPES
    raw = random_blocks(T.TQ2_0, 4, 512, seed=3)
    assert_bit_equal(dequantize(torch.from_numpy(raw), T.TQ2_0, (512, 4)), reference(raw, T.TQ2_0))


def test_dequantize_rejects_wrong_sizes():
    raw = random_blocks(T.Q4_K, 2, 256, seed=1)
    with pytest.raises(ValueError):
        dequantize(raw, T.Q4_K, (256, 3))
    with pytest.raises(ValueError):
        dequantize(raw, T.Q4_K, (128, 4))
    with pytest.raises(ValueError):
        dequantize(raw[:, :-1], T.Q4_K)


# --- quantized linear -------------------------------------------------------------------

LINEAR_TYPES = [T.Q4_K, T.Q6_K, T.Q8_0, T.IQ4_XS, T.MXFP4, T.F16]


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale)


def make_weight(t: GGMLType, out: int, n_in: int, seed: int, n_expert: int | None = None):
    """A QuantWeight and gguf-py's float32 dequantization of it (numpy order)."""
    rows = out * (n_expert or 1)
    raw = quantized(t, rows, n_in, seed) if t in QUANTIZABLE else random_blocks(t, rows, n_in, seed)
    shape = (n_in, out) if n_expert is None else (n_in, out, n_expert)
    dense = torch.from_numpy(reference(raw, t)).reshape(*reversed(shape))
    return QuantWeight(torch.from_numpy(raw), t, shape), dense


@pytest.mark.parametrize("t", LINEAR_TYPES, ids=lambda t: t.name)
def test_linear_matches_dense_matmul(t, exact):
    w, dense = make_weight(t, out=48, n_in=512, seed=11)
    x = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(0))
    want = x @ dense.T
    for fn in (linear, linear_ref):
        y = fn(x, w)
        assert y.shape == (2, 3, 48) and y.dtype == torch.float32
        assert_close_rel(y, want)


def test_linear_keeps_input_dtype():
    w, dense = make_weight(T.Q8_0, out=16, n_in=256, seed=2)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    y = linear(x, w)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, (x.float() @ dense.T).to(torch.bfloat16), rel=1e-2)


def test_linear_ref_dequantizes_in_chunks(monkeypatch):
    w, dense = make_weight(T.Q4_K, out=37, n_in=512, seed=5)
    chunk = 4 * 512 * 5  # five float32 rows
    assert 4 * dense.numel() > chunk
    seen = []

    def spy(raw, ggml_type, shape=None):
        out = dequantize(raw, ggml_type, shape)
        seen.append(out.numel() * 4)
        return out

    monkeypatch.setattr(linear_mod, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(linear_mod, "dequantize", spy)
    x = torch.randn(3, 512)
    assert_close_rel(linear_ref(x, w), x @ dense.T)
    assert len(seen) == 8 and max(seen) <= chunk and sum(seen) == 4 * dense.numel()


def test_quant_weight_keeps_raw_bytes():
    raw = torch.from_numpy(random_blocks(T.Q4_K, 6, 256, seed=9)).reshape(-1)
    w = QuantWeight(raw, T.Q4_K, (256, 3, 2))
    assert w.raw.dtype == torch.uint8 and w.raw.shape == (2, 3, 144)
    assert w.raw.data_ptr() == raw.data_ptr()
    e1 = w.expert(1)
    assert e1.shape == (256, 3) and e1.raw.data_ptr() == raw.data_ptr() + 3 * 144
    with pytest.raises(ValueError):
        QuantWeight(raw[:-1], T.Q4_K, (256, 3, 2))
    with pytest.raises(ValueError):
        QuantWeight(raw, T.Q4_K, (128, 6, 2))


@pytest.mark.parametrize("t", [T.Q4_K, T.MXFP4], ids=lambda t: t.name)
def test_gathered_linear_matches_dense(t, monkeypatch, exact):
    n_expert, out, n_in = 6, 24, 256
    w, dense = make_weight(t, out=out, n_in=n_in, seed=21, n_expert=n_expert)  # dense [E, out, in]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, n_in, generator=g)
    ids = torch.tensor([[0, 3], [3, 5], [5, 0], [3, 0], [0, 5]])
    want = torch.einsum("ti,tkoi->tko", x, dense[ids])

    rows = []

    def spy(raw, ggml_type, shape=None):
        rows.append(shape[1])
        return dequantize(raw, ggml_type, shape)

    monkeypatch.setattr(linear_mod, "dequantize", spy)
    for fn in (gathered_linear, gathered_linear_ref):
        rows.clear()
        y = fn(x, w, ids)
        assert y.shape == (5, 2, out)
        assert_close_rel(y, want)
    # Only the three selected experts were expanded (the fast path decodes in C, never whole).
    assert sum(rows) == 3 * out
    with pytest.raises(IndexError):
        gathered_linear_ref(x, w, torch.full((5, 2), n_expert))
