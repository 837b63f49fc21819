"""The engine (lemonslice.engine) on synthetic tiny Qwen3.5 GGUFs, and end to end against transformers.

* streaming mode gives the same tokens and logits as full-load mode, holding at most
  shared + one layer of weights (counted by the store);
* a split directory gives the same logits as the monolithic file;
* a playlist that repeats a block keeps separate state per position (checked against a
  hand-written token-by-token loop);
* incremental decode agrees with teacher forcing, and prefill chunking changes nothing;
* `lemonslice run` prints the engine's tokens;
* a transformers checkpoint converted to F32 gives transformers' logits and greedy tokens.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lemonslice.engine import Engine, Streamed, WeightStore
from lemonslice.gguf.constants import Keys
from lemonslice.models import Block, Shared, make_cache
from lemonslice.ops import QuantWeight
from lemonslice.slicing import split_gguf
from lemonslice.testing import tiny_qwen35, tiny_qwen35moe, write_synthetic

from hf_models import HFSpec, hf_model  # noqa: F401  (hf_model is a session fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
PROMPT = [3, 17, 101, 250, 7, 7, 42, 511, 300, 12, 5]


@pytest.fixture(scope="module", params=["moe", "dense"])
def model(request, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp(request.param)
    cfg = tiny_qwen35moe(type_overrides={"experts": "Q4_0"}) if request.param == "moe" else tiny_qwen35()
    return write_synthetic(d / "model.gguf", cfg)


@pytest.fixture(scope="module")
def split_dir(model) -> Path:
    out = model.parent / "split"
    split_gguf(model, out)
    return out


def test_streaming_equals_full_load(model):
    full = Engine(model)
    stream = Engine(model, plan=Streamed(1))
    assert not full.streaming and stream.streaming
    assert stream.generate(PROMPT, 6) == full.generate(PROMPT, 6)
    torch.testing.assert_close(stream.logits(PROMPT), full.logits(PROMPT), rtol=0, atol=0)


def test_streaming_holds_shared_plus_one_layer(model):
    e = Engine(model, plan=Streamed(1))
    store = e.store
    shared = store.nbytes(None)
    largest = max(store.nbytes(i) for i in e.playlist)
    assert store.resident_bytes == shared
    store.reset_peak()
    e.generate(PROMPT, 3)
    # Streaming MoE maps its expert tensors rather than reading them, so only the upper bound
    # is exact; the experts' resident pages are measured as RSS in test_streaming_memory.
    assert shared < store.peak_resident_bytes <= shared + largest
    assert store.resident_bytes == shared  # every layer went back
    full = Engine(model)
    assert full.store.resident_bytes == full.weight_bytes == shared + sum(store.nbytes(i) for i in e.playlist)


def test_max_memory_decides_the_mode(model):
    need = Engine(model, plan=Streamed(1)).weight_bytes
    assert not Engine(model, max_memory=need).streaming
    assert Engine(model, max_memory=need - 1).streaming


def test_split_dir_equals_monolithic(model, split_dir):
    mono, split = Engine(model, plan=Streamed(1)), Engine(split_dir, plan=Streamed(1))
    assert split.args == mono.args
    torch.testing.assert_close(split.logits(PROMPT), mono.logits(PROMPT), rtol=0, atol=0)


def test_store_tensor_kinds_and_metadata(split_dir):
    with WeightStore(split_dir) as store:
        assert not any(k.startswith(Keys.LS_PREFIX) for k in store.metadata)
        w = store.load_layer(0)
        assert isinstance(w["blk.0.attn_qkv.weight"], QuantWeight)
        assert w["blk.0.attn_norm.weight"].dtype == torch.float32 and w["blk.0.attn_norm.weight"].dim() == 1
        assert store.layers == list(range(8))


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory) -> Path:
    cfg = tiny_qwen35moe(type_overrides={"experts": "Q4_0"})
    return write_synthetic(tmp_path_factory.mktemp("moe1") / "model.gguf", cfg)


def test_expert_slice_reads_only_that_expert(moe_model):
    with WeightStore(moe_model) as store:
        name = "blk.1.ffn_up_exps.weight"
        whole = store.load(name)
        before = store.resident_bytes
        one = store.load_expert(name, 5)
        assert store.resident_bytes - before == whole.raw[5].numel() == store.expert_range(name, 5)[1]
        assert one.shape == whole.shape[:2] and torch.equal(one.raw, whole.raw[5])


def test_playlist_repeats_keep_separate_state(model):
    playlist = [0, 1, 2, 3, 3, 4, 5, 5, 6, 7]  # repeats an attention block and a recurrent one
    e = Engine(model, playlist=playlist, plan=Streamed(1), prefill_chunk=4)
    got = e.logits(PROMPT)
    caches = e.caches
    assert caches[3] is not caches[4] and caches[6] is not caches[7]
    assert caches[3].length == caches[4].length == len(PROMPT) == caches[6].length

    # Reference: one token at a time, a fresh cache per playlist position.
    with WeightStore(model) as store:
        shared = Shared(e.args, store.load_shared())
        blocks = [Block(e.args, i, store.load_layer(i)) for i in playlist]
        state = [make_cache(e.args, b) for b in blocks]
        rows = []
        with torch.inference_mode():
            for t in PROMPT:
                x = shared.embed(torch.tensor([t]))
                for b, c in zip(blocks, state):
                    x = b(x, c)
                rows.append(shared.logits(x))
    ref = torch.cat(rows)
    # Batched vs one-row matmuls round differently; the tiny random models amplify that to ~3e-5.
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    assert not torch.allclose(got, Engine(model).logits(PROMPT), atol=1e-3)


def test_decode_agrees_with_teacher_forcing(model):
    e = Engine(model, prefill_chunk=4)
    new = e.generate(PROMPT, 6)
    forced = e.logits(PROMPT + new[:-1])
    assert forced[len(PROMPT) - 1 :].argmax(-1).tolist() == new
    torch.testing.assert_close(Engine(model).logits(PROMPT), e.logits(PROMPT), rtol=1e-5, atol=1e-5)


def test_bad_playlist_is_refused(model):
    with pytest.raises(Exception, match="playlist"):
        Engine(model, playlist=[0, 99])


def test_mtp_block_is_left_out(tmp_path):
    path = write_synthetic(tmp_path / "mtp.gguf", tiny_qwen35moe(mtp=True))
    e = Engine(path)
    assert (e.args.block_count, e.args.n_layer, e.playlist) == (9, 8, list(range(8)))
    plain = Engine(write_synthetic(tmp_path / "plain.gguf", tiny_qwen35moe()))
    assert e.generate(PROMPT, 3) == plain.generate(PROMPT, 3)
    with pytest.raises(Exception, match="playlist"):
        Engine(path, playlist=[8])


def test_tied_head_uses_token_embd(model):
    with WeightStore(model) as store:
        weights = store.load_shared()
        args = Engine(store).args
        del weights["output.weight"]
        shared = Shared(args, weights)
        x = torch.randn(3, args.n_embd, generator=torch.Generator().manual_seed(0))
        tied = Shared(args, {**weights, "output.weight": weights["token_embd.weight"]})
        torch.testing.assert_close(shared.logits(x), tied.logits(x), rtol=0, atol=0)
        assert shared.n_vocab == args.n_vocab


def test_run_cli(moe_model):
    model = moe_model
    want = Engine(model).generate([1, 2, 3], 4)
    r = subprocess.run(
        [LEMONSLICE, "run", str(model), "--prompt-ids", "1,2,3", "-n", "4", "--max-memory", "450KiB", "--threads", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    m = re.search(r"^generated: ([\d ]+)$", r.stdout, re.M)
    assert m and [int(t) for t in m.group(1).split()] == want
    assert "streaming, budget 460.80 KB (--max-memory)" in r.stderr and "expert cache" in r.stderr
    # Below what one token needs: one line saying the minimum, before any weight is read.
    low = subprocess.run([LEMONSLICE, "run", str(model), "--prompt-ids", "1,2,3", "--max-memory", "1KB"],
                         capture_output=True, text=True, timeout=120)
    assert low.returncode != 0 and low.stderr.startswith("error: a weight budget of 1000 B cannot run")
    assert "needs at least" in low.stderr and len(low.stderr.strip().splitlines()) == 1
    for label in ("prefill", "decode", "peak RSS"):
        assert label in r.stderr
    bad = subprocess.run([LEMONSLICE, "run", str(model), "--prompt-ids", "1,x"], capture_output=True, text=True)
    assert bad.returncode != 0 and "error" in bad.stderr


# ---- end to end against transformers (through lemonslice.convert) ----------------------

@pytest.mark.slow
@pytest.mark.parametrize("moe", [True, False])
def test_converted_model_matches_transformers(moe, hf_model, tmp_path):
    from lemonslice import convert
    ckpt = hf_model(HFSpec(moe=moe))
    gguf_path = tmp_path / "model.gguf"
    convert.convert_hf(ckpt, gguf_path, out_type="f32", mtp=False)
    if moe:
        from transformers import Qwen3_5MoeForCausalLM as Model
    else:
        from transformers import Qwen3_5ForCausalLM as Model
    hf = Model.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    prompt = torch.randint(0, 600, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = Engine(gguf_path)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    got = engine.logits(prompt)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())

    seq = list(prompt)
    with torch.no_grad():
        for _ in range(32):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert engine.generate(prompt, 32) == seq[len(prompt) :]



def test_streaming_pins_what_the_budget_holds(tmp_path):
    """A budget between one layer and all of them: blocks are pinned in playlist order while
    shared + pinned + the largest streamed block fits; output equals full load."""
    path = write_synthetic(tmp_path / "dense.gguf", tiny_qwen35())
    full = Engine(path)
    want = full.generate([1, 2, 3], 6)
    store = full.store
    shared = store.nbytes(None)
    sizes = [store.nbytes(i) for i in range(full.args.n_layer)]
    largest = max(sizes)
    # Room for blocks 0 and 1 pinned plus one streamed slot, worked out from the sizes by hand.
    budget = shared + sizes[0] + sizes[1] + largest
    assert budget < full.weight_bytes
    eng = Engine(path, plan=Streamed(budget))
    assert eng.streaming and eng.pinned == 2
    assert eng.generate([1, 2, 3], 6) == want
    assert eng.store.peak_resident_bytes <= budget
    assert Engine(path, plan=Streamed(shared + largest)).pinned == 0


def test_a_few_tokens_at_once_equal_one_at_a_time_bit_for_bit(model):
    # An MTP verify pass feeds K+1 tokens at once; speculative decoding is lossless only if
    # that gives each token the bits of a one-token step (8-bit activations magnify any
    # difference: a value that moves across a rounding boundary moves by a whole step).
    e = Engine(model)
    c = e.compute
    together, alone = c.new_state(), c.new_state()
    c.forward([together], [PROMPT])
    c.forward([alone], [PROMPT])
    nxt = [5, 77, 300, 12, 9]
    got = c.forward([together], [nxt], logits="all")[0]
    want = torch.cat([c.forward([alone], [[t]], logits="all")[0] for t in nxt])
    assert torch.equal(got, want)
