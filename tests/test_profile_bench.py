"""`lemonslice profile` and `lemonslice bench` through the console script.

Roles and bytes are checked against gguf-py's reading of the files (tensor names and sizes),
never against lemonslice's own tables; the only timing check is that the per-layer times add
up to the measured time per token (within the 10% the command states).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_util import one_line_error
from gguf_refs import GGUFPy

from lemonslice.testing import tiny_qwen35moe, write_synthetic

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))


def cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR")}
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def syn_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "moe.gguf"
    write_synthetic(path, tiny_qwen35moe())
    return path


def expected_rows(files: list[Path]) -> dict[str, tuple[str, int]]:
    """Part -> (role, bytes) from gguf-py: a block's mixer from attn_q / ssm_ tensors, its FFN from
    the routed-expert / dense FFN tensors, its bytes the sum of its tensors'."""
    blocks: dict[int, list] = {}
    shared: dict[str, int] = {}
    for f in files:
        for t in GGUFPy(f).tensors:
            if t.name.startswith("blk."):
                blocks.setdefault(int(t.name.split(".")[1]), []).append(t)
            else:
                shared[t.name] = int(t.n_bytes)
    out = {"embedding": ("embedding", shared["token_embd.weight"])}
    for b, ts in blocks.items():
        names = {t.name.split(".", 2)[2] for t in ts}
        mixer = "deltanet" if "ssm_out.weight" in names else "attention"
        ffn = "moe" if "ffn_gate_exps.weight" in names else "dense" if "ffn_up.weight" in names else ""
        out[str(b)] = (f"{mixer} + {ffn}", sum(int(t.n_bytes) for t in ts))
    head = "head" if "output.weight" in shared else "head (tied)"  # a tied head's bytes are the embedding's
    out[head] = (head, shared["output_norm.weight"] + shared.get("output.weight", 0))
    return out


def check_profile(doc: dict, files: list[Path], tokens: int, prompt: int) -> None:
    want = expected_rows(files)
    got = {r["part"]: r for r in doc["rows"]}
    assert list(got) == list(want), (list(got), list(want))  # embedding, 0..N-1, head
    for part, (role, nbytes) in want.items():
        r = got[part]
        assert r["role"].replace(" (sliding)", "") == role, (part, r["role"], role)
        assert r["nbytes"] == nbytes, (part, r["nbytes"], nbytes)
        for phase in ("prefill", "decode"):
            assert r["phases"][phase]["ms_per_token"] > 0, (part, phase)
    assert doc["phases"]["decode"]["tokens"] == tokens and doc["phases"]["prefill"]["tokens"] == prompt


def sum_line(stdout: str, phase: str) -> float:
    """The ratio the command prints: the parts' time over the measured time per token."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith(f"{phase}: layers + embedding + head"))
    return float(line.split("(")[1].split("%")[0]) / 100


def test_profile_split_directory_rows_roles_bytes(syn_split, tmp_path):
    js, png = tmp_path / "p.json", tmp_path / "p.png"
    r = cli("profile", syn_split, "--tokens", 4, "--prompt", 16, "--threads", 1, "--json", js, "--png", png)
    assert r.returncode == 0, r.stderr
    doc = json.loads(js.read_text())
    check_profile(doc, sorted(syn_split.glob("*.gguf")), 4, 16)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "deltanet + moe" in r.stdout and "attention + moe" in r.stdout


def test_profile_gemma_sums_to_the_measured_time(gemma_path, tmp_path):
    js = tmp_path / "g.json"
    r = cli("profile", gemma_path, "--tokens", 16, "--prompt", 64, "--threads", 1, "--json", js)
    assert r.returncode == 0, r.stderr
    doc = json.loads(js.read_text())
    check_profile(doc, [gemma_path], 16, 64)
    assert {x["role"] for x in doc["rows"][1:-1]} == {"attention + dense", "attention (sliding) + dense"}
    for phase in ("decode", "prefill"):
        ph = doc["phases"][phase]
        assert ph["parts_ms_per_token"] == pytest.approx(sum(x["phases"][phase]["ms_per_token"] for x in doc["rows"]))
        assert 0.9 <= ph["parts_ms_per_token"] / ph["ms_per_token"] <= 1.0, ph
        assert sum_line(r.stdout, phase) == pytest.approx(ph["parts_ms_per_token"] / ph["ms_per_token"], abs=1e-3)


def test_profile_streamed_counts_reads_and_expert_lookups(syn_path, tmp_path):
    js = tmp_path / "s.json"
    r = cli("profile", syn_path, "--tokens", 3, "--prompt", 8, "--threads", 1, "--max-memory", "400KB", "--json", js)
    assert r.returncode == 0, r.stderr
    rows = json.loads(js.read_text())["rows"][1:-1]
    for x in rows:
        d = x["phases"]["decode"]
        assert d["bytes_read_per_token"] > 0
        # tiny_qwen35moe routes each token to 2 experts: one lookup each per decode token.
        assert d["expert_lookups"] == 3 * 2 and d["expert_hits"] + d["expert_misses"] == d["expert_lookups"]


def test_bench_with_llama_writes_every_depth_and_turn(syn_path, tmp_path):
    pre = tmp_path / "b"
    r = cli("bench", syn_path, "--llama", "--depths", "16,64", "--turns", 3, "-n", 3, "--user-tokens", 8,
            "--threads", 1, "--csv", tmp_path / "b.csv", "--json", tmp_path / "b.json", "--png", pre)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "b.csv").open()))
    keys = {(x["engine"], x["kind"], int(x["x"])) for x in rows}
    assert keys == {(e, k, x) for e in ("lemonslice", "llama") for k, xs in (("depth", (16, 64)), ("turn", (1, 2, 3)))
                    for x in xs}
    assert len(rows) == len(keys)
    doc = json.loads((tmp_path / "b.json").read_text())
    assert len(doc["rows"]) == 10 and doc["threads"] == 1 and doc["user_tokens"] == 8
    for x in doc["rows"]:
        assert x["prefill_tps"] > 0 and x["decode_tps"] > 0 and x["decode_tokens"] == 3
        if x["kind"] == "turn":
            # Each turn feeds only what the state lacks: the last reply token and the user message.
            # Before turn t the state holds the earlier turns (8 user + 4 reply ids each) less the
            # last reply id, which no forward has taken yet.
            assert x["context"] == (0 if x["x"] == 1 else (x["x"] - 1) * 12 - 1)
            assert x["prefill_tokens"] == (8 if x["x"] == 1 else 9)
    for suffix in ("depth", "turns"):
        assert Path(f"{pre}-{suffix}.png").read_bytes()[:4] == b"\x89PNG"
    assert "llama.cpp decode" in r.stdout and "decode ratio" in r.stdout


def test_bad_input_is_refused(syn_path, syn_split):
    r = cli("bench", syn_path, "--bogus")
    assert r.returncode == 2 and "No such option: --bogus" in r.stderr
    one_line_error(cli("bench", syn_path, "--depths", "8192"), "above the model's context length 4096")
    one_line_error(cli("bench", syn_path, "--turns", "0"), "--turns must be >= 1")
    one_line_error(cli("bench", syn_path, "--depths", "1,x"), "--depths")
    one_line_error(cli("bench", syn_split, "--llama"), "--llama needs a .gguf file")
    one_line_error(cli("profile", syn_path, "--prompt", "5000"), "above the model's context length 4096")
    one_line_error(cli("profile", syn_path, "--tokens", "0"), "--tokens must be >= 1")
