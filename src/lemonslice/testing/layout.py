"""Tensor names, shapes and types of a synthetic Qwen3.5 GGUF (llama.cpp's layout).

Shapes are in ggml order: ne0 (the row length) first, so a matrix mapping `E` inputs to
`N` outputs is `[E, N]`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..gguf.constants import BLOCK_SIZES, GGMLType, Role, Tensors, block_suffix
from .config import MATRIX_KINDS, SyntheticConfig


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of the layout, before a type is chosen."""

    name: str
    shape: tuple[int, ...]  # ggml order, ne0 first
    kind: str  # name without `blk.N.` and `.weight`/`.bias`, e.g. "attn_q", "ssm_a", "token_embd"
    layer: int | None  # block index, None for shared tensors
    # How values are drawn: "matrix", "embd", "norm", "vector", "conv", "ssm_a", "ssm_dt".
    init: str

    @property
    def is_matrix(self) -> bool:
        return self.kind in MATRIX_KINDS


@dataclass(frozen=True)
class SyntheticTensor:
    """A tensor of a synthetic file with its chosen type."""

    slot: TensorSlot
    ggml_type: GGMLType  # the type written
    requested_type: GGMLType  # the type the config asked for

    @property
    def name(self) -> str:
        return self.slot.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.slot.shape

    @property
    def fallback(self) -> bool:
        """True when the row length did not fit the requested type's block and F16 was written."""
        return self.ggml_type != self.requested_type


def kind_of(name: str) -> str:
    s = block_suffix(name)
    for ext in (".weight", ".bias"):
        if s.endswith(ext):
            return s[: -len(ext)]
    return s


def _slot(template: str, bid: int | None, shape: tuple[int, ...], init: str) -> TensorSlot:
    name = template.format(bid=bid) if bid is not None else template
    return TensorSlot(name, tuple(int(d) for d in shape), kind_of(name), bid, init)


def _attention(c: SyntheticConfig, b: int) -> list[TensorSlot]:
    E, D, H, Hkv = c.n_embd, c.head_dim, c.n_head, c.n_head_kv
    T = Tensors
    return [
        _slot(T.ATTN_Q, b, (E, 2 * D * H), "matrix"),  # [n_embd, 2*head_dim*n_head]: query + gate per head
        _slot(T.ATTN_K, b, (E, D * Hkv), "matrix"),  # [n_embd, head_dim*n_head_kv]
        _slot(T.ATTN_V, b, (E, D * Hkv), "matrix"),  # [n_embd, head_dim*n_head_kv]
        _slot(T.ATTN_OUT, b, (D * H, E), "matrix"),  # [head_dim*n_head, n_embd]
        _slot(T.ATTN_Q_NORM, b, (D,), "norm"),  # [head_dim]
        _slot(T.ATTN_K_NORM, b, (D,), "norm"),  # [head_dim]
    ]


def _linear_attention(c: SyntheticConfig, b: int) -> list[TensorSlot]:
    E, Hv = c.n_embd, c.ssm_dt_rank
    T = Tensors
    return [
        _slot(T.ATTN_QKV, b, (E, c.ssm_conv_dim), "matrix"),  # [n_embd, 2*key_dim + value_dim]
        _slot(T.ATTN_GATE, b, (E, c.ssm_d_inner), "matrix"),  # [n_embd, value_dim] (z)
        _slot(T.SSM_CONV1D, b, (c.ssm_conv_kernel, c.ssm_conv_dim), "conv"),  # [conv_kernel, conv_dim]
        _slot(T.SSM_DT, b, (Hv,), "ssm_dt"),  # [n_v_heads]
        _slot(T.SSM_A, b, (Hv,), "ssm_a"),  # [n_v_heads], -exp(A_log)
        _slot(T.SSM_BETA, b, (E, Hv), "matrix"),  # [n_embd, n_v_heads]
        _slot(T.SSM_ALPHA, b, (E, Hv), "matrix"),  # [n_embd, n_v_heads]
        _slot(T.SSM_NORM, b, (c.ssm_d_state,), "norm"),  # [head_v_dim]
        _slot(T.SSM_OUT, b, (c.ssm_d_inner, E), "matrix"),  # [value_dim, n_embd]
    ]


def _ffn(c: SyntheticConfig, b: int) -> list[TensorSlot]:
    E = c.n_embd
    T = Tensors
    if not c.is_moe:
        return [
            _slot(T.FFN_GATE, b, (E, c.n_ff), "matrix"),  # [n_embd, n_ff]
            _slot(T.FFN_UP, b, (E, c.n_ff), "matrix"),  # [n_embd, n_ff]
            _slot(T.FFN_DOWN, b, (c.n_ff, E), "matrix"),  # [n_ff, n_embd]
        ]
    X, Fe, Fs = c.n_expert, c.n_ff_exp, c.n_ff_shexp
    return [
        _slot(T.FFN_GATE_INP, b, (E, X), "matrix"),  # [n_embd, n_expert] router
        _slot(T.FFN_GATE_EXPS, b, (E, Fe, X), "matrix"),  # [n_embd, n_ff_exp, n_expert]
        _slot(T.FFN_UP_EXPS, b, (E, Fe, X), "matrix"),  # [n_embd, n_ff_exp, n_expert]
        _slot(T.FFN_DOWN_EXPS, b, (Fe, E, X), "matrix"),  # [n_ff_exp, n_embd, n_expert]
        _slot(T.FFN_GATE_INP_SHEXP, b, (E,), "vector"),  # [n_embd]
        _slot(T.FFN_GATE_SHEXP, b, (E, Fs), "matrix"),  # [n_embd, n_ff_shexp]
        _slot(T.FFN_UP_SHEXP, b, (E, Fs), "matrix"),  # [n_embd, n_ff_shexp]
        _slot(T.FFN_DOWN_SHEXP, b, (Fs, E), "matrix"),  # [n_ff_shexp, n_embd]
    ]


def block_layout(c: SyntheticConfig, b: int) -> list[TensorSlot]:
    """The tensors of block `b`: mixer (recurrent or attention), FFN, and the nextn extras."""
    E = c.n_embd
    role = c.layer_roles()[b]
    out = [_slot(Tensors.ATTN_NORM, b, (E,), "norm")]  # [n_embd]
    out += _linear_attention(c, b) if role == Role.RECURRENT else _attention(c, b)
    out.append(_slot(Tensors.ATTN_POST_NORM, b, (E,), "norm"))  # [n_embd]
    out += _ffn(c, b)
    if role == Role.MTP:
        out += [
            _slot(Tensors.NEXTN_EH_PROJ, b, (2 * E, E), "matrix"),  # [2*n_embd, n_embd]
            _slot(Tensors.NEXTN_ENORM, b, (E,), "norm"),  # [n_embd]
            _slot(Tensors.NEXTN_HNORM, b, (E,), "norm"),  # [n_embd]
            _slot(Tensors.NEXTN_SHARED_HEAD_NORM, b, (E,), "norm"),  # [n_embd]
        ]
    return out


def tensor_layout(c: SyntheticConfig) -> list[TensorSlot]:
    """Every tensor, in file order: token_embd, the blocks in order, output_norm, output."""
    out = [_slot(Tensors.TOKEN_EMBD, None, (c.n_embd, c.n_vocab), "embd")]  # [n_embd, n_vocab]
    for b in range(c.block_count):
        out += block_layout(c, b)
    out.append(_slot(Tensors.OUTPUT_NORM, None, (c.n_embd,), "norm"))  # [n_embd]
    out.append(_slot(Tensors.OUTPUT, None, (c.n_embd, c.n_vocab), "matrix"))  # [n_embd, n_vocab]
    return out


def fits_blocks(shape: tuple[int, ...], t: GGMLType) -> bool:
    return shape[0] % BLOCK_SIZES[t][0] == 0


def choose_type(slot: TensorSlot, requested: GGMLType) -> SyntheticTensor:
    """1-D tensors and conv kernels are F32; other tensors get `requested`, or F16 when
    their rows do not split into the type's blocks."""
    if not slot.is_matrix:
        return SyntheticTensor(slot, GGMLType.F32, GGMLType.F32)
    written = requested if fits_blocks(slot.shape, requested) else GGMLType.F16
    return SyntheticTensor(slot, written, requested)


def synthetic_tensors(c: SyntheticConfig) -> list[SyntheticTensor]:
    """The tensors `write_synthetic` writes for `c`, with their types, in file order."""
    return [choose_type(s, c.type_for_kind(s.kind)) for s in tensor_layout(c)]


def fallbacks(c: SyntheticConfig) -> list[SyntheticTensor]:
    """Tensors written as F16 because their rows do not fit the requested type's blocks."""
    return [t for t in synthetic_tensors(c) if t.fallback]
