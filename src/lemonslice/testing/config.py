"""Configuration of a synthetic Qwen3.5 model, and its presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..gguf.constants import GGMLType, Role

ARCHES = ("qwen35moe", "qwen35")

# Types gguf-py's `gguf.quants.quantize` can write.
QUANTIZABLE_TYPES = frozenset({
    GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0,
    GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.MXFP4, GGMLType.TQ1_0, GGMLType.TQ2_0,
})

# Override groups: a name in `type_overrides` may be a tensor kind (see layout.py) or one of these.
KIND_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("attn_q", "attn_k", "attn_v", "attn_output"),
    "linear_attention": ("attn_qkv", "attn_gate", "ssm_alpha", "ssm_beta", "ssm_out"),
    "experts": ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"),
    "shared_expert": ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"),
    "router": ("ffn_gate_inp",),
    "ffn": ("ffn_gate", "ffn_up", "ffn_down"),
    "embeddings": ("token_embd",),
    "output": ("output",),
    "nextn": ("nextn.eh_proj",),
}
# Every weight-matrix kind, i.e. every kind whose type the config decides.
MATRIX_KINDS = frozenset(k for kinds in KIND_GROUPS.values() for k in kinds)


def as_ggml_type(t: GGMLType | str | int) -> GGMLType:
    if isinstance(t, str):
        try:
            return GGMLType[t.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type {t!r}") from None
    return GGMLType(t)


@dataclass(frozen=True)
class SyntheticConfig:
    """Hyper-parameters, quantization and seed of a synthetic Qwen3.5 GGUF.

    The defaults are a tiny MoE model (see `tiny_qwen35moe`). Sizes use llama.cpp's names;
    the HF names are in the comments.
    """

    arch: str = "qwen35moe"
    name: str = "tiny-qwen35moe"
    n_layer: int = 8  # trunk blocks (num_hidden_layers)
    full_attention_interval: int = 4  # layer i is full attention when (i + 1) % interval == 0
    context_length: int = 4096
    n_embd: int = 64  # hidden_size
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16  # attention.key_length = value_length
    rope_dim: int = 8  # rope.dimension_count (head_dim * partial_rotary_factor)
    rope_sections: tuple[int, int, int, int] = (2, 1, 1, 0)  # IMRoPE sections, sum = rope_dim / 2
    rope_freq_base: float = 10_000_000.0
    rms_eps: float = 1e-6
    ssm_d_state: int = 16  # linear_key_head_dim (= linear_value_head_dim)
    ssm_n_group: int = 2  # linear_num_key_heads
    ssm_dt_rank: int = 4  # linear_num_value_heads
    ssm_conv_kernel: int = 4  # linear_conv_kernel_dim
    n_expert: int = 8  # MoE only
    n_expert_used: int = 2
    n_ff_exp: int = 32  # moe_intermediate_size
    n_ff_shexp: int = 32  # shared_expert_intermediate_size
    n_ff: int = 128  # dense FFN width (qwen35); written as feed_forward_length for both archs
    n_vocab: int = 512
    mtp: bool = False  # add one MTP (nextn) block after the trunk
    seed: int = 0
    # Type of 2-D/3-D weight matrices; 1-D tensors and ssm_conv1d are always F32.
    default_type: GGMLType = GGMLType.Q8_0
    # (kind or group, type) pairs; a kind beats a group, which beats `default_type`.
    # A dict is accepted and stored as sorted pairs.
    type_overrides: tuple[tuple[str, GGMLType], ...] = ()
    tokenizer_pre: str = "qwen35"

    def __post_init__(self) -> None:
        # Normalise the fields that accept looser input (frozen, hence object.__setattr__).
        ov: Iterable[tuple[str, Any]]
        ov = self.type_overrides.items() if isinstance(self.type_overrides, Mapping) else self.type_overrides
        object.__setattr__(self, "default_type", as_ggml_type(self.default_type))
        object.__setattr__(self, "rope_sections", tuple(int(s) for s in self.rope_sections))
        object.__setattr__(self, "type_overrides", tuple(sorted((str(k), as_ggml_type(v)) for k, v in ov)))
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"SyntheticConfig: {msg}")

        need(self.arch in ARCHES, f"arch must be one of {', '.join(ARCHES)}, got {self.arch!r}")
        need(self.n_layer >= 1, "n_layer must be >= 1")
        need(self.full_attention_interval >= 1, "full_attention_interval must be >= 1")
        for f in ("n_embd", "n_head", "n_head_kv", "head_dim", "ssm_d_state", "ssm_n_group",
                  "ssm_dt_rank", "ssm_conv_kernel", "n_ff", "context_length"):
            need(getattr(self, f) >= 1, f"{f} must be >= 1")
        need(self.n_head % self.n_head_kv == 0, "n_head must be a multiple of n_head_kv")
        need(self.ssm_dt_rank % self.ssm_n_group == 0, "ssm_dt_rank (V heads) must be a multiple of ssm_n_group (K heads)")
        need(len(self.rope_sections) == 4, "rope_sections must have 4 entries")
        need(0 < self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0, "rope_dim must be even and <= head_dim")
        need(2 * sum(self.rope_sections) == self.rope_dim, "rope_sections must sum to rope_dim / 2")
        if self.arch == "qwen35moe":
            need(self.n_expert >= 1 and 1 <= self.n_expert_used <= self.n_expert, "need 1 <= n_expert_used <= n_expert")
            need(self.n_ff_exp >= 1 and self.n_ff_shexp >= 1, "n_ff_exp and n_ff_shexp must be >= 1")
        need(self.n_vocab >= 256 + 3, "n_vocab must hold the 256 byte tokens and 3 special tokens")
        for t in (self.default_type, *(t for _, t in self.type_overrides)):
            need(t in QUANTIZABLE_TYPES, f"{t.name} cannot be written by gguf.quants.quantize")
        for k, _ in self.type_overrides:
            need(k in MATRIX_KINDS or k in KIND_GROUPS, f"unknown tensor kind or group {k!r} in type_overrides")

    # ---- derived sizes ------------------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.arch == "qwen35moe"

    @property
    def block_count(self) -> int:
        return self.n_layer + (1 if self.mtp else 0)

    @property
    def ssm_d_inner(self) -> int:  # value heads * value head dim
        return self.ssm_dt_rank * self.ssm_d_state

    @property
    def ssm_key_dim(self) -> int:
        return self.ssm_n_group * self.ssm_d_state

    @property
    def ssm_conv_dim(self) -> int:
        return 2 * self.ssm_key_dim + self.ssm_d_inner

    def is_recurrent(self, layer: int) -> bool:
        return layer < self.n_layer and (layer + 1) % self.full_attention_interval != 0

    def layer_roles(self) -> list[Role]:
        """Role of each block: RECURRENT, ATTENTION, or MTP for the nextn block."""
        roles = [Role.RECURRENT if self.is_recurrent(i) else Role.ATTENTION for i in range(self.n_layer)]
        return roles + [Role.MTP] * (self.block_count - self.n_layer)

    def type_for_kind(self, kind: str) -> GGMLType:
        """The requested type of a weight-matrix kind (before any block-size fallback)."""
        ov = dict(self.type_overrides)
        if kind in ov:
            return ov[kind]
        for group, kinds in KIND_GROUPS.items():
            if kind in kinds and group in ov:
                return ov[group]
        return self.default_type

    def replace(self, **changes: Any) -> "SyntheticConfig":
        return dataclasses.replace(self, **changes)


def tiny_qwen35moe(**overrides: Any) -> SyntheticConfig:
    """Tiny hybrid MoE model: 8 layers (6 recurrent, 2 attention), 8 experts top-2, vocab 512."""
    return SyntheticConfig(**overrides)


def tiny_qwen35(**overrides: Any) -> SyntheticConfig:
    """Tiny hybrid dense model: as `tiny_qwen35moe` with a SwiGLU FFN of width 128."""
    base: dict[str, Any] = dict(arch="qwen35", name="tiny-qwen35", n_ff=128, n_expert=0, n_expert_used=0,
                                n_ff_exp=0, n_ff_shexp=0)
    return SyntheticConfig(**{**base, **overrides})


# What the released Qwen3.5 checkpoints share: the hybrid layout, attention and DeltaNet
# head shapes, RoPE and the vocabulary.
_QWEN35_COMMON: dict[str, Any] = dict(
    full_attention_interval=4, context_length=262144, n_head=16, head_dim=256, rope_dim=64,
    rope_sections=(11, 11, 10, 0), rope_freq_base=10_000_000.0, rms_eps=1e-6, ssm_d_state=128, ssm_n_group=16,
    ssm_dt_rank=32, ssm_conv_kernel=4, n_vocab=248320,
)


def qwen35_4b(n_layer: int = 32, **overrides: Any) -> SyntheticConfig:
    """Dense Qwen3.5-4B-like shapes (hidden 2560, SwiGLU 9216, 16 query and 4 KV heads of 256,
    DeltaNet with 16 key and 32 value heads of 128, vocab 248320): a dense bench model."""
    base: dict[str, Any] = dict(
        _QWEN35_COMMON, arch="qwen35", name="Qwen3.5-4B (random)", n_layer=n_layer, n_embd=2560, n_head_kv=4,
        n_expert=0, n_expert_used=0, n_ff_exp=0, n_ff_shexp=0, n_ff=9216,
    )
    return SyntheticConfig(**{**base, **overrides})


def qwen35moe_35b_a3b(n_layer: int = 40, **overrides: Any) -> SyntheticConfig:
    """The real Qwen3.5-35B-A3B shapes (40 layers, 256 experts top-8, vocab 248320)."""
    base: dict[str, Any] = dict(
        _QWEN35_COMMON, arch="qwen35moe", name="Qwen3.5-35B-A3B (random)", n_layer=n_layer, n_embd=2048,
        n_head_kv=2, n_expert=256, n_expert_used=8, n_ff_exp=512, n_ff_shexp=512, n_ff=512,
    )
    return SyntheticConfig(**{**base, **overrides})
