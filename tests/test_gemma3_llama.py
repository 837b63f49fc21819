"""Gemma 3 270M against llama.cpp on 1,228 tokens of English prose (tests/data/prose.txt).

* Teacher-forced top-1 agreement over the first 512 tokens: at least 93%. llama.cpp rounds
  the activations of every quantized product to 8 bits and evaluates GELU through an fp16
  table, so near-ties flip; the exact reference is transformers (test_gemma3.py).
* Perplexity with a 512-token context, llama.cpp's method: `lemonslice perplexity` against
  the same windows scored here from llama.cpp's own logits; within 1%.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lemonslice.engine import Engine

from llama_ref import llama_logits, llama_tokenize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROSE = Path(__file__).parent / "data" / "prose.txt"
LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
CTX = 512


@pytest.fixture(scope="module")
def tokens(gemma_path) -> list[int]:
    ids = llama_tokenize(gemma_path, PROSE.read_text(encoding="utf-8"), True, False)
    assert len(ids) >= 2 * CTX and ids[0] == 2  # BOS
    return ids


def _llama_ppl(path: Path, tokens: list[int], ctx: int) -> float:
    """llama-perplexity's arithmetic, written out: fresh context per window, BOS first,
    the logits at j in [ctx/2, ctx-1) scored against token j+1."""
    nll, count, first = 0.0, 0, ctx // 2
    for w in range(len(tokens) // ctx):
        ids = tokens[w * ctx : (w + 1) * ctx]
        ids[0] = 2
        logits = llama_logits(path, ids, n_threads=1).astype(np.float64)  # [ctx, V]
        for j in range(first, ctx - 1):
            row = logits[j]
            m = row.max()
            nll += (m + math.log(np.exp(row - m).sum())) - row[ids[j + 1]]
            count += 1
    return math.exp(nll / count)


def test_top1_agreement_with_llama_cpp(gemma_path, tokens):
    ids = tokens[:CTX]
    ref = llama_logits(gemma_path, ids, n_threads=1)  # [512, V]
    got = Engine(gemma_path).logits(ids).numpy()
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"FIGURE gemma3 top-1 vs llama.cpp over {len(ids)} tokens: {agree:.2%}")
    assert agree >= 0.93


def test_perplexity_matches_llama_cpp(gemma_path, tokens):
    want = _llama_ppl(gemma_path, tokens, CTX)
    r = subprocess.run(
        [LEMONSLICE, "perplexity", str(gemma_path), str(PROSE), "--ctx", str(CTX), "--threads", "1"],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr
    m = re.search(r"perplexity: ([\d.]+) over (\d+) tokens \((\d+) windows of 512\)", r.stdout)
    assert m, r.stdout
    got, scored, windows = float(m.group(1)), int(m.group(2)), int(m.group(3))
    assert windows == len(tokens) // CTX and scored == windows * (CTX - 1 - CTX // 2)
    print(f"FIGURE gemma3 perplexity ctx {CTX}: lemonslice {got:.4f}, llama.cpp {want:.4f}, "
          f"diff {abs(got / want - 1):.3%}")
    assert abs(got / want - 1) < 0.01
