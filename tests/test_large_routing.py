"""write_large_random's routing knobs (router_skew, centered) and project_routers, read back
with gguf-py as the independent reader."""

from __future__ import annotations

import gguf
import numpy as np

from lemonslice.testing import write_large_random
from lemonslice.testing.large import project_routers

# Small shapes (a 4.5 MB file): 2 layers, 32 experts, so that the 3/32 hot set is 3 experts.
KW = dict(
    n_vocab=512, n_expert=32, n_embd=256, n_ff_exp=256, n_ff_shexp=256, n_ff=256, head_dim=64, n_head=4,
    n_head_kv=1, rope_dim=32, rope_sections=(6, 6, 4, 0), ssm_d_state=32, ssm_n_group=2, ssm_dt_rank=4,
    pool_bytes=1 << 16,
)
ROUTERS = {"blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate_inp.weight"}


def tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_defaults_write_the_same_bytes(tmp_path):
    plain = write_large_random(tmp_path / "a.gguf", 2, **KW).read_bytes()
    zero = write_large_random(tmp_path / "b.gguf", 2, router_skew=0.0, centered=False, **KW).read_bytes()
    assert plain == zero


def test_router_skew_scales_only_router_rows(tmp_path):
    base = tensors(write_large_random(tmp_path / "a.gguf", 2, **KW))
    skewed = tensors(write_large_random(tmp_path / "b.gguf", 2, router_skew=0.9, **KW))
    assert base.keys() == skewed.keys() and ROUTERS <= base.keys()
    for name in base.keys() - ROUTERS:
        assert base[name].data.tobytes() == skewed[name].data.tobytes(), name
    hot = []
    for name in sorted(ROUTERS):
        a, b = np.asarray(base[name].data), np.asarray(skewed[name].data)  # [X, E]: one row per expert
        assert a.shape == (32, 256)
        ratio = b / a
        np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-6)  # whole rows
        row = ratio[:, 0]
        is_hot = np.isclose(row, np.exp(0.9), rtol=1e-6)
        assert (is_hot | np.isclose(row, 1.0, rtol=1e-6)).all()
        assert is_hot.sum() == 3  # 3/32 of the experts
        hot.append(set(np.flatnonzero(is_hot)))
    assert hot[0] != hot[1]  # each layer has its own popular experts


def test_centered_makes_k_quant_weights_zero_mean(tmp_path):
    base = tensors(write_large_random(tmp_path / "a.gguf", 2, **KW))
    cen = tensors(write_large_random(tmp_path / "b.gguf", 2, centered=True, **KW))
    checked = 0
    for name, t in cen.items():
        if t.tensor_type not in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K):
            assert t.data.tobytes() == base[name].data.tobytes(), name  # F32, Q6_K: as before
            continue
        if t.n_elements < 1 << 16:  # too few blocks for the mean to settle
            continue
        before = gguf.quants.dequantize(np.asarray(base[name].data), t.tensor_type)
        after = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        # dmin = d left every weight a positive mean; dmin = d * mean quant removes it.
        assert before.mean() > 0.5 * before.std(), name
        assert abs(after.mean()) < 0.05 * after.std(), name
        checked += 1
    assert checked >= 10


def test_project_routers_removes_one_direction(tmp_path):
    p = write_large_random(tmp_path / "a.gguf", 2, **KW)
    before = tensors(p)
    old = {n: np.array(before[n].data, dtype=np.float64) for n in ROUTERS}
    c = np.random.default_rng(0).standard_normal(256) * 3.0  # not unit length
    project_routers(p, {1: c})
    after = tensors(p)
    for name in after.keys() - {"blk.1.ffn_gate_inp.weight"}:
        assert after[name].data.tobytes() == before[name].data.tobytes(), name
    new = np.asarray(after["blk.1.ffn_gate_inp.weight"].data, dtype=np.float64)  # [X, E]
    u = c / np.linalg.norm(c)
    w = old["blk.1.ffn_gate_inp.weight"]
    assert np.abs(new @ u).max() < 1e-5 * np.abs(w @ u).max()
    np.testing.assert_allclose(new + np.outer(w @ u, u), w, atol=1e-6)
