"""`lemonslice lora merge`: a PEFT LoRA adapter merged into chosen layers of a Qwen3.5 GGUF.

The adapters are made with `peft` on the tiny transformers models of `hf_models` (B non-zero,
attention, Gated DeltaNet, dense MLP, shared-expert, router and fused-expert weights targeted).
The reference is transformers with the adapter merged (`merge_and_unload`), on only the chosen
layers (`layers_to_transform`, and per-layer `target_parameters` for the experts, which
`layers_to_transform` does not reach). lemonslice runs the merged F32 GGUF.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_util import one_line_error
from hf_models import HFSpec, hf_model  # noqa: F401 (hf_model is a fixture)
from lemonslice.convert import convert_hf
from lemonslice.engine import Engine
from lemonslice.errors import LemonsliceError
from lemonslice.slicing.merge import merge_split
from lemonslice.slicing.split import split_gguf
from lemonslice.slicing.verify import verify_split
from lemonslice.surgery.lora import merge_lora

SPECS = {"qwen35": HFSpec(moe=False), "qwen35moe": HFSpec()}
SUBSET = (1, 2, 3)  # two Gated DeltaNet layers and a full-attention one (of 8)
IDS = [int(i) for i in np.random.default_rng(0).integers(0, 400, 12)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj",
           "gate_proj", "up_proj", "down_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]


def lora_config(moe: bool, layers: tuple[int, ...] | None):
    from peft import LoraConfig

    params = None
    if moe:
        params = EXPERT_PARAMS if layers is None else [f"model.layers.{i}.{p}" for i in layers for p in EXPERT_PARAMS]
    return LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=TARGETS + ["shared_expert_gate"] * moe,
                      target_parameters=params, layers_to_transform=list(layers) if layers else None)


def reference_logits(hf_dir: Path, adapter: Path, moe: bool, layers: tuple[int, ...] | None) -> torch.Tensor:
    """transformers' logits [T, V] with `adapter`'s weights merged into `layers` (all when None)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = get_peft_model(base, lora_config(moe, layers))
    result = set_peft_model_state_dict(model, load_file(adapter / "adapter_model.safetensors"))
    assert not result.missing_keys or all("lora_" not in k for k in result.missing_keys)
    with torch.no_grad():
        return model.merge_and_unload()(torch.tensor([IDS])).logits[0]


@pytest.fixture(scope="module")
def made(hf_model, tmp_path_factory):
    """arch -> {hf, f32 (GGUF), adapter (all layers)}; built once per module."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    out = {}
    for arch, spec in SPECS.items():
        d = root / arch
        hf = hf_model(spec)
        f32 = convert_hf(hf, d / "f32.gguf", "f32", mtp=False).path
        torch.manual_seed(1)
        base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        get_peft_model(base, lora_config(spec.moe, None)).save_pretrained(d / "adapter")
        out[arch] = {"hf": hf, "f32": f32, "adapter": d / "adapter", "dir": d}
    return out


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("layers", [None, SUBSET], ids=["all-layers", "layers-1-3"])
@pytest.mark.parametrize("arch", list(SPECS))
def test_merged_f32_logits_match_transformers(arch, layers, made, tmp_path):
    m = made[arch]
    out = tmp_path / "merged.gguf"
    r = merge_lora(m["f32"], m["adapter"], out, layers)
    assert r.layers == (layers or tuple(range(8)))
    assert bool(r.skipped_modules) == (layers is not None)
    want = reference_logits(m["hf"], m["adapter"], arch == "qwen35moe", layers)
    got = Engine(out).logits(IDS)
    err = rel(got, want)
    print(f"\n{arch} layers={layers or 'all'}: max|lemonslice - transformers merged| / max|logit| = {err:.2e}; "
          f"unmerged base differs by {rel(Engine(m['f32']).logits(IDS), want):.2e}")
    assert err < 1e-4
    record = json.loads(out.with_name(out.name + ".lora.json").read_text())
    assert record["layers"] == list(layers or range(8)) and record["scale"] == 1.0
    assert record["adapter"]["sha256"] and record["source"]["sha256"]


def lemonslice(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lemonslice", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


def test_quantized_split_changes_only_the_chosen_layers(made, tmp_path):
    """Q8_0 base as a split: `lora merge --layers 1-3` rewrites layers 1-3 only (`diff`), in their
    types, links every other file, and the result still merges back and runs close to the reference."""
    m = made["qwen35moe"]
    src = split_gguf(convert_hf(m["hf"], tmp_path / "q8.gguf", "q8_0", mtp=False).path, tmp_path / "q8")
    r = lemonslice("lora", "merge", tmp_path / "q8", m["adapter"], tmp_path / "out", "--layers", "1-3")
    assert r.returncode == 0, r.stderr
    assert "layers 1-3" in r.stdout and "shared with the source by link" in r.stdout
    diff = lemonslice("diff", tmp_path / "q8", tmp_path / "out", "--json")
    assert diff.returncode == 0, diff.stderr
    d = json.loads(diff.stdout)
    changed = sorted(u["layer"] for u in d["units"] if u["status"] != "equal")
    print(f"\nlemonslice diff q8/ out/ --json: changed layers {changed}; {d['counts']}")
    assert changed == list(SUBSET) and d["kv_changed"] == []
    assert {t["kind"] for u in d["units"] for t in u["tensors"]} == {"bytes"}  # same types and shapes
    for f in src.files:
        assert os.path.samefile(tmp_path / "q8" / f.name, tmp_path / "out" / f.name) == (f.layer not in SUBSET)
    assert verify_split(tmp_path / "out") == []
    merge_split(tmp_path / "out", tmp_path / "rebuilt.gguf")  # checks the manifest's new source sha256
    doc = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert doc["lora"][-1]["layers"] == list(SUBSET)
    # Quantization noise swamps this random tiny model's logits (Q8_0 vs F32 differ by ~100% even
    # unmerged), so each merged tensor is checked instead: Q8_0 base + the F32 merge's ΔW, within
    # Q8_0's rounding; F32 tensors (the router) exactly the F32 merge's.
    merge_lora(m["f32"], m["adapter"], tmp_path / "f32-merged.gguf", SUBSET)
    f32, f32_merged = gguf_tensors(m["f32"]), gguf_tensors(tmp_path / "f32-merged.gguf")
    worst = 0.0
    for layer in SUBSET:
        base, merged = gguf_tensors(tmp_path / "q8" / f"layer_{layer:04d}.gguf"), gguf_tensors(
            tmp_path / "out" / f"layer_{layer:04d}.gguf")
        for name, (kind, w) in merged.items():
            want = base[name][1] + (f32_merged[name][1] - f32[name][1])
            if kind == "F32":
                np.testing.assert_array_equal(w, f32_merged[name][1], err_msg=name)
            else:
                assert kind == "Q8_0" and base[name][0] == "Q8_0", name
                worst = max(worst, float(np.abs(w - want).max() / (np.abs(want).max() / 127)))
    print(f"merged Q8_0 tensors vs Q8_0 base + F32 ΔW: max error {worst:.2f} x (max|w| / 127)")
    assert worst <= 1.0


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a GGUF file as (type name, float32 values), read with gguf-py."""
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
            for t in r.tensors}


def test_every_input_and_output_form_gives_the_same_model(made, tmp_path):
    """GGUF -> GGUF, GGUF -> split, split -> GGUF and split -> split describe the same bytes."""
    m = made["qwen35"]
    split_gguf(m["f32"], tmp_path / "src")
    merge_lora(m["f32"], m["adapter"], tmp_path / "a.gguf", SUBSET)
    merge_lora(tmp_path / "src", m["adapter"], tmp_path / "b.gguf", SUBSET)
    merge_lora(m["f32"], m["adapter"], tmp_path / "c", SUBSET)
    merge_lora(tmp_path / "src", m["adapter"], tmp_path / "d", SUBSET)
    merge_split(tmp_path / "c", tmp_path / "c.gguf")
    merge_split(tmp_path / "d", tmp_path / "d.gguf")
    want = (tmp_path / "a.gguf").read_bytes()
    assert want != m["f32"].read_bytes()
    for name in ("b.gguf", "c.gguf", "d.gguf"):
        assert (tmp_path / name).read_bytes() == want, name
    assert not list(tmp_path.glob(".c.lora-*"))  # the GGUF source's temporary split is gone


def _tamper(kind: str, adapter: Path, d: Path) -> tuple[Path, list[str], tuple[str, ...]]:
    """A copy of `adapter` broken one way; the extra CLI arguments; words the error must hold."""
    from safetensors.torch import load_file, save_file

    bad = d / f"bad-{kind}"
    shutil.copytree(adapter, bad)
    st, cfg_path = bad / "adapter_model.safetensors", bad / "adapter_config.json"
    tensors, cfg = load_file(st), json.loads(cfg_path.read_text())
    key = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    args: list[str] = []
    if kind == "shape":
        tensors[key] = torch.zeros(4, 128)
        words: tuple[str, ...] = ("layers.3.self_attn.q_proj", "512x128", "512x256")
    elif kind == "module":
        for ab in "AB":
            tensors[key.replace("q_proj", "r_proj").replace("_A", f"_{ab}")] = tensors.pop(key.replace("_A", f"_{ab}"))
        words = ("r_proj", "unknown target module")
    elif kind == "dora":
        cfg["use_dora"] = True
        words = ("DoRA",)
    else:  # an adapter on layer 3 only, merged into layers 5-6
        tensors = {k: v for k, v in tensors.items() if ".layers.3." in k}
        args, words = ["--layers", "5-6"], ("changes layers 3", "5-6")
    save_file(tensors, st)
    cfg_path.write_text(json.dumps(cfg))
    return bad, args, words


@pytest.mark.parametrize("kind", ["shape", "module", "dora", "no-layer"])
def test_bad_adapters_are_refused_before_anything_is_written(kind, made, tmp_path):
    m = made["qwen35"]
    bad, args, words = _tamper(kind, m["adapter"], tmp_path)
    one_line_error(lemonslice("lora", "merge", m["f32"], bad, tmp_path / "out.gguf", *args), *words)
    with pytest.raises(LemonsliceError, match=words[-1]):  # a split output, in process
        merge_lora(m["f32"], bad, tmp_path / "out", (5, 6) if args else None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name], kind
