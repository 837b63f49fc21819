"""GGUF metadata of a synthetic Qwen3.5 model: hyper-parameter keys and a small GPT-2 style
byte-level BPE tokenizer."""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache

from ..gguf.constants import (
    FILE_TYPE_OF,
    GGML_QUANTIZATION_VERSION,
    FileType,
    Keys,
    TokenType,
    ValueType,
    arch_key,
)
from ..gguf.writer import encode_kv
from .config import SyntheticConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@lru_cache(maxsize=1)
def byte_unicode() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


@lru_cache(maxsize=1)
def _merge_pairs() -> tuple[tuple[str, str], ...]:
    """A fixed merge list over the byte alphabet: space+letter, letter pairs, space-letter+letter.

    Each merge's two parts are byte tokens or results of earlier merges, so any prefix of
    the list is a consistent merge table."""
    space = byte_unicode()[ord(" ")]  # "Ġ"
    letters = string.ascii_lowercase
    pairs = [(space, a) for a in letters]
    pairs += [(a, b) for a in letters for b in letters]
    pairs += [(space + a, b) for a in letters for b in letters]
    return tuple(pairs)


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    pad_id: int


def build_vocab(n_vocab: int) -> Vocab:
    """`n_vocab` unique tokens: the 256 byte tokens (in GPT-2 order), merge results,
    `<tok_N>` placeholders if the merges run out, and the 3 special tokens last."""
    alphabet = byte_unicode()
    printable_first = sorted(range(256), key=lambda b: (ord(alphabet[b]) >= 256, ord(alphabet[b])))
    tokens = [alphabet[b] for b in printable_first]
    n_normal = n_vocab - len(SPECIAL_TOKENS)
    pairs = _merge_pairs()[: max(0, n_normal - len(tokens))]
    merges = [f"{a} {b}" for a, b in pairs]
    tokens += [a + b for a, b in pairs]
    tokens += [f"<tok_{i}>" for i in range(len(tokens), n_normal)]
    tokens += SPECIAL_TOKENS
    types = [int(TokenType.NORMAL)] * n_normal + [int(TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    eot = n_normal  # <|endoftext|>
    return Vocab(tokens, types, merges, bos_id=eot, eos_id=n_normal + 2, pad_id=eot)


def arch_kv(c: SyntheticConfig) -> list[bytes]:
    """The `<arch>.*` hyper-parameter keys llama.cpp reads for qwen35 / qwen35moe."""
    U32, F32 = ValueType.UINT32, ValueType.FLOAT32

    def kv(template: str, vtype: ValueType, value: object, item: ValueType | None = None) -> bytes:
        return encode_kv(arch_key(template, c.arch), vtype, value, item)

    out = [
        kv(Keys.BLOCK_COUNT, U32, c.block_count),
        kv(Keys.CONTEXT_LENGTH, U32, c.context_length),
        kv(Keys.EMBEDDING_LENGTH, U32, c.n_embd),
        kv(Keys.FEED_FORWARD_LENGTH, U32, c.n_ff),
        kv(Keys.HEAD_COUNT, U32, c.n_head),
        kv(Keys.HEAD_COUNT_KV, U32, c.n_head_kv),
        kv(Keys.KEY_LENGTH, U32, c.head_dim),
        kv(Keys.VALUE_LENGTH, U32, c.head_dim),
        kv(Keys.RMS_EPS, F32, c.rms_eps),
        kv(Keys.ROPE_FREQ_BASE, F32, c.rope_freq_base),
        kv(Keys.ROPE_DIMENSION_COUNT, U32, c.rope_dim),
        kv(Keys.ROPE_DIMENSION_SECTIONS, ValueType.ARRAY, list(c.rope_sections), ValueType.INT32),
    ]
    if c.is_moe:
        out += [
            kv(Keys.EXPERT_COUNT, U32, c.n_expert),
            kv(Keys.EXPERT_USED_COUNT, U32, c.n_expert_used),
            kv(Keys.EXPERT_FEED_FORWARD_LENGTH, U32, c.n_ff_exp),
            kv(Keys.EXPERT_SHARED_FEED_FORWARD_LENGTH, U32, c.n_ff_shexp),
        ]
    out += [
        kv(Keys.SSM_CONV_KERNEL, U32, c.ssm_conv_kernel),
        kv(Keys.SSM_STATE_SIZE, U32, c.ssm_d_state),
        kv(Keys.SSM_GROUP_COUNT, U32, c.ssm_n_group),
        kv(Keys.SSM_TIME_STEP_RANK, U32, c.ssm_dt_rank),
        kv(Keys.SSM_INNER_SIZE, U32, c.ssm_d_inner),
        kv(Keys.FULL_ATTENTION_INTERVAL, U32, c.full_attention_interval),
    ]
    if c.mtp:
        out.append(kv(Keys.NEXTN_PREDICT_LAYERS, U32, c.block_count - c.n_layer))
    return out


def tokenizer_kv(c: SyntheticConfig) -> list[bytes]:
    v = build_vocab(c.n_vocab)
    S, A, U32 = ValueType.STRING, ValueType.ARRAY, ValueType.UINT32
    return [
        encode_kv(Keys.TOKENIZER_MODEL, S, "gpt2"),
        encode_kv(Keys.TOKENIZER_PRE, S, c.tokenizer_pre),
        encode_kv(Keys.TOKENIZER_TOKENS, A, v.tokens, S),
        encode_kv(Keys.TOKENIZER_TOKEN_TYPE, A, v.token_types, ValueType.INT32),
        encode_kv(Keys.TOKENIZER_MERGES, A, v.merges, S),
        encode_kv(Keys.BOS_ID, U32, v.bos_id),
        encode_kv(Keys.EOS_ID, U32, v.eos_id),
        encode_kv(Keys.PAD_ID, U32, v.pad_id),
        encode_kv(Keys.ADD_BOS, ValueType.BOOL, False),
    ]


def model_kv(c: SyntheticConfig, file_type: FileType | None = None) -> list[bytes]:
    """Every KV record of a synthetic file, in write order."""
    ft = file_type if file_type is not None else FILE_TYPE_OF.get(c.default_type)
    out = [
        encode_kv(Keys.ARCHITECTURE, ValueType.STRING, c.arch),
        encode_kv(Keys.NAME, ValueType.STRING, c.name),
    ]
    if ft is not None:
        out.append(encode_kv(Keys.FILE_TYPE, ValueType.UINT32, int(ft)))
    out.append(encode_kv(Keys.QUANTIZATION_VERSION, ValueType.UINT32, GGML_QUANTIZATION_VERSION))
    return out + arch_kv(c) + tokenizer_kv(c)
