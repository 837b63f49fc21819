"""Per-layer profile: time, bytes read and expert-cache hits of every playlist position.

`profile(engine, prompt, tokens)` prefills `prompt` and decodes `tokens` greedy tokens through
the one decode step (`generation.Plain`) while a probe on `Compute` times the embedding, each
playlist position and the head, and counts the weight reads of each (residency's counters).
The parts' times add up to the measured time per token less the Python between them ("other").
Each row carries its role from the block's tensors (attention or DeltaNet mixer, MoE or dense
FFN) and its bytes (the tensors' sizes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..engine import Engine
from ..engine.compute import Part
from ..engine.generation import Plain
from ..engine.residency import Residency
from ..engine.sampling import Sampler, SamplingParams
from ..gguf.constants import Tensors as TN
from ..gguf.constants import block_suffix

PHASES = ("prefill", "decode")
_IO_KEYS = ("bytes_read", "expert_lookups", "expert_hits")


@dataclass
class PartStats:
    """One part's totals in one phase."""

    seconds: float = 0.0
    calls: int = 0
    bytes_read: int = 0
    expert_lookups: int = 0
    expert_hits: int = 0


class LayerProbe:
    """Compute's probe: seconds and weight reads per part, added to the current phase."""

    def __init__(self, residency: Residency):
        self.residency = residency
        self.phase = "prefill"
        self.parts: dict[str, dict[Part, PartStats]] = {p: {} for p in PHASES}
        self._io: dict[str, float] = {}
        self._t0 = 0.0

    def enter(self, part: Part) -> None:
        self._io = self.residency.io_counters()
        self._t0 = time.perf_counter()

    def leave(self, part: Part, rows: int) -> None:
        dt = time.perf_counter() - self._t0
        io = self.residency.io_counters()
        st = self.parts[self.phase].setdefault(part, PartStats())
        st.seconds += dt
        st.calls += 1
        for k in _IO_KEYS:
            setattr(st, k, getattr(st, k) + int(io[k] - self._io[k]))


@dataclass
class LayerRow:
    """One row of the profile: a playlist position, the embedding or the head."""

    part: str  # "embedding", "head", or the position as text
    block: int | None  # the source block of a position
    mixer: str  # attention, attention (sliding), deltanet, or "" for the shared parts
    ffn: str  # moe, dense, or ""
    nbytes: int
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def role(self) -> str:
        if not self.mixer:
            return self.part
        return f"{self.mixer} + {self.ffn}" if self.ffn else self.mixer


def block_role(names: Sequence[str]) -> tuple[str, str]:
    """(mixer, ffn) of a block from its tensor names: attention or deltanet, moe or dense."""
    suffixes = [block_suffix(n) for n in names]
    mixer = ("deltanet" if any(s.startswith("ssm_") for s in suffixes)
             else "attention" if any(s.startswith(("attn_q.", "attn_qkv.", "attn_k.")) for s in suffixes) else "")
    ffn = ("moe" if any(s.startswith(("ffn_gate_exps.", "ffn_up_exps.", "ffn_gate_up_exps.")) for s in suffixes)
           else "dense" if any(s.startswith(("ffn_up.", "ffn_gate.")) for s in suffixes) else "")
    return mixer, ffn


def _rows(engine: Engine) -> list[LayerRow]:
    """The profile's rows before timing: embedding, every position of the engine's range, head."""
    res = engine.residency
    shared = res.store.tensor_names(None)
    size = {n: res.store.info(n).n_bytes for n in shared}
    tied = TN.OUTPUT not in size
    rows = [LayerRow("embedding", None, "", "", size.get(TN.TOKEN_EMBD, 0))]
    a, b = res.positions
    for pos in range(a, b):
        store, layer = res.source(res.playlist[pos])
        mixer, ffn = block_role(store.tensor_names(layer))
        swa = getattr(res.args_of(res.playlist[pos]), "swa", None)
        if mixer == "attention" and swa is not None and swa[layer]:
            mixer = "attention (sliding)"
        rows.append(LayerRow(str(pos), layer, mixer, ffn, store.nbytes(layer)))
    # A tied head reads the embedding's tensor: its bytes are counted once, on the embedding.
    rows.append(LayerRow("head (tied)" if tied else "head", None, "", "",
                         size.get(TN.OUTPUT_NORM, 0) + size.get(TN.OUTPUT, 0)))
    return rows


def _key(row: LayerRow) -> Part:
    return "head" if row.part.startswith("head") else row.part if row.part == "embedding" else int(row.part)


@dataclass
class Profile:
    rows: list[LayerRow]
    tokens: dict[str, int]  # prefill: prompt tokens, decode: decode tokens
    wall_s: dict[str, float]  # measured time of each phase

    def per_token_ms(self, phase: str) -> float:
        return 1e3 * self.wall_s[phase] / self.tokens[phase]

    def parts_ms(self, phase: str) -> float:
        """The parts' time per token, summed."""
        return sum(r.phases[phase]["ms_per_token"] for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        summary = {p: {"tokens": self.tokens[p], "wall_s": self.wall_s[p], "ms_per_token": self.per_token_ms(p),
                       "parts_ms_per_token": self.parts_ms(p)} for p in PHASES}
        return {"phases": summary,
                "rows": [{**asdict(r), "role": r.role} for r in self.rows]}


def _fill(rows: list[LayerRow], probe: LayerProbe, tokens: dict[str, int]) -> None:
    for r in rows:
        for phase in PHASES:
            st = probe.parts[phase].get(_key(r), PartStats())
            n = tokens[phase]
            r.phases[phase] = {"ms_per_token": 1e3 * st.seconds / n, "calls": st.calls,
                               "bytes_read_per_token": st.bytes_read / n, "expert_lookups": st.expert_lookups,
                               "expert_hits": st.expert_hits, "expert_misses": st.expert_lookups - st.expert_hits}


def profile(engine: Engine, prompt: Sequence[int], tokens: int) -> Profile:
    """Prefill `prompt`, then decode `tokens` greedy tokens, timing every part of each forward."""
    rows = _rows(engine)
    sampler = Sampler(SamplingParams(temperature=0.0))
    engine.generate(list(prompt[:8]), 2)  # warm-up: kernels built, first-call allocations made
    engine.reset()
    probe = LayerProbe(engine.residency)
    decoder = Plain(engine, sampler)
    history = list(prompt)
    engine.compute.probe = probe
    try:
        t0 = time.perf_counter()
        decoder.prefill(history)
        tok = decoder.step(None, history, 1)[0]
        prefill_s = time.perf_counter() - t0
        probe.phase = "decode"
        t0 = time.perf_counter()
        for _ in range(tokens):
            history.append(tok)
            tok = decoder.step(tok, history, 1)[0]
        decode_s = time.perf_counter() - t0
    finally:
        engine.compute.probe = None
    counts = {"prefill": len(prompt), "decode": tokens}
    _fill(rows, probe, counts)
    return Profile(rows, counts, {"prefill": prefill_s, "decode": decode_s})


# Bar colours: the mixer decides the hue, the FFN the shade.
_COLOURS = {("deltanet", "moe"): "#1f77b4", ("deltanet", "dense"): "#9ecae1", ("attention", "moe"): "#d62728",
            ("attention", "dense"): "#fc9272", ("attention (sliding)", "dense"): "#fdd0a2",
            ("attention (sliding)", "moe"): "#fd8d3c"}


def plot_profile(prof: Profile, path: Path, title: str) -> None:
    """Bars of decode and prefill ms per token for every part, coloured by role."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from ..slicing.atomic import staged_output

    fig = Figure(figsize=(max(7.0, 0.35 * len(prof.rows) + 3.5), 5.5))
    labels = [r.part for r in prof.rows]
    colours = [_COLOURS.get((r.mixer, r.ffn), "#7f7f7f") for r in prof.rows]
    for ax, phase in zip(fig.subplots(2, 1, sharex=True), ("decode", "prefill")):
        ax.bar(range(len(labels)), [r.phases[phase]["ms_per_token"] for r in prof.rows], color=colours)
        ax.set_ylabel(f"{phase} ms/token")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{phase}: {prof.per_token_ms(phase):.2f} ms/token measured, "
                     f"parts {prof.parts_ms(phase):.2f}", fontsize=9)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    roles = dict.fromkeys((r.mixer, r.ffn) for r in prof.rows)
    handles = [Patch(color=_COLOURS.get(k, "#7f7f7f"), label=" + ".join(x for x in k if x) or "shared")
               for k in roles]
    fig.axes[0].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with staged_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
