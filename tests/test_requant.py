"""`lemonslice requant`: per-layer requantization through llama.cpp's quantizer.

References: llama.cpp's own quantizer run on the whole source through llama-cpp-python
(tests/llama_ref.py `llama_quantize`: one plain run per file type of the plan, `pure` runs for
the glob types), llama.cpp loading and greedily decoding the outputs, hashlib and the file
system's inode numbers. Models: a tiny synthetic qwen35moe in F32 with rows of 256 (so the
K-quants are real, not fallbacks) and an MTP block, and Gemma 3 270M in F16 (made from the
Q4_K_M file by llama.cpp's quantizer). `pytest -s` prints each figure on a `FIGURE:` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_util import one_line_error
from lemonslice.engine import Engine
from lemonslice.errors import LemonsliceError
from lemonslice.gguf.constants import block_index
from lemonslice.gguf.constants import GGMLType
from lemonslice.gguf.reader import open_gguf
from lemonslice.ops import set_exact
from lemonslice.slicing import merge_split, split_gguf
from lemonslice.surgery.plan import PlanError
from lemonslice.surgery.requant import requant
from lemonslice.surgery.requant_plan import RequantPlan, glob_regex, load_requant_plan
from lemonslice.testing import tiny_qwen35moe, write_synthetic
from llama_ref import LlamaVocab, llama_greedy, llama_quantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
# Blocks 6 and 8 (MTP) are outside the plan; block 7 only has its attention weights replaced.
QWEN_PLAN = "shared=Q8_0; 0-2=Q4_K_M; 3-5=Q3_K_M; blk.7.attn_*=Q6_K"
QWEN_UNTOUCHED = (6, 8)
# Gemma 3 270M has 18 blocks; 12-17 are outside the plan but 14's attention. Two llama.cpp
# runs (Q8_0, Q4_K_M) keep the test short.
GEMMA_PLAN = "shared=Q8_0; 0-8=Q4_K_M; 9-11=Q8_0; blk.14.attn_*=Q5_0"
GEMMA_UNTOUCHED = (12, 13, 15, 16, 17)
N_NEW = 16


def figure(text: str) -> None:
    print(f"\nFIGURE: {text}", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, timeout=300)


def tensor_bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (ggml type, bytes) of every tensor of a GGUF."""
    with open_gguf(path) as r:
        return {t.name: (t.ggml_type.name, bytes(r.tensor_bytes(t.name))) for t in r.tensors}


def references(src: Path, plan: RequantPlan, d: Path) -> dict[str, dict[str, tuple[str, bytes]]]:
    """llama-quantize's own output for each file type of the plan, and `pure` runs for the glob types."""
    out = {}
    for ft in plan.ftypes:
        out[ft] = tensor_bytes(llama_quantize(src, d / f"ref-{ft}.gguf", ft))
    for _, t in plan.globs:  # the file type named after a ggml type gives that type to every tensor
        out["pure-" + t] = tensor_bytes(llama_quantize(src, d / f"ref-pure-{t}.gguf", t, pure=True))
    return out


def expected(plan: RequantPlan, name: str, refs: dict, source: dict) -> tuple[str, bytes]:
    """What llama-quantize writes for one tensor under the plan: globs first, then ranges/shared."""
    for g, t in plan.globs:
        if re.match(glob_regex(g), name):
            return refs["pure-" + t][name]
    layer = block_index(name)
    ft = plan.shared if layer is None else plan.ftype_of(layer)
    return refs[ft][name] if ft else source[name]


def check_against_llama(out: Path, src: Path, plan: RequantPlan, refs: dict) -> tuple[int, int]:
    """(tensors quantized, tensors kept) after checking every tensor's type and bytes."""
    got, source = tensor_bytes(out), tensor_bytes(src)
    assert list(got) == list(source)
    changed = 0
    for name, (typ, data) in got.items():
        want_type, want = expected(plan, name, refs, source)
        assert (typ, len(data)) == (want_type, len(want)), name
        assert data == want, name
        changed += typ != source[name][0]
    return changed, len(got) - changed


def greedy_runs(path: Path, prompts: list[list[int]], d: Path) -> dict[str, list[list[int]]]:
    """Greedy ids after each prompt: llama.cpp on the file itself and on its ALL_F32 copy (the
    same weights dequantized by llama.cpp), lemonslice with float activations (`exact`) and with
    8-bit ones as llama.cpp rounds them."""
    f32 = llama_quantize(path, d / f"{path.stem}-as-f32.gguf", "F32", allow_requantize=True)
    out = {"llama": [llama_greedy(path, p, N_NEW) for p in prompts],
           "llama_f32": [llama_greedy(f32, p, N_NEW) for p in prompts]}
    f32.unlink()
    with Engine(path) as e:
        for exact in (True, False):
            set_exact(exact)
            try:
                out["exact" if exact else "lemonslice"] = [e.generate(p, N_NEW) for p in prompts]
            finally:
                set_exact(False)
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """Greedy ids equal up to the first difference, over all of them."""
    same = sum(next((k for k, (x, y) in enumerate(zip(u, v)) if x != y), len(u)) for u, v in zip(a, b))
    return f"{same}/{sum(map(len, a))}"


# ---- plans ----------------------------------------------------------------------------------


def test_plan_spec_and_file_forms(tmp_path):
    p = RequantPlan.from_spec("shared=q8_0; 0-9=Q4_K_M\n10-29 = Q3_K_M; *.attn_*=Q6_K")
    assert p.shared == "Q8_0" and p.ftype_of(10) == "Q3_K_M" and p.ftype_of(30) is None
    assert p.glob_type("blk.3.attn_q.weight") == "Q6_K" and p.glob_type("blk.3.ffn_up.weight") is None
    assert p.ftypes == ["Q8_0", "Q4_K_M", "Q3_K_M"]
    assert RequantPlan.from_spec(p.spec) == p
    f = tmp_path / "plan.yaml"
    f.write_text("shared: Q8_0\n0-9: Q4_K_M\n10-29: Q3_K_M\n'*.attn_*': Q6_K\n")
    assert load_requant_plan(f) == p
    assert load_requant_plan(str(f)) == p


@pytest.mark.parametrize("spec, match", [
    ("0-3=Q4_K_X", "unknown llama.cpp file type"),
    ("*.attn_*=Q4_K_M", "unknown ggml type"),
    ("0-5=Q4_K_M; 4-9=Q3_K_M", "overlap"),
    ("0-3", "expected KEY=TYPE"),
    ("0-3=IQ2_XXS", "importance matrix"),
    ("blk.0/x=Q8_0", "neither"),
    ("", "empty"),
])
def test_bad_plans_are_refused(spec, match):
    with pytest.raises(PlanError, match=match):
        RequantPlan.from_spec(spec)


# ---- the tiny qwen35moe ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("requant-qwen")
    cfg = tiny_qwen35moe(mtp=True, default_type="F32", n_embd=256, n_ff_exp=256, n_ff_shexp=256, n_expert=4)
    src = write_synthetic(d / "src.gguf", cfg)
    split_gguf(src, d / "src-split")
    plan = RequantPlan.from_spec(QWEN_PLAN)
    return {"dir": d, "src": src, "split": d / "src-split", "refs": references(src, plan, d),
            "gguf": requant(src, d / "out.gguf", plan).path,
            "out-split": requant(d / "src-split", d / "out-split", plan).path}


def test_qwen_tensors_equal_llama_quantize(qwen):
    plan = RequantPlan.from_spec(QWEN_PLAN)
    changed, kept = check_against_llama(qwen["gguf"], qwen["src"], plan, qwen["refs"])
    merged = qwen["dir"] / "merged.gguf"
    merge_split(qwen["out-split"], merged)
    assert sha256(merged) == sha256(qwen["gguf"])
    figure(f"tiny qwen35moe, plan {QWEN_PLAN!r}: {changed} tensors quantized, {kept} kept, every one's type and "
           "bytes equal llama-quantize's (plain runs per mix, pure runs per glob type); the split output merges "
           "to the same file byte for byte")


def test_qwen_untouched_layers_are_the_sources(qwen):
    got, source = tensor_bytes(qwen["gguf"]), tensor_bytes(qwen["src"])
    for name, v in source.items():
        if block_index(name) in QWEN_UNTOUCHED:
            assert got[name] == v, name
    out, src = qwen["out-split"], qwen["split"]
    linked = sorted(p.name for p in out.glob("*.gguf") if os.path.samefile(p, src / p.name))
    assert linked == [f"layer_{i:04d}.gguf" for i in QWEN_UNTOUCHED]
    changed = [f"layer_{i:04d}.gguf" for i in range(9) if i not in QWEN_UNTOUCHED] + ["shared.gguf"]
    assert all(sha256(out / n) != sha256(src / n) for n in changed)
    assert not subprocess.run([LEMONSLICE, "verify", out], capture_output=True).returncode
    rec = json.loads((out / "manifest.json").read_text())["requant"]
    assert RequantPlan.from_dict(rec) == RequantPlan.from_spec(QWEN_PLAN)
    assert [r["linked"] for r in rec["layers"]] == [i in QWEN_UNTOUCHED for i in range(9)]
    assert rec["layers"][7]["tensors"]["blk.7.attn_q.weight"] == "Q6_K"
    assert rec["layers"][7]["tensors"]["blk.7.attn_output.weight"] == "Q8_0"  # Q6_K falls back on rows of 64
    assert load_requant_plan(qwen["gguf"].with_name("out.gguf.requant.json")) == RequantPlan.from_spec(QWEN_PLAN)
    figure(f"tiny qwen35moe split output: {', '.join(linked)} hard-linked to the source split (same inode), "
           f"{len(changed)} files rewritten; `verify` passes")


def test_qwen_loads_in_llama_and_lemonslice(qwen):
    prompts = [[1, 2, 3, 4], [100, 7, 250, 33, 9]]
    g = greedy_runs(qwen["gguf"], prompts, qwen["dir"])
    with Engine(qwen["out-split"]) as e:
        set_exact(True)
        try:
            split_ids = [e.generate(p, N_NEW) for p in prompts]
        finally:
            set_exact(False)
    assert g["exact"] == g["llama_f32"] and split_ids == g["llama_f32"]
    figure(f"tiny qwen35moe requantized: lemonslice (float activations, GGUF and split) and llama.cpp on the "
           f"output's ALL_F32 copy: greedy ids equal, {len(prompts)}x{N_NEW}; with 8-bit activations, lemonslice "
           f"vs llama.cpp on the quantized file itself: {agreement(g['lemonslice'], g['llama'])} ids before the "
           f"first difference (a tiny random model: near-ties everywhere)")


BAD_PLANS = [
    ("shared=Q8_0; 0-3=Q9_K", "unknown llama.cpp file type"),
    ("0-5=Q4_K_M; 5-7=Q3_K_M", "overlap"),
    ("7-9=Q4_K_M", "out of range"),
    ("0-3:Q4_K_M", "expected KEY=TYPE"),
    ("*.attn_*=IQ2_XXS", "importance matrix"),
    ("*.nothing_*=Q8_0", "matches no tensor"),
]


@pytest.mark.parametrize("spec, needle", BAD_PLANS)
def test_bad_plans_write_nothing(qwen, tmp_path, spec, needle):
    for out in (tmp_path / "o.gguf", tmp_path / "o-split"):
        with pytest.raises(LemonsliceError, match=needle) as e:
            requant(qwen["src"], out, spec)
        assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_refusals_write_nothing(qwen, tmp_path):
    one_line_error(cli("requant", qwen["src"], tmp_path / "o-split", "--plan", BAD_PLANS[1][0]), BAD_PLANS[1][1])
    q8 = llama_quantize(qwen["src"], tmp_path / "q8.gguf", "Q8_0")
    one_line_error(cli("requant", q8, tmp_path / "o.gguf", "--plan", "0-1=Q4_K_M"), "--allow-requantize")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8.gguf"]
    r = cli("requant", q8, tmp_path / "o.gguf", "--plan", "0-1=Q4_K_M", "--allow-requantize")
    assert r.returncode == 0 and r.stderr.startswith("warning: ") and "quantized tensors (Q8_0)" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.gguf", "o.gguf.requant.json", "q8.gguf"]
    figure(f"{len(BAD_PLANS)} bad plans x (GGUF, split) and a quantized source without --allow-requantize: "
           "one-line errors, nothing written; with the flag a warning on stderr")


# ---- Gemma 3 270M ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(gemma_path, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("requant-gemma")
    f16 = llama_quantize(gemma_path, d / "gemma-f16.gguf", "F16", allow_requantize=True)
    r = cli("requant", f16, d / "out.gguf", "--plan", GEMMA_PLAN, "--threads", 2)
    assert r.returncode == 0, r.stderr
    return {"dir": d, "src": f16, "out": d / "out.gguf", "log": r.stdout}


def test_gemma_tensors_equal_llama_quantize(gemma):
    plan = RequantPlan.from_spec(GEMMA_PLAN)
    refs = references(gemma["src"], plan, gemma["dir"])
    changed, kept = check_against_llama(gemma["out"], gemma["src"], plan, refs)
    got, source = tensor_bytes(gemma["out"]), tensor_bytes(gemma["src"])
    untouched = [n for n in source if block_index(n) in GEMMA_UNTOUCHED]
    assert untouched and all(got[n] == source[n] for n in untouched)
    figure(f"Gemma 3 270M F16, plan {GEMMA_PLAN!r}: {changed} tensors quantized, {kept} kept, every one equal "
           f"to llama-quantize's; the {len(untouched)} tensors of blocks 12,13,15-17 are the source's bytes")


def test_gemma_loads_in_llama_and_lemonslice(gemma, gemma_path):
    with LlamaVocab(gemma_path) as v:
        prompts = [v.tokenize(t) for t in ("The capital of France is", "def fibonacci(n):")]
    ref = [llama_greedy(gemma["out"], p, N_NEW) for p in prompts]
    with Engine(gemma["out"]) as e:
        ours = [e.generate(p, N_NEW) for p in prompts]
    figure(f"Gemma 3 270M requantized, {len(prompts)}x{N_NEW} greedy ids: lemonslice vs llama.cpp, both on the "
           f"file itself: {agreement(ours, ref)} equal")
    assert ours == ref


def test_importance_matrix_reaches_llama_cpp(qwen, tmp_path):
    """llama.cpp's dry run says IQ2_XXS needs an importance matrix and Q8_0 does not; with one
    (weights of 1 for every column) `quantize_file` writes IQ2_XXS tensors, which a refused
    quantize without it does not."""
    from lemonslice.surgery.quantizer import QuantizerError, needs_imatrix, quantize_file

    src = qwen["src"]
    assert needs_imatrix(src, "IQ2_XXS") and not needs_imatrix(src, "Q8_0")
    with open_gguf(src) as r:
        ones = {t.name: np.ones(t.shape[0] * (t.shape[2] if len(t.shape) > 2 else 1), np.float32)
                for t in r.tensors if len(t.shape) >= 2}
    out = quantize_file(src, tmp_path / "iq2.gguf", "IQ2_XXS", imatrix=ones)
    types = {t for t, _ in tensor_bytes(out).values()}
    assert "IQ2_XXS" in types
    with pytest.raises(QuantizerError):
        quantize_file(src, tmp_path / "no-imatrix.gguf", "IQ2_XXS")


def test_a_signal_while_llama_cpp_runs_takes_effect_when_it_returns():
    """SIGTERM during a quantize is noted, not run inside llama.cpp's log callback (where ctypes
    would swallow the exception and the quantize carry on), and the process's handler runs once
    llama.cpp has returned: here as the exception it raises."""
    import signal

    from lemonslice.surgery import quantizer

    class Stop(Exception):
        pass

    def on_term(signum, frame):  # noqa: ANN001
        raise Stop

    old = signal.signal(signal.SIGTERM, on_term)
    reached = []
    try:
        with pytest.raises(Stop):
            with quantizer._captured_log():
                os.kill(os.getpid(), signal.SIGTERM)
                quantizer.quantize_rows(np.ones((1, 32), np.float32), GGMLType.Q8_0)
                reached.append(True)
        assert reached == [True]
        assert signal.getsignal(signal.SIGTERM) is on_term
    finally:
        signal.signal(signal.SIGTERM, old)
