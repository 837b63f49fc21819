"""Generation sessions, the perplexity method, and the text commands of the CLI.

The perplexity arithmetic is checked on a stub model whose probabilities are written out
here; sessions against fresh greedy decoding; the commands on the real Gemma 3 270M.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lemonslice.engine import Engine
from lemonslice.engine.generation import Session
from lemonslice.engine.sampling import Sampler, SamplingParams
from lemonslice.errors import LemonsliceError
from lemonslice.eval.perplexity import perplexity
from lemonslice.testing import tiny_qwen35, write_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
GREEDY = Sampler(SamplingParams(temperature=0.0))


class StubModel:
    """Next-token probabilities depend on the current token only: after token t,
    p(t) = 1/2 and every other of the 4 tokens 1/6. Records what it was fed."""

    def __init__(self):
        self.fed: list[list[int]] = []

    def reset(self):
        self.fed.append([])

    def forward(self, ids, all_logits=False):
        self.fed[-1].extend(ids)
        rows = []
        for t in ids:
            p = torch.full((4,), 1 / 6)
            p[t] = 1 / 2
            rows.append(p.log())
        out = torch.stack(rows)
        return out if all_logits else out[-1:]


def test_perplexity_method_by_hand():
    tokens = [1, 1, 2, 2, 3, 0, 0, 1, 3]  # 9 tokens, ctx 4: two windows, the last token unused
    stub = StubModel()
    r = perplexity(stub, tokens, ctx=4, bos_id=0)
    # Each window scores j = 2 only (j in [ctx/2, ctx-1)): window 0 predicts tokens[3]=2 after
    # tokens[2]=2 (p 1/2); window 1 predicts tokens[7]=1 after tokens[6]=0 (p 1/6).
    want = math.exp((math.log(2) + math.log(6)) / 2)
    assert r.scored == 2 and r.windows == 2
    assert math.isclose(r.ppl, want, rel_tol=1e-6)
    assert math.isclose(r.window_ppl[0], 2.0, rel_tol=1e-6)
    # Fresh state per window, first token replaced by BOS.
    assert stub.fed == [[0, 1, 2, 2], [0, 0, 0, 1]]
    with pytest.raises(LemonsliceError, match="needs at least 8"):
        perplexity(stub, tokens[:7], ctx=4, bos_id=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "tiny.gguf"
    write_synthetic(path, tiny_qwen35())
    return path


def test_session_reuses_state_only_for_an_extended_prompt(tiny):
    engine, other = Engine(tiny), Engine(tiny)
    want = other.generate([5, 6, 7, 8], 12)  # greedy from a fresh state
    s = Session(engine)
    first = list(s.generate([5, 6, 7], GREEDY, 4))
    assert s.stats.reused_tokens == 0 and s.stats.finish == "length"
    # The next turn extends what the state holds (the prompt and all but the last token).
    follow = [5, 6, 7] + first[:-1]
    fresh = other.generate(follow + [9], 5)
    again = list(s.generate(follow + [9], GREEDY, 5))
    assert s.stats.reused_tokens == len(follow) and again == fresh
    # A prompt that does not extend the state goes back to the checkpoint at the end of the
    # first prompt (the recurrent state as it was there) and still matches fresh decoding.
    assert list(s.generate([5, 6, 7, 8], GREEDY, 12)) == want and s.stats.reused_tokens == 3
    # One that shares less than any checkpoint starts over.
    assert list(s.generate([5, 9], GREEDY, 3)) == other.generate([5, 9], 3) and s.stats.reused_tokens == 0
    # Someone else moving the engine's state is noticed, not built upon.
    engine.generate([1, 2], 2)
    assert list(s.generate([5, 6, 7, 8] + want[:11] + [3], GREEDY, 2)) == other.generate([5, 6, 7, 8] + want[:11] + [3], 2)
    assert s.stats.reused_tokens == 0


def test_session_stops_at_a_stop_id_and_reports_it(tiny):
    engine = Engine(tiny)
    ref = engine.generate([1, 2, 3], 6)
    s = Session(engine)
    got = list(s.generate([1, 2, 3], GREEDY, 6, stop_ids=frozenset({ref[3]})))
    assert got == ref[: ref.index(ref[3])] and s.stats.finish == "eos"


def test_same_seed_same_tokens(tiny):
    params = SamplingParams.preset("instruct-general", seed=11)
    runs = [list(Session(Engine(tiny)).generate([4, 5], Sampler(params), 16)) for _ in range(2)]
    assert runs[0] == runs[1]


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LEMONSLICE, *args], capture_output=True, text=True, input=stdin, timeout=600)


def test_cli_rejects_bad_text_input(tiny, tmp_path):
    r = _cli("run", str(tiny), "-p", "x", "--prompt-ids", "1")
    assert r.returncode == 1 and r.stderr.strip() == "error: give exactly one of -p/--prompt and --prompt-ids"
    r = _cli("run", str(tiny), "-p", "x", "--preset", "nope")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: unknown sampling preset 'nope'")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    r = _cli("perplexity", str(tiny), str(short), "--ctx", "64")
    assert r.returncode == 1 and "needs at least 128" in r.stderr.strip().splitlines()[-1]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    r = _cli("perplexity", str(tiny), str(bad))
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == f"error: {bad} is not UTF-8 text"


def test_cli_chat_template_override_and_sandbox(tiny, tmp_path):
    """--chat-template replaces the template: the prompt it renders, given raw, generates the same text."""
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{{ messages[0].content }} => ")
    a = _cli("run", str(tiny), "--chat", "-p", "hello there", "--chat-template", str(tpl), "-n", "6")
    b = _cli("run", str(tiny), "-p", "hello there => ", "-n", "6")
    assert a.returncode == b.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    r = _cli("run", str(tiny), "--chat", "-p", "x", "--chat-template", str(evil))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith(f"error: chat template ({evil}) was blocked by the sandbox")
