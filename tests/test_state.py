"""Sequence state apart from weights: made from hyper-parameters, snapshot / restore, mark /
truncate, and MTP rollbacks that read no weight byte in streaming mode.

References: the same engine's plain path (a state that was never rolled back or restored
runs the same operations on the same values, so the logits must be equal), plain greedy
decoding for speculation, and residency's byte counter for what was read.

`pytest -s` prints the figures on lines starting with `FIGURE:`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lemonslice.engine import Engine, SequenceState, Streamed
from lemonslice.engine.speculative import generate
from lemonslice.errors import LemonsliceError
from lemonslice.models import AttentionCache, DeltaNetCache
from lemonslice.testing import tiny_qwen35moe, write_synthetic
from test_mtp import PROMPTS, _drafting_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

A, B, C = [3, 17, 101, 250, 7], [7, 42, 11, 9, 5, 6], [300, 2, 450]


def figure(text: str) -> None:
    print(f"\nFIGURE: {text}", flush=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("state") / "m.gguf", tiny_qwen35moe())


def run(e: Engine, state: SequenceState, ids: list[int]) -> torch.Tensor:
    return e.forward_batch([state], [ids], logits="all")[0]


def test_states_come_from_hyper_parameters_alone(model):
    e = Engine(model, plan=Streamed(1))  # streaming: no block resident
    before = e.residency.bytes_read
    states = [e.new_state() for _ in range(3)]
    assert e.residency.bytes_read == before
    kinds = [type(c) for c in states[0].caches]
    assert kinds == [DeltaNetCache if r else AttentionCache for r in e.args.recurrent[: e.args.n_layer]]
    assert states[0].caches[0] is not states[1].caches[0]


def test_snapshot_and_restore(model):
    e = Engine(model)
    s, ref = e.new_state(), e.new_state()
    run(e, s, A)
    snap = s.snapshot()
    run(e, s, B)
    s.restore(snap)
    assert s.n_past == len(A)
    run(e, ref, A)
    assert torch.equal(run(e, s, C), run(e, ref, C))
    s.restore(snap)  # a snapshot serves more than one restore
    assert s.n_past == len(A)


def test_truncate_back_to_a_mark(model):
    e = Engine(model, plan=Streamed(1))
    s, ref = e.new_state(), e.new_state()
    run(e, s, A)
    s.mark()
    run(e, s, B)
    before = e.residency.bytes_read
    s.truncate(len(A) + 2)
    assert e.residency.bytes_read == before and s.n_past == len(A) + 2
    run(e, ref, A)
    run(e, ref, B[:2])
    got, want = run(e, s, C), run(e, ref, C)
    # The truncated state replays the delta rule over 2 recorded tokens; ref computed them in a
    # 2-row forward: the same tokens, projections of 6 rows against 2.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    with pytest.raises(LemonsliceError, match="mark"):
        s.truncate(len(A))  # the mark is gone after a truncate; recurrent state cannot rewind alone


def test_truncate_without_mark_is_refused_for_recurrent_state(model):
    e = Engine(model)
    s = e.new_state()
    run(e, s, A)
    with pytest.raises(LemonsliceError, match="mark"):
        s.truncate(2)
    with pytest.raises(LemonsliceError, match="truncate"):
        s.truncate(len(A) + 1)


def test_mtp_rollback_reads_no_weights_in_streaming(tmp_path, monkeypatch):
    e = Engine(_drafting_model(tmp_path / "m.gguf", moe=True), plan=Streamed(1))
    assert e.streaming and e.pinned == 0
    want = [e.generate(p, 32) for p in PROMPTS]
    cuts: list[tuple[int, int]] = []  # (positions dropped, bytes read during the truncate)
    truncate = SequenceState.truncate

    def counted(self, n):
        before, past = e.residency.bytes_read, self.n_past
        truncate(self, n)
        cuts.append((past - n, e.residency.bytes_read - before))

    monkeypatch.setattr(SequenceState, "truncate", counted)
    read_total = 0
    for p, w in zip(PROMPTS, want):
        before = e.residency.bytes_read
        got, stats = generate(e, p, 32, 3)
        read_total += e.residency.bytes_read - before
        assert got == w
    rollbacks = [c for c in cuts if c[0] > 0]
    figure(f"MTP streaming K=3: {len(PROMPTS)} prompts x 32 tokens identical to plain greedy; {len(rollbacks)} of "
           f"{len(cuts)} verify steps rolled back, reading {sum(b for _, b in cuts)} weight bytes for them "
           f"(the generations read {read_total} bytes in all)")
    assert rollbacks and all(b == 0 for _, b in cuts)
