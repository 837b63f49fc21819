"""Routed-expert pruning, the `prune-experts` plan clause.

    prune-experts LAYERS KEEP stats=FILE    keep the KEEP most used experts of each layer, counted
                                            in FILE (the JSON of `run --expert-stats`)
    prune-experts LAYERS keep=IDS           keep exactly these experts (ids and ranges: 0-63,70)

A pruned layer keeps its experts in ascending original order: the router's rows and the
`_exps` tensors (and any per-expert bias) are sliced along the expert dimension, bytes copied
as they are. Expert i of the output is therefore the i-th kept id, which provenance records.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..gguf.constants import Keys, arch_key, block_suffix
from ..gguf.reader import TensorInfo
from ..gguf.writer import encode_kv
from .plan import Op, PlanError, SourceModel, format_layers, parse_layers

if TYPE_CHECKING:
    from .plan import Entry, Plan

KIND = "prune-experts"
_PRUNE_RE = re.compile(r"^prune-experts\s+(\S+)\s+(?:(\d+)(?:\s+stats=(.+))?|keep=(\S+))$")
# Per-expert tensors: the router (not the shared expert's gate), the fused experts, a routing bias.
_PER_EXPERT_RE = re.compile(r"^(ffn_gate_inp|ffn_\w+_exps|exp_probs_b)\.(weight|bias)$")
ROUTER = "ffn_gate_inp.weight"
Ranges = tuple[tuple[int, int], ...]  # (absolute file offset, bytes)


def parse_prune(clause: str) -> Op:
    """'prune-experts 20-29 128 stats=s.json' or 'prune-experts 20 keep=0,3,7' -> Op."""
    m = _PRUNE_RE.match(clause)
    if not m:
        raise PlanError(f"cannot read plan clause {clause!r}: expected 'prune-experts LAYERS KEEP stats=FILE' "
                        "or 'prune-experts LAYERS keep=IDS'")
    layers = tuple(sorted(set(parse_layers(m.group(1), f"{clause!r}: layers"))))
    if m.group(4) is not None:
        ids = parse_layers(m.group(4), f"{clause!r}: keep=")
        if len(set(ids)) != len(ids):
            raise PlanError(f"{clause!r}: keep= names an expert twice")
        return Op(KIND, layers, times=len(ids), keep=tuple(sorted(ids)))
    if m.group(3) is None:
        raise PlanError(f"{clause!r}: say which experts to keep: stats=FILE (from `run --expert-stats`) or keep=IDS")
    return Op(KIND, layers, times=int(m.group(2)), model=m.group(3).strip())


def prune_text(op: Op) -> str:
    what = f"keep={format_layers(op.keep)}" if op.keep else f"{op.times} stats={op.model}"
    return f"{KIND} {format_layers(op.layers)} {what}"


@dataclass(frozen=True)
class LayerPrune:
    """What one layer keeps."""

    layer: int
    n_expert: int  # the source layer's experts
    keep: tuple[int, ...]  # original ids, ascending
    chosen_by: str  # "keep=" or the stats file's path

    def to_dict(self) -> dict[str, Any]:
        return {"experts": len(self.keep), "source_experts": self.n_expert, "kept": list(self.keep),
                "chosen_by": self.chosen_by}


def layer_experts(base: SourceModel, layer: int) -> int:
    """A block's routed-expert count, from its router's rows (ggml shape [n_embd, n_expert])."""
    shapes = base.block_shapes(layer)
    if ROUTER not in shapes:
        raise PlanError(f"{KIND}: layer {layer} has no routed experts")
    return int(shapes[ROUTER][-1])


def _stats_uses(path: str, cache: dict[str, dict[int, list[int]]]) -> dict[int, list[int]]:
    """layer -> use count of each expert, from a `run --expert-stats` JSON (read once per path)."""
    if path not in cache:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            cache[path] = {int(x["layer"]): [int(u) for u in x["uses"]] for x in d["layers"]}
        except OSError as e:
            raise PlanError(f"{KIND}: cannot read expert statistics {path} ({e.strerror or e})") from None
        except (ValueError, KeyError, TypeError):
            raise PlanError(f"{KIND}: {path} is not the JSON of `run --expert-stats`") from None
    return cache[path]


def _most_used(uses: Sequence[int], n: int) -> tuple[int, ...]:
    """The n most used expert ids, ties to the lower id; ascending."""
    order = sorted(range(len(uses)), key=lambda e: (-uses[e], e))
    return tuple(sorted(order[:n]))


def _choose(op: Op, layer: int, n_expert: int, stats_path: str, cache: dict) -> tuple[int, ...]:
    if op.keep:
        bad = [e for e in op.keep if e >= n_expert]
        if bad:
            raise PlanError(f"'{op.text}': layer {layer} has experts 0-{n_expert - 1}, keep= names {bad[0]}")
        return op.keep
    uses = _stats_uses(stats_path, cache).get(layer)
    if uses is None:
        raise PlanError(f"'{op.text}': {stats_path} has no counts for layer {layer}")
    if len(uses) != n_expert:
        raise PlanError(f"'{op.text}': {stats_path} counts {len(uses)} experts in layer {layer}, "
                        f"the model has {n_expert}")
    return _most_used(uses, op.times)


def plan_prunes(plan: "Plan", base: SourceModel, entries: Sequence["Entry"]) -> dict[int, LayerPrune]:
    """base layer -> what it keeps, for every prune-experts clause of `plan`; checked against the
    model before anything is written (counts, ids, top-k, replaced layers)."""
    out: dict[int, LayerPrune] = {}
    cache: dict[str, dict[int, list[int]]] = {}
    top_k = int(getattr(base.args, "n_expert_used", 0))
    for op in plan.ops:
        if op.kind != KIND:
            continue
        stats = plan._path(op.model) if op.model else ""
        for layer in op.layers:
            if layer in out:
                raise PlanError(f"'{op.text}': layer {layer} is pruned by two clauses")
            if any(e.slot == layer and e.source is not None for e in entries):
                raise PlanError(f"'{op.text}': layer {layer} is replaced by another model's block")
            n_expert = layer_experts(base, layer)
            if not top_k <= op.times <= n_expert:
                raise PlanError(f"'{op.text}': layer {layer} routes each token to {top_k} of {n_expert} experts, "
                                f"so it keeps {top_k}-{n_expert}, not {op.times}")
            keep = _choose(op, layer, n_expert, stats, cache)
            out[layer] = LayerPrune(layer, n_expert, keep, "keep=" if op.keep else stats)
    return out


def expert_slice(t: TensorInfo, keep: LayerPrune | None) -> tuple[tuple[int, ...], Ranges]:
    """(shape, byte ranges) of tensor `t` in the output: the kept experts' slices of a
    per-expert tensor (ggml's outermost dim is the expert), else the tensor whole."""
    whole: Ranges = ((t.data_start, t.n_bytes),)
    if keep is None or keep.keep == tuple(range(keep.n_expert)):
        return t.shape, whole
    suffix = block_suffix(t.name)
    if not _PER_EXPERT_RE.match(suffix):
        return t.shape, whole
    if t.shape[-1] != keep.n_expert:
        raise PlanError(f"{t.name}: outer dimension {t.shape[-1]} is not the layer's {keep.n_expert} experts")
    stride = t.n_bytes // keep.n_expert
    ranges: list[tuple[int, int]] = []
    for e in keep.keep:
        start = t.data_start + e * stride
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + stride)  # consecutive ids: one copy
        else:
            ranges.append((start, stride))
    return (*t.shape[:-1], len(keep.keep)), tuple(ranges)


def expert_count_kv(base: SourceModel, records: list[bytes], keys: list[str], counts: Sequence[int]
                    ) -> list[bytes]:
    """`records` with `{arch}.expert_count` set to the one count every MoE block of the output
    has (`counts`), which llama.cpp needs; unchanged when the blocks' counts differ."""
    key = arch_key(Keys.EXPERT_COUNT, base.arch or "")
    if len(set(counts)) != 1 or key not in keys:
        return records
    entry = next(e for e in base.kvs if e.key == key)
    out = list(records)
    out[keys.index(key)] = encode_kv(key, entry.vtype, counts[0])
    return out


def prune_summary(base: SourceModel, counts: Sequence[int]) -> dict[str, Any]:
    """Provenance: each MoE block's expert count in output order, and the model-wide
    expert_count the output carries (llama.cpp loads the file only when they agree)."""
    uniform = len(set(counts)) == 1
    return {"per_block": list(counts), "expert_count": counts[0] if uniform else base.kv(Keys.EXPERT_COUNT),
            "llama_cpp_loadable": uniform}


def prune_lines(prunes: "dict[int, LayerPrune] | dict[int, dict[str, Any]]") -> list[str]:
    """One line per pruned layer for the CLI: 'layer 3: keeps 5 of 16 experts (1,4-5,7,15)'."""
    out = []
    for layer, p in sorted(prunes.items()):
        d = p.to_dict() if isinstance(p, LayerPrune) else p
        out.append(f"layer {layer}: keeps {d['experts']} of {d['source_experts']} experts "
                   f"({format_layers(d['kept'])})")
    return out
