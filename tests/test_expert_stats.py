"""`run --expert-stats`, the weight-reading report of a budgeted run, and `inspect --budget`.

Expert use is checked against the routing of a fully loaded engine, recorded by wrapping
`MoE.route`: an MoE call looks each distinct expert its tokens route to up once. Cache hits
are checked where they are known by hand: none in a cache of 0 bytes, and every use but the
first of each expert in a cache that holds them all. Plan sizes come from gguf-py's reading
of the file.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lemonslice.cli import app
from lemonslice.engine import Budget, Engine, WeightStore
from lemonslice.engine.residency import budget_plan
from lemonslice.eval.expert_stats import write_expert_stats
from lemonslice.models.qwen35_layers import MoE
from lemonslice.testing import tiny_qwen35, tiny_qwen35moe, write_synthetic

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
PROMPT = [3, 17, 101, 250, 7, 42, 300]
N = 6  # generated tokens: N - 1 of them are fed back (decode steps)
N_LAYER, N_EXPERT = 8, 8  # tiny_qwen35moe


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("es") / "moe.gguf", tiny_qwen35moe())


@pytest.fixture(scope="module")
def routing(moe):
    """(greedy ids, [(block, ids [T, k])] of every MoE call) of a full load, in call order."""
    calls = []
    route = MoE.route

    def recording(self, x):  # noqa: ANN001, ANN202
        w, ids = route(self, x)
        calls.append((int(self.expert_names[0].split(".")[1]), ids.clone()))
        return w, ids

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MoE, "route", recording)
        engine = Engine(moe)
        ids = engine.generate(PROMPT, N)
        engine.close()
    return ids, calls


def expected_uses(calls) -> np.ndarray:  # noqa: ANN001
    """uses [block, expert]: one per expert per call that routes any token to it."""
    uses = np.zeros((N_LAYER, N_EXPERT), np.int64)
    for block, ids in calls:
        for e in set(ids.reshape(-1).tolist()):
            uses[block, e] += 1
    return uses


def lemonslice(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, timeout=120)


def generated(stdout: str) -> list[int]:
    m = re.search(r"^generated: ([\d ]+)$", stdout, re.M)
    assert m, stdout
    return [int(t) for t in m.group(1).split()]


def check_stats(path: Path, uses: np.ndarray) -> dict:
    """The JSON's uses equal `uses`, its counts add up, and its heatmap is a PNG of those rows."""
    d = json.loads(path.read_text())
    assert [x["layer"] for x in d["layers"]] == list(range(N_LAYER))
    np.testing.assert_array_equal(np.array([x["uses"] for x in d["layers"]]), uses)
    for x in d["layers"]:
        assert all(0 <= h <= u for h, u in zip(x["hits"], x["uses"]))
        assert (x["total_uses"], x["total_hits"]) == (sum(x["uses"]), sum(x["hits"]))
    hits = sum(x["total_hits"] for x in d["layers"])
    assert d["totals"] == {"uses": int(uses.sum()), "hits": hits, "misses": int(uses.sum()) - hits,
                           "hit_rate": hits / uses.sum()}
    assert (d["cache"]["lookups"], d["cache"]["hits"]) == (uses.sum(), hits)
    png = path.with_suffix(".png")
    assert d["heatmap"] == png.name
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        assert im.info["Description"] == f"rows: blocks {','.join(map(str, range(N_LAYER)))}; columns: experts 0-7"
    return d


# The in-process reference (`routing`) runs with the library's f32 cache; the CLI's default is f16.
F32_KV = ("-ctk", "f32", "-ctv", "f32")


def test_run_expert_stats_count_every_routed_expert(moe, routing, tmp_path):
    """At the smallest budget the expert cache gets 0 bytes: every lookup misses."""
    with WeightStore(moe) as store:
        least = budget_plan(store, budget_plan(store, 10**9).minimum)
    assert least.expert_cache == 0
    stats = tmp_path / "experts.json"
    r = lemonslice("run", moe, "--prompt-ids", ",".join(map(str, PROMPT)), "-n", N, "--max-memory", least.budget,
                   "--threads", 1, "--expert-stats", stats, *F32_KV)
    assert r.returncode == 0, r.stderr
    want_ids, calls = routing
    assert generated(r.stdout) == want_ids
    d = check_stats(stats, expected_uses(calls))
    assert all(h == 0 for x in d["layers"] for h in x["hits"])
    assert f"expert statistics: {stats}, heatmap {stats.with_suffix('.png')}" in r.stderr


def test_budgeted_run_reports_what_it_read(moe, routing, tmp_path):
    budget = 680_000  # under the 706 KB of weights: a per-tensor plan with a small expert cache
    stats_json, stats = tmp_path / "run.json", tmp_path / "experts.json"
    r = lemonslice("run", moe, "--prompt-ids", ",".join(map(str, PROMPT)), "-n", N, "--max-memory", budget,
                   "--threads", 1, "--stats-json", stats_json, "--expert-stats", stats, *F32_KV)
    assert r.returncode == 0, r.stderr
    want_ids, calls = routing
    assert generated(r.stdout) == want_ids
    check_stats(stats, expected_uses(calls))
    s = json.loads(stats_json.read_text())
    # Decode: each of the N - 1 fed tokens looks up its k distinct experts in every block.
    decode_calls = calls[N_LAYER:]
    assert len(decode_calls) == (N - 1) * N_LAYER
    lookups = sum(len(set(ids.reshape(-1).tolist())) for _, ids in decode_calls)
    assert s["decode_tokens"] == N - 1 and s["expert_lookups"] == lookups == (N - 1) * N_LAYER * 2
    assert 0 <= s["expert_hits"] <= lookups
    assert s["budget"] == budget and s["prefill_bytes_read"] > 0 and s["decode_bytes_read"] > 0
    assert s["resident_bytes"] + s["expert_cache_bytes"] <= budget
    assert s["decode_compute_seconds"] == pytest.approx(s["decode_seconds"] - s["decode_wait_seconds"])
    assert 0 <= s["decode_wait_seconds"] and 0 <= s["decode_read_seconds"]
    per_token = s["decode_bytes_read"] / (N - 1) / 1000
    line = re.search(r"^decode: read ([\d.]+) KB per token, expert hits ([\d.]+)% of 16 lookups per token, "
                     r"reads in flight [\d.]+ s, compute waited [\d.]+ s per token$", r.stderr, re.M)
    assert line, r.stderr
    assert float(line.group(1)) == pytest.approx(per_token, abs=0.005)
    assert float(line.group(2)) == pytest.approx(100 * s["expert_hits"] / lookups, abs=0.051)
    assert re.search(rf"^prefill: read [\d.]+ [KM]B for {len(PROMPT)} tokens, expert hits ", r.stderr, re.M)


def test_hits_of_a_cache_that_holds_every_expert(moe, routing, tmp_path):
    """Without prefetch, an expert misses only on its first use when nothing is evicted."""
    engine = Engine(moe, plan=Budget(10**9, prefetch=False))
    want_ids, calls = routing
    assert engine.generate(PROMPT, N) == want_ids
    uses = expected_uses(calls)
    path, png = write_expert_stats(tmp_path / "stats.json", engine.residency.experts)
    engine.close()
    d = check_stats(path, uses)
    np.testing.assert_array_equal(np.array([x["hits"] for x in d["layers"]]), np.maximum(uses - 1, 0))
    assert png == tmp_path / "stats.png"


def test_expert_stats_needs_an_expert_cache(moe, tmp_path):
    args = ["--prompt-ids", "1,2,3", "-n", 2, "--expert-stats", tmp_path / "s.json"]
    # The tiny model fits: a full load has no cache to count in.
    full = lemonslice("run", moe, *args)
    dense = write_synthetic(tmp_path / "dense.gguf", tiny_qwen35())
    with WeightStore(dense) as store:
        least = budget_plan(store, 10**9).minimum  # streamed: below the weights, above what a token needs
    small = lemonslice("run", dense, *args, "--max-memory", least)
    assert "full load" in full.stderr and "streaming, budget" in small.stderr
    for r in (full, small):
        assert r.returncode == 1
        assert r.stderr.strip().splitlines()[-1] == (
            "error: --expert-stats needs a streamed MoE model (a budget below the weights)")
    png = lemonslice("run", moe, "--prompt-ids", "1,2,3", "--expert-stats", tmp_path / "s.png")
    assert png.returncode == 1 and png.stderr.strip().startswith("error: ") and len(png.stderr.splitlines()) == 1
    assert not any(tmp_path.glob("s.*"))


def _tensor_bytes(path: Path) -> tuple[int, int]:
    """(non-expert bytes of all blocks, bytes of one token's routed experts) by gguf-py."""
    layer, per_token = 0, 0
    for t in gguf.GGUFReader(path).tensors:
        if not t.name.startswith("blk."):
            continue
        if "_exps" in t.name:
            per_token += int(t.n_bytes) // N_EXPERT * 2  # top-2 of 8
        else:
            layer += int(t.n_bytes)
    return layer, per_token


def test_inspect_budget(moe):
    runner = CliRunner()
    shown = runner.invoke(app, ["inspect", str(moe), "--budget", "600KiB"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()[-4:]
    assert re.fullmatch(r"budget: 614\.40 KB \(at least [\d.]+ KB to run at all\)", lines[0])
    assert lines[1].startswith("resident: ") and lines[3].startswith("expert cache: ")
    # Every byte of the budget is placed: shared, resident layer tensors, scratch, expert cache.
    p = json.loads(runner.invoke(app, ["inspect", str(moe), "--budget", "600KiB", "--json"]).output)["budget_plan"]
    assert p["budget"] == 600 * 1024 and p["minimum"] <= p["budget"]
    assert p["shared_bytes"] + p["resident_bytes"] + p["scratch"] + p["expert_cache"] == p["budget"]
    # Room for everything: all layer tensors resident, nothing read per token but the experts.
    layer, experts = _tensor_bytes(moe)
    big = json.loads(runner.invoke(app, ["inspect", str(moe), "--budget", "1GB", "--json"]).output)["budget_plan"]
    assert (big["resident_bytes"], big["streamed_bytes_per_token"]) == (layer, 0)
    assert big["expert_bytes_per_token"] == experts
    assert "budget_plan" not in json.loads(runner.invoke(app, ["inspect", str(moe), "--json"]).output)


def test_inspect_budget_reads_no_weight_and_refuses_too_little(moe):
    with WeightStore(moe) as store:
        budget_plan(store, 600 * 1024)
        assert store.bytes_read == 0 and store.resident_bytes == 0
    r = lemonslice("inspect", moe, "--budget", "1KB")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: a weight budget of 1000 B cannot run this model: one token needs at least ")
    assert len(r.stderr.strip().splitlines()) == 1
