"""The one text loop (`text.generate`): its replies against a hand-written greedy loop on the
engine's forward, decoded by the tokenizer in one go; UTF-8-safe streaming; stop strings and
context limits; prefix reuse between turns; the incremental reasoning split against
`split_reasoning`; and `run --mtp --stop` through the CLI against the plain run's text.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lemonslice.engine import Engine
from lemonslice.engine.sampling import Sampler, SamplingParams
from lemonslice.engine.speculative import Speculator
from lemonslice.errors import LemonsliceError
from lemonslice.testing import tiny_qwen35, write_synthetic
from lemonslice.text.chat import split_reasoning
from lemonslice.text.generate import Prompt, ReasoningSplit, TextGenerator
from lemonslice.text.tokenizer import Tokenizer
from test_mtp import _drafting_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
GREEDY = SamplingParams(temperature=0.0)
PROMPT = [3, 17, 101, 250, 7, 7, 42]


def hand_greedy(engine: Engine, ids: list[int], n: int) -> list[int]:
    """Argmax of the logits, each token fed back: written here, apart from the code under test."""
    engine.reset()
    out, logits = [], engine.forward(ids)[-1]
    while len(out) < n:
        out.append(int(torch.argmax(logits)))
        logits = engine.forward(out[-1:])[-1]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("textgen") / "tiny.gguf", tiny_qwen35())


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory) -> Path:
    return _drafting_model(tmp_path_factory.mktemp("textgen") / "mtp.gguf", moe=True)


def test_reply_is_greedy_ids_decoded(tiny):
    engine = Engine(tiny)
    tok = Tokenizer.from_gguf(engine.store.metadata)
    want = hand_greedy(Engine(tiny), PROMPT, 12)
    gen = TextGenerator(engine, tok, stops=frozenset()).generate(PROMPT, Sampler(GREEDY), 12)
    pieces = list(gen)
    assert gen.ids == want and gen.finish == "length" and gen.describe() == "length (12 tokens)"
    assert gen.text == "".join(p.text for p in pieces) == tok.decode(want, skip_special=True)
    assert [p.token for p in pieces if p.token is not None] == want  # one piece per token, as it comes
    s = gen.stats
    assert (s.prefill_tokens, s.decode_tokens, s.generated, s.reused_tokens) == (len(PROMPT), 11, 12, 0)
    # An end-of-turn id ends the reply before it, and is not part of it.
    gen = TextGenerator(engine, tok, stops=frozenset({want[5]})).generate(PROMPT, Sampler(GREEDY), 12).run()
    cut = want.index(want[5])
    assert gen.ids == want[:cut] and gen.finish == "eos" and gen.describe() == "end of text"


def test_mtp_reply_equals_plain_and_stops_at_a_string(mtp_model):
    engine = Engine(mtp_model)
    tok = Tokenizer.from_gguf(engine.store.metadata)
    want = hand_greedy(Engine(mtp_model), PROMPT, 24)
    spec = TextGenerator(engine, tok, stops=frozenset(), speculator=Speculator(engine), draft_max=2)
    gen = spec.generate(PROMPT, Sampler(GREEDY), 24)
    pieces = list(gen)
    full = tok.decode(want, skip_special=True)
    assert gen.ids == want and gen.text == full and gen.stats.steps < 23  # some drafts were kept
    assert [p.token for p in pieces if p.token is not None] == want
    stop = full[len(full) // 2:len(full) // 2 + 2]
    gen = spec.generate(PROMPT, Sampler(GREEDY), 24, stop=[stop]).run()
    assert gen.text == full[:full.index(stop)] and gen.finish == "stop string" and gen.stop_string == stop


def test_a_character_split_across_tokens_is_shown_once_whole(tiny):
    """A scripted sampler picks the byte tokens of "é" (2 bytes) and "€" (3 bytes) one at a time."""
    engine = Engine(tiny)
    tok = Tokenizer.from_gguf(engine.store.metadata)
    byte_id = {tok.token_bytes(i): i for i in range(tok.n_vocab) if len(tok.token_bytes(i)) == 1}
    script = [byte_id[bytes([b])] for b in "aé€b".encode()]

    class Scripted(Sampler):
        def sample(self, logits, history=()):  # noqa: ANN001, ANN202
            return script[len(history) - len(PROMPT)]

    gen = TextGenerator(engine, tok, stops=frozenset()).generate(PROMPT, Scripted(GREEDY), len(script))
    assert [p.text for p in gen] == ["a", "", "é", "", "", "€", "b"]
    assert gen.text == "aé€b"
    # Cut off inside a character: the end releases it as U+FFFD, as a whole decode does.
    gen = TextGenerator(engine, tok, stops=frozenset()).generate(PROMPT, Scripted(GREEDY), 4).run()
    assert gen.text == tok.decode(script[:4]) == "aé\ufffd"


def test_prefix_reuse_between_turns(tiny):
    engine = Engine(tiny)
    text = TextGenerator(engine, None)
    first = text.generate(PROMPT, Sampler(GREEDY), 6).run()
    # The state holds the prompt and every reply token but the last (never fed).
    follow = PROMPT + first.ids + [9, 10]
    second = text.generate(follow, Sampler(GREEDY), 5).run()
    assert second.stats.reused_tokens == len(PROMPT) + 5 and second.stats.prefill_tokens == 3
    assert second.ids == hand_greedy(Engine(tiny), follow, 5)
    # A stop string ends a reply before its last token is fed: the next turn builds on the rest.
    tok = Tokenizer.from_gguf(engine.store.metadata)
    text = TextGenerator(engine, tok, stops=frozenset())
    full = text.generate(PROMPT, Sampler(GREEDY), 8).run()
    stop = next(tok.decode([t]) for t in full.ids[2:] if tok.decode([t]).strip())
    cut = text.generate(PROMPT, Sampler(GREEDY), 8, stop=[stop]).run()
    k = len(cut.ids)
    assert cut.finish == "stop string" and cut.ids == full.ids[:k]
    nxt = text.generate(PROMPT + cut.ids + [11], Sampler(GREEDY), 3).run()
    assert nxt.stats.reused_tokens == len(PROMPT) + k - 1
    assert nxt.ids == hand_greedy(Engine(tiny), PROMPT + cut.ids + [11], 3)
    # A prompt that does not extend the state starts afresh.
    assert text.generate([1, 2, 3], Sampler(GREEDY), 2).run().stats.reused_tokens == 0


def test_context_limit(tiny):
    engine = Engine(tiny)
    text = TextGenerator(engine, None)
    gen = text.generate(PROMPT, Sampler(GREEDY), 10, ctx_size=len(PROMPT) + 4).run()
    assert len(gen.ids) == 4 and gen.finish == "context" and gen.describe() == f"context full ({len(PROMPT) + 4} tokens)"
    assert text.generate(PROMPT, Sampler(GREEDY), 3, ctx_size=100).run().finish == "length"
    with pytest.raises(LemonsliceError, match="leaves no room"):
        text.generate(PROMPT, Sampler(GREEDY), 3, ctx_size=len(PROMPT))


@pytest.mark.parametrize("text", [
    "plain answer", "  <think> why\n</think>\n\n  the answer", "reasoning only </think>  answer </think> more",
    "before <think> inside", "a</think>", "<think></think>", "\n\n</think>\n\n\nx",
])
@pytest.mark.parametrize("opened", [False, True])
def test_reasoning_split_follows_split_reasoning_at_every_step(text, opened):
    for size in (1, 2, 3, 7):
        split = ReasoningSplit(opened)
        for i in range(0, len(text), size):
            split.feed(text[i:i + size])
            assert split.split() == split_reasoning(text[:i + size], opened=opened), (text, size, i)
    assert split.text == text


def test_prompt_through_the_chat_template(tiny):
    engine = Engine(tiny)
    tok = Tokenizer.from_gguf(engine.store.metadata)
    text = TextGenerator(engine, tok)
    on = text.chat([{"role": "user", "content": "Hi"}], thinking=True)
    off = text.chat([{"role": "user", "content": "Hi"}], thinking=False)
    assert on.opened and not off.opened
    assert tok.decode(off.ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert text.stops == {tok.tokens.index("<|im_end|>"), tok.tokens.index("<|endoftext|>")}
    assert isinstance(text.encode("hello"), Prompt)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    return subprocess.run([LEMONSLICE, *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_run_mtp_streams_and_honours_stop(mtp_model):
    args = ["run", str(mtp_model), "-p", "hello there", "-n", "16", "--threads", "1"]
    plain = _cli(*args)
    assert plain.returncode == 0, plain.stderr
    full = plain.stdout[:-1]
    at = len(full) // 2
    stop = full[at:at + 2]
    r = _cli(*args, "--mtp", "--draft-max", "2", "--stop", stop)
    assert r.returncode == 0, r.stderr
    assert r.stdout == full[:full.index(stop)] + "\n"
    stop_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("stop: ")]
    assert stop_lines == [f'stop: stop string "{stop}"'] and "MTP draft-max 2:" in r.stderr
