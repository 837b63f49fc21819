"""Hyper-parameters of the Qwen3.5 families (`qwen35moe`, `qwen35`), read from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import LemonsliceError
from ..gguf.constants import Keys, arch_key

ARCHES = ("qwen35moe", "qwen35")
_REQUIRED = object()


def _scalar(name: str, v: Any) -> Any:
    """A scalar, or a per-layer array whose entries are all equal (Qwen3.5 uses none that vary)."""
    if isinstance(v, (list, tuple, np.ndarray)):
        vals = set(np.asarray(v).tolist())
        if len(vals) != 1:
            raise LemonsliceError(f"{name}: per-layer values {', '.join(map(str, sorted(vals)))} are not supported")
        return vals.pop()
    return v


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    block_count: int  # trunk blocks + MTP blocks
    n_layer: int  # trunk blocks, the ones a forward pass runs
    nextn_predict_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int  # leading dims of each head that are rotated
    rope_sections: tuple[int, ...]  # IMRoPE sections; text positions give every section the same angle
    rope_base: float
    rms_eps: float
    full_attention_interval: int
    recurrent: tuple[bool, ...]  # per block: Gated DeltaNet (True) or gated full attention
    n_ff: int  # dense FFN width (qwen35)
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    ssm_conv_kernel: int
    ssm_d_state: int  # linear key head dim (= value head dim)
    ssm_n_group: int  # linear K heads
    ssm_dt_rank: int  # linear V heads
    ssm_d_inner: int  # V heads * value head dim
    n_vocab: int | None  # from the tokenizer; None when the file has none

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def ssm_head_v_dim(self) -> int:
        return self.ssm_d_inner // self.ssm_dt_rank

    @property
    def ssm_key_dim(self) -> int:
        return self.ssm_n_group * self.ssm_d_state

    @property
    def ssm_conv_dim(self) -> int:
        return 2 * self.ssm_key_dim + self.ssm_d_inner

    @classmethod
    def from_gguf(cls, kv: Mapping[str, Any]) -> "ModelArgs":
        """Read the `<arch>.*` keys llama.cpp reads, with its defaults."""
        arch = kv.get(Keys.ARCHITECTURE)
        if arch not in ARCHES:
            raise LemonsliceError(f"architecture {arch!r} is not one of {', '.join(ARCHES)}")

        def get(template: str, default: Any = _REQUIRED) -> Any:
            key = arch_key(template, arch)
            if key in kv:
                return _scalar(key, kv[key])
            if default is _REQUIRED:
                raise LemonsliceError(f"GGUF metadata lacks {key}")
            return default

        block_count = int(get(Keys.BLOCK_COUNT))
        nextn = int(get(Keys.NEXTN_PREDICT_LAYERS, 0))
        n_layer = block_count - nextn
        n_embd = int(get(Keys.EMBEDDING_LENGTH))
        n_head = int(get(Keys.HEAD_COUNT))
        head_dim = int(get(Keys.KEY_LENGTH, n_embd // n_head))
        sections = kv.get(arch_key(Keys.ROPE_DIMENSION_SECTIONS, arch))
        if sections is None:
            raise LemonsliceError(f"GGUF metadata lacks {arch_key(Keys.ROPE_DIMENSION_SECTIONS, arch)}")
        sections = tuple(int(s) for s in np.atleast_1d(np.asarray(sections)))
        scaling = get(Keys.ROPE_SCALING_TYPE, "none")
        if scaling not in ("none", "linear") or float(get(Keys.ROPE_SCALING_FACTOR, 1.0)) not in (0.0, 1.0):
            raise LemonsliceError(f"RoPE scaling {scaling!r} is not supported")
        interval = int(get(Keys.FULL_ATTENTION_INTERVAL, 4))
        rec_key = arch_key(Keys.RECURRENT_LAYERS, arch)
        if rec_key in kv:
            flags = np.atleast_1d(np.asarray(kv[rec_key]))
            flags = np.broadcast_to(flags, (block_count,)) if flags.size == 1 else flags
            if flags.size != block_count:
                raise LemonsliceError(f"{rec_key} has {flags.size} entries, expected {block_count}")
            recurrent = tuple(bool(f) for f in flags)
        else:
            recurrent = tuple(i < n_layer and (i + 1) % interval != 0 for i in range(block_count))
        n_ff = int(get(Keys.FEED_FORWARD_LENGTH, 0))
        n_expert = int(get(Keys.EXPERT_COUNT, 0))
        n_used = int(get(Keys.EXPERT_USED_COUNT, 0))
        tokens = kv.get(Keys.TOKENIZER_TOKENS)
        args = cls(
            arch=arch, block_count=block_count, n_layer=n_layer, nextn_predict_layers=nextn, n_embd=n_embd,
            n_head=n_head, n_head_kv=int(get(Keys.HEAD_COUNT_KV, n_head)), head_dim=head_dim,
            rope_dim=int(get(Keys.ROPE_DIMENSION_COUNT, head_dim)), rope_sections=sections,
            rope_base=float(get(Keys.ROPE_FREQ_BASE, 10000.0)), rms_eps=float(get(Keys.RMS_EPS)),
            full_attention_interval=interval, recurrent=recurrent, n_ff=n_ff, n_expert=n_expert,
            n_expert_used=n_used,
            n_ff_exp=int(get(Keys.EXPERT_FEED_FORWARD_LENGTH, 0)) or (n_ff // n_used if n_used else 0),
            n_ff_shexp=int(get(Keys.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0)) or n_ff,
            ssm_conv_kernel=int(get(Keys.SSM_CONV_KERNEL)), ssm_d_state=int(get(Keys.SSM_STATE_SIZE)),
            ssm_n_group=int(get(Keys.SSM_GROUP_COUNT)), ssm_dt_rank=int(get(Keys.SSM_TIME_STEP_RANK)),
            ssm_d_inner=int(get(Keys.SSM_INNER_SIZE)), n_vocab=len(tokens) if tokens is not None else None,
        )
        args._validate(int(get(Keys.VALUE_LENGTH, head_dim)))
        return args

    def _validate(self, value_length: int) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise LemonsliceError(f"{self.arch}: {msg}")

        need(0 <= self.nextn_predict_layers < self.block_count, "nextn_predict_layers must be < block_count")
        need(value_length == self.head_dim, "attention value_length must equal key_length")
        need(self.n_head % self.n_head_kv == 0, "head_count must be a multiple of head_count_kv")
        need(0 < self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0,
             "rope.dimension_count must be even and <= key_length")
        need(self.ssm_dt_rank % self.ssm_n_group == 0, "ssm.time_step_rank must be a multiple of ssm.group_count")
        need(self.ssm_d_inner == self.ssm_d_state * self.ssm_dt_rank, "ssm value head dim must equal ssm.state_size")
        need(not any(self.recurrent[self.n_layer :]), "MTP blocks cannot be recurrent")
        if self.arch == "qwen35moe":
            need(0 < self.n_expert_used <= self.n_expert, "need 0 < expert_used_count <= expert_count")
