"""The C kernels of kernels_types.c (Q2_K, Q3_K, IQ4_NL, IQ4_XS, MXFP4, and F16/BF16 products):
dequantization bit for bit against gguf-py on blocks written by llama.cpp's own quantizer,
products against float64 references, the portable (no AVX2) build, and the refusal of types
lemonslice cannot run. test_kernels.py runs these types through its twin tests as well."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lemonslice.errors import LemonsliceError
from lemonslice.gguf.constants import BLOCK_SIZES, GGMLType
from lemonslice.ops import QuantWeight, dequantize, kernels, linear, runnable
from lemonslice.ops.qlinear import Q8_BLOCK, round_activations

from test_dequant import assert_bit_equal, assert_close_rel, reference

T = GGMLType
IQ_GRID = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]
NEW = [T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS, T.MXFP4, *IQ_GRID]
HALF = [T.F16, T.BF16]


def floats(rows: int, cols: int, seed: int) -> np.ndarray:
    """Normal rows of varied scale, with a few outliers (the quantizers' hard case)."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3, (rows, 1))
    data[rng.random((rows, cols)) < 0.01] *= 8
    return data.astype(np.float32)


def llama_blocks(t: GGMLType, rows: int, cols: int, seed: int) -> np.ndarray:
    """uint8 [rows, row_bytes] from llama.cpp's ggml_quantize_chunk (F16/BF16: the floats cast)."""
    data = floats(rows, cols, seed)
    if t == T.F16:
        return data.astype(np.float16).view(np.uint8)
    if t == T.BF16:
        return (data.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    from lemonslice.surgery.quantizer import quantize_rows, requires_imatrix

    # IQ2 types need an importance matrix: a random positive one
    imatrix = np.random.default_rng(seed).uniform(0.1, 2, cols).astype(np.float32) if requires_imatrix(t) else None
    return quantize_rows(data, int(t), imatrix)


def weight(t: GGMLType, rows: int, cols: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    """The weight and gguf-py's dequantization of it in float64 [rows, cols]."""
    raw = llama_blocks(t, rows, cols, seed)
    dense = torch.from_numpy(reference(raw, t)).reshape(rows, cols).double()
    return QuantWeight(torch.from_numpy(raw), t, (cols, rows)), dense


def test_new_types_are_reported():
    assert all(kernels.supported(t) and kernels.q8_supported(t) for t in NEW)
    assert all(kernels.supported(t) and not kernels.q8_supported(t) for t in HALF)
    assert {t: Q8_BLOCK[t] for t in NEW} == {t: 32 if t in (T.IQ4_NL, T.MXFP4) else 256 for t in NEW}
    assert not kernels.supported(T.TQ1_0) and not kernels.supported(T.TQ2_0)


@pytest.mark.parametrize("t", NEW, ids=lambda t: t.name)
def test_dequant_of_llama_cpp_blocks_equals_gguf_py(t):
    raw = llama_blocks(t, 9, 1024, seed=int(t))
    want = reference(raw, t)
    assert_bit_equal(kernels.dequant(torch.from_numpy(raw), t, 1024), want)  # C
    assert_bit_equal(dequantize(torch.from_numpy(raw), t), want)  # the torch twin


@pytest.mark.parametrize("t", NEW + HALF, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 4, 16, 40])
def test_float_product_is_within_2e_6_of_float64(t, n, exact):
    # n <= 16: the fused decode-and-dot (or the F16/BF16 dot); 40: C dequantization + BLAS
    w, dense = weight(t, 45, 768, seed=n)
    x = torch.randn(n, 768, generator=torch.Generator().manual_seed(n))
    assert_close_rel(linear(x, w).double(), x.double() @ dense.T, rel=2e-6)


@pytest.mark.parametrize("t", NEW, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 3, 9])
def test_8bit_product_equals_the_int8_reference(t, n):
    # The activations rounded by hand (round_activations: int8 codes times amax/127 per block)
    # times the float64 weight: the kernel's integer sums are exact, only its float scaling rounds.
    w, dense = weight(t, 45, 768, seed=10 + n)
    x = torch.randn(n, 768, generator=torch.Generator().manual_seed(n)) * 2
    got = linear(x, w).double()
    assert_close_rel(got, round_activations(x, Q8_BLOCK[t]) @ dense.T, rel=2e-6)
    drift = ((got - x.double() @ dense.T).abs().max() / got.abs().max()).item()
    assert 0 < drift < 0.05  # the rounding is real


@pytest.mark.parametrize("t", HALF, ids=lambda t: t.name)
def test_half_rows_do_not_depend_on_the_batch(t):
    w, _ = weight(t, 33, 1000, seed=3)  # 1000 columns: a tail after the 16-wide (or 64-wide, AVX2) steps
    x = torch.randn(7, 1000, generator=torch.Generator().manual_seed(2))
    together = linear(x, w)
    for i in range(7):
        assert torch.equal(linear(x[i : i + 1], w)[0], together[i])


PORTABLE = """
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from lemonslice.ops import kernels
from lemonslice.gguf.constants import GGMLType as T
from test_dequant import random_blocks, reference
kernels.FLAGS = tuple("-march=x86-64" if f == "-march=native" else f for f in kernels.FLAGS)
assert kernels.library() is not None
for t in map(T, {new}):
    raw = random_blocks(t, 6, 512, seed=int(t))
    if t == T.MXFP4:  # finite products: exponents near 2^0
        raw.reshape(-1, 17)[:, 0] = 120 + raw.reshape(-1, 17)[:, 0] % 16
    want = reference(raw, t)
    assert np.array_equal(kernels.dequant(torch.from_numpy(raw), t, 512).numpy().view(np.uint32), want.view(np.uint32))
    assert not kernels.q8_supported(t)
    x = torch.randn(3, 512, dtype=torch.float64)
    y = kernels.qmatmul(x.float(), torch.from_numpy(raw), t, 512).double()
    ref = x.float().double() @ torch.from_numpy(want).double().T
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 2e-6, t
for t, dtype in ((T.F16, torch.float16), (T.BF16, torch.bfloat16)):
    raw = torch.randn(6, 100).to(dtype).view(torch.uint8)
    x = torch.randn(5, 100)
    ref = x.double() @ torch.from_numpy(reference(raw.numpy(), t)).double().T
    y = kernels.matmul_half(x, raw, t, 100).double()
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 2e-6, t
print("ok")
"""


def test_portable_build_without_avx2(tmp_path):
    # The non-x86 fallback: decode-and-dot through the block decoders, no 8-bit path.
    code = PORTABLE.format(tests=str(Path(__file__).parent), new=tuple(int(t) for t in NEW))
    r = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin", "LEMONSLICE_CACHE": str(tmp_path)},
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_runnable_types():
    for t in [*NEW, *HALF, T.F32, T.Q4_K, T.IQ3_S, T.IQ2_XXS, T.IQ1_M, T.TQ2_0]:
        assert runnable(t), t.name
    for t in [T.Q8_1, T.Q8_K, T.I32]:
        assert not runnable(t), t.name


@pytest.fixture(scope="module")
def model_with_q8_1(tmp_path_factory) -> Path:
    """A tiny Qwen3.5 whose blk.0.attn_gate.weight is stored as Q8_1 (which nothing here decodes)."""
    from lemonslice.gguf.reader import GGUFReader
    from lemonslice.gguf.writer import write_gguf
    from lemonslice.testing import tiny_qwen35, write_synthetic

    d = tmp_path_factory.mktemp("q8_1")
    src = GGUFReader(write_synthetic(d / "model.gguf", tiny_qwen35()))
    tensors = []
    for t in src.tensors:
        data, ty = bytes(src.tensor_bytes(t.name)), t.ggml_type
        if t.name == "blk.0.attn_gate.weight":
            ty = T.Q8_1
            block, size = BLOCK_SIZES[ty]
            data = bytes(t.n_elements // block * size)
        tensors.append((t.name, t.shape, ty, data))
    write_gguf(d / "bad.gguf", [e.raw for e in src.kv.values()], tensors)
    src.close()
    return d / "bad.gguf"


def test_a_type_lemonslice_cannot_run_is_refused_before_reading(model_with_q8_1, monkeypatch):
    from lemonslice.engine import Engine, WeightStore

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(WeightStore, "_read", no_reads)
    monkeypatch.setattr(WeightStore, "_map", no_reads)
    with pytest.raises(LemonsliceError) as err:
        Engine(model_with_q8_1)
    assert str(err.value) == "tensor blk.0.attn_gate.weight has type Q8_1, which lemonslice cannot run"


@pytest.mark.parametrize("t", HALF, ids=lambda t: t.name)
def test_half_experts_in_one_call_equal_expert_by_expert(t):
    # F16/BF16 experts go through three batched C calls; each row must keep the bits `linear`
    # gives it expert by expert, and the result the float64 twin's value.
    from lemonslice.ops import qlinear

    g = torch.Generator().manual_seed(0)

    def half(n_in: int, n_out: int) -> QuantWeight:
        f = torch.randn(n_out, n_in, generator=g) * 0.05
        raw = (f.view(torch.int32) >> 16).to(torch.int16) if t == T.BF16 else f.half()
        return QuantWeight(raw.view(torch.uint8).contiguous(), t, (n_in, n_out))

    parts = [(half(256, 96), half(256, 96), half(96, 256)) for _ in range(5)]
    counts = [1, 3, 2, 7, 1]
    x = torch.randn(sum(counts), 256, generator=g)
    got = qlinear.swiglu_experts(x, counts, parts)
    assert torch.equal(got, qlinear._per_expert(x, counts, parts, qlinear.linear))
    assert_close_rel(got, qlinear.swiglu_experts_ref(x, counts, parts), rel=2e-6)
