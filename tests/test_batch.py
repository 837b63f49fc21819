"""A batch of sequences through one forward (`Engine.forward_batch` / `Compute.forward`).

Four prompts of different lengths are prefilled together and then decoded greedily together,
one batched forward per step (each sequence at its own position); every sequence must get
exactly the ids that plain single-sequence greedy decoding (`Engine.generate`) gives it, on
tiny qwen35moe and qwen35 models and on the real Gemma 3 270M, fully loaded and streamed.

In streaming mode the bytes one decode step reads (counted by residency) are printed for the
batch next to one sequence's step; they may differ only by routed experts, so for the dense
models and Gemma they are equal, and for the MoE the difference is whole experts' bytes,
per-expert sizes taken from the file with gguf-py.

`pytest -s` prints the figures on lines starting with `FIGURE:`.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from lemonslice.engine import Compute, Engine, FullLoad, Pinned, Residency, Streamed, WeightStore
from lemonslice.errors import LemonsliceError
from lemonslice.testing import tiny_qwen35, tiny_qwen35moe, write_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [[3, 17, 101, 250, 7, 7, 42, 11, 9], [5], [300, 2, 450, 31, 31, 99, 4, 8, 15, 16, 23, 42, 1, 2], [77, 78, 79]]
N_NEW = 8


def figure(text: str) -> None:
    print(f"\nFIGURE: {text}", flush=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("batch")
    return {"qwen35moe": write_synthetic(d / "moe.gguf", tiny_qwen35moe()),
            "qwen35": write_synthetic(d / "dense.gguf", tiny_qwen35())}


def greedy_batch(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy decoding of all prompts together: one batched forward per step."""
    states = [engine.new_state() for _ in prompts]
    last = engine.forward_batch(states, prompts, logits="last")
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(n):
        for o, logits in zip(out, last):
            o.append(int(torch.argmax(logits[-1])))
        if step + 1 < n:
            last = engine.forward_batch(states, [o[-1:] for o in out], logits="last")
    return out


def expert_bytes(path: Path) -> int:
    """Bytes of one expert of block 0 across its expert tensors, from gguf-py (0 without experts)."""
    total = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.0.") and "_exps." in t.name:
            total += int(t.n_bytes) // int(t.shape[-1])
    return total


def step_bytes(engine: Engine, prompts: list[list[int]]) -> int:
    """Bytes residency reads for one decode step of these sequences after their prompts."""
    states = [engine.new_state() for _ in prompts]
    engine.forward_batch(states, prompts, logits="last")
    before = engine.residency.bytes_read
    engine.forward_batch(states, [[1] for _ in prompts], logits="last")
    return engine.residency.bytes_read - before


def check_batch(path: Path, name: str, chunk: int) -> None:
    for streaming in (False, True):
        engine = Engine(path, plan=Streamed(1) if streaming else None, prefill_chunk=chunk)
        assert engine.streaming == streaming
        alone = [engine.generate(p, N_NEW) for p in PROMPTS]
        together = greedy_batch(engine, PROMPTS, N_NEW)
        mode = "streaming" if streaming else "full load"
        assert together == alone, mode
        if streaming:
            one = step_bytes(engine, PROMPTS[:1])
            four = step_bytes(engine, PROMPTS)
            per_expert = expert_bytes(path)
            figure(f"{name} streaming: one decode step reads {one} bytes for 1 sequence, {four} bytes for a batch "
                   f"of {len(PROMPTS)} (one expert is {per_expert} bytes a layer)")
            if per_expert:
                assert four >= one and (four - one) % per_expert == 0
            else:
                assert four == one
        engine.close()
    figure(f"{name}: {len(PROMPTS)} prompts of {[len(p) for p in PROMPTS]} tokens decoded together for {N_NEW} "
           f"tokens give each one's own greedy ids, full load and streaming")


@pytest.mark.parametrize("arch", ["qwen35moe", "qwen35"])
def test_batch_equals_one_at_a_time(tiny, arch):
    # A chunk of 4 prompt rows: the prompts take 1 to 4 prefill steps, so steps run part of the batch.
    check_batch(tiny[arch], arch, chunk=4)


def test_batch_equals_one_at_a_time_gemma(gemma_path):
    check_batch(gemma_path, "gemma3 270M", chunk=512)


def test_stages_and_hidden_inputs(tiny):
    """Positions [0, k) then [k, n) with the hidden states handed over give the whole run's
    logits; a stage without embedding or head never loads the shared weights."""
    path = tiny["qwen35moe"]
    whole = Engine(path)
    want = whole.forward_batch([whole.new_state()], [PROMPTS[0]], logits="all")[0]
    first, second = Engine(path), Engine(path)
    s1, s2 = first.new_state(), second.new_state()
    h = first.forward_batch([s1], [PROMPTS[0]], stop=3)[0]  # [T, E]
    got = second.forward_batch([s2], [h], start=3, logits="all")[0]
    assert torch.equal(got, want)

    # The parts alone: a middle stage holds its blocks and never the embedding or the head.
    store = WeightStore(path)
    residency = Residency(store)
    compute = Compute(residency)
    before = store.bytes_read
    out = compute.forward([compute.new_state()], [h], start=3)[0]
    assert not residency.loaded_shared and store.resident_bytes == residency.weight_bytes - store.nbytes(None)
    assert store.bytes_read == before  # the blocks were read up front (full load), nothing since
    assert torch.equal(second.shared.logits(out), want)


def test_bad_batches_are_refused(tiny):
    e = Engine(tiny["qwen35"])
    s = e.new_state()
    with pytest.raises(LemonsliceError, match="twice"):
        e.forward_batch([s, s], [[1], [2]])
    with pytest.raises(LemonsliceError, match="no token ids"):
        e.forward_batch([s], [[]])
    with pytest.raises(LemonsliceError, match="positions"):
        e.forward_batch([s], [[1]], start=3, stop=3)
    e.set_playlist([0, 1, 2])
    with pytest.raises(LemonsliceError, match="another playlist"):
        e.forward_batch([s], [[1]])


def test_plans_are_residency_not_engine_branches(tiny):
    """Full load, streaming and explicit pins give the same tokens; only what stays resident differs."""
    path = tiny["qwen35moe"]
    full = Engine(path)
    want = full.generate(PROMPTS[0], N_NEW)
    pinned = Engine(path, plan=Pinned(frozenset({0, 3})))
    assert pinned.streaming and pinned.pinned == 2
    assert pinned.generate(PROMPTS[0], N_NEW) == want
    store = pinned.store
    assert store.resident_bytes == store.nbytes(None) + store.nbytes(0) + store.nbytes(3) - _mapped(store, (0, 3))
    assert not store.map_experts  # the caller's store is left as it was given
    assert Engine(path, plan=FullLoad(), max_memory=1).pinned == full.args.n_layer


def _mapped(store: WeightStore, layers: tuple[int, ...]) -> int:
    """Bytes of the expert tensors of these blocks: streaming plans map them instead of reading."""
    return sum(store.info(n).n_bytes for b in layers for n in store.tensor_names(b) if "_exps." in n)


@pytest.mark.parametrize("arch", ["qwen35moe", "qwen35"])
def test_logits_of_a_batched_decode_step_are_each_sequences_own_bit_for_bit(tiny, arch):
    """A decode step of several sequences (their DeltaNet layers in one delta-rule call) gives
    each sequence the logits and the state its own step gives, bit for bit."""
    engine = Engine(tiny[arch])
    together = [engine.new_state() for _ in PROMPTS]
    alone = [engine.new_state() for _ in PROMPTS]
    for s, a, p in zip(together, alone, PROMPTS):
        engine.forward_batch([s], [p])
        engine.forward_batch([a], [p])
    for step in range(3):
        nxt = [[(7 * i + step) % 500 + 1] for i in range(len(PROMPTS))]
        batched = engine.forward_batch(together, nxt, logits="last")
        single = [engine.forward_batch([a], [n], logits="last")[0] for a, n in zip(alone, nxt)]
        assert all(torch.equal(b, s) for b, s in zip(batched, single)), step
    for s, a in zip(together, alone):
        for cs, ca in zip(s.caches, a.caches):
            if hasattr(cs, "state"):
                assert torch.equal(cs.state, ca.state) and torch.equal(cs.conv, ca.conv) and cs.length == ca.length
