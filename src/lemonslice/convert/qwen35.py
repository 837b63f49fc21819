"""Qwen3.5 (`qwen35moe`, `qwen35`) Hugging Face -> GGUF: hyper-parameter keys, the tensor
name map and the value transforms llama.cpp's converter applies.

Transforms (all in float32, numpy/PyTorch order [out, in]):
* `A_log` -> `ssm_a = -exp(A_log)`; conv1d [C, 1, K] squeezed to [C, K];
* +1 on every RMSNorm weight except the gated `linear_attn.norm` (HF stores w for (1+w));
* linear-attention V heads reordered from grouped-by-K-head to tiled when K != V heads;
* experts stacked to [X, out, in] (from per-expert tensors or a fused gate_up_proj).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LemonsliceError
from ..gguf.constants import Keys, Tensors, ValueType, arch_key
from ..gguf.writer import encode_kv
from .hf import HFCheckpoint

if TYPE_CHECKING:  # torch comes in with the first tensor loaded, so config errors are reported fast
    import torch

log = logging.getLogger(__name__)

ARCHITECTURES = {
    "Qwen3_5MoeForCausalLM": "qwen35moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen35moe",
    "Qwen3_5ForCausalLM": "qwen35",
    "Qwen3_5ForConditionalGeneration": "qwen35",
}
DEFAULT_MROPE_SECTIONS = (11, 11, 10, 0)  # llama.cpp's converter default when a config has none
_MTP_LAYER_RE = re.compile(r"^mtp\.layers\.(\d+)\.")
# Weights of the vision tower and other non-text parts of a ...ForConditionalGeneration checkpoint.
_SKIP_RE = re.compile(r"(^|\.)(visual|vision_tower|vision_model|audio_tower)\.|rotary_emb\.inv_freq$")

_ATTN = {
    "self_attn.q_proj.weight": Tensors.ATTN_Q, "self_attn.k_proj.weight": Tensors.ATTN_K,
    "self_attn.v_proj.weight": Tensors.ATTN_V, "self_attn.q_norm.weight": Tensors.ATTN_Q_NORM,
    "self_attn.k_norm.weight": Tensors.ATTN_K_NORM, "self_attn.o_proj.weight": Tensors.ATTN_OUT,
}
_LINEAR = {
    "linear_attn.in_proj_qkv.weight": Tensors.ATTN_QKV, "linear_attn.in_proj_z.weight": Tensors.ATTN_GATE,
    "linear_attn.conv1d.weight": Tensors.SSM_CONV1D, "linear_attn.dt_bias": Tensors.SSM_DT,
    "linear_attn.A_log": Tensors.SSM_A, "linear_attn.in_proj_b.weight": Tensors.SSM_BETA,
    "linear_attn.in_proj_a.weight": Tensors.SSM_ALPHA, "linear_attn.norm.weight": Tensors.SSM_NORM,
    "linear_attn.out_proj.weight": Tensors.SSM_OUT,
}
_MOE = {
    "mlp.gate.weight": Tensors.FFN_GATE_INP, "mlp.shared_expert_gate.weight": Tensors.FFN_GATE_INP_SHEXP,
    "mlp.shared_expert.gate_proj.weight": Tensors.FFN_GATE_SHEXP,
    "mlp.shared_expert.up_proj.weight": Tensors.FFN_UP_SHEXP,
    "mlp.shared_expert.down_proj.weight": Tensors.FFN_DOWN_SHEXP,
}
_DENSE = {
    "mlp.gate_proj.weight": Tensors.FFN_GATE, "mlp.up_proj.weight": Tensors.FFN_UP,
    "mlp.down_proj.weight": Tensors.FFN_DOWN,
}
_NEXTN = {
    "mtp.fc.weight": Tensors.NEXTN_EH_PROJ, "mtp.pre_fc_norm_embedding.weight": Tensors.NEXTN_ENORM,
    "mtp.pre_fc_norm_hidden.weight": Tensors.NEXTN_HNORM, "mtp.norm.weight": Tensors.NEXTN_SHARED_HEAD_NORM,
}
_PLUS_ONE = {
    Tensors.ATTN_NORM, Tensors.ATTN_POST_NORM, Tensors.ATTN_Q_NORM, Tensors.ATTN_K_NORM, Tensors.OUTPUT_NORM,
    Tensors.NEXTN_ENORM, Tensors.NEXTN_HNORM, Tensors.NEXTN_SHARED_HEAD_NORM,
}
# Kept F32 whatever the output type (llama.cpp's converter: 1-D tensors, norms, routers, conv kernels).
KEEP_F32 = {Tensors.FFN_GATE_INP, Tensors.FFN_GATE_INP_SHEXP, Tensors.SSM_CONV1D, Tensors.SSM_A, Tensors.SSM_DT}


@dataclass(frozen=True)
class HParams:
    arch: str
    n_layer: int  # trunk layers
    n_mtp: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_head_kv: int
    head_dim: int
    recurrent: tuple[bool, ...]  # per trunk layer
    lin_k_heads: int
    lin_v_heads: int
    lin_k_dim: int
    lin_v_dim: int
    conv_kernel: int
    n_expert: int
    n_ff: int  # dense FFN or shared-expert width
    n_ff_exp: int
    tied: bool

    @property
    def block_count(self) -> int:
        return self.n_layer + self.n_mtp

    @property
    def moe(self) -> bool:
        return self.arch == "qwen35moe"


def _req(hp: dict[str, Any], key: str) -> Any:
    if hp.get(key) is None:
        raise LemonsliceError(f"config.json lacks {key}")
    return hp[key]


def _rope(hp: dict[str, Any]) -> dict[str, Any]:
    return hp.get("rope_parameters") or hp.get("rope_scaling") or {}


def architecture_of(ckpt: HFCheckpoint) -> str:
    arch = ARCHITECTURES.get(ckpt.architecture)
    if arch is None:
        raise LemonsliceError(
            f"{ckpt.path}: unsupported architecture {ckpt.architecture!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    return arch


def read_hparams(ckpt: HFCheckpoint, canon: dict[str, str], want_mtp: bool) -> HParams:
    arch = architecture_of(ckpt)
    hp = ckpt.hparams
    n_layer = int(_req(hp, "num_hidden_layers"))
    interval = int(hp.get("full_attention_interval") or 4)
    types = hp.get("layer_types") or [
        "linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layer)
    ]
    if len(types) != n_layer or set(types) - {"linear_attention", "full_attention"}:
        raise LemonsliceError(f"config.json: layer_types must list {n_layer} linear_attention/full_attention entries")
    mtp_layers = {int(m.group(1)) for n in canon if (m := _MTP_LAYER_RE.match(n))}
    n_mtp = int(hp.get("mtp_num_hidden_layers") or 0) or len(mtp_layers)
    if n_mtp and not want_mtp:
        n_mtp = 0
    elif n_mtp and not mtp_layers:
        log.warning("config.json declares %d MTP layer(s) but the checkpoint has no mtp.* tensors", n_mtp)
        n_mtp = 0
    moe = arch == "qwen35moe"
    head_dim = int(hp.get("head_dim") or _req(hp, "hidden_size") // _req(hp, "num_attention_heads"))
    out = HParams(
        arch=arch, n_layer=n_layer, n_mtp=n_mtp, n_embd=int(_req(hp, "hidden_size")),
        n_vocab=int(_req(hp, "vocab_size")),
        n_head=int(_req(hp, "num_attention_heads")), n_head_kv=int(_req(hp, "num_key_value_heads")), head_dim=head_dim,
        recurrent=tuple(t == "linear_attention" for t in types),
        lin_k_heads=int(_req(hp, "linear_num_key_heads")), lin_v_heads=int(_req(hp, "linear_num_value_heads")),
        lin_k_dim=int(_req(hp, "linear_key_head_dim")), lin_v_dim=int(_req(hp, "linear_value_head_dim")),
        conv_kernel=int(_req(hp, "linear_conv_kernel_dim")),
        n_expert=int(_req(hp, "num_experts")) if moe else 0,
        n_ff=int(_req(hp, "shared_expert_intermediate_size" if moe else "intermediate_size")),
        n_ff_exp=int(_req(hp, "moe_intermediate_size")) if moe else 0,
        tied=bool(hp.get("tie_word_embeddings", False)) and "lm_head.weight" not in canon,
    )
    if out.lin_v_heads % out.lin_k_heads:
        raise LemonsliceError("config.json: linear_num_value_heads must be a multiple of linear_num_key_heads")
    if out.lin_k_dim != out.lin_v_dim:
        raise LemonsliceError("config.json: llama.cpp needs linear_key_head_dim == linear_value_head_dim")
    return out


def kv_records(ckpt: HFCheckpoint, h: HParams) -> list[bytes]:
    """The `<arch>.*` keys, with the GGUF types llama.cpp's loader insists on."""
    hp = ckpt.hparams
    rope = _rope(hp)
    u32, f32 = ValueType.UINT32, ValueType.FLOAT32
    recs: list[tuple[str, ValueType, Any, ValueType | None]] = [
        (Keys.BLOCK_COUNT, u32, h.block_count, None),
        (Keys.CONTEXT_LENGTH, u32, int(_req(hp, "max_position_embeddings")), None),
        (Keys.EMBEDDING_LENGTH, u32, h.n_embd, None),
    ]
    if not h.moe or hp.get("intermediate_size") is not None:
        recs.append((Keys.FEED_FORWARD_LENGTH, u32, int(hp.get("intermediate_size") or h.n_ff), None))
    sections = list(rope.get("mrope_section") or DEFAULT_MROPE_SECTIONS)[:4]
    recs += [
        (Keys.HEAD_COUNT, u32, h.n_head, None),
        (Keys.HEAD_COUNT_KV, u32, h.n_head_kv, None),
        (Keys.ROPE_DIMENSION_SECTIONS, ValueType.ARRAY, sections + [0] * (4 - len(sections)), ValueType.INT32),
        (Keys.ROPE_FREQ_BASE, f32, float(rope.get("rope_theta", hp.get("rope_theta", 10000.0))), None),
        (Keys.RMS_EPS, f32, float(_req(hp, "rms_norm_eps")), None),
    ]
    rope_type, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if rope_type in ("linear", "yarn") and factor is not None:
        recs += [
            (Keys.ROPE_SCALING_TYPE, ValueType.STRING, rope_type, None),
            (Keys.ROPE_SCALING_FACTOR, f32, float(factor), None),
        ]
        if rope_type == "yarn":
            recs.append((Keys.ROPE_SCALING_ORIG_CTX, u32, int(rope["original_max_position_embeddings"]), None))
    elif rope_type not in (None, "default"):
        log.warning("rope type %r is not converted; llama.cpp will use plain RoPE", rope_type)
    if h.moe:
        recs += [
            (Keys.EXPERT_COUNT, u32, h.n_expert, None),
            (Keys.EXPERT_USED_COUNT, u32, int(_req(hp, "num_experts_per_tok")), None),
        ]
    recs += [(Keys.KEY_LENGTH, u32, h.head_dim, None), (Keys.VALUE_LENGTH, u32, h.head_dim, None)]
    if h.moe:
        recs += [
            (Keys.EXPERT_FEED_FORWARD_LENGTH, u32, h.n_ff_exp, None),
            (Keys.EXPERT_SHARED_FEED_FORWARD_LENGTH, u32, h.n_ff, None),
        ]
    partial = float(rope.get("partial_rotary_factor", hp.get("partial_rotary_factor", 0.25)))
    recs += [
        (Keys.SSM_CONV_KERNEL, u32, h.conv_kernel, None),
        (Keys.SSM_STATE_SIZE, u32, h.lin_k_dim, None),
        (Keys.SSM_GROUP_COUNT, u32, h.lin_k_heads, None),
        (Keys.SSM_TIME_STEP_RANK, u32, h.lin_v_heads, None),
        (Keys.SSM_INNER_SIZE, u32, h.lin_v_dim * h.lin_v_heads, None),
        (Keys.RECURRENT_LAYERS, ValueType.ARRAY, list(h.recurrent) + [False] * h.n_mtp, ValueType.BOOL),
        (Keys.FULL_ATTENTION_INTERVAL, u32, int(hp.get("full_attention_interval") or 4), None),
        (Keys.ROPE_DIMENSION_COUNT, u32, int(h.head_dim * partial), None),
    ]
    if h.n_mtp:
        recs.append((Keys.NEXTN_PREDICT_LAYERS, u32, h.n_mtp, None))
    return [encode_kv(arch_key(k, h.arch), t, v, it) for k, t, v, it in recs]


@dataclass(frozen=True)
class OutTensor:
    """One GGUF tensor: its name, kind (the Tensors template), numpy-order shape and how to make it."""

    name: str
    kind: str
    shape: tuple[int, ...]  # numpy order, [out, in]
    sources: tuple[str, ...]  # HF names read (for error messages and the unused-tensor check)
    make: Callable[[], torch.Tensor]


def canonical_names(names: list[str]) -> dict[str, str]:
    """Canonical HF name -> stored name: `language_model.` dropped, `model.mtp.` -> `mtp.`, vision skipped."""
    out: dict[str, str] = {}
    for n in names:
        if _SKIP_RE.search(n):
            continue
        c = n.replace("language_model.", "", 1)
        if c.startswith("model.mtp."):
            c = c[len("model."):]
        out[c] = n
    return out


class _Planner:
    def __init__(self, ckpt: HFCheckpoint, canon: dict[str, str], h: HParams):
        self.ckpt, self.canon, self.h = ckpt, canon, h
        self.missing: list[str] = []
        self.used: set[str] = set()

    def _src_shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self.canon:
            self.missing.append(name)
            return None
        self.used.add(name)
        return self.ckpt.shape(self.canon[name])

    def _load(self, name: str) -> torch.Tensor:
        return self.ckpt.load(self.canon[name])

    def plain(self, kind: str, bid: int | None, src: str, shape: tuple[int, ...]) -> OutTensor | None:
        got = self._src_shape(src)
        if got is None:
            return None
        if kind == Tensors.SSM_CONV1D:
            got = tuple(d for d in got if d != 1)
        name = kind.format(bid=bid)
        if tuple(got) != shape:
            raise LemonsliceError(f"{self.canon[src]}: shape {'x'.join(map(str, got))} does not match config.json "
                                  f"({'x'.join(map(str, shape))})")
        return OutTensor(name, kind, shape, (src,), lambda: transform(kind, self._load(src), self.h))

    def experts(self, bid: int, prefix: str) -> list[OutTensor]:
        h = self.h
        gate_up = self._either(prefix + "gate_up_proj")
        up_shape, down_shape = (h.n_expert, h.n_ff_exp, h.n_embd), (h.n_expert, h.n_embd, h.n_ff_exp)
        if gate_up is not None:
            down = self._either(prefix + "down_proj") or prefix + "down_proj"
            self._check(gate_up, (h.n_expert, 2 * h.n_ff_exp, h.n_embd))
            self._check(down, down_shape)
            half = h.n_ff_exp
            # Fused [X, 2F, E]: gate rows first, then up rows.
            return [
                OutTensor(Tensors.FFN_GATE_EXPS.format(bid=bid), Tensors.FFN_GATE_EXPS, up_shape, (gate_up,),
                          lambda: self._slice(gate_up, 0, half)),
                OutTensor(Tensors.FFN_UP_EXPS.format(bid=bid), Tensors.FFN_UP_EXPS, up_shape, (gate_up,),
                          lambda: self._slice(gate_up, half, 2 * half)),
                OutTensor(Tensors.FFN_DOWN_EXPS.format(bid=bid), Tensors.FFN_DOWN_EXPS, down_shape, (down,),
                          lambda: self._load(down)),
            ]
        out = []
        projs = (("gate_proj", Tensors.FFN_GATE_EXPS, up_shape), ("up_proj", Tensors.FFN_UP_EXPS, up_shape),
                 ("down_proj", Tensors.FFN_DOWN_EXPS, down_shape))
        for proj, kind, shape in projs:
            srcs = tuple(f"{prefix}{x}.{proj}.weight" for x in range(h.n_expert))
            for s in srcs:
                self._check(s, shape[1:])
            out.append(OutTensor(kind.format(bid=bid), kind, shape, srcs,
                                 lambda srcs=srcs: self._stack(srcs)))
        return out

    def _either(self, name: str) -> str | None:
        """A fused expert tensor's stored name: with or without a `.weight` suffix."""
        return next((n for n in (name, name + ".weight") if n in self.canon), None)

    def _check(self, src: str, shape: tuple[int, ...]) -> None:
        got = self._src_shape(src)
        if got is not None and tuple(got) != shape:
            raise LemonsliceError(f"{self.canon[src]}: shape {'x'.join(map(str, got))} does not match config.json "
                                  f"({'x'.join(map(str, shape))})")

    def _stack(self, srcs: tuple[str, ...]) -> torch.Tensor:
        """[X, out, in] from X per-expert [out, in] tensors, loaded one at a time."""
        first = self._load(srcs[0])
        out = first.new_empty((len(srcs), *first.shape))
        out[0] = first
        for i, s in enumerate(srcs[1:], 1):
            out[i] = self._load(s)
        return out

    def _slice(self, src: str, lo: int, hi: int) -> torch.Tensor:
        return self.ckpt.load_rows(self.canon[src], lo, hi)  # only the needed half of the fused tensor


def _block_shapes(h: HParams) -> dict[str, tuple[int, ...]]:
    """Numpy-order shape of every per-block tensor kind, from the config."""
    E = h.n_embd
    key_dim, val_dim = h.lin_k_heads * h.lin_k_dim, h.lin_v_heads * h.lin_v_dim
    q_dim, kv_dim = h.n_head * h.head_dim, h.n_head_kv * h.head_dim
    return {
        Tensors.ATTN_Q: (2 * q_dim, E), Tensors.ATTN_K: (kv_dim, E), Tensors.ATTN_V: (kv_dim, E),
        Tensors.ATTN_Q_NORM: (h.head_dim,), Tensors.ATTN_K_NORM: (h.head_dim,), Tensors.ATTN_OUT: (E, q_dim),
        Tensors.ATTN_QKV: (2 * key_dim + val_dim, E), Tensors.ATTN_GATE: (val_dim, E),
        Tensors.SSM_CONV1D: (2 * key_dim + val_dim, h.conv_kernel), Tensors.SSM_DT: (h.lin_v_heads,),
        Tensors.SSM_A: (h.lin_v_heads,), Tensors.SSM_BETA: (h.lin_v_heads, E), Tensors.SSM_ALPHA: (h.lin_v_heads, E),
        Tensors.SSM_NORM: (h.lin_v_dim,), Tensors.SSM_OUT: (E, val_dim),
        Tensors.FFN_GATE_INP: (h.n_expert, E), Tensors.FFN_GATE_INP_SHEXP: (1, E),
        Tensors.FFN_GATE_SHEXP: (h.n_ff, E), Tensors.FFN_UP_SHEXP: (h.n_ff, E), Tensors.FFN_DOWN_SHEXP: (E, h.n_ff),
        Tensors.FFN_GATE: (h.n_ff, E), Tensors.FFN_UP: (h.n_ff, E), Tensors.FFN_DOWN: (E, h.n_ff),
        Tensors.NEXTN_EH_PROJ: (E, 2 * E), Tensors.NEXTN_ENORM: (E,), Tensors.NEXTN_HNORM: (E,),
        Tensors.NEXTN_SHARED_HEAD_NORM: (E,),
    }


def block_tensor_kind(hf_name: str, recurrent: bool, moe: bool) -> str | None:
    """The tensor kind (a `Tensors` template) `convert` makes of a trunk block's Hugging Face weight
    `hf_name` (`self_attn.q_proj.weight`, no layer prefix), or None when such a block has none.
    Stacked experts are not in the table (see `_Planner.experts`)."""
    return {**(_LINEAR if recurrent else _ATTN), **(_MOE if moe else _DENSE)}.get(hf_name)


def _plan_block(p: _Planner, bid: int, h: HParams, shapes: dict[str, tuple[int, ...]]) -> list[OutTensor | None]:
    """Block `bid`'s tensors in output order; blocks from `h.n_layer` on come from `mtp.layers.*`."""
    E = h.n_embd
    mtp = bid >= h.n_layer
    pre = f"mtp.layers.{bid - h.n_layer}." if mtp else f"model.layers.{bid}."
    out = [p.plain(Tensors.ATTN_NORM, bid, pre + "input_layernorm.weight", (E,))]
    mixer = _LINEAR if not mtp and h.recurrent[bid] else _ATTN
    out += [p.plain(k, bid, pre + s, shapes[k]) for s, k in mixer.items()]
    out.append(p.plain(Tensors.ATTN_POST_NORM, bid, pre + "post_attention_layernorm.weight", (E,)))
    if h.moe:
        out.append(p.plain(Tensors.FFN_GATE_INP, bid, pre + "mlp.gate.weight", shapes[Tensors.FFN_GATE_INP]))
        out += p.experts(bid, pre + "mlp.experts.")
        out += [p.plain(k, bid, pre + s, shapes[k]) for s, k in _MOE.items() if k != Tensors.FFN_GATE_INP]
    else:
        out += [p.plain(k, bid, pre + s, shapes[k]) for s, k in _DENSE.items()]
    if bid == h.n_layer:
        out += [p.plain(k, bid, s, shapes[k]) for s, k in _NEXTN.items()]
    return out


def _raise_missing(ckpt: HFCheckpoint, missing: list[str]) -> None:
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LemonsliceError(f"{ckpt.path}: missing tensor {missing[0]}{more}")


def plan_tensors(ckpt: HFCheckpoint, canon: dict[str, str], h: HParams) -> list[OutTensor]:
    """Every GGUF tensor in output order; raises if the checkpoint lacks any."""
    p = _Planner(ckpt, canon, h)
    E, V = h.n_embd, h.n_vocab
    shapes = _block_shapes(h)
    out: list[OutTensor | None] = [p.plain(Tensors.TOKEN_EMBD, None, "model.embed_tokens.weight", (V, E))]
    for bid in range(h.block_count):
        out += _plan_block(p, bid, h, shapes)
    out.append(p.plain(Tensors.OUTPUT_NORM, None, "model.norm.weight", (E,)))
    if not h.tied:
        out.append(p.plain(Tensors.OUTPUT, None, "lm_head.weight", (V, E)))
    _raise_missing(ckpt, p.missing)
    unused = sorted(set(canon) - p.used - ({"lm_head.weight"} if h.tied else set()))
    if h.n_mtp == 0:
        unused = [n for n in unused if not n.startswith("mtp.")]
    if unused:
        log.warning("skipping %d tensor(s) the converter does not know, e.g. %s", len(unused), canon[unused[0]])
    return [t for t in out if t is not None]


def plan_mtp_tensors(ckpt: HFCheckpoint, canon: dict[str, str], h: HParams) -> list[OutTensor]:
    """Only the MTP blocks' tensors (blocks n_layer..block_count-1), named and valued exactly as
    `plan_tensors` makes them; no trunk tensor is opened."""
    p = _Planner(ckpt, canon, h)
    shapes = _block_shapes(h)
    out = [t for bid in range(h.n_layer, h.block_count) for t in _plan_block(p, bid, h, shapes)]
    _raise_missing(ckpt, p.missing)
    return [t for t in out if t is not None]


def _tile_v_heads(t: torch.Tensor, dim: int, n_k: int, n_v: int, head_dim: int) -> torch.Tensor:
    """V heads along `dim` from grouped by K head (g*r + j) to tiled (j*n_k + g), r = n_v / n_k.

    llama.cpp broadcasts Q/K to the V heads by tiling, so the V heads must be stored tiled."""
    shape = list(t.shape)
    grouped = t.reshape(*shape[:dim], n_k, n_v // n_k, head_dim, *shape[dim + 1:])
    return grouped.transpose(dim, dim + 1).reshape(shape)


def transform(kind: str, t: torch.Tensor, h: HParams) -> torch.Tensor:
    """HF values -> llama.cpp values for one tensor (numpy order in and out)."""
    if kind == Tensors.SSM_A:
        t = t.exp().neg()
    elif kind == Tensors.SSM_CONV1D:
        t = t.reshape(t.shape[0], -1)  # [C, 1, K] -> [C, K]
    elif kind in _PLUS_ONE:
        t = t + 1
    if h.lin_k_heads == h.lin_v_heads:
        return t
    nk, nv, dv = h.lin_k_heads, h.lin_v_heads, h.lin_v_dim
    qk = 2 * nk * h.lin_k_dim
    if kind in (Tensors.ATTN_QKV, Tensors.SSM_CONV1D):
        t[qk:] = _tile_v_heads(t[qk:], 0, nk, nv, dv)  # the right side is a copy: reshape of a transpose
    elif kind == Tensors.ATTN_GATE:
        t = _tile_v_heads(t, 0, nk, nv, dv)
    elif kind in (Tensors.SSM_BETA, Tensors.SSM_ALPHA, Tensors.SSM_A, Tensors.SSM_DT):
        t = _tile_v_heads(t, 0, nk, nv, 1)
    elif kind == Tensors.SSM_OUT:
        t = _tile_v_heads(t, 1, nk, nv, dv)
    return t
