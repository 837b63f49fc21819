"""Layer surgery: plans, playlists in the engine, and the files `surgery` writes.

References: hand-written playlists and layer layouts, llama.cpp (tests/llama_ref.py: F32 KV
cache, flash attention off) running the written files, gguf-py reading them, hashlib, and
the file system's inode numbers. Models are the tiny synthetic qwen35moe/qwen35 (8 trunk
blocks, full attention at 3 and 7, one MTP block) in F32, so numerics are tight.

`pytest -s` prints every measured figure on a line starting with `FIGURE:`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lemonslice.engine import Engine, Streamed
from lemonslice.errors import LemonsliceError
from lemonslice.gguf.reader import GGUFReader
from lemonslice.gguf.writer import write_gguf
from lemonslice.slicing import merge_split, split_gguf, verify_split
from lemonslice.surgery import Plan, PlanError, load_plan, pattern_report, playlist_for, surgery
from lemonslice.testing import synthetic_tensors, tiny_qwen35, tiny_qwen35moe, write_synthetic
from lemonslice.testing.metadata import model_kv
from lemonslice.testing.synthetic import encode_tensor, tensor_values
from llama_ref import LlamaError, llama_log, llama_logits, llama_model_info

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FACTORIES = {"qwen35moe": tiny_qwen35moe, "qwen35": tiny_qwen35}
IDS = np.random.default_rng(0).integers(0, 512, 128).tolist()  # 128 positions: 1 miss is 99.2%
TOP1_BOUND = 0.99
LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))

# Repeated runs of length 4, 3 and 5 on the 8-layer models, written out by hand: the playlist,
# and each position's kind (R recurrent, A attention; the source has A at layers 3 and 7).
RUNS = {
    "repeat 2-5": ([0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7], "RRRARRRARRRA"),
    "repeat 3-5": ([0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7], "RRRARRARRRA"),
    "repeat 1-5": ([0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 7], "RRRARRRRARRRA"),
}


def figure(text: str) -> None:
    print(f"\nFIGURE: {text}", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).double().mean())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def gguf_kv(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def no_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "lemonslice-tmp" in p.name)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("surgery-src")
    out = {arch: write_synthetic(d / f"{arch}.gguf", make(mtp=True, default_type="F32"))
           for arch, make in FACTORIES.items()}
    # A donor: the same shapes and metadata, other weights.
    out["donor"] = write_synthetic(d / "donor.gguf", tiny_qwen35moe(mtp=True, default_type="F32", seed=1))
    return out


# ---- plans ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, n_layer, want", [
    ("0-3,2-3,4-7", 8, [0, 1, 2, 3, 2, 3, 4, 5, 6, 7]),
    ("0-30,27-30,31-39", 40, list(range(31)) + [27, 28, 29, 30] + list(range(31, 40))),
    ("repeat 27-30", 32, list(range(31)) + [27, 28, 29, 30, 31]),
    ("repeat 2-3x3", 6, [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]),
    ("repeat 4", 6, [0, 1, 2, 3, 4, 4, 5]),
    ("drop 3,5-6", 8, [0, 1, 2, 4, 7]),
    ("exit-after 4", 8, [0, 1, 2, 3, 4]),
    ("repeat 1-2; exit-after 4", 8, [0, 1, 2, 1, 2]),
    ("repeat 1-2\ndrop 2", 6, [0, 1, 1, 3, 4, 5]),
    ("7,6,5; drop 6", 8, [7, 5]),
])
def test_plan_resolves_to_hand_written_playlists(spec, n_layer, want):
    entries = Plan.from_spec(spec).resolve(n_layer)
    assert Plan.from_spec(Plan.from_spec(spec).spec) == Plan.from_spec(spec)
    assert [e.layer for e in entries] == want
    assert all(e.source is None for e in entries)


def test_replace_names_a_donor_block(tmp_path):
    entries = Plan.from_spec("repeat 2-3; replace 3=donor.gguf:6", root=tmp_path).resolve(6)
    donor = str((tmp_path / "donor.gguf").resolve())
    assert [(e.source, e.layer) for e in entries] == [
        (None, 0), (None, 1), (None, 2), (donor, 6), (None, 2), (donor, 6), (None, 4), (None, 5)]
    assert [e.slot for e in entries] == [0, 1, 2, 3, 2, 3, 4, 5]


@pytest.mark.parametrize("spec, n_layer, match", [
    ("", 8, "empty plan"),
    ("repeat 9-10", 8, "not in the playlist"),
    ("repeat 5-3", 8, "backwards"),
    ("repeat 2-3x0", 8, "at least once"),
    ("0-3,2-3; repeat 2-3", 8, "run 2 times"),
    ("repeat 3-2", 8, "backwards"),
    ("drop 0-7", 8, "leaves no layer"),
    ("drop 9", 8, "not in the playlist"),
    ("exit-after 8", 8, "positions 0-7"),
    ("0-9", 8, "0-7"),
    ("repeat 1-2; 0-3", 8, "only come first"),
    ("replace 9=x.gguf:1", 8, "layer 9 is not in the playlist"),
    ("frobnicate 3", 8, "cannot read plan clause"),
    ("1,,2", 8, "expected a layer list"),
    ("drop 1,,2", 8, "expected numbers and ranges"),
])
def test_bad_plans_are_refused(spec, n_layer, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_spec(spec).resolve(n_layer)


def test_plan_files_yaml_and_json(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "plan.yaml").write_text(
        "layers: 0-5,4-5\nops:\n  - repeat 1-2\n  - replace 1=d:3\nmodels:\n  d: ../donor.gguf\n")
    p = Plan.load(tmp_path / "sub" / "plan.yaml")
    donor = str((tmp_path / "donor.gguf").resolve())
    want = [(None, 0), (donor, 3), (None, 2), (donor, 3), (None, 2), (None, 3), (None, 4), (None, 5), (None, 4),
            (None, 5)]
    assert [(e.source, e.layer) for e in p.resolve(6)] == want
    for name in ("saved.json", "saved.yaml"):
        p.save(tmp_path / name)  # donor paths saved absolute: the copy resolves alike anywhere
        again = load_plan(tmp_path / name)
        assert [(e.source, e.layer) for e in again.resolve(6)] == want
    assert json.loads((tmp_path / "saved.json").read_text())["models"] == {"d": donor}
    assert load_plan("repeat 1-2") == Plan.from_spec("repeat 1-2")
    (tmp_path / "bad.yaml").write_text("layers: 0-3\nrepeat: 1-2\n")
    with pytest.raises(PlanError, match="unknown key"):
        Plan.load(tmp_path / "bad.yaml")
    with pytest.raises(PlanError, match="no such plan file"):
        load_plan(tmp_path / "missing.yaml")


def test_pattern_report_against_hand_written_layouts():
    ok = pattern_report([c == "R" for c in "RRRARRRARRRA"], 4, "qwen35")
    assert ok.ok and ok.breaks == ()
    bad = pattern_report([c == "R" for c in "RRRARRARRRA"], 4, "qwen35")
    assert bad.breaks == (6, 7, 10)  # A at 6 (want R), R at 7 (want A), A at 10 (want R)
    assert "full_attention_interval=4" in bad.message and "qwen35.attention.recurrent_layers" in bad.message


# ---- playlist equals file -------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(RUNS))
@pytest.mark.parametrize("arch", list(FACTORIES))
def test_playlist_equals_surgery_file(models, arch, spec, tmp_path):
    src = models[arch]
    order, kinds = RUNS[spec]
    n = len(order)
    playlist = playlist_for(spec, src)
    assert playlist == order
    want = Engine(src, playlist=playlist).logits(IDS)

    out = tmp_path / "out.gguf"
    r = surgery(spec, src, out)
    assert (r.n_trunk, r.block_count) == (n, n + 1)

    # The file, read by gguf-py: counts, the layout key, renamed blocks and the MTP block after the trunk.
    kv = gguf_kv(out)
    breaks = kinds != "RRRA" * (n // 4) + "RRR"[: n % 4]
    assert kv[f"{arch}.block_count"] == n + 1 and kv[f"{arch}.nextn_predict_layers"] == 1
    rl_key = f"{arch}.attention.recurrent_layers"
    assert (rl_key in kv) == breaks == (not r.report.ok) == r.recurrent_layers
    if breaks:
        assert kv[rl_key] == [c == "R" for c in kinds] + [False]
        assert rl_key in r.report.message
    src_r, out_r = gguf.GGUFReader(src), gguf.GGUFReader(out)
    src_t = {t.name: t for t in src_r.tensors}
    out_t = {t.name: t for t in out_r.tensors}
    for pos, layer in list(enumerate(order)) + [(n, 8)]:
        names = [k[len(f"blk.{layer}."):] for k in src_t if k.startswith(f"blk.{layer}.")]
        assert sorted(k[len(f"blk.{pos}."):] for k in out_t if k.startswith(f"blk.{pos}.")) == sorted(names)
        for s in names:
            np.testing.assert_array_equal(out_t[f"blk.{pos}.{s}"].data, src_t[f"blk.{layer}.{s}"].data)
    assert any(k.startswith(f"blk.{n}.nextn.") for k in out_t)

    # Provenance beside the file: the plan, the source's hash and each block's source layer.
    rec = json.loads(out.with_name("out.gguf.surgery.json").read_text())
    assert rec["source"]["sha256"] == sha256(src)
    assert [x["layer"] for x in rec["layers"]] == order + [8]
    assert {x["model_sha256"] for x in rec["layers"]} == {sha256(src)}
    assert load_plan(out.with_name("out.gguf.surgery.json")).resolve(8) == Plan.from_spec(spec).resolve(8)

    # (a) lemonslice runs the file.
    got = Engine(out).logits(IDS)
    diff_a = float((got - want).abs().max())
    # (b) llama.cpp loads it (MTP block included) and runs it.
    info = llama_model_info(out, load_mtp=True)
    assert "unused tensor" not in llama_log()
    assert (info["n_layer"], info["n_layer_nextn"]) == (n, 1)
    ref = torch.from_numpy(llama_logits(out, IDS))
    agree, rd = top1(want, ref), rel(want, ref)
    figure(f"playlist=file {arch} '{spec}' ({n} layers, recurrent_layers {'written' if breaks else 'not needed'}): "
           f"lemonslice file vs playlist max|diff| {diff_a:.1e}; llama.cpp file vs playlist top-1 {agree:.2%} "
           f"over {len(IDS)} tokens, relative difference {rd:.1e}")
    assert diff_a <= 1e-6 * float(want.abs().max())
    assert agree >= TOP1_BOUND


def strip_key(src: Path, dst: Path, key: str) -> Path:
    """`src` without one KV pair (the tensors copied as they are)."""
    with GGUFReader(src) as r:
        kvs = [e.raw for e in r.kv.values() if e.key != key]
        tensors = [(t.name, t.shape, t.ggml_type, bytes(r.tensor_bytes(t.name))) for t in r.tensors]
        write_gguf(dst, kvs, tensors, r.alignment)
    return dst


@pytest.mark.parametrize("spec, first_break", [("repeat 3-5", 6), ("repeat 1-5", 7)])
def test_recurrent_layers_is_what_makes_the_file_loadable(models, spec, first_break, tmp_path):
    out = surgery(spec, models["qwen35"], tmp_path / "out.gguf").path
    llama_model_info(out)
    bare = strip_key(out, tmp_path / "bare.gguf", "qwen35.attention.recurrent_layers")
    # Without the key llama.cpp derives the layout from the interval and looks for the other kind's tensors.
    with pytest.raises(LlamaError, match=rf"tensor 'blk\.{first_break}\.[a-z0-9_.]+' (not found|has wrong shape)") as e:
        llama_model_info(bare)
    why = next(line for line in str(e.value).splitlines() if "check_tensor_dims" in line).split(": ", 2)[-1].strip()
    figure(f"'{spec}' without qwen35.attention.recurrent_layers: llama.cpp refuses it ({why})")


def test_drop_and_exit_after_equal_their_files(models, tmp_path):
    spec = "drop 2; repeat 5-7; exit-after 8"  # 0 1 3 4 5 6 7 5 6: R R A R R R A R R
    src = models["qwen35moe"]
    assert playlist_for(spec, src) == [0, 1, 3, 4, 5, 6, 7, 5, 6]
    want = Engine(src, playlist=playlist_for(spec, src)).logits(IDS)
    r = surgery(spec, src, tmp_path / "out.gguf")
    assert r.report.breaks == (2, 3, 6, 7) and r.report.warnings == ()
    assert torch.equal(Engine(r.path).logits(IDS), want)
    agree = top1(want, torch.from_numpy(llama_logits(r.path, IDS)))
    figure(f"playlist=file qwen35moe '{spec}': llama.cpp top-1 {agree:.2%}")
    assert agree >= TOP1_BOUND


def test_layout_without_attention_is_flagged(models, tmp_path):
    # llama.cpp 0.3.36 aborts the process on such a file (so it is not run here): the report says so.
    r = surgery("drop 3,7", models["qwen35"], tmp_path / "out.gguf")
    assert len(r.report.warnings) == 1 and "no attention layer" in r.report.warnings[0]
    want = Engine(models["qwen35"], playlist=[0, 1, 2, 4, 5, 6]).logits(IDS)
    assert torch.equal(Engine(r.path).logits(IDS), want)
    assert pattern_report([False, False], 4, "qwen35").warnings[0].startswith("no recurrent layer")


# ---- donors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["repeat 2-5; replace 5=DONOR:5", "replace 3=DONOR:2"])
def test_donor_blocks_equal_their_file(models, spec, tmp_path):
    src, donor = models["qwen35moe"], models["donor"]
    spec = spec.replace("DONOR", str(donor))
    playlist = playlist_for(spec, src)
    assert any(isinstance(e, tuple) and Path(e[0]) == donor for e in playlist)
    want = Engine(src, playlist=playlist).logits(IDS)
    assert torch.equal(Engine(src, playlist=playlist, plan=Streamed(1)).logits(IDS), want)  # streamed donors too
    own = [e if isinstance(e, int) else e[1] for e in playlist]  # the same order, the model's own blocks
    assert not torch.equal(want, Engine(src, playlist=own).logits(IDS))
    r = surgery(spec, src, tmp_path / "out.gguf")
    # Attention slot 3 taken by recurrent block 2 breaks the interval: the layout key carries it.
    assert r.recurrent_layers == ("replace 3=" in spec)
    got = Engine(r.path).logits(IDS)
    llama_model_info(r.path, load_mtp=True)
    agree = top1(want, torch.from_numpy(llama_logits(r.path, IDS)))
    donor_rows = [x for x in r.record["layers"] if x["model"] == str(donor)]
    assert donor_rows and {x["model_sha256"] for x in donor_rows} == {sha256(donor)}
    figure(f"donor '{spec.replace(str(donor), 'donor.gguf')}': lemonslice file vs playlist max|diff| "
           f"{float((got - want).abs().max()):.1e}; llama.cpp top-1 {agree:.2%}")
    assert torch.equal(got, want)
    assert agree >= TOP1_BOUND


def write_mismatched(path: Path) -> Path:
    """Metadata of the tiny MoE model, tensors of one with wider experts: only the shapes differ."""
    meta, wide = tiny_qwen35moe(mtp=True, default_type="F32"), tiny_qwen35moe(mtp=True, default_type="F32", n_ff_exp=64)
    tensors = [(t.name, t.shape, t.ggml_type, encode_tensor(tensor_values(wide, t.slot), t.ggml_type))
               for t in synthetic_tensors(wide)]
    write_gguf(path, model_kv(meta), tensors)
    return path


@pytest.mark.parametrize("kind, match", [
    ("architecture", "donor architecture 'qwen35' differs from the model's 'qwen35moe'"),
    ("dimensions", "donor n_embd = 32, the model has 64"),
    ("shapes", "donor tensor ffn_down_exps.weight has shape 64x64x8,"),
    ("layer", "the donor has trunk blocks 0-7"),
])
def test_incompatible_donor_is_refused_and_nothing_written(models, kind, match, tmp_path):
    d = tmp_path / "donors"
    d.mkdir()
    donor = {
        "architecture": lambda: models["qwen35"],
        "dimensions": lambda: write_synthetic(d / "narrow.gguf", tiny_qwen35moe(n_embd=32, default_type="F32")),
        "shapes": lambda: write_mismatched(d / "wide.gguf"),
        "layer": lambda: models["donor"],
    }[kind]()
    layer = 8 if kind == "layer" else 5
    spec = f"replace 5={donor}:{layer}"
    outs = tmp_path / "out"
    outs.mkdir()
    for out in (outs / "one.gguf", outs / "split"):
        with pytest.raises(LemonsliceError, match=match):
            surgery(spec, models["qwen35moe"], out)
        assert list(outs.iterdir()) == []  # no output, no sidecar, no staging left behind
    with pytest.raises(LemonsliceError, match=match):
        playlist_for(spec, models["qwen35moe"])
    if kind != "shapes":  # the engine's own check covers the metadata (and block numbers)
        with pytest.raises(LemonsliceError, match="donor|playlist"):
            Engine(models["qwen35moe"], playlist=[0, 1, (donor, layer)])


@pytest.mark.parametrize("target", ["one.gguf", "split"])
def test_failure_while_writing_leaves_nothing(models, src_split, target, tmp_path, monkeypatch):
    from lemonslice.surgery import write as write_mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write_mod, "write_json", boom)  # the last step of both forms
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="No space"):
        surgery("repeat 3-5", src_split, out / target)
    assert list(out.iterdir()) == []


# ---- split directories ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def src_split(models, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("surgery-split") / "src"
    split_gguf(models["qwen35moe"], d)
    return d


def inode(p: Path) -> tuple[int, int]:
    st = os.stat(p)
    return st.st_dev, st.st_ino


def test_split_output_links_unchanged_layers(models, src_split, tmp_path):
    donor = models["donor"]
    spec = f"replace 5={donor}:5"
    out = tmp_path / "split"
    r = surgery(spec, src_split, out)
    same = ["shared.gguf"] + [f"layer_{i:04d}.gguf" for i in (0, 1, 2, 3, 4, 6, 7, 8)]
    assert sorted(r.linked) == sorted(same)
    for name in same:
        assert inode(out / name) == inode(src_split / name) and os.stat(out / name).st_nlink >= 2, name
    assert os.stat(out / "layer_0005.gguf").st_nlink == 1
    assert verify_split(out) == []
    rows = json.loads((out / "manifest.json").read_text())["surgery"]["layers"]
    assert [(x["layer"], x["linked"]) for x in rows] == [(i, i != 5) for i in range(9)]
    assert rows[5]["model_sha256"] == sha256(donor) and rows[0]["model_sha256"] == sha256(models["qwen35moe"])

    # The split runs as the playlist does, and merges into the single file surgery writes.
    want = Engine(models["qwen35moe"], playlist=playlist_for(spec, models["qwen35moe"])).logits(IDS)
    assert torch.equal(Engine(out).logits(IDS), want)
    single = surgery(spec, models["qwen35moe"], tmp_path / "single.gguf").path
    merge_split(out, tmp_path / "merged.gguf")
    assert sha256(tmp_path / "merged.gguf") == sha256(single)
    n_written = 9 - len(r.linked) + 1
    figure(f"split surgery '{spec.replace(str(donor), 'donor.gguf')}': {len(r.linked)} of 10 files linked "
           f"(same inode, st_nlink >= 2), {n_written} written ({r.written_bytes} bytes); verify clean; "
           "merge == single-file output (sha256)")


@pytest.mark.parametrize("from_split", [True, False], ids=["from-split", "from-gguf"])
def test_split_repeat_output_verifies_and_runs(models, src_split, from_split, tmp_path):
    spec = "repeat 3-5"
    out = tmp_path / "split"
    r = surgery(spec, src_split if from_split else models["qwen35moe"], out)
    # block_count changes, so every file's header does: nothing can be shared.
    assert r.linked == []
    assert all(os.stat(p).st_nlink == 1 for p in out.iterdir())
    assert verify_split(out) == []
    m = json.loads((out / "manifest.json").read_text())
    roles = {f["name"]: f["role"] for f in m["files"]}
    assert roles["layer_0006.gguf"] == "attention" and roles["layer_0011.gguf"] == "mtp"
    want = Engine(models["qwen35moe"], playlist=RUNS[spec][0]).logits(IDS)
    assert torch.equal(Engine(out).logits(IDS), want)
    merge_split(out, tmp_path / "merged.gguf")
    llama_model_info(tmp_path / "merged.gguf", load_mtp=True)
    assert sha256(tmp_path / "merged.gguf") == sha256(surgery(spec, src_split, tmp_path / "one.gguf").path)


def test_identity_plan_links_every_file(src_split, tmp_path):
    r = surgery("0-7", src_split, tmp_path / "split")
    assert len(r.linked) == 10 and r.written_bytes == 0
    assert verify_split(tmp_path / "split") == []


# ---- command line ---------------------------------------------------------------------------------


def cli(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_cli_surgery(models, tmp_path):
    plan = tmp_path / "rys.yaml"
    plan.write_text("ops: [repeat 3-5]\n")
    r = cli("surgery", plan, models["qwen35"], "-o", tmp_path / "out.gguf")
    assert r.returncode == 0, r.stderr
    assert "qwen35.attention.recurrent_layers" in r.stderr and "11 layers + 1 MTP" in r.stdout
    assert gguf_kv(tmp_path / "out.gguf")["qwen35.block_count"] == 12
    assert (tmp_path / "out.gguf.surgery.json").is_file()

    r = cli("surgery", "repeat 3-5", models["qwen35"], "-o", tmp_path / "out.gguf")
    assert r.returncode == 1 and "pass --force" in r.stderr

    bad = cli("surgery", f"replace 2={models['qwen35moe']}:2", models["qwen35"], "-o", tmp_path / "bad")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "donor architecture" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("spec", ["repeat 3-5", "repeat 1-5", "drop 2; repeat 5-7", "repeat 4-7"])
def test_cli_run_layers_equals_surgery_file(models, spec, tmp_path):
    """`run --layers PLAN` on the source generates what `run` generates on the file `surgery` wrote."""
    out = tmp_path / "out.gguf"
    assert cli("surgery", spec, models["qwen35moe"], "-o", out).returncode == 0
    args = ["--prompt-ids", "3,1,4,1,5,9,2,6", "-n", "12", "--threads", "1"]
    a = cli("run", models["qwen35moe"], "--layers", spec, *args)
    b = cli("run", out, *args)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and "generated:" in a.stdout
    # A playlist that breaks the interval pattern is reported, naming the key that keeps a file loadable.
    breaks = spec != "repeat 4-7"  # layers 0-7,4-7: attention stays at every 4th position
    assert ("break the full_attention_interval" in a.stderr) == breaks and (
        "qwen35moe.attention.recurrent_layers" in a.stderr) == breaks
    bad = cli("run", models["qwen35moe"], "--layers", "repeat 5-99", *args)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error:")
