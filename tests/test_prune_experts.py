"""`prune-experts`: surgery that keeps fewer routed experts in chosen layers.

References: the routing of the unpruned model (its router's top-k recomputed with numpy from
the GGUF's router weights, read with gguf-py, on the inputs the engine fed it), the source
tensors' bytes read with gguf-py, hand-sorted use counts, and llama.cpp (tests/llama_ref.py)
on the written files. Model: the tiny synthetic qwen35moe in F32 with 16 experts, top-2.

Qwen3.5 routes with a softmax over all experts, takes the top k and renormalises over them, so
an expert's weight is exp(l_i) / sum over the chosen of exp(l_j): experts never chosen do
not enter it, and a model without them computes the same output on a prompt that never picks
them. `pytest -s` prints every measured figure on a line starting with `FIGURE:`.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from cli_util import one_line_error
from llama_ref import LlamaError, llama_logits, llama_model_info

from lemonslice.engine import Budget, Engine, WeightStore
from lemonslice.engine.residency import budget_plan
from lemonslice.gguf.reader import GGUFReader
from lemonslice.gguf.writer import encode_kv, write_gguf
from lemonslice.models.qwen35_layers import MoE
from lemonslice.slicing import split_gguf, verify_split
from lemonslice.surgery import Plan, PlanError, surgery
from lemonslice.testing import tiny_qwen35moe, write_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
N_LAYER, N_EXPERT, TOP_K = 8, 16, 2
PROMPT = [3, 17, 101, 250]  # 4 tokens route to at most 8 of the 16 experts per layer
IDS = np.random.default_rng(0).integers(0, 512, 64).tolist()
COUNT_KEY = "qwen35moe.expert_count"


def figure(text: str) -> None:
    print(f"\nFIGURE: {text}", flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, timeout=120)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prune")
    return write_synthetic(d / "moe.gguf", tiny_qwen35moe(n_expert=N_EXPERT, default_type="F32"))


def record_routing(model: Path, ids: list[int]) -> tuple[torch.Tensor, list[tuple[int, np.ndarray, np.ndarray]]]:
    """(teacher-forced logits, [(block, router input x [T, E], chosen ids [T, k])] of every MoE call)."""
    calls = []
    route = MoE.route

    def recording(self, x):  # noqa: ANN001, ANN202
        w, chosen = route(self, x)
        calls.append((int(self.expert_names[0].split(".")[1]), x.double().numpy(), chosen.numpy().copy()))
        return w, chosen

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MoE, "route", recording)
        with Engine(model) as engine:
            logits = engine.logits(ids)
    return logits, calls


@pytest.fixture(scope="module")
def routing(src):
    from lemonslice.ops import set_exact

    set_exact(True)  # float activations: the router's logits are x @ W exactly, as numpy's below
    try:
        return record_routing(src, PROMPT)
    finally:
        set_exact(False)


def used_by_layer(calls) -> dict[int, list[int]]:  # noqa: ANN001
    used: dict[int, set[int]] = {b: set() for b in range(N_LAYER)}
    for block, _, chosen in calls:
        used[block] |= set(chosen.reshape(-1).tolist())
    return {b: sorted(s) for b, s in used.items()}


def tensor(path: Path, name: str) -> gguf.ReaderTensor:
    return next(t for t in gguf.GGUFReader(path).tensors if t.name == name)


def test_engine_routing_is_numpys_top_k(src, routing):
    """Independently: softmax is monotonic, so the top k of the router's logits x @ W^T
    (W [16, 64] read with gguf-py) are the experts the engine chose."""
    _, calls = routing
    for block, x, chosen in calls:
        w = tensor(src, f"blk.{block}.ffn_gate_inp.weight").data.astype(np.float64)  # [X, E]
        logits = x @ w.T  # [T, X]
        top = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
        assert [set(r) for r in top.tolist()] == [set(r) for r in chosen.tolist()], block
    used = used_by_layer(calls)
    figure("experts the 4-token prompt routes to, per layer: " + "; ".join(f"{b}: {len(u)}" for b, u in used.items()))


@pytest.fixture(scope="module")
def kept(src, routing, tmp_path_factory) -> tuple[Path, dict[int, list[int]]]:
    """The source with every expert the prompt does not route to pruned away (a keep= per layer)."""
    used = used_by_layer(routing[1])
    spec = "; ".join(f"prune-experts {b} keep={','.join(map(str, u))}" for b, u in used.items())
    out = tmp_path_factory.mktemp("kept") / "kept.gguf"
    surgery(spec, src, out)
    return out, used


def test_pruning_unchosen_experts_keeps_the_logits(src, routing, kept, exact):
    """Teacher-forced logits on the prompt equal the unpruned model's; the pruned model's routing,
    mapped back through the kept ids, is the source's (no removed expert is ever selected)."""
    path, used = kept
    want, src_calls = routing
    got, calls = record_routing(path, PROMPT)
    diff = rel(got, want)
    # Not bit-equal: the f32 softmax's denominator sums other experts, so the renormalised
    # weights round differently (float32 eps is 6e-8; 8 layers carry it).
    assert diff <= 1e-5
    assert [b for b, _, _ in calls] == [b for b, _, _ in src_calls]
    for (block, _, chosen), (_, _, want_ids) in zip(calls, src_calls):
        assert np.array_equal(np.array(used[block])[chosen], want_ids), block
    counts = {b: tensor(path, f"blk.{b}.ffn_gate_inp.weight").data.shape[0] for b in range(N_LAYER)}
    assert counts == {b: len(u) for b, u in used.items()}
    figure(f"pruned to the prompt's experts (per layer {list(counts.values())} of {N_EXPERT}): "
           f"logits differ from the source's by {diff:.2e} (max abs / max abs)")

    # Control: dropping one expert the prompt uses changes the logits.
    block, ids = next((b, u) for b, u in used.items() if len(u) > TOP_K)
    cut = path.with_name("cut.gguf")
    surgery(f"prune-experts {block} keep={','.join(map(str, ids[1:]))}", src, cut)
    with Engine(cut) as engine:
        assert rel(engine.logits(PROMPT), want) > 1e-3


def test_explicit_list_slices_router_rows_and_experts(src, tmp_path):
    keep = [1, 4, 5, 7, 15]
    out = surgery("prune-experts 3 keep=1,4-5,7,15", src, tmp_path / "out.gguf").path
    before = {t.name: t for t in gguf.GGUFReader(src).tensors}
    after = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert list(after) == list(before)
    sliced = {f"blk.3.{n}.weight" for n in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
    for name, t in after.items():
        # gguf-py's arrays are in numpy order: the expert is the first axis.
        want = before[name].data[keep] if name in sliced else before[name].data
        assert t.data.tobytes() == np.ascontiguousarray(want).tobytes(), name
    assert after["blk.3.ffn_gate_exps.weight"].shape.tolist() == [64, 32, 5]
    with GGUFReader(out) as r:
        assert r.kv[COUNT_KEY].value == N_EXPERT  # one layer pruned: the counts differ
    record = json.loads(out.with_name("out.gguf.surgery.json").read_text())
    assert record["routed_experts"] == {"per_block": [16, 16, 16, 5, 16, 16, 16, 16], "expert_count": 16,
                                        "llama_cpp_loadable": False}
    row = record["layers"][3]
    assert row["pruned_experts"] == {"experts": 5, "source_experts": N_EXPERT, "kept": keep, "chosen_by": "keep="}


def test_keeping_every_expert_is_byte_identical(src, tmp_path):
    out = surgery(f"prune-experts 0-7 keep=0-{N_EXPERT - 1}", src, tmp_path / "all.gguf").path
    assert sha256(out) == sha256(src)


def test_split_output_links_unpruned_layers(src, tmp_path):
    split = tmp_path / "split"
    split_gguf(src, split)
    r = surgery("prune-experts 2,5 keep=0-3", split, tmp_path / "out")
    assert sorted(set(f"layer_{i:04d}.gguf" for i in range(N_LAYER)) - set(r.linked)) == \
        ["layer_0002.gguf", "layer_0005.gguf"]
    assert verify_split(tmp_path / "out") == []
    single = surgery("prune-experts 2,5 keep=0-3", src, tmp_path / "out.gguf").path
    with Engine(tmp_path / "out") as a, Engine(single) as b:
        assert torch.equal(a.logits(PROMPT), b.logits(PROMPT))


@pytest.mark.parametrize("spec, match", [
    ("prune-experts 2 1 stats=x.json", r"routes each token to 2 of 16 experts, so it keeps 2-16, not 1"),
    ("prune-experts 2 keep=3", r"keeps 2-16, not 1"),
    ("prune-experts 2 17 stats=x.json", r"keeps 2-16, not 17"),
    ("prune-experts 8 keep=0,1", r"layer\(s\) 8 are not in the playlist"),
    ("prune-experts 2 keep=0,16", r"layer 2 has experts 0-15, keep= names 16"),
    ("prune-experts 2 keep=0,1,1", r"names an expert twice"),
    ("prune-experts 2 4", r"stats=FILE .* or keep=IDS"),
    ("prune-experts 2 4 stats=/nonexistent.json", r"cannot read expert statistics /nonexistent.json"),
    ("prune-experts 2-3 keep=0,1; prune-experts 3 keep=4,5", r"layer 3 is pruned by two clauses"),
    ("prune-experts 2 keep=", r"cannot read plan clause"),
    ("drop 2; prune-experts 2 keep=0,1", r"not in the playlist"),
])
def test_bad_clauses_are_refused_writing_nothing(src, spec, match, tmp_path):
    with pytest.raises(PlanError, match=match):
        surgery(spec, src, tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []


def test_bad_clause_on_the_cli_is_one_line(src, tmp_path):
    one_line_error(cli("surgery", "prune-experts 1 keep=5", src, "-o", tmp_path / "out"), "keeps 2-16, not 1")
    one_line_error(cli("run", src, "--prompt-ids", "1,2", "-n", 1, "--layers", "prune-experts 1 keep=0-3"),
                   "write the model with `lemonslice surgery`")
    assert list(tmp_path.iterdir()) == []


def generated(stdout: str) -> list[int]:
    m = re.search(r"^generated: ([\d ]+)$", stdout, re.M)
    assert m, stdout
    return [int(t) for t in m.group(1).split()]


def stats_run(model: Path, stats: Path, *extra: object) -> subprocess.CompletedProcess:
    """`run --expert-stats` on the prompt at the smallest budget (an expert cache of 0 bytes)."""
    with WeightStore(model) as store:
        least = budget_plan(store, budget_plan(store, 10**9).minimum)
    r = cli("run", model, "--prompt-ids", ",".join(map(str, PROMPT)), "-n", 1, "--max-memory", least.budget,
            "--threads", 1, "--expert-stats", stats, "-ctk", "f32", "-ctv", "f32", *extra)
    assert r.returncode == 0, r.stderr
    return r


def test_stats_clause_keeps_the_most_used_and_runs(src, tmp_path):
    """`run --expert-stats` on the source, then `prune-experts 0-7 8 stats=FILE`: each layer keeps
    the 8 most used (ties to the lower id, sorted here by hand), which holds every expert the
    4-token prompt picks (at most 8). The pruned model runs under an expert cache, gives the
    source's token, and its statistics, mapped back through the kept ids, are the source's."""
    stats = tmp_path / "stats.json"
    first = generated(stats_run(src, stats).stdout)
    uses = {x["layer"]: x["uses"] for x in json.loads(stats.read_text())["layers"]}
    plan = tmp_path / "plan.yaml"
    plan.write_text("ops: ['prune-experts 0-7 8 stats=stats.json']\n")  # relative to the plan file
    out = tmp_path / "pruned"
    r = cli("surgery", plan, src, "-o", out)
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "manifest.json").read_text())["surgery"]
    assert record["plan"]["ops"] == [f"prune-experts 0-7 8 stats={stats}"]
    for row in record["layers"]:
        u = uses[row["layer"]]
        want = sorted(sorted(range(N_EXPERT), key=lambda e: (-u[e], e))[:8])
        assert row["pruned_experts"]["kept"] == want and row["pruned_experts"]["chosen_by"] == str(stats)
    with GGUFReader(out / "shared.gguf") as rd:
        assert rd.kv[COUNT_KEY].value == 8  # every MoE layer has 8: the KV follows

    again = tmp_path / "again.json"
    r = stats_run(out, again)
    assert generated(r.stdout) == first
    d = json.loads(again.read_text())
    assert [len(x["uses"]) for x in d["layers"]] == [8] * N_LAYER
    for x in d["layers"]:
        back = np.zeros(N_EXPERT, np.int64)
        back[record["layers"][x["layer"]]["pruned_experts"]["kept"]] = x["uses"]
        assert back.tolist() == uses[x["layer"]]
    figure(f"run --expert-stats on the model pruned to 8 of 16 by stats: {d['totals']['uses']} expert uses, "
           f"the source's counts and first token {first}")


def test_perplexity_of_a_pruned_model_matches_llama_cpp(src, tmp_path):
    """Every layer pruned to 4: the writer sets expert_count to 4, llama.cpp loads the file, and
    `perplexity` equals the same formula on llama.cpp's logits."""
    out = surgery("prune-experts 0-7 keep=0,5,9,12", src, tmp_path / "p4.gguf").path
    from llama_ref import llama_logits_each, llama_tokenize

    text = tmp_path / "prose.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and then it runs far away " * 6)
    ctx, chunks = 16, 3
    r = cli("perplexity", out, "-f", text, "-c", ctx, "--chunks", chunks)
    assert r.returncode == 0, r.stderr
    ppl = float(re.search(r"^Final estimate: PPL = ([\d.]+)", r.stdout, re.M).group(1))
    tokens = llama_tokenize(out, text.read_text(), add_special=True, parse_special=False)
    windows = [tokens[w * ctx:(w + 1) * ctx] for w in range(chunks)]
    nll = []
    for ids, logits in zip(windows, llama_logits_each(out, windows)):
        lg = logits.astype(np.float64)
        logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
        nll += [-logp[j, ids[j + 1]] for j in range(ctx // 2, ctx - 1)]
    want = float(np.exp(np.mean(nll)))
    assert ppl == pytest.approx(want, rel=1e-4)
    figure(f"perplexity (c={ctx}, {chunks} windows) of every layer pruned to 4 experts: lemonslice {ppl:.4f}, "
           f"llama.cpp's logits {want:.4f}")


def with_kv(src: Path, dst: Path, key: str, value: int) -> Path:
    """`src` with one uint32 KV value changed (the tensors copied as they are)."""
    with GGUFReader(src) as r:
        kvs = [encode_kv(key, e.vtype, value) if e.key == key else e.raw for e in r.kv.values()]
        tensors = [(t.name, t.shape, t.ggml_type, bytes(r.tensor_bytes(t.name))) for t in r.tensors]
        write_gguf(dst, kvs, tensors, r.alignment)
    return dst


def test_llama_cpp_loads_only_one_expert_count_per_model(src, kept, tmp_path):
    """llama.cpp (0.3.36) sizes every layer's router and experts from `{arch}.expert_count`:
    (a) a model with some layers pruned is refused at the first pruned layer's router;
    (b) every layer pruned to the same count loads once the writer has set the KV to that count
    (with the source's count left in the KV it is refused the same way), and its logits match
    lemonslice's. lemonslice runs (a) as well: each layer's count comes from its router."""
    part = surgery("prune-experts 2,5 keep=0-3", src, tmp_path / "part.gguf").path
    with pytest.raises(LlamaError, match=r"tensor 'blk\.2\.ffn_gate_inp\.weight' has wrong shape") as e:
        llama_model_info(part)
    why = next(line for line in str(e.value).splitlines() if "check_tensor_dims" in line).split(": ", 2)[-1].strip()
    figure(f"llama.cpp on layers 2 and 5 pruned to 4 of 16 experts: refused ({why})")
    with Engine(part) as engine:
        assert engine.logits(PROMPT).isfinite().all()

    uniform = surgery("prune-experts 0-7 keep=0-3", src, tmp_path / "u.gguf").path
    with GGUFReader(uniform) as r:
        assert r.kv[COUNT_KEY].value == 4
    assert llama_model_info(uniform)["n_layer"] == N_LAYER
    with Engine(uniform) as engine:
        ours = engine.logits(IDS)
    theirs = torch.from_numpy(llama_logits(uniform, IDS))
    diff = rel(ours, theirs)
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).double().mean())
    assert diff < 1e-3 and top1 >= 0.99
    stale = with_kv(uniform, tmp_path / "stale.gguf", COUNT_KEY, N_EXPERT)
    stale_shape = r"blk\.0\.ffn_gate_inp\.weight' has wrong shape; expected +64, +16, got +64, +4"
    with pytest.raises(LlamaError, match=stale_shape):
        llama_model_info(stale)
    figure(f"llama.cpp on every layer pruned to 4 (expert_count written as 4): loads; logits vs lemonslice "
           f"{diff:.2e} relative, top-1 {top1:.1%} of {len(IDS)}; with expert_count left at 16: refused")


def test_plan_round_trip_keeps_the_clause(tmp_path):
    p = Plan.from_spec("repeat 2-3; prune-experts 1-3,5 keep=0-3,9")
    assert p.spec == "repeat 2-3; prune-experts 1-3,5 keep=0-3,9"
    assert Plan.from_dict(p.to_dict()) == p
    q = Plan.from_spec("prune-experts 4 8 stats=s.json", root=tmp_path)
    assert q.to_dict(resolve_paths=True)["ops"] == [f"prune-experts 4 8 stats={tmp_path / 's.json'}"]
