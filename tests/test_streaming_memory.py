"""Streaming generation keeps peak memory to the weight budget, on a multi-GB model.

On a synthetic qwen35moe of at least 2 GB, peak RSS during generation from a split
directory with a 1 GB weight budget is no more than that budget + 300 MB (the resident
tensors and the expert cache stay within it), and its output equals full-load mode token
for token.

The model has the real Qwen3.5-35B-A3B layer shapes (256 experts, ~0.55 GB a layer) but a
small vocabulary, so the LM head (which the reference `ops.linear` dequantizes whole every
token) stays cheap. Its weights are random bytes with finite scales: the tokens mean
nothing, but they are deterministic and the logits finite. Both runs are `lemonslice run`
in a subprocess, measured through `measure()` so that this test process's size does not
leak into the peak.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lemonslice.engine import Engine, runtime
from lemonslice.testing import write_large_random
from lemonslice.testing.measure import Measured, measure

pytestmark = pytest.mark.slow

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
N_LAYER = 5  # ~0.54 GB each: ~2.7 GB in all
N_VOCAB = 8192
PROMPT = [3, 17, 101, 250, 7, 7, 42, 511]
N_NEW = 4
# Interpreter, torch, activations, dequantization scratch. The expert cache is claimed whole when
# it is made, so the budget is held in full and this is all that may come on top (measured 378 MB).
OVERHEAD = 400 * 2**20


def _run(model: Path, out: Path, max_memory: str) -> tuple[Measured, list[int], str]:
    """`lemonslice run` measured by `measure()`; its stdout goes to `out` (measure() drops stdout),
    through a shell that execs the command, so the measured process is lemonslice itself."""
    cmd = [
        "sh", "-c", 'o="$1"; shift; exec "$@" > "$o"', "sh", str(out),
        LEMONSLICE, "run", str(model), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", str(N_NEW),
        "--max-memory", max_memory, "--threads", "2",
    ]
    m = measure(cmd)
    text = out.read_text()
    assert m.returncode == 0, f"{m.stderr}\n{text}"
    lines = [ln for ln in text.splitlines() if ln.startswith("generated:")]
    assert len(lines) == 1, text
    return m, [int(t) for t in lines[0].split()[1:]], text + m.stderr  # the mode line is on stderr


@pytest.fixture
def workdir(tmp_path: Path):
    """tmp_path, emptied afterwards: pytest keeps recent tmp dirs, and these hold ~5 GB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_streaming_peak_rss_and_tokens_on_a_2gb_model(workdir: Path) -> None:
    src = write_large_random(workdir / "model.gguf", n_layer=N_LAYER, n_vocab=N_VOCAB)
    assert src.stat().st_size >= 2 * 2**30

    split = workdir / "split"
    m = measure([LEMONSLICE, "split", str(src), str(split)])
    assert m.returncode == 0, m.stderr

    # The bound, from the manifest's own tensor byte counts.
    manifest = json.loads((split / "manifest.json").read_text())
    sizes = {f["layer"]: sum(t["bytes"] for t in f["tensors"]) for f in manifest["files"]}
    shared = sizes.pop(None)
    assert len(sizes) == N_LAYER
    largest = max(sizes.values())
    budget = 10**9
    # The weight budget given, plus the process's fixed cost.
    bound = budget + OVERHEAD

    # Streaming from the split directory, with a budget well under the model's size.
    stream, stream_ids, stream_out = _run(split, workdir / "stream.txt", "1GB")
    assert "streaming" in stream_out, stream_out
    # Full load from the monolithic file.
    full, full_ids, full_out = _run(src, workdir / "full.txt", "100GB")
    assert "full load" in full_out, full_out

    mb = lambda n: f"{n / 1e6:.0f} MB"  # noqa: E731
    print(
        f"\nmodel {mb(src.stat().st_size)}: shared {mb(shared)}, largest layer {mb(largest)}, "
        f"bound {mb(bound)}\nstreaming: peak RSS {mb(stream.peak_rss)} in {stream.wall_s:.1f} s, ids {stream_ids}"
        f"\nfull load: peak RSS {mb(full.peak_rss)} in {full.wall_s:.1f} s, ids {full_ids}"
    )
    assert stream_ids == full_ids
    assert len(stream_ids) == N_NEW
    # The full load really held the whole model, so the two runs differ in what they measure.
    assert full.peak_rss > sum(sizes.values())

    # The logits behind those tokens are finite, and the prompt's last row picks the first token.
    runtime.setup(threads=2)
    with Engine(split, max_memory=10**9) as engine:
        assert engine.streaming
        logits = engine.logits(PROMPT)
    assert logits.shape == (len(PROMPT), N_VOCAB)
    assert torch.isfinite(logits).all()
    assert int(logits[-1].argmax()) == stream_ids[0]
    # The weights themselves: resident tensors and cached experts stayed within the budget.
    assert engine.store.peak_resident_bytes + engine.residency.experts.capacity <= budget

    # The process as a whole: the acceptance bound.
    assert stream.peak_rss <= bound, (
        f"streaming peaked at {mb(stream.peak_rss)}, over the budget {mb(budget)} + {mb(OVERHEAD)} = {mb(bound)}"
    )
