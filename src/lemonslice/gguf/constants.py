"""GGUF constants: value types, ggml tensor types, key names and tensor-name templates.

This is the one table of GGUF names in lemonslice; other modules import from here.
"""

from __future__ import annotations

import enum
import re

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
WRITE_VERSION = 3
DEFAULT_ALIGNMENT = 32
# Largest alignment accepted; real files use 32..4096.
MAX_ALIGNMENT = 1 << 24
GGML_MAX_DIMS = 4


class ValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format of each fixed-size value type (little-endian).
SCALAR_FORMATS: dict[ValueType, str] = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}

NUMPY_DTYPES: dict[ValueType, str] = {
    ValueType.UINT8: "<u1",
    ValueType.INT8: "<i1",
    ValueType.UINT16: "<u2",
    ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4",
    ValueType.INT32: "<i4",
    ValueType.FLOAT32: "<f4",
    ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8",
    ValueType.INT64: "<i8",
    ValueType.FLOAT64: "<f8",
}


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# (elements per block, bytes per block) of every ggml type.
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 40),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66),
    GGMLType.IQ2_XS: (256, 74),
    GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 56),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
    GGMLType.MXFP4: (32, 17),
    GGMLType.NVFP4: (64, 36),
    GGMLType.Q1_0: (128, 18),
}


class Keys:
    """GGUF metadata key names. `{arch}` is filled with general.architecture."""

    ARCHITECTURE = "general.architecture"
    ALIGNMENT = "general.alignment"
    NAME = "general.name"
    TYPE = "general.type"
    FILE_TYPE = "general.file_type"
    QUANTIZATION_VERSION = "general.quantization_version"

    BLOCK_COUNT = "{arch}.block_count"
    CONTEXT_LENGTH = "{arch}.context_length"
    EMBEDDING_LENGTH = "{arch}.embedding_length"
    FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
    HEAD_COUNT = "{arch}.attention.head_count"
    HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
    KEY_LENGTH = "{arch}.attention.key_length"
    VALUE_LENGTH = "{arch}.attention.value_length"
    RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
    SLIDING_WINDOW = "{arch}.attention.sliding_window"
    SLIDING_WINDOW_PATTERN = "{arch}.attention.sliding_window_pattern"  # int period or per-layer bools
    RECURRENT_LAYERS = "{arch}.attention.recurrent_layers"
    ROPE_FREQ_BASE = "{arch}.rope.freq_base"
    ROPE_FREQ_BASE_SWA = "{arch}.rope.freq_base_swa"
    ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
    ROPE_DIMENSION_SECTIONS = "{arch}.rope.dimension_sections"
    ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
    ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
    ROPE_SCALING_ORIG_CTX = "{arch}.rope.scaling.original_context_length"
    EXPERT_COUNT = "{arch}.expert_count"
    EXPERT_USED_COUNT = "{arch}.expert_used_count"
    EXPERT_FEED_FORWARD_LENGTH = "{arch}.expert_feed_forward_length"
    EXPERT_SHARED_FEED_FORWARD_LENGTH = "{arch}.expert_shared_feed_forward_length"
    SSM_CONV_KERNEL = "{arch}.ssm.conv_kernel"
    SSM_STATE_SIZE = "{arch}.ssm.state_size"
    SSM_GROUP_COUNT = "{arch}.ssm.group_count"
    SSM_TIME_STEP_RANK = "{arch}.ssm.time_step_rank"
    SSM_INNER_SIZE = "{arch}.ssm.inner_size"
    FULL_ATTENTION_INTERVAL = "{arch}.full_attention_interval"
    NEXTN_PREDICT_LAYERS = "{arch}.nextn_predict_layers"
    FINAL_LOGIT_SOFTCAPPING = "{arch}.final_logit_softcapping"

    TOKENIZER_MODEL = "tokenizer.ggml.model"
    TOKENIZER_PRE = "tokenizer.ggml.pre"
    TOKENIZER_TOKENS = "tokenizer.ggml.tokens"
    TOKENIZER_TOKEN_TYPE = "tokenizer.ggml.token_type"
    TOKENIZER_MERGES = "tokenizer.ggml.merges"
    TOKENIZER_SCORES = "tokenizer.ggml.scores"
    ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
    BOS_ID = "tokenizer.ggml.bos_token_id"
    EOS_ID = "tokenizer.ggml.eos_token_id"
    PAD_ID = "tokenizer.ggml.padding_token_id"
    UNK_ID = "tokenizer.ggml.unknown_token_id"
    ADD_BOS = "tokenizer.ggml.add_bos_token"
    ADD_EOS = "tokenizer.ggml.add_eos_token"
    CHAT_TEMPLATE = "tokenizer.chat_template"

    # Keys lemonslice adds to every file it writes.
    LS_PREFIX = "lemonslice."
    LS_FORMAT = "lemonslice.format"
    LS_LAYER_INDEX = "lemonslice.layer_index"
    LS_ROLE = "lemonslice.role"


class TokenType(enum.IntEnum):
    """Values of `tokenizer.ggml.token_type`."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class FileType(enum.IntEnum):
    """Values of `general.file_type` (llama.cpp's `llama_ftype`); informational only."""

    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q4_K_M = 15
    MOSTLY_BF16 = 32
    MOSTLY_TQ1_0 = 36
    MOSTLY_TQ2_0 = 37
    MOSTLY_MXFP4_MOE = 38


# The file type of a file whose weight matrices are mostly of one ggml type.
FILE_TYPE_OF: dict[GGMLType, FileType] = {
    GGMLType.F32: FileType.ALL_F32,
    GGMLType.F16: FileType.MOSTLY_F16,
    GGMLType.Q4_0: FileType.MOSTLY_Q4_0,
    GGMLType.Q4_1: FileType.MOSTLY_Q4_1,
    GGMLType.Q8_0: FileType.MOSTLY_Q8_0,
    GGMLType.Q5_0: FileType.MOSTLY_Q5_0,
    GGMLType.Q5_1: FileType.MOSTLY_Q5_1,
    GGMLType.BF16: FileType.MOSTLY_BF16,
    GGMLType.TQ1_0: FileType.MOSTLY_TQ1_0,
    GGMLType.TQ2_0: FileType.MOSTLY_TQ2_0,
    GGMLType.MXFP4: FileType.MOSTLY_MXFP4_MOE,
}

# Value of general.quantization_version for the current ggml quant formats.
GGML_QUANTIZATION_VERSION = 2


def arch_key(template: str, arch: str) -> str:
    return template.format(arch=arch)


FORMAT_NAME = "lemonslice-gguf-v1"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARED_FILE = "shared.gguf"
LAYER_FILE = "layer_{index:04d}.gguf"
LAYER_FILE_RE = re.compile(r"^layer_(\d{4,})\.gguf$")

# Tensor-name templates. `{bid}` is the block index.
BLOCK_PREFIX_RE = re.compile(r"^blk\.(\d+)\.")
BLOCK_PREFIX = "blk.{bid}."


class Tensors:
    TOKEN_EMBD = "token_embd.weight"
    OUTPUT_NORM = "output_norm.weight"
    OUTPUT = "output.weight"

    ATTN_NORM = "blk.{bid}.attn_norm.weight"
    ATTN_Q = "blk.{bid}.attn_q.weight"
    ATTN_K = "blk.{bid}.attn_k.weight"
    ATTN_V = "blk.{bid}.attn_v.weight"
    ATTN_OUT = "blk.{bid}.attn_output.weight"
    ATTN_Q_NORM = "blk.{bid}.attn_q_norm.weight"
    ATTN_K_NORM = "blk.{bid}.attn_k_norm.weight"
    ATTN_POST_NORM = "blk.{bid}.post_attention_norm.weight"
    ATTN_QKV = "blk.{bid}.attn_qkv.weight"
    ATTN_GATE = "blk.{bid}.attn_gate.weight"

    SSM_A = "blk.{bid}.ssm_a"
    SSM_ALPHA = "blk.{bid}.ssm_alpha.weight"
    SSM_BETA = "blk.{bid}.ssm_beta.weight"
    SSM_CONV1D = "blk.{bid}.ssm_conv1d.weight"
    SSM_DT = "blk.{bid}.ssm_dt.bias"
    SSM_NORM = "blk.{bid}.ssm_norm.weight"
    SSM_OUT = "blk.{bid}.ssm_out.weight"

    FFN_NORM = "blk.{bid}.ffn_norm.weight"
    FFN_POST_NORM = "blk.{bid}.post_ffw_norm.weight"
    FFN_GATE = "blk.{bid}.ffn_gate.weight"
    FFN_UP = "blk.{bid}.ffn_up.weight"
    FFN_DOWN = "blk.{bid}.ffn_down.weight"
    FFN_GATE_INP = "blk.{bid}.ffn_gate_inp.weight"
    FFN_GATE_EXPS = "blk.{bid}.ffn_gate_exps.weight"
    FFN_UP_EXPS = "blk.{bid}.ffn_up_exps.weight"
    FFN_DOWN_EXPS = "blk.{bid}.ffn_down_exps.weight"
    FFN_GATE_UP_EXPS = "blk.{bid}.ffn_gate_up_exps.weight"  # optional fused gate+up, gate half first
    FFN_GATE_INP_SHEXP = "blk.{bid}.ffn_gate_inp_shexp.weight"
    FFN_GATE_SHEXP = "blk.{bid}.ffn_gate_shexp.weight"
    FFN_UP_SHEXP = "blk.{bid}.ffn_up_shexp.weight"
    FFN_DOWN_SHEXP = "blk.{bid}.ffn_down_shexp.weight"

    NEXTN_EH_PROJ = "blk.{bid}.nextn.eh_proj.weight"
    NEXTN_ENORM = "blk.{bid}.nextn.enorm.weight"
    NEXTN_HNORM = "blk.{bid}.nextn.hnorm.weight"
    NEXTN_SHARED_HEAD_NORM = "blk.{bid}.nextn.shared_head_norm.weight"
    NEXTN_EMBED_TOKENS = "blk.{bid}.nextn.embed_tokens.weight"
    NEXTN_SHARED_HEAD_HEAD = "blk.{bid}.nextn.shared_head_head.weight"


class Role(str, enum.Enum):
    SHARED = "shared"
    RECURRENT = "recurrent"
    ATTENTION = "attention"
    DENSE = "dense"
    MTP = "mtp"


def block_index(tensor_name: str) -> int | None:
    """The N of a `blk.N.` tensor name, or None for shared tensors."""
    m = BLOCK_PREFIX_RE.match(tensor_name)
    return int(m.group(1)) if m else None


def block_suffix(tensor_name: str) -> str:
    """`attn_q.weight` for `blk.3.attn_q.weight`."""
    return BLOCK_PREFIX_RE.sub("", tensor_name, count=1)


def classify_block(tensor_names: list[str], hybrid: bool) -> Role:
    """A block's role, decided from its tensors.

    `hybrid` says whether the model has any recurrent block: there a block with
    attention is an `attention` block, elsewhere a plain transformer block is `dense`.
    """
    suffixes = [block_suffix(n) for n in tensor_names]
    if any(s.startswith("nextn.") for s in suffixes):
        return Role.MTP
    if any(s.startswith("ssm_") for s in suffixes):
        return Role.RECURRENT
    if hybrid and any(s.startswith(("attn_q.", "attn_k.", "attn_v.")) for s in suffixes):
        return Role.ATTENTION
    return Role.DENSE
