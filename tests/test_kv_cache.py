"""KV-cache storage types and sliding-window caches.

References: gguf-py's Q8_0 quantizer (bit for bit), round-to-nearest-even by hand for the
float types, the torch twin of the C attention over stored rows, and a full cache with a
mask (every position kept, the window applied by the attention) for the windowed cache.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize

from lemonslice.errors import LemonsliceError
from lemonslice.models.caches import AttentionCache
from lemonslice.models.qwen35_layers import attend_kv, attend_one, attend_one_ref
from lemonslice.ops import kv

TYPES = list(kv.KV_TYPES)
LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("name", TYPES)
def test_codec(name):
    x = _rand(5, 2, 64)
    rows = kv.encode(x, name)
    assert rows[0].numel() * rows.element_size() == kv.bytes_per_position(name, 2, 64)
    back = kv.decode(rows, name, 2, 64)
    if name == "q8_0":  # ggml's blocks, as gguf-py writes them
        want = quantize(x.reshape(5, -1).numpy(), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(rows.numpy(), want)
        # half a step, plus 127 codes times the f16 scale's rounding (2^-11 relative)
        bound = x.reshape(5, -1, 32).abs().amax(-1, keepdim=True) / 127 * (0.5 + 127 * 2.0**-11) * 1.001
        assert ((back.reshape(5, -1, 32) - x.reshape(5, -1, 32)).abs() <= bound).all()
    else:
        ulp = {"f32": 0.0, "f16": 2.0**-11, "bf16": 2.0**-8}[name]  # half an ulp, relative
        assert ((back - x).abs() <= x.abs() * ulp).all()


@pytest.mark.parametrize("vt", TYPES)
@pytest.mark.parametrize("kt", TYPES)
def test_attention_over_stored_rows_equals_its_twin(kt, vt):
    cache = AttentionCache.empty(2, 64, types=(kt, vt))
    rows = cache.append(_rand(37, 2, 64, seed=1), _rand(37, 2, 64, seed=2))
    q = _rand(1, 6, 64, seed=3)
    for lo, hi in ((0, 37), (5, 37), (36, 37), (3, 20)):
        got, want = attend_one(q, rows, lo, hi, 0.125), attend_one_ref(q, rows, lo, hi, 0.125)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * want.abs().max().item())


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("kt", TYPES)
def test_a_few_query_rows_get_the_bits_of_each_row_alone(kt, window):
    # A verify pass (2-16 rows) attends its rows in one call; each must equal a one-token step.
    cache = AttentionCache.empty(2, 64, types=(kt, kt))
    rows = cache.append(_rand(30, 2, 64, seed=7), _rand(30, 2, 64, seed=8))
    q = _rand(5, 6, 64, seed=9)
    got = attend_kv(q, rows, 25, 0.125, window)  # positions 25..29
    for i in range(5):
        end = 26 + i
        alone = attend_one(q[i : i + 1], rows, max(0, end - window) if window else 0, end, 0.125)
        assert torch.equal(got[i : i + 1], alone), i


@pytest.mark.parametrize("step", [1, 5, 23])
def test_windowed_cache_equals_a_full_cache_with_a_mask(step):
    W, n, scale = 8, 120, 0.2
    k, v, q = _rand(n, 2, 16, seed=4), _rand(n, 2, 16, seed=5), _rand(n, 4, 16, seed=6)
    win, full = AttentionCache.empty(2, 16, window=W), AttentionCache.empty(2, 16)
    for s in range(0, n, step):
        e = min(n, s + step)
        a = attend_kv(q[s:e], win.append(k[s:e], v[s:e]), s, scale, W)
        b = attend_kv(q[s:e], full.append(k[s:e], v[s:e]), s, scale, W)
        assert torch.equal(a, b), f"positions {s}..{e}"
    # it holds its window (and a chunk), not the context
    assert win.k.shape[0] <= 2 * (W + step) and win.rows <= 2 * (W + step)
    assert full.rows == n


def test_windowed_cache_rewinds_to_a_mark_and_no_further():
    W = 4
    c = AttentionCache.empty(1, 8, window=W)
    for i in range(50):
        c.append(_rand(1, 1, 8, seed=i), _rand(1, 1, 8, seed=100 + i))
    c.mark()
    for i in range(50, 70):  # much more than the window since the mark
        c.append(_rand(1, 1, 8, seed=i), _rand(1, 1, 8, seed=100 + i))
    c.truncate(51)
    assert c.length == 51 and c.start <= 51 - W + 1
    # the rows after a rewind are what a cache that never went further holds
    ref = AttentionCache.empty(1, 8)
    for i in range(51):
        ref.append(_rand(1, 1, 8, seed=i), _rand(1, 1, 8, seed=100 + i))
    q = _rand(1, 2, 8, seed=7)
    nxt = (_rand(1, 1, 8, seed=51), _rand(1, 1, 8, seed=151))
    torch.testing.assert_close(attend_kv(q, c.append(*nxt), 51, 0.3, W), attend_kv(q, ref.append(*nxt), 51, 0.3, W),
                               rtol=0, atol=0)
    for i in range(52, 80):
        c.append(_rand(1, 1, 8, seed=i), _rand(1, 1, 8, seed=100 + i))
    with pytest.raises(LemonsliceError, match="sliding-window cache"):
        c.truncate(40)


def test_gemma_windowed_cache_equals_a_full_cache_past_its_window(gemma_path, monkeypatch):
    """Real Gemma 3 (window 512): 700 prompt tokens, then 6 decoded, with the windowed caches
    and with every layer keeping every position (the same attention mask)."""
    from lemonslice.engine import Engine

    ids = torch.randint(10, 200_000, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    e = Engine(gemma_path)
    windowed = e.generate(ids, 6)
    logits_w = e.logits(ids[-600:])
    caches = e.state.caches
    assert max(c.rows for c in caches if c.window) <= 2 * (512 + e.prefill_chunk)

    empty = AttentionCache.empty.__func__
    monkeypatch.setattr(AttentionCache, "empty", classmethod(
        lambda cls, h, d, window=0, types=None: empty(cls, h, d, 0, types)))
    full = e.generate(ids, 6)
    assert all(c.window == 0 for c in e.state.caches)
    assert full == windowed
    torch.testing.assert_close(e.logits(ids[-600:]), logits_w, rtol=1e-5, atol=1e-5)


def test_cli_rejects_an_unknown_cache_type(gemma_path):
    r = subprocess.run([LEMONSLICE, "run", str(gemma_path), "-p", "hi", "-n", "1", "-ctv", "q4_0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "error: unknown KV cache type 'q4_0'; choose one of f32, f16, bf16, q8_0"


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_f16_cache_decodes_as_f32_on_tiny_qwen35(tmp_path, dense, exact):
    """Greedy tokens of the tiny random Qwen3.5 models (full attention every 4th layer) with an f16
    cache equal those with the f32 one, with float activations: on the 8-bit path the rounding
    of activations flips these near-flat distributions' near ties by itself (tokens 11 and 13 here)."""
    from lemonslice.engine import Engine
    from lemonslice.models.caches import set_kv_types
    from lemonslice.testing import tiny_qwen35, tiny_qwen35moe, write_synthetic

    path = write_synthetic(tmp_path / "m.gguf", tiny_qwen35() if dense else tiny_qwen35moe())
    e = Engine(path)
    prompt = [3, 17, 101, 250, 7, 42, 11, 9]
    try:
        out = {}
        for t in ("f32", "f16"):
            set_kv_types(t, t)
            out[t] = e.generate(prompt, 48)
            assert all(c.types == (t, t) for c in e.state.caches if isinstance(c, AttentionCache))
    finally:
        set_kv_types("f32", "f32")
    assert out["f16"] == out["f32"]
