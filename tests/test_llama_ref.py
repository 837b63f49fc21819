"""The llama.cpp reference harness (tests/llama_ref.py) against the project's files.

(a) llama.cpp loads the synthetic tiny Qwen3.5 models (with and without the MTP block) and
    gives finite, per-position logits; (b) its quantizer makes real K-quant files of a
    synthetic model and an F32 copy of them; (c) its tokenizer on the Gemma 3 270M GGUF;
    (d) its logits on that model are finite and the same across loads.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest

from lemonslice.gguf import GGMLType, GGUFReader
from lemonslice.testing import tiny_qwen35, tiny_qwen35moe, write_synthetic
from llama_ref import (
    LlamaError,
    LlamaVocab,
    gemma_gguf,
    llama_detokenize,
    llama_greedy,
    llama_log,
    llama_logits,
    llama_model_info,
    llama_quantize,
    llama_tokenize,
)

T = GGMLType
IDS = [5, 77, 300, 12, 499, 256, 3, 140, 8, 401, 64, 200]  # < 512, the tiny vocab
FACTORIES = {"qwen35moe": tiny_qwen35moe, "qwen35": tiny_qwen35}


def tensor_types(path: Path) -> dict[str, GGMLType]:
    with GGUFReader(path) as r:
        return {t.name: t.ggml_type for t in r.tensors}


def quantizable(path: Path) -> dict[str, GGMLType]:
    """The tensors llama.cpp's quantizer converts: 2-D/3-D weights, less the router and conv."""
    with GGUFReader(path) as r:
        return {t.name: t.ggml_type for t in r.tensors if len(t.shape) >= 2
                and not t.name.endswith(("ffn_gate_inp.weight", "ssm_conv1d.weight"))}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    d = tmp_path_factory.mktemp("tiny")
    return {
        (arch, mtp): write_synthetic(d / f"{arch}-mtp{int(mtp)}.gguf", make(mtp=mtp))
        for arch, make in FACTORIES.items() for mtp in (False, True)
    }


# ---- (a) synthetic tiny models --------------------------------------------------------------


@pytest.mark.parametrize("mtp", [False, True], ids=["trunk", "mtp"])
@pytest.mark.parametrize("arch", list(FACTORIES))
def test_llama_loads_tiny_model(tiny_files, arch, mtp):
    cfg = FACTORIES[arch](mtp=mtp)
    path = tiny_files[arch, mtp]
    # load_mtp=True makes llama.cpp check the nextn block's tensors (names, shapes) too.
    info = llama_model_info(path, load_mtp=mtp)
    assert "unused tensor" not in llama_log()  # llama.cpp consumed every tensor of the file
    assert info["n_layer"] == cfg.n_layer  # trunk blocks only
    assert info["n_layer_nextn"] == (1 if mtp else 0)
    assert info["meta"][f"{arch}.block_count"] == str(cfg.n_layer + mtp)
    assert (info["n_embd"], info["n_head"], info["n_vocab"]) == (cfg.n_embd, cfg.n_head, cfg.n_vocab)
    assert info["meta"]["general.architecture"] == arch

    logits = llama_logits(path, IDS)
    assert logits.shape == (len(IDS), cfg.n_vocab) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert logits.std() > 1e-3
    # One row per position: no two rows alike (a harness that kept only the last row would repeat it).
    assert min(np.abs(logits[i] - logits[j]).max() for i in range(len(IDS)) for j in range(i)) > 1e-4


@pytest.mark.parametrize("arch", list(FACTORIES))
def test_mtp_block_does_not_change_trunk_logits(tiny_files, arch):
    # Same seed, same tensor values: the nextn block is extra and llama.cpp's trunk ignores it.
    a = llama_logits(tiny_files[arch, False], IDS)
    b = llama_logits(tiny_files[arch, True], IDS)
    np.testing.assert_array_equal(a, b)


def test_logits_per_position_batch_forms_agree(tiny_files):
    path = tiny_files["qwen35moe", False]
    full = llama_logits(path, IDS)
    stepwise = llama_logits(path, IDS, n_batch=1)
    chunks = llama_logits(path, IDS, n_batch=5)
    prefix = llama_logits(path, IDS[:7])
    scale = np.abs(full).max()
    for other in (stepwise, chunks):
        assert np.abs(other - full).max() <= 1e-3 * scale
    assert np.abs(prefix - full[:7]).max() <= 1e-3 * scale  # causal: later tokens do not matter


def test_kv_cache_is_f32_and_flash_attention_off(tiny_files):
    path = tiny_files["qwen35", False]
    f32 = llama_logits(path, IDS)
    log = llama_log()  # the last call's llama.cpp log
    assert re.search(r"K \(f32\).*V \(f32\)", log) and re.search(r"flash_attn\s*= disabled", log), log[-3000:]
    f16 = llama_logits(path, IDS, f32_kv=False)
    assert re.search(r"K \(f16\).*V \(f16\)", llama_log())
    # F16 K/V round V and the attention inputs: visibly different, still the same model.
    diff = np.abs(f16 - f32).max()
    assert 0 < diff <= 0.1 * np.abs(f32).max()


def test_greedy_matches_teacher_forced_argmax(tiny_files):
    path = tiny_files["qwen35", False]
    prompt = IDS[:5]
    gen = llama_greedy(path, prompt, 6)
    assert len(gen) == 6 and all(0 <= t < 512 for t in gen)
    tf = llama_logits(path, prompt + gen[:-1])
    top2 = np.sort(tf[len(prompt) - 1:], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3  # skip near-ties, where batch forms may disagree
    assert clear.any()
    np.testing.assert_array_equal(np.argmax(tf[len(prompt) - 1:], axis=1)[clear], np.array(gen)[clear])


def test_llama_refuses_a_broken_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(LlamaError, match="could not load"):
        llama_logits(bad, [1, 2])


# ---- (b) llama.cpp's quantizer ---------------------------------------------------------------

# Every width a multiple of 256, so every matrix can take a K-quant (block of 256).
WIDE = dict(
    n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, rope_dim=16, rope_sections=(3, 3, 2, 0),
    ssm_d_state=64, ssm_n_group=2, ssm_dt_rank=4, n_expert=4, n_expert_used=2, n_ff_exp=256,
    n_ff_shexp=256, n_ff=256, n_vocab=512, mtp=True, default_type="F32",
)
K_QUANTS = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


def test_quantize_q4_k_m_and_f32_copy(tmp_path):
    src = write_synthetic(tmp_path / "wide-f32.gguf", tiny_qwen35moe(**WIDE))
    q = llama_quantize(src, tmp_path / "wide-q4_k_m.gguf", "Q4_K_M")
    types = tensor_types(q)
    counts = Counter(types.values())
    matrices = quantizable(q)
    assert counts[T.Q4_K] >= len(matrices) // 2, counts
    assert set(matrices.values()) <= K_QUANTS, {n: t.name for n, t in matrices.items() if t not in K_QUANTS}
    assert types["blk.4.nextn.eh_proj.weight"] in K_QUANTS  # the MTP block is quantized too
    assert types["blk.0.ssm_conv1d.weight"] == T.F32 and types["blk.0.ffn_gate_inp.weight"] == T.F32
    with GGUFReader(q) as r:
        assert r.get("general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_model_info(q, load_mtp=True)["n_layer_nextn"] == 1

    lq = llama_logits(q, IDS)
    assert lq.shape == (len(IDS), 512) and np.isfinite(lq).all()

    with pytest.raises(LlamaError, match="requantizing"):
        llama_quantize(q, tmp_path / "refused.gguf", "F32")
    f32 = llama_quantize(q, tmp_path / "wide-q4_k_m-f32.gguf", "ALL_F32", allow_requantize=True)
    assert set(tensor_types(f32).values()) == {T.F32}
    # The F32 copy holds exactly the dequantized Q4_K_M weights (dequantized here by gguf-py).
    with GGUFReader(q) as rq, GGUFReader(f32) as rf:
        for name in ("blk.0.attn_qkv.weight", "blk.3.ffn_down_exps.weight", "output.weight"):
            t = rq.tensor_map[name]
            assert t.ggml_type in K_QUANTS
            want = gguf.quants.dequantize(np.frombuffer(rq.tensor_bytes(name), np.uint8),
                                          gguf.GGMLQuantizationType(int(t.ggml_type)))
            np.testing.assert_array_equal(rf.tensor_array(name).reshape(want.shape), want)
    lf = llama_logits(f32, IDS)
    # Same weights; llama.cpp's Q8_K rounding of the activations (and the MoE routing it can
    # flip) is the only difference.
    assert np.isfinite(lf).all()
    assert np.corrcoef(lf.ravel(), lq.ravel())[0, 1] > 0.95


def test_quantize_q8_0(tmp_path):
    src = write_synthetic(tmp_path / "f16.gguf", tiny_qwen35(default_type="F16"))
    q = llama_quantize(src, tmp_path / "q8.gguf", "Q8_0")
    types = tensor_types(q)
    assert types["blk.0.attn_qkv.weight"] == T.Q8_0 and types["output.weight"] == T.Q8_0
    assert np.isfinite(llama_logits(q, IDS)).all()


# ---- (c), (d) the real Gemma 3 270M GGUF ----------------------------------------------------


GEMMA_PROMPT = [2, 818, 5279, 529, 7001, 563]  # <bos>The capital of France is


@pytest.fixture(scope="module")
def gemma() -> Path:
    return gemma_gguf()


def test_gemma_tokenize_round_trip(gemma):
    text = "Hello world, this is Gemma."
    with GGUFReader(gemma) as r:
        tokens = r.get("tokenizer.ggml.tokens")
        bos = r.get("tokenizer.ggml.bos_token_id")
    assert llama_tokenize(gemma, "Hello world")[0] == bos  # the one-call form
    with LlamaVocab(gemma) as v:
        assert v.n_vocab == len(tokens)
        ids = v.tokenize(text)
        assert ids[0] == bos and len(ids) > 3
        assert v.tokenize(text, add_special=False) == ids[1:]
        # SentencePiece pieces read from the file by lemonslice's reader: "▁" stands for a space.
        assert "".join(tokens[i] for i in ids[1:]).replace("\u2581", " ") == text
        assert v.detokenize(ids, remove_special=True) == text
        assert b"".join(v.piece(i) for i in ids[1:]).decode() == text
        # Special-token text becomes one id only when asked.
        turn = tokens.index("<start_of_turn>")
        assert v.tokenize("<start_of_turn>", add_special=False, parse_special=True) == [turn]
        assert turn not in v.tokenize("<start_of_turn>", add_special=False)
        assert v.tokenize("The capital of France is") == GEMMA_PROMPT
    assert llama_detokenize(gemma, ids[1:]) == text


def test_gemma_logits_finite_and_deterministic(gemma):
    ids = GEMMA_PROMPT
    a = llama_logits(gemma, ids)
    b = llama_logits(gemma, ids)
    assert a.shape == (len(ids), 262144) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert len({int(i) for i in a.argmax(axis=1)}) > 1  # per-position rows
    assert llama_greedy(gemma, ids, 1) == [int(a[-1].argmax())]
