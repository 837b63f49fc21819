"""`lemonslice convert` (Hugging Face Qwen3.5 -> GGUF) against llama.cpp's own converter.

Tiny random checkpoints (tests/hf_models.py: 8 layers, 2 full-attention, 2 K vs 4 V linear
heads, MoE or dense, with or without an MTP block) are converted by lemonslice and by
`convert_hf_to_gguf.py` from the llama-cpp-python 0.3.36 sdist. The files must agree on
tensor names, shapes, types and bytes, and on every KV key llama.cpp reads. Other output
types are checked against the F32 conversion with gguf-py's dequantizers, and a few
transforms are checked by hand against the safetensors values.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_models import HFSpec, hf_model  # noqa: F401 (hf_model is a fixture)
from lemonslice.convert import convert_hf
from lemonslice.errors import LemonsliceError
from llama_sdist import llama_convert_hf

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
MOE, DENSE, MOE_MTP = HFSpec(), HFSpec(moe=False), HFSpec(mtp=True)
FUSED_VL = HFSpec(mtp=True, fused_experts=True, conditional=True)  # same weights as MOE_MTP
# general.* keys llama.cpp reads; the others (name, size label, ...) are informational.
GENERAL_READ = {"general.architecture", "general.alignment", "general.file_type", "general.quantization_version"}
F32_KINDS = (
    "_norm.weight", "ssm_a", "ssm_dt.bias", "ssm_conv1d.weight", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight",
)


@pytest.fixture(scope="session")
def ours(hf_model, tmp_path_factory):
    """`ours(spec, out_type, mtp)` -> lemonslice's conversion, made once per worker."""
    made: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("ours")

    def get(spec: HFSpec, out_type: str = "f32", mtp: bool = True) -> Path:
        key = (spec, out_type, mtp)
        if key not in made:
            made[key] = convert_hf(hf_model(spec), root / f"{spec.name}-{out_type}-{mtp}.gguf", out_type, mtp=mtp).path
        return made[key]

    return get


def read_kvs(r: gguf.GGUFReader) -> dict:
    return {
        k: ([gguf.GGUFValueType(t).name for t in f.types], f.contents())
        for k, f in r.fields.items()
        if not k.startswith("GGUF.") and (not k.startswith("general.") or k in GENERAL_READ)
    }


def assert_same_gguf(a: Path, b: Path) -> None:
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ka, kb = read_kvs(ra), read_kvs(rb)
    assert sorted(ka) == sorted(kb)
    for k in ka:
        assert ka[k] == kb[k], k
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    assert sorted(ta) == sorted(tb)
    for name, x in ta.items():
        y = tb[name]
        assert (list(x.shape), x.tensor_type) == (list(y.shape), y.tensor_type), name
        assert np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes(), name


@pytest.mark.parametrize("spec", [MOE, DENSE, MOE_MTP], ids=lambda s: s.name)
def test_f32_matches_llama_cpp(spec, hf_model, ours, tmp_path):
    # Without MTP tensors llama.cpp's converter needs --no-mtp (it asserts an MTP block exists).
    ref = llama_convert_hf(hf_model(spec), tmp_path / "ref.gguf", "f32", *(() if spec.mtp else ("--no-mtp",)))
    assert_same_gguf(ours(spec), ref)


def test_llama_cpp_runs_our_conversion(hf_model, ours):
    """End to end: llama.cpp's logits on our GGUF are transformers' logits on the checkpoint, and
    its tokenizer (built from our metadata) splits text as the Hugging Face tokenizer does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_ref import llama_logits, llama_tokenize

    src, path = hf_model(MOE_MTP), ours(MOE_MTP)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 400, 16)]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(llama_logits(path, ids), ref, atol=2e-3 * np.abs(ref).max(), rtol=0)
    text = "Hello world! The quick brown fox 123 <|im_start|>user\n<think>hi</think><|im_end|>"
    expected = AutoTokenizer.from_pretrained(src).encode(text)
    assert list(llama_tokenize(path, text, add_special=False, parse_special=True)) == expected


def test_checkpoint_layouts_agree(ours):
    """Fused experts + a ...ForConditionalGeneration checkpoint (vision weights, language_model.
    prefix) give the same file as per-expert weights in a ...ForCausalLM one; --no-mtp drops the
    MTP block and its keys entirely."""
    assert_same_gguf(ours(FUSED_VL), ours(MOE_MTP))
    assert_same_gguf(ours(MOE_MTP, mtp=False), ours(MOE))


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_types_within_error(out_type, ours):
    ref = {t.name: t for t in gguf.GGUFReader(ours(MOE_MTP)).tensors}
    got = gguf.GGUFReader(ours(MOE_MTP, out_type))
    assert sorted(t.name for t in got.tensors) == sorted(ref)
    for t in got.tensors:
        x = np.asarray(ref[t.name].data, dtype=np.float32)
        if x.ndim <= 1 or t.name.endswith(F32_KINDS):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            assert np.array_equal(np.asarray(t.data), x), t.name
            continue
        assert t.tensor_type.name == out_type.upper(), t.name
        y = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(x.shape)
        if out_type == "q8_0":
            # Per 32-block: |error| <= scale/2, plus the f16 rounding of the scale.
            amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
            bound = (amax / 127 * (0.5 + 127 * 2.0**-11)).repeat(32, axis=1).reshape(x.shape)
            assert np.all(np.abs(y - x) <= bound + 1e-12), t.name
        else:
            rel = 2.0**-11 if out_type == "f16" else 2.0**-8
            assert np.all(np.abs(y - x) <= np.abs(x) * rel + 2.0**-24), t.name


def test_bf16_sharded_checkpoint(hf_model, ours, tmp_path):
    """A bf16 checkpoint in two shards with an index: bf16 matrices pass through bit for bit
    (the V-head reorder only permutes them), 1-D tensors are computed in float32."""
    import json

    import torch
    from safetensors.torch import save_file as save_torch

    src = hf_model(DENSE)
    d = tmp_path / "bf16"
    d.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).symlink_to(f)
    weights = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in shards.items():
        save_torch({k: weights[k] for k in part}, d / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    got = {t.name: t for t in gguf.GGUFReader(convert_hf(d, tmp_path / "m.gguf", "bf16").path).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(ours(DENSE, "bf16")).tensors}
    assert sorted(got) == sorted(ref)
    for name, t in got.items():
        a, b = np.asarray(t.data), np.asarray(ref[name].data)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            assert a.tobytes() == b.tobytes(), name
        else:
            np.testing.assert_allclose(a, b, rtol=2.0**-7, atol=1e-6, err_msg=name)


def test_transforms_by_hand(hf_model, ours):
    """A few values recomputed from the safetensors, independently of both converters."""
    hf = load_file(hf_model(MOE_MTP) / "model.safetensors")
    r = gguf.GGUFReader(ours(MOE_MTP))
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    n_k, n_v, d = 2, 4, 64
    tiled = [g * (n_v // n_k) + j for j in range(n_v // n_k) for g in range(n_k)]  # tiled slot -> grouped head
    rows = np.concatenate([np.arange(h * d, (h + 1) * d) for h in tiled])
    p = "model.layers.0.linear_attn."
    np.testing.assert_allclose(t["blk.0.ssm_a"], -np.exp(hf[p + "A_log"])[tiled], rtol=1e-6)  # exp: 1 ulp apart
    np.testing.assert_array_equal(t["blk.0.ssm_dt.bias"], hf[p + "dt_bias"][tiled])
    np.testing.assert_array_equal(t["blk.0.ssm_beta.weight"], hf[p + "in_proj_b.weight"][tiled])
    qkv = hf[p + "in_proj_qkv.weight"]
    qk = 2 * n_k * d  # Q and K rows/channels keep their order
    np.testing.assert_array_equal(t["blk.0.attn_qkv.weight"], np.concatenate([qkv[:qk], qkv[qk:][rows]]))
    np.testing.assert_array_equal(t["blk.0.ssm_conv1d.weight"][qk:], hf[p + "conv1d.weight"][qk:, 0][rows])
    np.testing.assert_array_equal(t["blk.0.ssm_out.weight"], hf[p + "out_proj.weight"][:, rows])
    np.testing.assert_array_equal(t["blk.0.ssm_norm.weight"], hf[p + "norm.weight"])  # gated norm: no +1
    np.testing.assert_array_equal(t["blk.0.attn_norm.weight"], hf["model.layers.0.input_layernorm.weight"] + 1)
    np.testing.assert_array_equal(t["blk.3.attn_q_norm.weight"], hf["model.layers.3.self_attn.q_norm.weight"] + 1)
    down = hf["model.layers.2.mlp.experts.3.down_proj.weight"]
    np.testing.assert_array_equal(t["blk.2.ffn_down_exps.weight"][3], down)
    # MTP: block 8 is a full-attention block plus the nextn tensors.
    np.testing.assert_array_equal(t["blk.8.attn_q.weight"], hf["mtp.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(t["blk.8.ffn_gate_exps.weight"][1], hf["mtp.layers.0.mlp.experts.1.gate_proj.weight"])
    np.testing.assert_array_equal(t["blk.8.nextn.eh_proj.weight"], hf["mtp.fc.weight"])
    np.testing.assert_array_equal(t["blk.8.nextn.enorm.weight"], hf["mtp.pre_fc_norm_embedding.weight"] + 1)
    np.testing.assert_array_equal(t["blk.8.nextn.shared_head_norm.weight"], hf["mtp.norm.weight"] + 1)
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["qwen35moe.block_count"] == 9 and kv["qwen35moe.nextn_predict_layers"] == 1
    assert kv["qwen35moe.attention.recurrent_layers"] == [True, True, True, False] * 2 + [False]
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    eos = kv["tokenizer.ggml.eos_token_id"]
    assert tokens[eos] == "<|im_end|>" and types[eos] == gguf.TokenType.CONTROL
    assert types[tokens.index("<think>")] == gguf.TokenType.USER_DEFINED
    assert (tokens[-1], types[-1]) == (f"[PAD{len(tokens) - 1}]", gguf.TokenType.UNUSED)


def cli(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    cmd = [LEMONSLICE, "convert", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert all(w in lines[0] for w in words), lines[0]


def _broken(kind: str, src: Path, d: Path) -> tuple[Path, tuple[str, ...]]:
    """A bad input of the given kind, made from the checkpoint `src`, and words its error names."""
    if kind == "missing-dir":
        return d / "nope", ("no such directory",)
    d.mkdir()
    if kind == "missing-config":
        shutil.copy(src / "model.safetensors", d)
        return d, ("no config.json",)
    for f in src.iterdir():
        (d / f.name).symlink_to(f)
    (d / "config.json").unlink()
    text = (src / "config.json").read_text()
    if kind == "missing-tensor":
        (d / "config.json").write_text(text)
        (d / "model.safetensors").unlink()
        weights = load_file(src / "model.safetensors")
        del weights["model.layers.3.self_attn.q_proj.weight"]
        save_file(weights, d / "model.safetensors")
        return d, ("missing tensor", "model.layers.3.self_attn.q_proj.weight")
    arch = {"llama": "LlamaForCausalLM", "qwen3-next": "Qwen3NextForCausalLM"}[kind]
    (d / "config.json").write_text(text.replace("Qwen3_5ForCausalLM", arch))
    return d, ("unsupported architecture", arch)


@pytest.mark.parametrize("kind", ["missing-dir", "missing-config", "llama", "qwen3-next", "missing-tensor"])
def test_cli_bad_input(kind, hf_model, tmp_path):
    src, words = _broken(kind, hf_model(DENSE), tmp_path / "in")
    out = tmp_path / "out" / "m.gguf"
    assert_one_line_error(cli(src, out, "--type", "f32"), *words)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_cli_convert_and_force(hf_model, tmp_path):
    out = tmp_path / "m.gguf"
    r = cli(hf_model(MOE_MTP), out, "--type", "bf16")
    assert r.returncode == 0, r.stderr
    assert "qwen35moe, 8 layers + 1 MTP, 169 tensors" in r.stdout
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    before = out.read_bytes()
    assert_one_line_error(cli(hf_model(DENSE), out, "--type", "f32"), "exists", "--force")
    assert out.read_bytes() == before
    assert_one_line_error(cli(hf_model(DENSE), out, "--type", "q4_k"), "unknown output type")
    assert cli(hf_model(DENSE), out, "--type", "f32", "--force").returncode == 0
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "qwen35"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_missing_tensor_in_process(hf_model, tmp_path):
    """The API raises the same one-line LemonsliceError and leaves nothing behind."""
    src, _ = _broken("missing-tensor", hf_model(DENSE), tmp_path / "in")
    with pytest.raises(LemonsliceError, match=r"missing tensor model\.layers\.3\.self_attn\.q_proj\.weight$"):
        convert_hf(src, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()
