"""The synthetic Qwen3.5 GGUF factory (lemonslice.testing).

Expected names, shapes and KV keys below are written out by hand from llama.cpp's layout
(the qwen35 / qwen35moe fact sheet), not taken from the factory's own tables.
"""

from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import pytest

from lemonslice.gguf import GGMLType, GGUFReader, ValueType
from lemonslice.gguf.constants import Role, classify_block
from lemonslice.testing import (
    build_vocab,
    byte_unicode,
    fallbacks,
    synthetic_tensors,
    tensor_values,
    tiny_qwen35,
    tiny_qwen35moe,
    write_large_random,
    write_synthetic,
)

T = GGMLType

# A config with distinct sizes, so a transposed shape cannot pass:
# E=96, V=300, H=4, Hkv=2, D=16, ssm: d_state 16, 2 K heads, 4 V heads (key_dim 32,
# value_dim 64, conv_dim 128), conv kernel 3, 4 experts of 64, shared expert 32, dense n_ff 160.
SIZES = dict(
    n_layer=4, n_embd=96, n_vocab=300, n_head=4, n_head_kv=2, head_dim=16, ssm_d_state=16,
    ssm_n_group=2, ssm_dt_rank=4, ssm_conv_kernel=3, n_ff=160,
)
MOE_SIZES = dict(SIZES, n_expert=4, n_expert_used=2, n_ff_exp=64, n_ff_shexp=32)

SHARED = {"token_embd.weight": (96, 300), "output_norm.weight": (96,), "output.weight": (96, 300)}
NORMS = {"attn_norm.weight": (96,), "post_attention_norm.weight": (96,)}
RECURRENT = {
    "attn_qkv.weight": (96, 128), "attn_gate.weight": (96, 64), "ssm_conv1d.weight": (3, 128),
    "ssm_dt.bias": (4,), "ssm_a": (4,), "ssm_beta.weight": (96, 4), "ssm_alpha.weight": (96, 4),
    "ssm_norm.weight": (16,), "ssm_out.weight": (64, 96),
}
ATTENTION = {
    "attn_q.weight": (96, 128), "attn_k.weight": (96, 32), "attn_v.weight": (96, 32),
    "attn_output.weight": (64, 96), "attn_q_norm.weight": (16,), "attn_k_norm.weight": (16,),
}
MOE = {
    "ffn_gate_inp.weight": (96, 4), "ffn_gate_exps.weight": (96, 64, 4), "ffn_up_exps.weight": (96, 64, 4),
    "ffn_down_exps.weight": (64, 96, 4), "ffn_gate_inp_shexp.weight": (96,), "ffn_gate_shexp.weight": (96, 32),
    "ffn_up_shexp.weight": (96, 32), "ffn_down_shexp.weight": (32, 96),
}
DENSE = {"ffn_gate.weight": (96, 160), "ffn_up.weight": (96, 160), "ffn_down.weight": (160, 96)}
NEXTN = {
    "nextn.eh_proj.weight": (192, 96), "nextn.enorm.weight": (96,), "nextn.hnorm.weight": (96,),
    "nextn.shared_head_norm.weight": (96,),
}


def expected_layout(moe: bool, mtp: bool) -> dict[str, tuple[int, ...]]:
    ffn = MOE if moe else DENSE
    out = dict(SHARED)
    blocks = [RECURRENT, RECURRENT, RECURRENT, ATTENTION] + ([ATTENTION] if mtp else [])
    for b, mixer in enumerate(blocks):
        extra = NEXTN if b == 4 else {}
        out.update({f"blk.{b}.{k}": v for k, v in {**NORMS, **mixer, **ffn, **extra}.items()})
    return out


def shapes_ours(path) -> dict[str, tuple[int, ...]]:
    with GGUFReader(path) as r:
        return {t.name: t.shape for t in r.tensors}


def shapes_gguf_py(path) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("mtp", [False, True])
def test_layout_matches_llama_cpp(tmp_path, moe, mtp):
    cfg = (tiny_qwen35moe(**MOE_SIZES) if moe else tiny_qwen35(**SIZES)).replace(mtp=mtp)
    p = write_synthetic(tmp_path / "m.gguf", cfg)
    want = expected_layout(moe, mtp)
    assert shapes_ours(p) == want
    assert shapes_gguf_py(p) == want
    per_block = {b: [n for n in want if n.startswith(f"blk.{b}.")] for b in range(cfg.block_count)}
    counts = [len(v) for v in per_block.values()]
    if moe:
        assert counts[:4] == [19, 19, 19, 16]
    else:
        assert counts[:4] == [14, 14, 14, 11]
    if mtp:
        assert counts[4] == (20 if moe else 15)
    roles = [classify_block(per_block[b], hybrid=True) for b in range(cfg.block_count)]
    assert roles == [Role.RECURRENT] * 3 + [Role.ATTENTION] + ([Role.MTP] if mtp else [])
    assert roles == cfg.layer_roles()


def test_kv_keys_and_types(tmp_path):
    cfg = tiny_qwen35moe(**MOE_SIZES, mtp=True)
    p = write_synthetic(tmp_path / "m.gguf", cfg)
    U32, F32 = ValueType.UINT32, ValueType.FLOAT32
    want = {
        "general.architecture": (ValueType.STRING, "qwen35moe"),
        "qwen35moe.block_count": (U32, 5),
        "qwen35moe.nextn_predict_layers": (U32, 1),
        "qwen35moe.context_length": (U32, 4096),
        "qwen35moe.embedding_length": (U32, 96),
        "qwen35moe.feed_forward_length": (U32, 160),
        "qwen35moe.attention.head_count": (U32, 4),
        "qwen35moe.attention.head_count_kv": (U32, 2),
        "qwen35moe.attention.key_length": (U32, 16),
        "qwen35moe.attention.value_length": (U32, 16),
        "qwen35moe.attention.layer_norm_rms_epsilon": (F32, pytest.approx(1e-6)),
        "qwen35moe.rope.freq_base": (F32, pytest.approx(1e7)),
        "qwen35moe.rope.dimension_count": (U32, 8),
        "qwen35moe.expert_count": (U32, 4),
        "qwen35moe.expert_used_count": (U32, 2),
        "qwen35moe.expert_feed_forward_length": (U32, 64),
        "qwen35moe.expert_shared_feed_forward_length": (U32, 32),
        "qwen35moe.ssm.conv_kernel": (U32, 3),
        "qwen35moe.ssm.state_size": (U32, 16),
        "qwen35moe.ssm.group_count": (U32, 2),
        "qwen35moe.ssm.time_step_rank": (U32, 4),
        "qwen35moe.ssm.inner_size": (U32, 64),
        "qwen35moe.full_attention_interval": (U32, 4),
        "tokenizer.ggml.model": (ValueType.STRING, "gpt2"),
        "tokenizer.ggml.pre": (ValueType.STRING, "qwen35"),
        "tokenizer.ggml.bos_token_id": (U32, 297),
        "tokenizer.ggml.eos_token_id": (U32, 299),
    }
    with GGUFReader(p) as r:
        for key, (vtype, value) in want.items():
            assert r.kv[key].vtype == vtype, key
            assert r.get(key) == value, key
        sec = r.kv["qwen35moe.rope.dimension_sections"]
        assert (sec.vtype, sec.item_type) == (ValueType.ARRAY, ValueType.INT32)
        assert list(sec.value) == [2, 1, 1, 0]
        tokens = r.get("tokenizer.ggml.tokens")
        assert r.kv["tokenizer.ggml.token_type"].item_type == ValueType.INT32
        assert len(r.get("tokenizer.ggml.token_type")) == len(tokens) == 300
        assert tokens[299] == "<|im_end|>" and tokens[297] == "<|endoftext|>"
    g = gguf.GGUFReader(p)
    assert g.fields["qwen35moe.ssm.inner_size"].contents() == 64
    assert len(g.fields["tokenizer.ggml.merges"].contents()) == 300 - 256 - 3
    # Dense: no expert keys.
    d = write_synthetic(tmp_path / "d.gguf", tiny_qwen35(**SIZES))
    with GGUFReader(d) as r:
        assert r.get("general.architecture") == "qwen35"
        assert r.get("qwen35.feed_forward_length") == 160
        assert "qwen35.expert_count" not in r.kv and "qwen35.nextn_predict_layers" not in r.kv


@pytest.mark.parametrize("n_vocab", [300, 2000])
def test_tokenizer_is_consistent(n_vocab):
    v = build_vocab(n_vocab)
    assert len(v.tokens) == len(set(v.tokens)) == len(v.token_types) == n_vocab
    assert set(v.tokens[:256]) == set(byte_unicode()) and len(set(byte_unicode())) == 256
    assert v.tokens[0] == "!" and byte_unicode()[32] == "\u0120"  # GPT-2's byte order and "Ġ"
    index = {t: i for i, t in enumerate(v.tokens)}
    for m in v.merges:
        a, b = m.split(" ")
        assert index[a] < index[a + b] and index[b] < index[a + b]
    assert v.token_types[-3:] == [3, 3, 3] and set(v.token_types[:-3]) == {1}
    if n_vocab == 2000:
        assert "<tok_1996>" in index


def test_deterministic(tmp_path):
    cfg = tiny_qwen35moe(mtp=True, default_type="Q4_0")
    a = write_synthetic(tmp_path / "a.gguf", cfg).read_bytes()
    b = write_synthetic(tmp_path / "b.gguf", tiny_qwen35moe(mtp=True, default_type="Q4_0")).read_bytes()
    c = write_synthetic(tmp_path / "c.gguf", cfg.replace(seed=1)).read_bytes()
    assert a == b
    assert a != c and len(a) == len(c)


def test_mixed_types_honoured(tmp_path):
    cfg = tiny_qwen35moe(
        **MOE_SIZES, mtp=True, default_type="F16",
        type_overrides={"experts": "Q4_0", "attention": T.Q8_0, "ffn_down_exps": "MXFP4", "router": "BF16"},
    )
    p = write_synthetic(tmp_path / "m.gguf", cfg)
    with GGUFReader(p) as r:
        types = {t.name: t.ggml_type for t in r.tensors}
    want = {
        "blk.0.ffn_gate_exps.weight": T.Q4_0, "blk.0.ffn_up_exps.weight": T.Q4_0,
        "blk.0.ffn_down_exps.weight": T.MXFP4, "blk.3.attn_q.weight": T.Q8_0,
        "blk.3.attn_output.weight": T.Q8_0, "blk.4.attn_k.weight": T.Q8_0, "blk.0.ffn_gate_inp.weight": T.BF16,
        "blk.0.attn_qkv.weight": T.F16, "blk.0.ssm_out.weight": T.F16, "token_embd.weight": T.F16,
        "output.weight": T.F16, "blk.4.nextn.eh_proj.weight": T.F16, "blk.0.ffn_gate_shexp.weight": T.F16,
        "blk.0.ssm_a": T.F32, "blk.0.ssm_dt.bias": T.F32, "blk.0.ssm_conv1d.weight": T.F32,
        "blk.0.ssm_norm.weight": T.F32, "blk.3.attn_q_norm.weight": T.F32, "output_norm.weight": T.F32,
        "blk.0.ffn_gate_inp_shexp.weight": T.F32, "blk.4.nextn.enorm.weight": T.F32,
    }
    assert {n: types[n] for n in want} == want
    assert all(types[n] == T.F32 for n, s in expected_layout(True, True).items() if len(s) == 1)
    assert not fallbacks(cfg)


def test_block_size_fallback(tmp_path):
    # Shared expert of width 48: ffn_down_shexp rows (48) do not split into 32-blocks.
    cfg = tiny_qwen35moe(n_ff_shexp=48, default_type="Q4_0")
    p = write_synthetic(tmp_path / "m.gguf", cfg)
    fb = {t.name for t in fallbacks(cfg)}
    assert fb == {f"blk.{b}.ffn_down_shexp.weight" for b in range(8)}
    assert all(t.requested_type == T.Q4_0 and t.ggml_type == T.F16 for t in fallbacks(cfg))
    with GGUFReader(p) as r:
        assert r.tensor_map["blk.0.ffn_down_shexp.weight"].ggml_type == T.F16
        assert r.tensor_map["blk.0.ffn_up_shexp.weight"].ggml_type == T.Q4_0
    # A 256-element block type does not fit n_embd=64 anywhere: every matrix falls back.
    cfg = tiny_qwen35(default_type="TQ2_0")
    write_synthetic(tmp_path / "t.gguf", cfg)
    assert len(fallbacks(cfg)) == sum(1 for t in synthetic_tensors(cfg) if t.ggml_type != T.F32)


def test_values_sane_and_round_trip(tmp_path):
    cfg = tiny_qwen35moe(default_type="F16", type_overrides={"experts": "Q8_0"})
    p = write_synthetic(tmp_path / "m.gguf", cfg)
    g = {t.name: t for t in gguf.GGUFReader(p).tensors}
    for spec in synthetic_tensors(cfg):
        t = g[spec.name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(spec.shape)))
        want = tensor_values(cfg, spec.slot)
        assert np.isfinite(got).all(), spec.name
        np.testing.assert_allclose(got, want, atol=0.02 if spec.ggml_type == T.Q8_0 else 2e-3, rtol=2e-3)
        kind = spec.slot.kind
        if kind.endswith("norm"):
            assert 0.7 < got.min() and got.max() < 1.3, spec.name
        elif kind == "ssm_a":
            assert (got < 0).all()
        elif len(spec.shape) >= 2 and kind != "ssm_conv1d":
            assert 0.01 < got.std() < 0.15, spec.name


def test_large_random_opens(tmp_path):
    p = write_large_random(
        tmp_path / "big.gguf", 2, n_vocab=1024, n_expert=2, mtp=True, pool_bytes=1 << 20,
        full_attention_interval=2,
    )
    # Real Qwen3.5-35B-A3B sizes: E=2048, H=16, Hkv=2, D=256, ssm d_state 128, 16 K heads,
    # 32 V heads (key_dim 2048, value_dim 4096, conv_dim 8192), Fe=Fs=512.
    want = {
        "token_embd.weight": ((2048, 1024), {T.Q4_K}), "output.weight": ((2048, 1024), {T.Q6_K}),
        "output_norm.weight": ((2048,), {T.F32}),
        "blk.0.attn_qkv.weight": ((2048, 8192), {T.Q5_K}), "blk.0.attn_gate.weight": ((2048, 4096), {T.Q4_K}),
        "blk.0.ssm_conv1d.weight": ((4, 8192), {T.F32}), "blk.0.ssm_a": ((32,), {T.F32}),
        "blk.0.ssm_alpha.weight": ((2048, 32), {T.Q4_K}), "blk.0.ssm_norm.weight": ((128,), {T.F32}),
        "blk.0.ssm_out.weight": ((4096, 2048), {T.Q4_K}), "blk.0.ffn_gate_inp.weight": ((2048, 2), {T.F32}),
        "blk.0.ffn_gate_exps.weight": ((2048, 512, 2), {T.Q4_K}),
        "blk.0.ffn_down_exps.weight": ((512, 2048, 2), {T.Q4_K, T.Q6_K}),
        "blk.0.ffn_down_shexp.weight": ((512, 2048), {T.Q4_K, T.Q6_K}),
        "blk.1.attn_q.weight": ((2048, 8192), {T.Q4_K}), "blk.1.attn_k.weight": ((2048, 512), {T.Q4_K}),
        "blk.1.attn_v.weight": ((2048, 512), {T.Q4_K, T.Q6_K}), "blk.1.attn_output.weight": ((4096, 2048), {T.Q4_K}),
        "blk.1.attn_q_norm.weight": ((256,), {T.F32}), "blk.2.nextn.eh_proj.weight": ((4096, 2048), {T.Q4_K}),
    }
    with GGUFReader(p) as r:
        got = {t.name: t for t in r.tensors}
        assert r.get("qwen35moe.block_count") == 3 and r.get("qwen35moe.nextn_predict_layers") == 1
        assert r.get("qwen35moe.ssm.inner_size") == 4096 and r.get("qwen35moe.attention.key_length") == 256
        assert list(r.get("qwen35moe.rope.dimension_sections")) == [11, 11, 10, 0]
        assert len(r.get("tokenizer.ggml.tokens")) == 1024
        assert r.data_offset + max(t.offset + t.n_bytes for t in r.tensors) <= r.file_size
    for name, (shape, types) in want.items():
        assert got[name].shape == shape and got[name].ggml_type in types, name
    assert len([n for n in got if n.startswith("blk.0.")]) == 19
    assert len([n for n in got if n.startswith("blk.1.")]) == 16
    assert len([n for n in got if n.startswith("blk.2.")]) == 20
    g = gguf.GGUFReader(p)
    assert {t.name for t in g.tensors} == set(got)
    for t in g.tensors:  # a few rows of every tensor dequantize to finite, modest numbers
        rows = np.asarray(t.data).reshape(-1, t.data.shape[-1])[:4]
        d = gguf.quants.dequantize(rows, t.tensor_type)
        assert np.isfinite(d).all() and np.abs(d).max() < 20, t.name


def test_large_random_deterministic(tmp_path):
    kw = dict(n_vocab=512, n_expert=1, pool_bytes=1 << 20)
    a = write_large_random(tmp_path / "a.gguf", 1, **kw).read_bytes()
    b = write_large_random(tmp_path / "b.gguf", 1, **kw).read_bytes()
    c = write_large_random(tmp_path / "c.gguf", 1, seed=1, **kw).read_bytes()
    assert a == b and a != c and len(a) == len(c)
