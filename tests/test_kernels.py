"""The C kernels (ops/kernels.c) against gguf-py and against their torch reference twins."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from lemonslice.gguf.constants import GGMLType
from lemonslice.ops import (
    QuantWeight, gathered_linear, gathered_linear_q8_ref, gathered_linear_ref, kernels, linear, linear_q8_ref,
    linear_ref, set_exact, swiglu_experts, swiglu_experts_q8_ref, swiglu_experts_ref, take_rows, take_rows_ref,
)
from lemonslice.ops.qlinear import Q8_BLOCK, round_activations

from test_dequant import QUANTIZABLE, assert_bit_equal, assert_close_rel, quantized, random_blocks, reference

T = GGMLType
C_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
           T.IQ4_NL, T.IQ4_XS, T.MXFP4, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S,
           T.IQ1_S, T.IQ1_M]
linear_mod = importlib.import_module("lemonslice.ops.qlinear")


def blocks(t: GGMLType, rows: int, cols: int, seed: int) -> np.ndarray:
    if t == T.F32:
        return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    return quantized(t, rows, cols, seed) if t in QUANTIZABLE else random_blocks(t, rows, cols, seed)


def test_kernels_build_here():
    # The suite must exercise the fast path, not silently fall back to the reference.
    assert kernels.library() is not None
    assert all(kernels.supported(t) for t in C_TYPES)
    assert not kernels.supported(T.TQ2_0)


@pytest.mark.parametrize("t", C_TYPES, ids=lambda t: t.name)
def test_c_dequant_equals_gguf_py_bit_for_bit(t):
    for seed, maker in ((1, blocks), (2, random_blocks if t not in (T.F32,) else blocks)):
        raw = maker(t, 7, 512, seed)
        got = kernels.dequant(torch.from_numpy(raw), t, 512)
        assert_bit_equal(got, reference(raw, t).reshape(7, 512))


@pytest.mark.parametrize("t", C_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 3, 16, 17, 40])
def test_linear_exact_equals_reference_twin(t, n, exact):
    # n <= 16 takes the fused decode-and-dot kernel, larger n C dequantization + BLAS.
    raw = blocks(t, 37, 768, seed=n)
    w = QuantWeight(torch.from_numpy(raw), t, (768, 37))
    x = torch.randn(n, 768, generator=torch.Generator().manual_seed(n))
    got, want = linear(x, w), linear_ref(x, w)
    assert got.shape == want.shape == (n, 37)
    assert_close_rel(got, want, rel=2e-6)


@pytest.mark.parametrize("t", C_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 2, 8, 9, 21, 40])
def test_linear_8bit_equals_its_twin(t, n):
    # 8 activation rows share one pass over a weight row: 9 and more take several passes.
    raw = blocks(t, 37, 768, seed=n)
    w = QuantWeight(torch.from_numpy(raw), t, (768, 37))
    x = torch.randn(n, 768, generator=torch.Generator().manual_seed(n)) * 3
    got, want = linear(x, w), linear_q8_ref(x, w)
    assert kernels.q8_supported(t) == (t in Q8_BLOCK)
    assert_close_rel(got, want, rel=2e-6)
    if t in Q8_BLOCK:  # the rounding is real: the product moves off the exact one, a little
        exact_y = linear_ref(x, w)
        drift = ((got - exact_y).abs().max() / exact_y.abs().max()).item()
        assert 0 < drift < 0.05


def test_activation_rounding_worked_by_hand():
    # amax 2.54 -> scale 0.02; 1.0 / 0.02 = 50, 0.01 / 0.02 = 0.5 rounds to even 0, -0.03 -> -1.5 -> -2
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([2.54, 1.0, 0.01, -0.03])
    got = round_activations(x, 32)[0, :4]
    want = torch.tensor([127, 50, 0, -2], dtype=torch.float64) * (2.54 / 127)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_exact_switch_and_environment(exact):
    raw = blocks(T.Q8_0, 5, 64, seed=3)
    w = QuantWeight(torch.from_numpy(raw), T.Q8_0, (64, 5))
    x = torch.randn(2, 64)
    assert torch.equal(linear(x, w), kernels.qmatmul(x, torch.from_numpy(raw), T.Q8_0, 64))
    code = "from lemonslice.ops import is_exact; print(is_exact())"
    for value, want in (("1", "True"), ("0", "False")):
        r = subprocess.run([sys.executable, "-c", code], env={"LEMONSLICE_EXACT": value, "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True)
        assert r.stdout.strip() == want, r.stderr
    r = subprocess.run([sys.executable, "-c", code], env={"LEMONSLICE_EXACT": "yes"}, capture_output=True, text=True)
    assert r.returncode != 0 and "LEMONSLICE_EXACT must be 0 or 1, got 'yes'" in r.stderr


def test_fast_linear_handles_chunks_and_strided_rows(monkeypatch, exact):
    monkeypatch.setattr(linear_mod, "CHUNK_BYTES", 4 * 256 * 5)
    raw = torch.from_numpy(blocks(T.Q4_K, 23, 256, seed=4))
    w = QuantWeight(raw, T.Q4_K, (256, 23))
    x = torch.randn(30, 256)
    assert_close_rel(linear(x, w), linear_ref(x, w), rel=2e-6)
    with pytest.raises(ValueError):
        kernels.qmatmul(x[:2], raw[:, :100], T.Q4_K, 256)  # wrong row bytes for 256 columns
    with pytest.raises(ValueError):
        kernels.qmatmul(torch.randn(17, 256), raw, T.Q4_K, 256)  # more rows than the fused kernel takes


@pytest.mark.parametrize("t", [T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_gathered_fast_equals_reference_twins(t):
    n_expert, out, n_in = 5, 24, 512
    raw = torch.from_numpy(blocks(t, n_expert * out, n_in, seed=9))
    w = QuantWeight(raw, t, (n_in, out, n_expert))
    x = torch.randn(4, n_in)
    ids = torch.tensor([[0, 4], [4, 2], [2, 0], [1, 4]])
    assert_close_rel(gathered_linear(x, w, ids), gathered_linear_q8_ref(x, w, ids), rel=2e-6)
    set_exact(True)
    try:
        assert_close_rel(gathered_linear(x, w, ids), gathered_linear_ref(x, w, ids), rel=2e-6)
    finally:
        set_exact(False)


def test_reference_switch_and_missing_compiler(tmp_path):
    code = (
        "import logging, torch; logging.basicConfig();"
        "from lemonslice.ops import kernels, linear, QuantWeight;"
        "assert kernels.library() is None;"
        "w = QuantWeight(torch.zeros(4, 34, dtype=torch.uint8), 8, (32, 4));"
        "print(linear(torch.ones(1, 32), w).sum().item())"
    )
    base = {"PATH": "/usr/bin:/bin", "LEMONSLICE_CACHE": str(tmp_path)}
    for env in ({"LEMONSLICE_KERNELS": "ref"}, {"CC": "/bin/false"}):
        r = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "0.0"
    assert "reference" in r.stderr  # the failed build is reported once, not silent
    assert not list(tmp_path.rglob("*.tmp"))  # no torn library left behind


@pytest.mark.parametrize("fused", [False, True], ids=["gate+up", "gate_up"])
@pytest.mark.parametrize("types", [(T.Q4_K, T.Q6_K), (T.Q8_0, T.Q5_0), (T.Q2_K, T.Q3_K), (T.IQ4_XS, T.MXFP4),
                                   (T.IQ4_NL, T.IQ4_XS)], ids=lambda ts: "-".join(t.name for t in ts))
def test_swiglu_experts_one_call_equals_twins(types, fused):
    gate_t, down_t = types
    n_expert, E, Fe = 4, 512, 256
    gu = QuantWeight(torch.from_numpy(blocks(gate_t, n_expert * 2 * Fe, E, seed=1)), gate_t, (E, 2 * Fe, n_expert))
    down = QuantWeight(torch.from_numpy(blocks(down_t, n_expert * E, Fe, seed=2)), down_t, (Fe, E, n_expert))
    parts = []
    for e in range(n_expert):
        g = gu.expert(e)
        if fused:
            parts.append((g, down.expert(e)))
        else:  # separate gate and up tensors: the two halves of the fused rows
            half = lambda r: QuantWeight(g.raw[r], gate_t, (E, Fe))  # noqa: E731
            parts.append((half(slice(0, Fe)), half(slice(Fe, 2 * Fe)), down.expert(e)))
    gen = torch.Generator().manual_seed(5)
    counts = [1, 3, 20, 2]  # 20 rows: a prompt chunk's expert goes through the AMX tiles alone, where they exist
    x = torch.randn(sum(counts), E, generator=gen)
    got = swiglu_experts(x, counts, parts)
    # the SiLU output is rounded to 8 bits again: a one-ulp SiLU difference can move a code
    assert_close_rel(got, swiglu_experts_q8_ref(x, counts, parts), rel=2e-4)
    assert torch.equal(swiglu_experts(x[1:4], [3], parts[1:2]), got[1:4])  # an expert alone: the same bits
    for i in (4, 13, 23):  # a row of the big expert alone: the same bits
        assert torch.equal(swiglu_experts(x[i : i + 1], [1], parts[2:3]), got[i : i + 1])
    set_exact(True)
    try:
        assert_close_rel(swiglu_experts(x, counts, parts), swiglu_experts_ref(x, counts, parts), rel=2e-6)
    finally:
        set_exact(False)


@pytest.mark.parametrize("t", sorted(Q8_BLOCK), ids=lambda t: t.name)
def test_8bit_rows_do_not_depend_on_the_batch(t):
    # Batched decoding must give each sequence the bits it gets alone.
    # 21 weight rows: the main types go 8 rows at a time, the last group padded. Batches of 1-2
    # (32-value blocks) and 1-7 rows (K-quants) take the unpacked path, larger ones the packed
    # one, except 2-8 rows of 32-value blocks where the CPU has AVX-512: 16 weight rows
    # transposed in 512-bit registers (16 + 5 rows here).
    # 33 and 40 rows: AMX tiles where the CPU has them; without, the IQ grid types take 32 rows a
    # pass over a weight row, the others 8.
    raw = torch.from_numpy(blocks(t, 21, 768, seed=7))
    x = torch.randn(40, 768, generator=torch.Generator().manual_seed(3))
    together = kernels.qmatmul_q8(x, raw, t, 768)
    for i in (*range(11), 31, 32, 39):
        assert torch.equal(kernels.qmatmul_q8(x[i : i + 1], raw, t, 768)[0], together[i])
    for n in (2, 3, 4, 5, 7, 8, 9, 33):
        assert torch.equal(kernels.qmatmul_q8(x[:n], raw, t, 768), together[:n])
    assert torch.equal(kernels.qmatmul_q8(x, raw[5:18], t, 768), together[:, 5:18])  # rows grouped otherwise


@pytest.mark.parametrize("t", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_8bit_long_rows_do_not_depend_on_the_batch(t):
    # Rows of more than 16 blocks take the unpacked path's scalar variant for 1-7 activation rows.
    raw = torch.from_numpy(blocks(t, 11, 17 * 256, seed=8))
    x = torch.randn(9, 17 * 256, generator=torch.Generator().manual_seed(4))
    together = kernels.qmatmul_q8(x, raw, t, 17 * 256)  # 9 rows: packed
    for n in (1, 2, 7):
        assert torch.equal(kernels.qmatmul_q8(x[:n], raw, t, 17 * 256), together[:n])
    assert_close_rel(together, linear_q8_ref(x, QuantWeight(raw, t, (17 * 256, 11))), rel=2e-6)


PACKED = [T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]


def test_first_8bit_product_of_a_process_may_be_any_type():
    # Types outside the 8-row path need no scratch: a fresh thread's first such product once
    # failed (its empty scratch read as an allocation failure).
    code = (
        "import sys, torch; sys.path.insert(0, 'tests');"
        "from test_kernels import blocks, T; from lemonslice.ops import kernels, QuantWeight, linear_q8_ref;"
        "raw = torch.from_numpy(blocks(T.Q2_K, 8, 256, seed=1)); x = torch.randn(3, 256);"
        "y = kernels.qmatmul_q8(x, raw, T.Q2_K, 256);"
        "ref = linear_q8_ref(x, QuantWeight(raw, T.Q2_K, (256, 8)));"
        "print(float((y - ref).abs().max() / ref.abs().max()))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) <= 2e-6


def test_8bit_kernels_built_for_avx2_alone_give_the_same_bits(tmp_path):
    # Without AVX-512 the kernels use maddubs for VNNI's dot product and signed Q8_0 codes; the
    # integers are exact either way, so a CPU without VNNI gets this machine's bits.
    import ctypes

    so = tmp_path / "avx2.so"
    flags = [f if f != "-march=native" else "-march=x86-64-v3" for f in kernels.FLAGS]
    subprocess.run(["cc", *flags, *map(str, kernels.SOURCES), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ls_qmatmul_q8.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.ls_set_table.argtypes = [ctypes.c_int, ptr, i64]
    for which, table in kernels._grid_tables():  # the IQ grids, as kernels.library() hands them over
        assert lib.ls_set_table(which, table.ctypes.data, table.nbytes) == 0
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(2))
    for t in sorted(Q8_BLOCK):
        raw = torch.from_numpy(blocks(t, 19, 512, seed=3))
        for n in (1, 3, 5, 12, 40):  # 3 and 5: 16-row groups here; 40: the AMX tiles here
            out = torch.empty(n, 19)
            assert lib.ls_qmatmul_q8(int(t), raw.data_ptr(), raw.stride(0), 19, 512, x.data_ptr(), n, out.data_ptr(), 2) == 0
            assert torch.equal(out, kernels.qmatmul_q8(x[:n], raw, t, 512)), (t.name, n)


def _amx_here() -> bool:
    return "amx_int8" in open("/proc/cpuinfo").read()


@pytest.mark.parametrize("t", sorted(Q8_BLOCK), ids=lambda t: t.name)
def test_amx_tiles_give_the_bits_of_the_row_paths(t):
    # Prompt chunks go through AMX tiles 16 rows at a time where the CPU has them (every 8-bit
    # type: the 256-value ones from 16 rows, the 32-value ones from 32): the same integers and
    # float steps, so a row's bits do not depend on the path or the batch.
    cols = 17 * 256 if t in (T.Q4_K, T.Q5_K, T.Q6_K) else 768
    raw = torch.from_numpy(blocks(t, 37, cols, seed=9))
    x = torch.randn(70, cols, generator=torch.Generator().manual_seed(5))
    try:
        assert kernels.set_amx(True) == _amx_here()
        tiles = kernels.qmatmul_q8(x, raw, t, cols)
        kernels.set_amx(False)
        assert torch.equal(kernels.qmatmul_q8(x, raw, t, cols), tiles)
    finally:
        kernels.set_amx(True)
    for n in (16, 33, 64):
        assert torch.equal(kernels.qmatmul_q8(x[:n], raw, t, cols), tiles[:n])
    assert torch.equal(kernels.qmatmul_q8(x[7:8], raw, t, cols), tiles[7:8])
    assert torch.equal(kernels.qmatmul_q8(x, raw[3:30], t, cols), tiles[:, 3:30])  # rows grouped otherwise
    assert_close_rel(tiles, linear_q8_ref(x, QuantWeight(raw, t, (cols, 37))), rel=2e-6)


@pytest.mark.parametrize("t", C_TYPES, ids=lambda t: t.name)
def test_take_rows_equals_its_twin_bit_for_bit(t):
    raw = blocks(t, 40, 512, seed=12)
    w = QuantWeight(torch.from_numpy(raw), t, (512, 40))
    ids = torch.tensor([3, 0, 39, 3])
    assert_bit_equal(take_rows(w, ids), take_rows_ref(w, ids).numpy())


@pytest.mark.parametrize("T", [1, 3])
def test_delta_rule_in_c_equals_the_recurrent_twin(T):
    from lemonslice.models.gated_delta import delta_rule_recurrent, delta_rule_steps

    gen = torch.Generator().manual_seed(T)
    H, Dk, Dv = 4, 32, 48
    q, k = (torch.nn.functional.normalize(torch.randn(T, H, Dk, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(T, H, Dv, generator=gen)
    g, beta = -torch.rand(T, H, generator=gen), torch.rand(T, H, generator=gen)
    state = torch.randn(H, Dk, Dv, generator=gen)
    before = state.clone()
    o, s = delta_rule_steps(q, k, v, g, beta, state)
    o_ref, s_ref = delta_rule_recurrent(q, k, v, g, beta, state)
    assert_close_rel(o, o_ref, rel=1e-5)
    assert_close_rel(s, s_ref, rel=1e-5)
    assert torch.equal(state, before)  # a rewind keeps the old state: it is not written


def test_delta_rule_in_c_flushes_denormal_states():
    # exp(-95) is a denormal: a state decayed by it would run on x86's slow path for denormals.
    from lemonslice.models.gated_delta import delta_rule_recurrent, delta_rule_steps

    gen = torch.Generator().manual_seed(1)
    H, D, T = 2, 16, 1
    q, k = (torch.nn.functional.normalize(torch.randn(T, H, D, generator=gen), dim=-1) for _ in range(2))
    v, beta = torch.zeros(T, H, D), torch.rand(T, H, generator=gen)
    g = torch.full((T, H), -95.0)
    state = torch.randn(H, D, D, generator=gen)
    o, s = delta_rule_steps(q, k, v, g, beta, state)
    o_ref, s_ref = delta_rule_recurrent(q, k, v, g, beta, state)
    assert ((s_ref != 0) & (s_ref.abs() < torch.finfo(torch.float32).tiny)).any()  # the twin keeps denormals
    assert torch.equal(s, torch.zeros_like(s)) and torch.equal(o, torch.zeros_like(o))
    assert float((s - s_ref).abs().max()) < torch.finfo(torch.float32).tiny
    assert torch.equal(torch.tensor([1e-40]) * 1, torch.tensor([1e-40]))  # the caller's thread is left as it was


def test_rms_norm_and_one_position_attention_in_c_equal_torch():
    from lemonslice.models.caches import KVRows
    from lemonslice.models.qwen35_layers import attend_one, attend_ref

    gen = torch.Generator().manual_seed(8)
    x, w = torch.randn(3, 5, 640, generator=gen), torch.randn(640, generator=gen)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert_close_rel(kernels.rms_norm(x, w, 1e-6), want, rel=1e-6)
    for S in (1, 37, 5000):  # 5000 keys: the scores no longer fit the kernel's stack buffer
        q = torch.randn(1, 8, 64, generator=gen)
        cache = torch.randn(S + 3, 2, 2, 64, generator=gen)  # [S, K/V, Hkv, D]: strided rows, as a cache
        k, v = cache[:S, 0], cache[:S, 1]
        got = attend_one(q, KVRows(k, v, 0, ("f32", "f32"), 2, 64), 0, S, 64**-0.5)
        assert torch.equal(got, kernels.attend_one(q, k, v, 64**-0.5, 2))  # the C kernel took it
        assert_close_rel(got, attend_ref(q, k, v, S - 1), rel=1e-5)


def test_f32_rows_do_not_depend_on_the_batch():
    raw = torch.from_numpy(blocks(T.F32, 300, 640, seed=2))
    w = QuantWeight(raw, T.F32, (640, 300))
    x = torch.randn(5, 640, generator=torch.Generator().manual_seed(1))
    together = linear(x, w)
    for i in range(5):
        assert torch.equal(linear(x[i : i + 1], w)[0], together[i])
    assert_close_rel(together, linear_ref(x, w), rel=2e-6)


def test_deltanet_gates_in_c_equal_torch():
    gen = torch.Generator().manual_seed(4)
    alpha, b = torch.randn(3, 32, generator=gen) * 8, torch.randn(3, 32, generator=gen) * 4
    a, dt_bias = -torch.rand(32, generator=gen) * 4, torch.randn(32, generator=gen)
    g, beta = kernels.deltanet_gates(alpha, b, a, dt_bias)
    assert_close_rel(g, a * torch.nn.functional.softplus(alpha + dt_bias), rel=1e-6)
    assert_close_rel(beta, torch.sigmoid(b), rel=1e-6)


@pytest.mark.parametrize("D, rope", [(256, 64), (256, 256)])
def test_rope_tables_equal_apply_rope(D, rope):
    from lemonslice.models.qwen35_layers import _inv_freq, apply_rope, rope_tables, rotate

    inv = _inv_freq(1e4, rope)
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(D + rope))
    cos, sin = rope_tables(inv, 17, 3, D)
    assert_close_rel(rotate(x, cos, sin, rope // 2), apply_rope(x, torch.arange(17, 20), inv), rel=1e-6)
