"""What a memory plan needs to know about a model, read from its header and tensor table."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.store import WeightStore
from ..gguf.constants import Keys, arch_key
from ..models import AttentionCache
from ..ops import kv


@dataclass(frozen=True)
class LayerFacts:
    """One block: its kind, weight bytes and per-sequence state."""

    index: int
    kind: str  # "attention", "sliding" (windowed attention) or "recurrent"
    dense_bytes: int  # every tensor but the routed experts
    expert_bytes: int  # all routed experts (0 for a dense block)
    n_expert: int
    window: int  # sliding window (0: global)
    n_head_kv: int  # attention layers: KV heads and head size
    head_dim: int
    state_bytes: int  # recurrent layers: conv inputs and delta-rule state, float32


@dataclass(frozen=True)
class ModelFacts:
    path: str
    arch: str
    file_bytes: int  # the GGUF, or all files of a split
    shared: dict[str, int]  # shared tensor -> bytes
    layers: tuple[LayerFacts, ...]  # the trunk, in order
    extra_bytes: int  # blocks a forward pass does not run (an MTP head)
    n_vocab: int
    n_merges: int
    n_embd: int
    n_head: int
    n_ff: int  # the widest FFN a token goes through (routed + shared experts for MoE)
    n_expert_used: int
    context_length: int | None

    @property
    def tensor_bytes(self) -> int:
        return sum(self.shared.values()) + sum(x.dense_bytes + x.expert_bytes for x in self.layers) + self.extra_bytes

    @property
    def is_moe(self) -> bool:
        return any(x.expert_bytes for x in self.layers)

    def kv_bytes_per_position(self, layer: LayerFacts, types: tuple[str, str]) -> int:
        return sum(kv.bytes_per_position(t, layer.n_head_kv, layer.head_dim) for t in types)


def model_facts(store: WeightStore) -> ModelFacts:
    """The facts of an opened model (its header and tensor table: no weight is read)."""
    args, meta = store.args, store.metadata
    layers = tuple(_layer(store, i) for i in range(args.n_layer))
    extra = sum(store.info(n).n_bytes for i in range(args.n_layer, getattr(args, "block_count", args.n_layer))
                for n in store.tensor_names(i))
    files = [f.n_bytes for f in store.manifest.files] if store.manifest else [store.path.stat().st_size]
    n_used = getattr(args, "n_expert_used", 0)
    widest = max(getattr(args, "n_ff", 0), n_used * getattr(args, "n_ff_exp", 0) + getattr(args, "n_ff_shexp", 0))
    ctx = meta.get(arch_key(Keys.CONTEXT_LENGTH, args.arch))
    return ModelFacts(
        path=str(store.path), arch=args.arch, file_bytes=sum(files),
        shared={n: store.info(n).n_bytes for n in store.tensor_names(None)}, layers=layers, extra_bytes=extra,
        n_vocab=args.n_vocab or meta.count(Keys.TOKENIZER_TOKENS) or 0,
        n_merges=meta.count(Keys.TOKENIZER_MERGES) or 0, n_embd=args.n_embd, n_head=args.n_head, n_ff=widest,
        n_expert_used=n_used, context_length=int(ctx) if ctx is not None else None,
    )


def _layer(store: WeightStore, i: int) -> LayerFacts:
    names = store.tensor_names(i)
    experts = [store.info(n) for n in names if len(store.info(n).shape) == 3]
    dense = sum(store.info(n).n_bytes for n in names) - sum(x.n_bytes for x in experts)
    cache = store.family.new_cache(store.args, i)
    if isinstance(cache, AttentionCache):
        kind = "sliding" if cache.window else "attention"
        return LayerFacts(i, kind, dense, sum(x.n_bytes for x in experts), experts[0].shape[2] if experts else 0,
                          cache.window, cache.n_head_kv, cache.head_dim, 0)
    state = sum(t.numel() * t.element_size() for t in (cache.conv, cache.state))
    return LayerFacts(i, "recurrent", dense, sum(x.n_bytes for x in experts), experts[0].shape[2] if experts else 0,
                      0, 0, 0, state)
