"""Residency: where each weight of a loaded model lives, under a plan.

A `Residency` owns the weights of one model (and of the donor models a playlist borrows
blocks from) and hands compute the built block of a playlist entry: a resident one, or one
read now that compute drops after use. The plan says which blocks stay resident:

* `FullLoad`: every block, read once;
* `Streamed(budget)`: blocks are pinned in playlist order while shared + pinned + the largest
  block still streamed fits the budget; the rest are read, run and dropped per use;
* `Pinned(entries)`: exactly these entries stay resident, the rest stream;
* `Budget(budget)`: decided per tensor (engine/budget.py): shared weights and as many
  non-expert layer tensors as fit stay resident, the rest are read per use, and routed
  experts go through an expert cache (engine/experts.py) that gets the rest of the budget.

`Streamed` and `Pinned` memory-map routed-expert tensors, so only the experts the router
picks are read. Residency counts the bytes resident and the bytes read (preads, plus the routed
experts' bytes of mapped tensors, per call and once per expert for a whole batch). The
shared weights (embedding, final norm, head) load on first use.

`positions=(a, b)` limits a residency to playlist positions [a, b) (a pipeline stage): only
those entries' files are opened and planned, and of the shared weights only what the range
uses: the embedding when a == 0, the final norm and head when b is the playlist's end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, Union

import torch

from ..errors import LemonsliceError
from ..gguf.constants import Tensors as TN
from ..models import Family
from ..models.protocol import Args, Block, Head
from .budget import EntryTensors, TensorPlan, env_int, plan_tensors
from .experts import POLICIES, CachedExperts, ExpertCache, ExpertLayout, ExpertPart, ExpertReader
from .store import Weight, WeightStore

log = logging.getLogger(__name__)

# A block of this model, or (donor model path or WeightStore, block index).
PlaylistEntry = Union[int, tuple[Any, int]]
# ModelArgs fields that describe the layer layout, not a block: a donor may differ in them.
_LAYOUT_FIELDS = frozenset({"block_count", "n_layer", "nextn_predict_layers", "recurrent", "swa", "n_vocab",
                            "full_attention_interval"})


def block_args(args: Args) -> dict[str, Any]:
    """The hyper-parameters a block computes with: a donor's must equal the model's."""
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in _LAYOUT_FIELDS}


# ---- plans ------------------------------------------------------------------------------


class Plan(Protocol):
    """Which playlist entries stay resident."""

    @property
    def streaming(self) -> bool:
        """True when some block may be read per use (routed experts are then memory-mapped)."""
        ...

    def pins(self, sizes: dict[Any, int], shared: int) -> list[Any]:
        """The entries to keep resident, given each distinct entry's bytes in playlist order."""
        ...


@dataclass(frozen=True)
class FullLoad:
    streaming = False

    def pins(self, sizes: dict[Any, int], shared: int) -> list[Any]:
        return list(sizes)


@dataclass(frozen=True)
class Streamed:
    """Pin in playlist order while shared + pinned + the largest block left to stream fits `budget`."""

    budget: int
    streaming = True

    def pins(self, sizes: dict[Any, int], shared: int) -> list[Any]:
        room = self.budget - shared
        keep: list[Any] = []
        used = 0
        for e in sizes:
            rest = [n for x, n in sizes.items() if x != e and x not in keep]
            if used + sizes[e] + max(rest, default=0) <= room:
                keep.append(e)
                used += sizes[e]
        return keep


@dataclass(frozen=True)
class Pinned:
    """Exactly `entries` stay resident; every other block streams."""

    entries: frozenset[Any]
    streaming = True

    def pins(self, sizes: dict[Any, int], shared: int) -> list[Any]:
        return [e for e in sizes if e in self.entries]


@dataclass(frozen=True)
class Budget:
    """Per-tensor residency within `budget` bytes of weights, routed experts through a cache
    evicted by `policy`; `prefetch` starts reading the experts a layer's router is expected to
    pick from the layer's input, before its mixer runs."""

    budget: int
    policy: str = "lfu"
    prefetch: bool = False
    read_threads: int = 4
    lookahead: int = 4
    streaming = True

    def pins(self, sizes: dict[Any, int], shared: int) -> list[Any]:
        return []


def budget_plan(store: WeightStore, budget: int, playlist: Sequence[PlaylistEntry] | None = None) -> TensorPlan:
    """What `Budget(budget)` would keep resident, read per token and cache, reading no weight."""
    return Residency(store, playlist, plan=Pinned(frozenset())).tensor_plan_for(Budget(budget))


def plan_for(weight_bytes: int, max_memory: int | None) -> Plan:
    """Full load when the weights fit the budget (or there is none), else per-tensor residency within it."""
    if max_memory is None or weight_bytes <= max_memory:
        return FullLoad()
    # Tuning knobs for benchmarks: LEMONSLICE_EXPERT_POLICY=lru|lfu, LEMONSLICE_PREFETCH=0|1.
    policy = os.environ.get("LEMONSLICE_EXPERT_POLICY", "lfu")
    if policy not in POLICIES:
        raise LemonsliceError(f"LEMONSLICE_EXPERT_POLICY must be one of {', '.join(POLICIES)}, got {policy}")
    return Budget(max_memory, policy=policy, prefetch=env_int("LEMONSLICE_PREFETCH", 0) != 0)


class _Counter:
    """Bytes of mapped experts the router used; held by watched blocks instead of the residency,
    so a pinned block does not keep its residency alive through a reference cycle."""

    def __init__(self) -> None:
        self.n = 0


# ---- residency --------------------------------------------------------------------------


class Residency:
    """The weights of one loaded model under a plan, for the playlist it runs."""

    def __init__(self, store: WeightStore, playlist: Sequence[PlaylistEntry] | None = None, *,
                 plan: Plan | None = None, max_memory: int | None = None, positions: tuple[int, int] | None = None):
        self.store = store
        self.family: Family = store.family
        self.args: Args = store.args
        # Donor key (resolved path or the WeightStore) -> (store, its args).
        self._donors: dict[Any, tuple[WeightStore, Args]] = {}
        self._blocks: dict[Any, Block] = {}
        self._shared: Head | None = None
        self._mapped = _Counter()
        # Budget plans: the per-tensor plan, the resident (entry, tensor) weights, the expert cache.
        self.tensor_plan: TensorPlan | None = None
        self._resident: dict[tuple[Any, str], Weight] = {}
        self.experts: ExpertCache | None = None
        self._split: dict[Any, tuple[list[str], list[str]]] = {}
        self._layouts: dict[Any, ExpertLayout] = {}
        self._positions = positions
        self.playlist = self.entries(playlist if playlist is not None else range(self.args.n_layer))
        self.positions = self._check_positions()
        self.shared_bytes = 0  # shared tensor bytes read so far (mapped ones not included)
        self.weight_bytes = self._shared_use_bytes() + sum(self.nbytes(e) for e in self.active())
        self.plan: Plan = plan if plan is not None else plan_for(self.weight_bytes, max_memory)
        log.info("%s: %d weight bytes, budget %s", type(self.plan).__name__, self.weight_bytes, max_memory)
        self._pin()

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()
        self.store.close()
        for store, _ in self._donors.values():
            store.close()

    # ---- the playlist -------------------------------------------------------------------

    def set_playlist(self, playlist: Sequence[PlaylistEntry]) -> None:
        """Run another order of blocks: pins are planned again (full load keeps what it read)."""
        self.playlist = self.entries(playlist)
        self.positions = self._check_positions()
        self._pin()

    def entries(self, playlist: Sequence[PlaylistEntry]) -> list[Any]:
        """Checked entries: an int for a block of this model, (donor key, block) for a donor's."""
        out: list[Any] = []
        bad: list[Any] = []
        for e in playlist:
            if isinstance(e, tuple) and len(e) == 2:
                key = self._donor(e[0])
                out.append((key, int(e[1])))
                ok = 0 <= int(e[1]) < self._donors[key][1].n_layer
            else:
                out.append(int(e))
                ok = 0 <= int(e) < self.args.n_layer
            if not ok:
                bad.append(e)
        if bad or not out:
            got = ", ".join(f"{e[0]}:{e[1]}" if isinstance(e, tuple) else str(e) for e in bad) or "none"
            raise LemonsliceError(f"playlist needs trunk block indices in [0, {self.args.n_layer}) "
                                  f"(or a donor's), got {got}")
        return out

    def _check_positions(self) -> tuple[int, int]:
        n = len(self.playlist)
        a, b = self._positions if self._positions is not None else (0, n)
        if not 0 <= a < b <= n:
            raise LemonsliceError(f"positions [{a}, {b}) are not a part of a {n}-position playlist")
        return a, b

    @property
    def embeds(self) -> bool:
        """The range starts the playlist: token ids come in through the embedding."""
        return self.positions[0] == 0

    @property
    def heads(self) -> bool:
        """The range ends the playlist: the final norm and head make logits."""
        return self.positions[1] == len(self.playlist)

    def active(self) -> list[Any]:
        """The distinct entries of positions [a, b), in playlist order: the only ones read."""
        a, b = self.positions
        return list(dict.fromkeys(self.playlist[a:b]))

    def _donor(self, src: Any) -> Any:
        """Open a donor model once; its blocks must compute as this model's would (same family and sizes)."""
        key = src if isinstance(src, WeightStore) else str(Path(src).resolve())
        if key not in self._donors:
            store = src if isinstance(src, WeightStore) else WeightStore(src)
            if store.family is not self.family or block_args(store.args) != block_args(self.args):
                raise LemonsliceError(f"donor {src}: its blocks differ from {self.store.path}'s "
                                      "(architecture or hyper-parameters)")
            self._donors[key] = (store, store.args)
        return key

    def source(self, e: Any) -> tuple[WeightStore, int]:
        """The store and block index behind a playlist entry."""
        return (self._donors[e[0]][0], e[1]) if isinstance(e, tuple) else (self.store, e)

    def args_of(self, e: Any) -> Args:
        return self._donors[e[0]][1] if isinstance(e, tuple) else self.args

    def nbytes(self, e: Any) -> int:
        store, layer = self.source(e)
        return store.nbytes(layer)

    def cache_specs(self) -> list[tuple[Args, int]]:
        """(args, block index) per playlist position: what a sequence state is made from."""
        return [(self.args_of(e), self.source(e)[1]) for e in self.playlist]

    # ---- weights ------------------------------------------------------------------------

    @property
    def streaming(self) -> bool:
        return self.plan.streaming

    @property
    def pinned(self) -> int:
        """Blocks kept resident (all of them under a full load)."""
        return len(self._blocks)

    def _pin(self) -> None:
        if isinstance(self.plan, Budget):
            self._plan_tensors(self.plan)
            return
        sizes = {e: self.nbytes(e) for e in self.active()}
        keep = self.plan.pins(sizes, self._shared_use_bytes())
        kept = {} if self.plan.streaming else dict(self._blocks)
        self._blocks = {**kept, **{e: self._blocks.get(e) or self._build(e) for e in keep}}
        if self.plan.streaming:
            log.info("streaming: %d of %d blocks pinned (%d bytes)", len(keep), len(sizes),
                     sum(sizes[e] for e in keep))

    # ---- per-tensor residency (Budget) -------------------------------------------------

    def _names(self, e: Any) -> tuple[list[str], list[str]]:
        """(non-expert, routed-expert) tensor names of a playlist entry, split once."""
        if e not in self._split:
            store, layer = self.source(e)
            names = store.tensor_names(layer)
            self._split[e] = ([n for n in names if len(store.info(n).shape) != 3],
                              [n for n in names if len(store.info(n).shape) == 3])
        return self._split[e]

    def tensor_plan_for(self, plan: Budget) -> TensorPlan:
        """The per-tensor plan of `plan` for this playlist, from tensor sizes alone (reads nothing)."""
        counts: dict[Any, int] = {}
        a, b = self.positions
        for e in self.playlist[a:b]:
            counts[e] = counts.get(e, 0) + 1
        entries = []
        for e, count in counts.items():
            store, _ = self.source(e)
            others, exps = self._names(e)
            per_expert = self._layout(e, exps).nbytes if exps else 0
            tensors = {n: store.info(n).n_bytes for n in others}
            entries.append(EntryTensors(e, tensors, count, per_expert,
                                        getattr(self.args_of(e), "n_expert_used", 0) if exps else 0))
        shared_bytes = sum(self.store.info(n).n_bytes for n in self._shared_names(plan)[0])
        reserve = (2 * plan.lookahead + 1) * sum(self._slot_classes())
        return plan_tensors(plan.budget, shared_bytes, entries, reserve)

    def _slot_classes(self) -> dict[int, int]:
        """Slot size -> how many distinct MoE playlist entries have experts of that size."""
        classes: dict[int, int] = {}
        for e in self.active():
            exps = self._names(e)[1]
            if exps:
                size = self._layout(e, exps).slot_bytes
                classes[size] = classes.get(size, 0) + 1
        return classes

    def _cache_slots(self, capacity: int) -> dict[int, int]:
        """The expert cache's bytes split into slots, the same share for every MoE entry."""
        classes = self._slot_classes()
        total = sum(classes.values())
        return {size: capacity * n // total // size for size, n in classes.items()}

    def _plan_tensors(self, plan: Budget) -> None:
        """Plan residency per tensor, read the resident tensors and build the blocks that are
        wholly resident; the expert cache gets what is left."""
        self.tensor_plan = tp = self.tensor_plan_for(plan)
        counts = self.active()
        log.info("per-tensor plan: %d resident tensors (%d bytes), %d bytes streamed per token, "
                 "expert cache %d bytes", len(tp.resident), tp.resident_bytes, tp.streamed_bytes_per_token,
                 tp.expert_cache)
        if self.experts is not None:
            self.experts.close()
        self.experts = ExpertCache(self._cache_slots(tp.expert_cache), plan.policy, ExpertReader(plan.read_threads),
                                   plan.lookahead)
        self._resident = {}
        for e in counts:
            store, _ = self.source(e)
            for name in self._names(e)[0]:
                if (e, name) in tp.resident:
                    # The copy is ours: its page cache would be charged to a cgroup a second time.
                    self._resident[(e, name)] = store.load(name, map_experts=False, drop_page_cache=True)
        self._blocks = {e: self._build(e) for e in counts
                        if all((e, n) in tp.resident for n in self._names(e)[0])}

    def _shared_uses(self) -> dict[str, bool]:
        """Shared tensor -> whether this range uses it: the embedding where token ids come in (or
        where it is also the head), the head where logits are made, the rest at either end."""
        names = self.store.tensor_names(None)
        tied = TN.OUTPUT not in names

        def used(n: str) -> bool:
            if n == TN.TOKEN_EMBD:
                return self.embeds or (self.heads and tied)
            return self.heads if n == TN.OUTPUT else self.embeds or self.heads

        return {n: used(n) for n in names}

    def _shared_names(self, plan: Plan) -> tuple[list[str], list[str]]:
        """(read, mapped) shared tensors. A Budget plan maps an embedding that is not also the head in
        use (a token reads one row); a tensor the range does not use is mapped and never touched."""
        tied_head = self.heads and TN.OUTPUT not in self.store.tensor_names(None)
        uses = self._shared_uses()

        def read(n: str) -> bool:
            return uses[n] and not (n == TN.TOKEN_EMBD and isinstance(plan, Budget) and not tied_head)

        return [n for n in uses if read(n)], [n for n in uses if not read(n)]

    def _shared_use_bytes(self) -> int:
        """Bytes of the shared tensors this range uses (read or mapped): none between the ends."""
        return sum(self.store.info(n).n_bytes for n, used in self._shared_uses().items() if used)

    def _build_budgeted(self, e: Any) -> Block:
        """A block from its resident tensors plus the rest read now, its experts from the cache."""
        store, layer = self.source(e)
        w = {}
        for name in self._names(e)[0]:
            got = self._resident.get((e, name))
            # Read per use: its page cache may serve the next token while memory allows (the
            # kernel reclaims it first under a cap), unlike a resident tensor's.
            w[name] = got if got is not None else store.load(name, map_experts=False)
        block = self.family.Block(self.args_of(e), layer, w)
        ffn = getattr(block, "ffn", None)
        names = getattr(ffn, "expert_names", None)
        if names and getattr(ffn, "experts", None) is None:
            assert self.experts is not None
            layout = self._layout(e, names)
            ffn.check_experts(layout.n_expert)
            ffn.experts = CachedExperts(self.experts, layout)
        return block

    def _layout(self, e: Any, names: Sequence[str]) -> ExpertLayout:
        key = (e, tuple(names))
        if key not in self._layouts:
            self._layouts[key] = self._make_layout(e, names)
        return self._layouts[key]

    def _make_layout(self, e: Any, names: Sequence[str]) -> ExpertLayout:
        store, layer = self.source(e)
        infos = [store.info(n) for n in names]
        n_expert = infos[0].shape[2]
        parts = tuple(ExpertPart(str(store.file_of(i.name)), i.data_start, i.n_bytes // n_expert, i.ggml_type,
                                 (i.shape[0], i.shape[1])) for i in infos)
        return ExpertLayout(e, layer, parts, n_expert)

    def prefetch(self, pos: int, x: torch.Tensor) -> None:
        """Before playlist position `pos` runs on x [N, E]: start reading the experts its router is
        expected to pick (Budget plans with prefetch, resident blocks, decode-sized inputs)."""
        if not (isinstance(self.plan, Budget) and self.plan.prefetch) or x.shape[0] > 4:
            return
        block = self._blocks.get(self.playlist[pos])
        ffn = getattr(block, "ffn", None)
        guess = getattr(block, "expected_experts", None)
        if guess is not None and isinstance(getattr(ffn, "experts", None), CachedExperts):
            ffn.experts.prefetch(guess(x))

    # ---- blocks -------------------------------------------------------------------------

    def _build(self, e: Any) -> Block:
        if isinstance(self.plan, Budget):
            return self._build_budgeted(e)
        store, layer = self.source(e)
        # A block read to stay resident: its page cache would be charged to a cgroup a second time.
        weights = store.load_layer(layer, map_experts=self.plan.streaming, drop_page_cache=not self.plan.streaming)
        block = self.family.Block(self.args_of(e), layer, weights)
        ffn = getattr(block, "ffn", None)
        if self.plan.streaming and hasattr(ffn, "observe"):
            # Mapped experts are read when touched: count each routed expert once per call.
            counter, per_expert = self._mapped, ffn.expert_nbytes

            def observe(ids: torch.Tensor) -> None:
                counter.n += per_expert * int(torch.unique(ids).numel())

            ffn.observe = observe
        return block

    def block(self, e: Any) -> Block:
        """The built block of playlist entry `e`: resident, or read now (drop it after use)."""
        b = self._blocks.get(e)
        return b if b is not None else self._build(e)

    @property
    def loaded_shared(self) -> bool:
        return self._shared is not None

    @property
    def shared(self) -> Head:
        """Embedding, final norm and LM head: read on first use (what this range uses), then resident."""
        if self._shared is None:
            read, mapped = self._shared_names(self.plan)
            weights = self.store.load_shared(mapped, drop_page_cache=isinstance(self.plan, Budget)
                                             or not self.plan.streaming)
            self.shared_bytes = sum(self.store.info(n).n_bytes for n in read)
            self._shared = self.family.Shared(self.args, weights)
        return self._shared

    def load_layer(self, layer: int) -> dict[str, Weight]:
        """Every tensor of block `layer` of the model, read whole (the MTP head keeps them)."""
        return self.store.load_layer(layer, map_experts=False)

    # ---- accounting ---------------------------------------------------------------------

    def _stores(self) -> list[WeightStore]:
        return [self.store, *(s for s, _ in self._donors.values() if s is not self.store)]

    @property
    def resident_bytes(self) -> int:
        """Weight bytes read by this model's stores that something still holds."""
        return sum(s.resident_bytes for s in self._stores())

    def io_counters(self) -> dict[str, float]:
        """Running totals: bytes read, expert lookups and hits, seconds expert reads were in
        flight and seconds compute waited for them (the last three 0 without an expert cache)."""
        c = self.experts
        return {"bytes_read": self.bytes_read, "expert_lookups": c.lookups if c is not None else 0,
                "expert_hits": c.hits if c is not None else 0,
                "read_seconds": c.reader.busy_seconds if c is not None else 0.0,
                "wait_seconds": c.wait_seconds if c is not None else 0.0}

    @property
    def bytes_read(self) -> int:
        """Weight bytes read so far: file reads, plus the routed experts used from mapped tensors."""
        cached = self.experts.reader.bytes_read if self.experts is not None else 0
        return sum(s.bytes_read for s in self._stores()) + self._mapped.n + cached
