"""Multi-token prediction: `mtp inject` / `mtp strip`, the MTP head and speculative decoding.

References, none of them lemonslice's own numbers:

* llama.cpp: `convert_hf_to_gguf.py` (llama-cpp-python 0.3.36 sdist) converting the tiny random
  Qwen3_5MoeForCausalLM with `mtp.*` tensors (tests/hf_models.py) directly with MTP; llama.cpp
  (llama_cpp) loading the injected file with its MTP block, and its main-model logits;
* the base file itself (strip must give it back byte for byte, `verify` must pass);
* transformers' Qwen3.5-MoE modules (decoder layer, RMSNorms, rotary embedding) plus the
  `fc` projection written here, in the order of llama.cpp's qwen35moe MTP graph
  (src/models/qwen35moe.cpp, `graph_mtp`): concat [enorm(embed), hnorm(h)] -> fc -> decoder
  layer -> mtp.norm -> lm_head, h being the trunk's final-normed hidden state;
* plain greedy decoding (speculation must not change a token), and hand-worked distributions
  for speculative sampling.

`pytest -s` prints every figure on a line starting with `FIGURE:`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from hf_models import HFSpec, hf_model  # noqa: F401  (hf_model is a session fixture)
from lemonslice.convert import convert_hf
from lemonslice.engine import Engine
from lemonslice.engine.sampling import Sampler, SamplingParams
from lemonslice.engine.speculative import _accept, _Chooser, generate, load_mtp_head
from lemonslice.errors import LemonsliceError
from lemonslice.gguf.writer import write_gguf
from lemonslice.models.qwen35_layers import rms_norm
from lemonslice.slicing import merge_split, split_gguf, verify_split
from lemonslice.surgery import inject_mtp, strip_mtp
from lemonslice.testing import encode_tensor, synthetic_tensors, tensor_values, tiny_qwen35, tiny_qwen35moe
from lemonslice.testing.metadata import model_kv
from llama_ref import llama_logits, llama_model_info
from llama_sdist import llama_convert_hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
SPEC = HFSpec(mtp=True)
IDS = [int(i) for i in np.random.default_rng(1).integers(0, 600, 24)]


def figure(text: str) -> None:
    print(f"\nFIGURE: {text}", flush=True)


def cli(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def files(hf_model, tmp_path_factory):
    """The checkpoint, its conversion without MTP (the base, F32), the base with MTP injected
    (F32), and llama.cpp's own conversion with MTP (F32)."""
    d = tmp_path_factory.mktemp("mtp")
    ckpt = hf_model(SPEC)
    base = convert_hf(ckpt, d / "base.gguf", "f32", mtp=False).path
    injected = inject_mtp(base, d / "injected.gguf", ckpt, "f32").path
    ref = llama_convert_hf(ckpt, d / "llama-mtp.gguf", "f32")
    return {"ckpt": ckpt, "base": base, "injected": injected, "ref": ref, "dir": d}


def _tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


# general.* keys llama.cpp reads; the others (name, size label, ...) are informational.
GENERAL_READ = {"general.architecture", "general.alignment", "general.file_type", "general.quantization_version"}


def _kvs(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()
            if not k.startswith("GGUF.") and (not k.startswith("general.") or k in GENERAL_READ)}


# ---- inject / strip ------------------------------------------------------------------------------


def test_inject_matches_llama_cpp(files):
    inj, ref, base = _tensors(files["injected"]), _tensors(files["ref"]), _tensors(files["base"])
    assert sorted(inj) == sorted(ref)
    for name, t in inj.items():
        r = ref[name]
        assert (list(t.shape), t.tensor_type) == (list(r.shape), r.tensor_type), name
        assert np.asarray(t.data).tobytes() == np.asarray(r.data).tobytes(), name
    added = sorted(set(inj) - set(base))
    assert added and all(n.startswith("blk.8.") for n in added)
    # The trunk's bytes are copied unchanged (same data as the base, tensor by tensor).
    assert all(np.asarray(inj[n].data).tobytes() == np.asarray(t.data).tobytes() for n, t in base.items())
    kv_inj, kv_ref = _kvs(files["injected"]), _kvs(files["ref"])
    assert kv_inj == kv_ref
    assert kv_inj["qwen35moe.block_count"] == 9 and kv_inj["qwen35moe.nextn_predict_layers"] == 1
    assert kv_inj["qwen35moe.attention.recurrent_layers"] == [True, True, True, False] * 2 + [False]

    info = llama_model_info(files["injected"], load_mtp=True)  # checks every MTP tensor's shape and type
    assert (info["n_layer"], info["n_layer_nextn"]) == (8, 1)
    want = llama_logits(files["base"], IDS)
    got = llama_logits(files["injected"], IDS)
    diff = float(np.abs(got - want).max())
    figure(f"inject: {len(added)} MTP tensors, all {len(inj)} tensors byte-equal to llama.cpp's own --outtype f32 "
           f"conversion with MTP; llama.cpp sees n_layer={info['n_layer']} + nextn={info['n_layer_nextn']}; "
           f"main-model logits vs the base file over {len(IDS)} tokens: max|diff| = {diff}")
    assert np.array_equal(got, want)


def test_inject_bf16_matches_llama_cpp(files, tmp_path):
    """At --type bf16 too, base and MTP tensors alike are llama.cpp's own bf16 conversion's."""
    ckpt = files["ckpt"]
    base = convert_hf(ckpt, tmp_path / "base.gguf", "bf16", mtp=False).path
    inj = _tensors(inject_mtp(base, tmp_path / "inj.gguf", ckpt, "bf16").path)
    ref = _tensors(llama_convert_hf(ckpt, tmp_path / "ref.gguf", "bf16"))
    assert sorted(inj) == sorted(ref)
    for name, t in inj.items():
        assert t.tensor_type == ref[name].tensor_type, name
        assert np.asarray(t.data).tobytes() == np.asarray(ref[name].data).tobytes(), name
    assert inj["blk.8.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16


def test_engine_trunk_unchanged(files):
    """lemonslice's engine gives the same logits with and without the MTP block."""
    want = Engine(files["base"]).logits(IDS)
    assert torch.equal(Engine(files["injected"]).logits(IDS), want)


def test_strip_gives_back_the_base(files, tmp_path):
    out = strip_mtp(files["injected"], tmp_path / "stripped.gguf").path
    assert out.read_bytes() == files["base"].read_bytes()
    # A file converted with MTP (the block before output_norm) loses it just the same.
    direct = convert_hf(files["ckpt"], tmp_path / "direct.gguf", "f32", mtp=True).path
    assert strip_mtp(direct, tmp_path / "direct-stripped.gguf").path.read_bytes() == files["base"].read_bytes()


def test_split_dirs_round_trip(files, tmp_path):
    base_dir = tmp_path / "base"
    split_gguf(files["base"], base_dir)
    inj_dir = inject_mtp(base_dir, tmp_path / "injected", files["ckpt"], "f32").path
    assert verify_split(inj_dir) == []
    manifest = json.loads((inj_dir / "manifest.json").read_text())
    roles = {f["name"]: f["role"] for f in manifest["files"]}
    assert roles["layer_0008.gguf"] == "mtp" and manifest["block_count"] == 9
    # The directory stands for the injected monolithic file: merge rebuilds it exactly.
    merge_split(inj_dir, tmp_path / "merged.gguf")
    assert (tmp_path / "merged.gguf").read_bytes() == files["injected"].read_bytes()
    # ... and every file is what `split` makes of that file (the manifest keeps the base's source name).
    split_gguf(files["injected"], tmp_path / "resplit")
    for p in inj_dir.iterdir():
        if p.name != "manifest.json":
            assert p.read_bytes() == (tmp_path / "resplit" / p.name).read_bytes(), p.name
    resplit = json.loads((tmp_path / "resplit" / "manifest.json").read_text())
    assert resplit["source"].pop("name") == "injected.gguf" and manifest["source"].pop("name") == "base.gguf"
    assert resplit == manifest

    r = cli("mtp", "strip", inj_dir, tmp_path / "stripped")
    assert r.returncode == 0, r.stderr
    stripped = tmp_path / "stripped"
    # The split files; `split` also leaves its verify stamp, a local record of inodes and times.
    base_files = [p for p in base_dir.iterdir() if p.name != ".lemonslice-verified.json"]
    assert sorted(p.name for p in stripped.iterdir()) == sorted(p.name for p in base_files)
    for p in base_files:
        assert (stripped / p.name).read_bytes() == p.read_bytes(), p.name
    r = cli("verify", stripped)
    assert r.returncode == 0 and "all files intact" in r.stdout, r.stderr


def test_reads_only_the_mtp_shard(files, tmp_path):
    """A sharded checkpoint with an index: the trunk's shard is garbage, and injection never opens it."""
    from safetensors.torch import load_file, save_file

    src = files["ckpt"]
    d = tmp_path / "sharded"
    d.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).symlink_to(f)
    weights = load_file(src / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k.startswith("mtp.")}, d / "model-00002-of-00002.safetensors")
    (d / "model-00001-of-00002.safetensors").write_bytes(b"\xff" * 64)
    shard = {k: f"model-0000{1 + k.startswith('mtp.')}-of-00002.safetensors" for k in weights}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shard}))
    out = inject_mtp(files["base"], tmp_path / "m.gguf", d, "f32").path
    assert out.read_bytes() == files["injected"].read_bytes()


def test_refusals(files, tmp_path):
    ckpt, base = files["ckpt"], files["base"]
    with pytest.raises(LemonsliceError, match="already has an MTP block"):
        inject_mtp(files["injected"], tmp_path / "x.gguf", ckpt)
    with pytest.raises(LemonsliceError, match="has no MTP block"):
        strip_mtp(base, tmp_path / "x.gguf")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (bad / f.name).symlink_to(f)
    cfg = json.loads((ckpt / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 4}))
    with pytest.raises(LemonsliceError, match="attention heads is 4 in the checkpoint, 2 in the base"):
        inject_mtp(base, tmp_path / "x.gguf", bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3_5ForCausalLM"]}))
    with pytest.raises(LemonsliceError, match="is a qwen35 checkpoint, .* is qwen35moe"):
        inject_mtp(base, tmp_path / "x.gguf", bad)
    out = tmp_path / "o.gguf"
    r = cli("mtp", "inject", files["injected"], out, "--from", ckpt)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: "), r.stderr
    r = cli("mtp", "inject", base, out, "--from", ckpt, "--type", "q4_k")
    assert r.returncode == 1 and "unknown output type" in r.stderr, r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


# ---- the MTP head against transformers' modules --------------------------------------------------


def _transformers_mtp(ckpt: Path, ids: list[int]) -> torch.Tensor:
    """MTP logits [T-1, V]: row t drafts ids[t+2] from the trunk's state at t and ids[t+1]."""
    from safetensors.torch import load_file
    from transformers import Qwen3_5MoeForCausalLM
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
        Qwen3_5MoeDecoderLayer,
        Qwen3_5MoeRMSNorm,
        Qwen3_5MoeTextRotaryEmbedding,
    )

    model = Qwen3_5MoeForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    cfg = model.config
    cfg._attn_implementation = "eager"
    w = {k: v.float() for k, v in load_file(ckpt / "model.safetensors").items() if k.startswith("mtp.")}
    E, X = cfg.hidden_size, cfg.num_experts
    layer = Qwen3_5MoeDecoderLayer(cfg, cfg.layer_types.index("full_attention")).eval()
    pre = "mtp.layers.0."
    state = {k[len(pre):]: v for k, v in w.items() if k.startswith(pre) and ".experts." not in k}
    ex = pre + "mlp.experts."
    state["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat((w[f"{ex}{x}.gate_proj.weight"], w[f"{ex}{x}.up_proj.weight"])) for x in range(X)])
    state["mlp.experts.down_proj"] = torch.stack([w[f"{ex}{x}.down_proj.weight"] for x in range(X)])
    layer.load_state_dict(state, strict=True)
    norms = {}
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        norms[n] = Qwen3_5MoeRMSNorm(E, eps=cfg.rms_norm_eps)
        norms[n].load_state_dict({"weight": w[f"mtp.{n}.weight"]})
    fc = torch.nn.Linear(2 * E, E, bias=False)
    fc.load_state_dict({"weight": w["mtp.fc.weight"]})
    rotary = Qwen3_5MoeTextRotaryEmbedding(cfg)
    x = torch.tensor([ids])
    with torch.no_grad():
        h = model.model(x).last_hidden_state[:, :-1]  # final-normed, as llama.cpp's h_nextn
        e = model.model.embed_tokens(x[:, 1:])
        z = fc(torch.cat((norms["pre_fc_norm_embedding"](e), norms["pre_fc_norm_hidden"](h)), dim=-1))
        T = z.shape[1]
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        pe = rotary(z, torch.arange(T)[None])
        z = layer(z, position_embeddings=pe, attention_mask=mask)
        return model.lm_head(norms["norm"](z))[0]


def test_mtp_head_matches_transformers(files):
    want = _transformers_mtp(files["ckpt"], IDS)  # [T-1, V]
    engine = Engine(files["injected"])
    head = load_mtp_head(engine)
    with torch.inference_mode():
        h = rms_norm(engine.forward_hidden(IDS), engine.shared.norm, engine.args.rms_eps)  # [T, E]
        batch, g = head(torch.tensor(IDS[1:]), h[:-1], head.new_cache())
        last, g_last = head(torch.tensor(IDS[1:]), h[:-1], head.new_cache(), "last")  # a draft step's first call
        none, g_none = head(torch.tensor(IDS[1:]), h[:-1], head.new_cache(), None)  # the prompt's pairs
        cache = head.new_cache()  # the decode path: one pair at a time through the head's cache
        steps = torch.cat([head(torch.tensor(IDS[t + 1:t + 2]), h[t:t + 1], cache)[0] for t in range(len(IDS) - 1)])
    scale = float(want.abs().max())
    rel_b = float((batch - want).abs().max()) / scale
    rel_s = float((steps - want).abs().max()) / scale
    top1 = float((batch.argmax(-1) == want.argmax(-1)).double().mean())
    figure(f"MTP head vs transformers modules + fc over {want.shape[0]} pairs: max|diff|/max|logit| = {rel_b:.2e} "
           f"(batched), {rel_s:.2e} (one pair at a time); top-1 agreement {top1:.2%}")
    assert rel_b <= 1e-4 and rel_s <= 1e-4
    assert top1 == 1.0
    assert torch.equal(last, batch[-1:]) and none is None and torch.equal(g_last, g) and torch.equal(g_none, g)
    with pytest.raises(LemonsliceError, match="logits"):
        head(torch.tensor(IDS[1:2]), h[:1], head.new_cache(), "first")


# ---- speculative decoding ------------------------------------------------------------------------

# Output projections of every block scaled down: each trunk block only nudges the residual
# stream, so the next token depends mostly (not only) on the current one. The MTP head's
# eh_proj passes the normed embedding through and its head norm is output_norm, so it drafts
# what the trunk would say after the next token: a drafter that is often, not always, right.
_OUT_KINDS = ("attn_output", "ssm_out", "ffn_down_exps", "ffn_down_shexp", "ffn_down")


def _drafting_model(path: Path, moe: bool, alpha: float = 0.02) -> Path:
    cfg = (tiny_qwen35moe if moe else tiny_qwen35)(mtp=True)
    specs = synthetic_tensors(cfg)
    values = {t.name: tensor_values(cfg, t.slot) for t in specs}
    E = cfg.n_embd
    for t in specs:
        v = values[t.name]
        if t.slot.kind in _OUT_KINDS:
            values[t.name] = v * alpha
        elif t.slot.kind == "nextn.eh_proj":
            v[:, :E] = np.eye(E, dtype=np.float32)  # [E, 2E]: the embedding half
            v[:, E:] = 0
        elif t.slot.kind == "nextn.shared_head_norm":
            values[t.name] = values["output_norm.weight"].copy()
    write_gguf(path, model_kv(cfg), [(t.name, t.shape, t.ggml_type, encode_tensor(values[t.name], t.ggml_type))
                                     for t in specs])
    return path


PROMPTS = [[3, 17, 101, 250, 7, 7, 42], [5, 6, 7, 8, 9, 10, 11, 12], [300, 2, 450, 31, 31, 99]]
N_GEN = 64


@pytest.mark.parametrize("moe", [True, False], ids=["moe", "dense"])
def test_greedy_speculation_is_lossless(moe, tmp_path):
    engine = Engine(_drafting_model(tmp_path / "m.gguf", moe))
    plain = [engine.generate(p, N_GEN) for p in PROMPTS]
    for k in range(1, 5):
        hist = [0] * (k + 1)
        drafted = accepted = 0
        for p, want in zip(PROMPTS, plain):
            got, stats = generate(engine, p, N_GEN, k)
            assert got == want, (k, p)
            assert sum(stats.accepted_hist) == stats.steps and stats.decode_tokens == N_GEN - 1
            assert stats.accepted == sum(j * c for j, c in enumerate(stats.accepted_hist))
            hist = [a + b for a, b in zip(hist, stats.accepted_hist)]
            drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
        figure(f"speculation {'moe' if moe else 'dense'} K={k}: {len(PROMPTS)} prompts x {N_GEN} tokens identical to "
               f"plain greedy; drafted {drafted}, accepted {accepted} ({accepted / drafted:.1%}); "
               f"steps by drafts kept {hist}")
        # Both paths are exercised: a step keeping every draft, and a step rejecting one.
        assert hist[k] > 0 and sum(hist[:k]) > 0


def test_lossless_on_the_injected_model(files):
    """The converted checkpoint's random MTP head: drafts are nearly always rejected, output unchanged."""
    engine = Engine(files["injected"])
    want = engine.generate(IDS[:8], 16)
    for k in (1, 4):
        got, stats = generate(engine, IDS[:8], 16, k)
        assert got == want and stats.steps >= 1


def test_speculative_sampling_follows_the_target():
    """First token out of one step: distributed as the target p whatever the draft q (hand-worked:
    P(accept) = sum min(p, q) = 0.5)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    choose = _Chooser(Sampler(SamplingParams(temperature=1.0, seed=7)))
    logits = torch.log(p).float().expand(2, 4)
    n, counts, kept = 8000, torch.zeros(4), 0
    for _ in range(n):
        d = choose.draw(q)
        j, nxt = _accept(choose, logits, [d], [q], [])
        counts[d if j == 1 else nxt] += 1
        kept += j
    freq = counts / n
    figure(f"speculative sampling, {n} draws: first-token frequencies {[round(float(f), 3) for f in freq]} "
           f"vs target {p.tolist()}; acceptance {kept / n:.3f} vs 0.5")
    assert float((freq - p.float()).abs().max()) < 0.025
    assert abs(kept / n - 0.5) < 0.025


def test_sampled_generation_runs(tmp_path):
    engine = Engine(_drafting_model(tmp_path / "m.gguf", True))
    sampler = lambda: Sampler(SamplingParams(temperature=0.8, top_k=20, seed=3))  # noqa: E731
    a, stats = generate(engine, PROMPTS[0], 40, 3, sampler())
    b, _ = generate(engine, PROMPTS[0], 40, 3, sampler())
    assert len(a) == 40 and a == b  # seeded: reproducible
    assert 0 < stats.accepted <= stats.drafted
    with pytest.raises(LemonsliceError, match="draft_max"):
        generate(engine, PROMPTS[0], 4, 0)


def test_no_mtp_block_is_refused(files):
    with pytest.raises(LemonsliceError, match="has no MTP block"):
        generate(Engine(files["base"]), IDS[:4], 4, 2)


def test_cli_inject(files, tmp_path):
    out = tmp_path / "q8.gguf"
    r = cli("mtp", "inject", files["base"], out, "--from", files["ckpt"], "--type", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "8 layers + 1 MTP; added 20 tensors" in r.stdout
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors if t.name.startswith("blk.8.")}
    assert types["blk.8.attn_q.weight"] == "Q8_0" and types["blk.8.nextn.enorm.weight"] == "F32"
    shutil.copy(out, tmp_path / "again.gguf")
    assert cli("mtp", "strip", tmp_path / "again.gguf", tmp_path / "s.gguf").returncode == 0
    assert (tmp_path / "s.gguf").read_bytes() == files["base"].read_bytes()


def test_cli_run_mtp(tmp_path):
    """`run --mtp` prints plain greedy's ids and the acceptance figures; --mtp-compare checks both runs."""
    model = _drafting_model(tmp_path / "m.gguf", moe=True)
    args = ["--prompt-ids", ",".join(map(str, PROMPTS[0])), "-n", "24", "--threads", "1"]
    plain = cli("run", model, *args)
    spec = cli("run", model, *args, "--mtp", "--draft-max", "3", "--mtp-compare")
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and "generated:" in spec.stdout
    m = re.search(r"drafted (\d+), accepted (\d+) \(([\d.]+)%\)", spec.stderr)
    assert m and 0 < int(m.group(2)) <= int(m.group(1))
    assert "tokens identical" in spec.stderr and "decode without MTP" in spec.stderr
    bad = cli("run", model, *args, "--mtp-compare")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --mtp-compare needs --mtp"
