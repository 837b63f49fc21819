"""`lemonslice sweep`: candidate playlists, the sweep config, greedy generation with stops,
chat prompts, and whole sweeps on a tiny synthetic model run through the real console
script: outputs, a SIGKILL midway and the resume, and refusing a foreign OUTDIR.

Expected playlists and prompts are written out by hand; generation is checked against
`Engine.generate`; a resumed sweep is checked against an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lemonslice.cli.sweep import _parse_range
from lemonslice.engine import Engine, WeightStore
from lemonslice.errors import LemonsliceError
from lemonslice.eval import (
    ChatPrompter, SweepConfig, SweepError, greedy, load_suites, make_config, repeat_playlist, run_sweep, stop_ids,
)
from lemonslice.eval.generate import BUILTIN_GEMMA3_TEMPLATE, chat_template_for
from lemonslice.eval.heatmap import delta_grid
from lemonslice.eval.sweep import compact_playlist, load_results
from lemonslice.testing import tiny_qwen35, write_synthetic
from lemonslice.text.chat import ChatTemplate
from lemonslice.text.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
# 8 layers, blocks of 2 at every start: 7 candidates + the baseline; 2 items per suite.
SWEEP_ARGS = ["--block", "2", "--stride", "1", "--limit", "2", "--max-new-tokens", "12", "--threads", "1"]
N_CONFIGS = 8
TIMING_KEYS = ("seconds", "finished_at")


def cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), r.stderr
    assert not any(ln.startswith("error") for ln in lines[:-1]), r.stderr
    for n in needles:
        assert n in lines[-1], (n, r.stderr)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("tiny") / "tiny.gguf", tiny_qwen35())


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory) -> Path:
    """One uninterrupted sweep, shared by the output checks and the resume comparison."""
    out = tmp_path_factory.mktemp("full") / "out"
    r = cli("sweep", tiny, "-o", out, *SWEEP_ARGS)
    assert r.returncode == 0, r.stderr
    return out


def results(outdir: Path) -> dict:
    return json.loads((outdir / "results.json").read_text())


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


# ---- playlists and config -----------------------------------------------------------------


def test_repeat_playlist_matches_rys():
    # RYS's rys_27-30 on a 32-layer model: 0 .. 30, then 27 .. 31; blocks are inclusive like --layers.
    assert compact_playlist(repeat_playlist(32, 27, 30)) == "0-30,27-31"
    assert repeat_playlist(6, 2, 3) == [0, 1, 2, 3, 2, 3, 4, 5]
    assert repeat_playlist(4, 0, 3) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert compact_playlist([0, 1, 2, 1, 2, 3]) == "0-2,1-3"
    assert compact_playlist([5]) == "5"


def config(**kw) -> SweepConfig:
    base = dict(
        model={"name": "m.gguf", "arch": "gemma3", "n_layer": 18, "weight_bytes": 1},
        block=8, stride=4, start=0, end=17, limit=None, thinking=False, max_new_tokens=None,
        probes=({"name": "math", "source": "builtin:math", "sha256": "0" * 64, "scorer": "math", "items": 3},),
        chat_template_sha256="f" * 64,
    )
    return SweepConfig(**{**base, **kw})


def test_candidates_pass_1_and_pass_2():
    c = config().candidates()
    assert [(x.name, x.start, x.end) for x in c] == [
        ("baseline", None, None), ("0-7", 0, 7), ("4-11", 4, 11), ("8-15", 8, 15)]
    assert c[0].playlist == tuple(range(18))
    assert c[2].playlist == (*range(12), *range(4, 18))
    # Pass 2 of the RYS card: blocks of 4, stride 1, within layers 8-31 of 32.
    c2 = config(model={"name": "m", "arch": "qwen35", "n_layer": 32, "weight_bytes": 1},
                block=4, stride=1, start=8, end=31).candidates()
    assert len(c2) == 1 + 21
    assert (c2[1].name, c2[-1].name) == ("8-11", "28-31")
    assert compact_playlist(c2[-1].playlist) == "0-31,28-31"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(block=0), "--block must be >= 1"),
        (dict(stride=0), "--stride must be >= 1"),
        (dict(start=4, end=20), "--range must satisfy 0 <= i <= j < 18, got 4-20"),
        (dict(start=9, end=8), "--range must satisfy"),
        (dict(start=12, end=17), "--range 12-17 is shorter than a block of 8 layers"),
        (dict(limit=0), "--limit must be >= 1"),
        (dict(max_new_tokens=0), "--max-new-tokens must be >= 1"),
        (dict(probes=()), "at least one probe suite"),
    ],
)
def test_config_validation(kw, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(")):
        config(**kw)


def test_config_json_round_trip_and_validation():
    c = config(limit=5)
    assert SweepConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    with pytest.raises(SweepError, match="unknown key 'blok'"):
        SweepConfig.from_json({**c.to_json(), "blok": 8})
    with pytest.raises(SweepError, match="missing key 'stride'"):
        SweepConfig.from_json({k: v for k, v in c.to_json().items() if k != "stride"})
    with pytest.raises(SweepError, match="block must be an integer"):
        SweepConfig.from_json({**c.to_json(), "block": "8"})
    with pytest.raises(SweepError, match="format must be"):
        SweepConfig.from_json({**c.to_json(), "format": "other"})


def test_default_reply_lengths():
    assert config().max_new_tokens_for("eq") == 48
    assert config().max_new_tokens_for("math") == 24
    assert config(thinking=True).max_new_tokens_for("math") == 1024
    assert config(max_new_tokens=7).max_new_tokens_for("eq") == 7


def test_delta_grid():
    rows = [
        {"start": None, "end": None, "delta": {"m": 0.0}},
        {"start": 0, "end": 7, "delta": {"m": 0.25}},
        {"start": 4, "end": 11, "delta": {"m": -0.5}},
    ]
    starts, ends, grid = delta_grid(rows, "m")
    assert (starts, ends) == ([0, 4], [7, 11])
    assert grid[0][0] == 0.25 and grid[1][1] == -0.5
    assert grid[0][1] != grid[0][1] and grid[1][0] != grid[1][0]  # NaN: not run


# ---- prompts and generation ---------------------------------------------------------------


def test_gemma3_builtin_template():
    t = ChatTemplate(BUILTIN_GEMMA3_TEMPLATE)
    assert t.render([{"role": "user", "content": "Hi"}], bos_token="<bos>") == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert t.render(msgs, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_gemma_prompt_ids_and_stops(gemma_path):
    store = WeightStore(gemma_path)
    try:
        tok = Tokenizer.from_gguf(store.metadata)
        template = chat_template_for(store.metadata)
        assert template.origin == "built-in Gemma 3"
        ids, opened = ChatPrompter(tok, template).ids("Hi")
        # <bos> <start_of_turn> "user" "\n" "Hi" <end_of_turn> "\n" <start_of_turn> "model" "\n": one BOS only.
        assert [tok.tokens[i] for i in ids[:2]] == ["<bos>", "<start_of_turn>"] and ids.count(tok.bos_id) == 1
        assert tok.decode(ids) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        assert not opened
        assert {tok.tokens[i] for i in stop_ids(tok, store.metadata)} == {"<eos>", "<end_of_turn>"}
    finally:
        store.close()


def test_qwen_prompt_thinking_switch(tiny):
    store = WeightStore(tiny)
    try:
        tok = Tokenizer.from_gguf(store.metadata)
        off = ChatPrompter(tok, chat_template_for(store.metadata), thinking=False)
        on = ChatPrompter(tok, chat_template_for(store.metadata), thinking=True)
        assert off.render("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        assert on.render("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
        assert on.ids("Hi")[1] and not off.ids("Hi")[1]
        assert stop_ids(tok, store.metadata) == {tok.tokens.index("<|im_end|>"), tok.tokens.index("<|endoftext|>")}
    finally:
        store.close()


def test_greedy_matches_engine_generate_and_stops(tiny):
    engine = Engine(tiny)
    tok = Tokenizer.from_gguf(engine.store.metadata)
    prompt = tok.encode("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    want = engine.generate(prompt, 10)
    g = greedy(engine, prompt, tok, 10, frozenset())
    assert (g.ids, g.stop, g.text) == (want, "length", tok.decode(want))
    # A stop token ends the reply before it; it is not part of the reply.
    g = greedy(engine, prompt, tok, 10, frozenset({want[3]}))
    assert (g.ids, g.stop) == (want[: want.index(want[3])], "eos")
    seen: list[str] = []
    g = greedy(engine, prompt, tok, 10, frozenset(), done=lambda text: seen.append(text) or len(seen) == 2)
    assert (g.ids, g.stop) == (want[:2], "done")
    # `done` sees the text as it streams: a trailing incomplete UTF-8 character is held back.
    assert seen == [tok.decode(want[:1]).rstrip("\ufffd"), tok.decode(want[:2]).rstrip("\ufffd")]
    # A think block left open by the prompt: the answer is what follows </think>.
    g = greedy(engine, prompt, tok, 10, frozenset(), opened_think=True)
    assert g.answer == ""


# ---- whole sweeps through the console script ----------------------------------------------


def test_sweep_writes_results(full_run):
    cfg = json.loads((full_run / "sweep.json").read_text())
    assert (cfg["format"], cfg["block"], cfg["stride"], cfg["start"], cfg["end"]) == ("lemonslice-sweep-v2", 2, 1, 0, 7)
    assert (cfg["limit"], cfg["thinking"], cfg["max_new_tokens"]) == (2, False, 12)
    assert [(p["name"], p["scorer"], p["items"]) for p in cfg["probes"]] == [
        ("math", "math", 2), ("eq", "eq", 2), ("reasoning", "exact", 2)]
    assert cfg["model"] == {"name": "tiny.gguf", "arch": "qwen35", "n_layer": 8,
                            "weight_bytes": cfg["model"]["weight_bytes"]}

    doc = results(full_run)
    rows = doc["rows"]
    assert [r["config"] for r in rows] == ["baseline", "0-1", "1-2", "2-3", "3-4", "4-5", "5-6", "6-7"]
    assert rows[2]["playlist"] == [0, 1, 2, 1, 2, 3, 4, 5, 6, 7] and rows[2]["n_layers"] == 10
    assert doc["baseline"] == rows[0]["scores"]
    for r in rows:
        assert [len(r["items"][p]) for p in ("math", "eq", "reasoning")] == [2, 2, 2]
        for p in ("math", "eq", "reasoning"):
            assert r["scores"][p] == pytest.approx(sum(i["score"] for i in r["items"][p]) / 2)
            assert r["delta"][p] == pytest.approx(r["scores"][p] - rows[0]["scores"][p])
            assert all(i["tokens"] <= 12 for i in r["items"][p])

    with open(full_run / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["config", "start", "end", "n_layers", "playlist", "math", "math_delta", "eq",
                              "eq_delta", "reasoning", "reasoning_delta", "seconds", "finished_at"]
    assert [(t["config"], t["start"], t["end"], t["playlist"]) for t in table[:3]] == [
        ("baseline", "", "", "0-7"), ("0-1", "0", "1", "0-1,0-7"), ("1-2", "1", "2", "0-2,1-7")]
    assert float(table[3]["eq"]) == pytest.approx(rows[3]["scores"]["eq"], rel=1e-5)

    for p in ("math", "eq", "reasoning"):
        png = (full_run / f"heatmap_{p}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not [p for p in full_run.iterdir() if ".lemonslice-tmp-" in p.name]


def test_sweep_killed_midway_resumes(tiny, full_run, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    proc = subprocess.Popen([LEMONSLICE, "sweep", str(tiny), "-o", str(out), *SWEEP_ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "results.json").exists() and results(out)["rows"]:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = results(out)["rows"]
    assert 1 <= len(before) < N_CONFIGS, "the sweep finished before it could be killed"

    r = cli("sweep", tiny, "-o", out, *SWEEP_ARGS)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out}: {len(before)} of {N_CONFIGS} configurations already done" in r.stderr
    after = results(out)["rows"]
    # Finished configurations were not run again: their rows, timestamps included, are unchanged.
    assert after[: len(before)] == before
    assert len({r["finished_at"] for r in after}) == N_CONFIGS
    assert without_timing(after) == without_timing(results(full_run)["rows"])
    assert all((out / f"heatmap_{p}.png").exists() for p in ("math", "eq", "reasoning"))


def test_finished_sweep_reruns_nothing(tiny, full_run, tmp_path):
    """In process, through the library: the CLI's config, resumed with nothing left to do."""
    out = tmp_path / "copy"
    shutil.copytree(full_run, out)
    engine = Engine(tiny)
    prompter = ChatPrompter(Tokenizer.from_gguf(engine.store.metadata), chat_template_for(engine.store.metadata, style="auto"))
    suites = load_suites("math,eq,reasoning")
    cfg = make_config(engine, suites, prompter, block=2, stride=1, layer_range=None, limit=2, max_new_tokens=12)
    resumed: list[tuple[int, int]] = []
    rows = run_sweep(engine, suites, prompter, cfg, out, on_resume=lambda done, total: resumed.append((done, total)))
    assert resumed == [(N_CONFIGS, N_CONFIGS)]
    assert rows == results(out)["rows"] == results(full_run)["rows"]
    assert engine.playlist == list(range(8))


def test_sweep_refuses_foreign_outdir(tiny, full_run, tmp_path):
    r = cli("sweep", tiny, "-o", full_run, *SWEEP_ARGS[:2], "--stride", "2", *SWEEP_ARGS[4:])
    assert_one_line_error(r, "holds a different sweep (stride: saved 1, now 2)", "new -o directory")
    engine = Engine(tiny)
    tok = Tokenizer.from_gguf(engine.store.metadata)
    suites = load_suites("math,eq,reasoning")
    thinking = ChatPrompter(tok, chat_template_for(engine.store.metadata), thinking=True)
    cfg = make_config(engine, suites, thinking, block=2, stride=1, layer_range=None, limit=2, max_new_tokens=12)
    with pytest.raises(SweepError, match=r"holds a different sweep \(thinking: saved false, now true\)"):
        run_sweep(engine, suites, thinking, cfg, full_run)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match="is not empty and has no sweep.json"):
        run_sweep(engine, suites, thinking, cfg, other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_best_block_label_pasted_into_layers_runs_the_scored_playlist(tiny, full_run):
    """A block label means the same layers in a sweep and in --layers "repeat A-B" (both inclusive)."""
    from lemonslice.surgery.plan import playlist_for

    rows = results(full_run)["rows"]
    blocks = [r for r in rows if r["config"] != "baseline"]
    best = max(blocks, key=lambda r: sum(r["delta"].values()))
    assert playlist_for(f"repeat {best['config']}", tiny) == best["playlist"]
    for r in blocks:
        assert playlist_for(f"repeat {r['config']}", tiny) == r["playlist"], r["config"]
    # Written out by hand: block 2-3 of 8 layers runs layers 2 and 3 twice.
    assert next(r for r in rows if r["config"] == "2-3")["playlist"] == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7]


def test_half_open_v1_outdir_is_converted_on_resume(tiny, full_run, tmp_path):
    """An OUTDIR from before the inclusive notation ("0-2" for layers 0..1) is rewritten in it
    and resumes with nothing to rerun."""
    out = tmp_path / "v1"
    shutil.copytree(full_run, out)
    cfg = json.loads((out / "sweep.json").read_text())
    (out / "sweep.json").write_text(json.dumps({**cfg, "format": "lemonslice-sweep-v1", "end": cfg["end"] + 1}))
    doc = results(out)
    for r in doc["rows"]:
        if r["start"] is not None:
            r["end"] += 1
            r["config"] = f"{r['start']}-{r['end']}"
    (out / "results.json").write_text(json.dumps({**doc, "format": "lemonslice-sweep-results-v1"}))
    assert [r["config"] for r in doc["rows"]][:3] == ["baseline", "0-2", "1-3"]

    r = cli("sweep", tiny, "-o", out, *SWEEP_ARGS)
    assert r.returncode == 0, r.stderr
    assert "converted from half-open block labels" in r.stderr
    assert f"resuming {out}: {N_CONFIGS} of {N_CONFIGS} configurations already done" in r.stderr
    assert json.loads((out / "sweep.json").read_text()) == cfg
    assert results(out) == results(full_run)
    assert (out / "results.csv").read_text() == (full_run / "results.csv").read_text()


def test_damaged_results_are_refused(full_run, tmp_path):
    cfg = SweepConfig.from_json(json.loads((full_run / "sweep.json").read_text()))
    doc = results(full_run)
    doc["rows"][1]["playlist"] = [0, 1, 2, 3, 4, 5, 6, 7]
    (tmp_path / "results.json").write_text(json.dumps(doc))
    with pytest.raises(SweepError, match="has a row that does not belong"):
        load_results(tmp_path, cfg)
    (tmp_path / "results.json").write_text('{"rows": [')
    with pytest.raises(SweepError, match="is not valid JSON"):
        load_results(tmp_path, cfg)


def test_sweep_bad_options_one_line_errors(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "scorer": "math", "prompt": "1+1?", "answer": 2}\n{"id": "b"\n')
    # Probe files are checked before the model is read: the model path need not exist.
    r = cli("sweep", tmp_path / "no-model.gguf", "-o", tmp_path / "o", "--probes", f"math,{bad}")
    assert_one_line_error(r, f"{bad}:2: not valid JSON")
    r = cli("sweep", tiny, "-o", tmp_path / "o", "--range", "2-20", "--block", "2")
    assert_one_line_error(r, "--range must satisfy 0 <= i <= j < 8, got 2-20")
    assert not (tmp_path / "o").exists()


def test_parse_range():
    assert _parse_range("8-32") == (8, 32) and _parse_range(" 0 - 4 ") == (0, 4)
    with pytest.raises(LemonsliceError, match="--range must look like 8-31"):
        _parse_range("eight-32")


def test_completion_prompt_style_for_base_models(tiny):
    """No template in the GGUF: 'auto' asks a plain question; 'chat' falls back to a chat template."""
    meta = Engine(tiny).store.metadata
    assert "tokenizer.chat_template" not in meta
    auto = chat_template_for(meta, style="auto")
    text = auto.render([{"role": "user", "content": "What is 6 * 7? "}], bos_token="<s>")
    assert text == "<s>Question: What is 6 * 7?\nAnswer:"
    assert chat_template_for(meta, style="chat").origin != auto.origin
    with pytest.raises(ValueError, match="prompt style"):
        chat_template_for(meta, style="poem")
