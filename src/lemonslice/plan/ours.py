"""lemonslice's plan: full load when the weights fit, else per-tensor residency with the routed
experts streamed through a cache (engine/budget.py), and the peak memory of either.

The peak is the process's fixed cost plus what the model adds, each part from the model's sizes:
weights, the KV cache claimed for the whole context (`run -c` claims it at the start), the
recurrent state, one prefill chunk's activations and the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.budget import TensorPlan, human
from ..engine.compute import PREFILL_CHUNK
from ..engine.residency import budget_plan
from ..engine.store import WeightStore
from ..errors import LemonsliceError
from ..models.caches import held_rows
from .facts import ModelFacts

# Measured with ../shared/tools/capped.sh (page cache counted, cold): `lemonslice run -n 8` on the
# 8-layer test model (706 KB of weights, 32-token vocabulary) peaks at 578 MB: the interpreter,
# torch and the other libraries, and the page cache of their files.
BASE = 578_000_000
# The tokenizer and the decoded header per vocabulary entry: measured 107 MB over the sum of the
# other parts on a one-layer real-shape qwen35moe with 248,320 tokens (`run -c 4096`, cold cgroup).
# Per BPE merge: an estimate (a rank-map entry and the decoded string), not measured here.
PER_TOKEN = 430
PER_MERGE = 200
# Resident memory a prefill adds per byte of the tensors it holds live: measured on Gemma at a
# 32K context, RSS rose 250 MB while 115 MB of new tensors were alive (torch's and glibc's
# allocators keep what was freed).
SCRATCH_FACTOR = 2
# Kept free under a RAM budget: the allocator's slack and what the kernel needs to page.
MARGIN_FRACTION = 20


@dataclass(frozen=True)
class OurPlan:
    mode: str  # "full" or "budget"
    ctx: int
    parallel: int
    kv_types: tuple[str, str]
    parts: dict[str, int]  # what the peak is made of
    weight_budget: int | None  # --max-memory for a budget plan
    tensors: TensorPlan | None = field(default=None, repr=False)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def read_per_token(self) -> int:
        """Bytes read from disk per decoded token at most (0 for a full load)."""
        t = self.tensors
        return 0 if t is None else t.streamed_bytes_per_token + t.expert_bytes_per_token

    def flags(self) -> list[str]:
        k, v = self.kv_types
        args = ["-c", str(self.ctx), "--cache-type-k", k, "--cache-type-v", v]
        if self.weight_budget is not None:
            args += ["--max-memory", f"{self.weight_budget // (1 << 20)}MiB"]
        return args


def kv_bytes(facts: ModelFacts, ctx: int, types: tuple[str, str], chunk: int = PREFILL_CHUNK) -> int:
    """The attention caches of one sequence claimed for `ctx` positions (a windowed layer
    holds its window plus a prefill chunk)."""
    total = 0
    for x in facts.layers:
        if x.kind != "recurrent":
            total += held_rows(ctx, x.window, chunk) * facts.kv_bytes_per_position(x, types)
    return total


def activations(facts: ModelFacts, ctx: int, chunk: int = PREFILL_CHUNK) -> int:
    """Resident memory for the scratch of one prefill chunk at a full context: the residual stream and its norms, the
    widest FFN's gate, up and product (and a MoE's inputs copied per routed expert), the
    attention's projections, a layer's keys and values decoded to float32 for the whole context
    with the chunk's mask over it (bool, and float inside SDPA), and two rows of logits, times
    what the allocators keep besides."""
    rows = min(chunk, ctx)
    per_row = (facts.n_embd * (8 + facts.n_expert_used) + facts.n_ff * 3
               + facts.n_head * _head_dim(facts) * 4)
    attention = [x for x in facts.layers if x.kind != "recurrent"]
    seen = [held_rows(ctx, x.window, chunk) for x in attention]
    kv_float = max((s * x.n_head_kv * x.head_dim * 2 * 4 for s, x in zip(seen, attention)), default=0)
    mask = rows * max(seen, default=0) * 5
    return SCRATCH_FACTOR * (4 * (rows * per_row + 2 * facts.n_vocab) + kv_float + mask)


def _head_dim(facts: ModelFacts) -> int:
    return max((x.head_dim for x in facts.layers), default=0)


def plan_lemonslice(store: WeightStore, facts: ModelFacts, ram: int | None, ctx: int, parallel: int = 1,
                    kv_types: tuple[str, str] = ("f16", "f16")) -> OurPlan:
    """Full load if the weights fit `ram` (or there is no budget), else the per-tensor plan of
    what does; a budget that cannot hold one layer is refused with the shortfall."""
    fixed = {
        "process": BASE,
        "tokenizer": PER_TOKEN * facts.n_vocab + PER_MERGE * facts.n_merges,
        "kv cache": parallel * kv_bytes(facts, ctx, kv_types),
        "recurrent state": parallel * sum(x.state_bytes for x in facts.layers),
        "activations": activations(facts, ctx),
    }
    weights = sum(facts.shared.values()) + sum(x.dense_bytes + x.expert_bytes for x in facts.layers)
    if ram is None or sum(fixed.values()) + weights <= ram - ram // MARGIN_FRACTION:
        budget = None if ram is None else ram - ram // MARGIN_FRACTION - sum(fixed.values())
        return OurPlan("full", ctx, parallel, kv_types, {**fixed, "weights": weights}, budget)
    budget = ram - ram // MARGIN_FRACTION - sum(fixed.values())
    try:
        if budget <= 0:
            raise LemonsliceError("")
        tp = budget_plan(store, budget)
    except LemonsliceError:
        least = budget_plan(store, 1 << 62).minimum
        # The smallest RAM whose budget (less its slack and the fixed parts) holds `least`.
        need = -(-(sum(fixed.values()) + least) * MARGIN_FRACTION // (MARGIN_FRACTION - 1))
        raise LemonsliceError(
            f"a RAM budget of {human(ram)} cannot run this model at {ctx} tokens: lemonslice needs at least "
            f"{human(need)} ({human(sum(fixed.values()))} for the process and caches, {human(least)} for one "
            f"layer's weights and the shared ones, 5% slack); {human(need - ram)} short") from None
    parts = {**fixed, "shared weights": tp.shared_bytes, "resident layer weights": tp.resident_bytes,
             "expert cache": tp.expert_cache, "streaming scratch": tp.scratch}
    return OurPlan("budget", ctx, parallel, kv_types, parts, budget, tp)
