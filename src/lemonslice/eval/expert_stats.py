"""Expert statistics of a run under an expert cache (`run --expert-stats FILE`).

FILE gets, as JSON, every block's use count and cache-hit count of each routed expert, the
totals and the cache's own summary; beside it (FILE with .png) a heatmap of use by block
(rows) and expert (columns), each row labelled with its hit rate. A use is one expert looked
up by one MoE call: a prefill chunk looks each expert its tokens route to up once, a decode
step once per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import LemonsliceError
from ..slicing.atomic import staged_output, write_text

if TYPE_CHECKING:
    from ..engine import Engine
    from ..engine.experts import ExpertCache

__all__ = ["draw_heatmap", "expert_cache_of", "expert_stats", "heatmap_path", "use_matrix", "write_expert_stats"]

NEEDS_CACHE = "--expert-stats needs a streamed MoE model (a budget below the weights)"


def heatmap_path(path: Path) -> Path:
    """Where the heatmap of stats file `path` goes: the same name with .png."""
    path = Path(path)
    png = path.with_suffix(".png")
    if png == path:
        raise LemonsliceError(f"{path}: the expert statistics are JSON; the heatmap takes the name with .png")
    return png


def expert_cache_of(engine: "Engine") -> "ExpertCache":
    """The engine's expert cache, the only place routing is counted: a model without routed
    experts, or one fully loaded (no cache), has none."""
    cache = engine.residency.experts
    if cache is None or not getattr(engine.args, "is_moe", False):
        raise LemonsliceError(NEEDS_CACHE)
    return cache


def _rate(hits: int, uses: int) -> float:
    return hits / uses if uses else 0.0


def expert_stats(cache: "ExpertCache") -> dict[str, Any]:
    """Per block (ascending): uses and hits of every expert; totals; the cache's summary."""
    layers = []
    for layer in sorted(cache.stats):
        st = cache.stats[layer]
        uses, hits = int(st.uses.sum()), int(st.hits.sum())
        layers.append({"layer": int(layer), "uses": st.uses.tolist(), "hits": st.hits.tolist(),
                       "total_uses": uses, "total_hits": hits, "hit_rate": _rate(hits, uses)})
    uses = sum(x["total_uses"] for x in layers)
    hits = sum(x["total_hits"] for x in layers)
    return {"layers": layers,
            "totals": {"uses": uses, "hits": hits, "misses": uses - hits, "hit_rate": _rate(hits, uses)},
            "cache": cache.summary()}


def use_matrix(stats: dict[str, Any]) -> tuple[list[int], np.ndarray]:
    """(block indices, uses [L, X]) of `expert_stats` output; rows of fewer experts pad with 0."""
    rows = stats["layers"]
    width = max((len(x["uses"]) for x in rows), default=0)
    m = np.zeros((len(rows), width), np.int64)
    for i, x in enumerate(rows):
        m[i, : len(x["uses"])] = x["uses"]
    return [x["layer"] for x in rows], m


def _ticks(labels: Sequence[Any], most: int = 48) -> tuple[list[int], list[str]]:
    """Every label when there are few, else every k-th, so they stay readable."""
    step = max(1, -(-len(labels) // most))
    at = list(range(0, len(labels), step))
    return at, [str(labels[i]) for i in at]


def draw_heatmap(target: Path, stats: dict[str, Any]) -> Path:
    """Write the use heatmap of `stats` to `target` as a PNG (atomically)."""
    from matplotlib.figure import Figure

    layers, m = use_matrix(stats)
    L, X = m.shape
    fig = Figure(figsize=(min(24.0, max(6.0, 3 + 0.05 * X)), min(16.0, max(3.0, 1.5 + 0.22 * L))),
                 layout="constrained")
    ax = fig.add_subplot()
    tot = stats["totals"]
    ax.set_title(f"routed-expert use: {tot['uses']} lookups, {tot['hit_rate']:.1%} cache hits", fontsize=9)
    if L == 0:
        ax.text(0.5, 0.5, "no expert was looked up", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        image = ax.imshow(m, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xlabel("expert")
        ax.set_ylabel("block")
        ax.set_yticks(*_ticks(layers))
        # The hit rate of each row on the right, on the same rows as the block labels.
        rates = ax.twinx()
        rates.set_ylim(ax.get_ylim())
        at, _ = _ticks(layers)
        rates.set_yticks(at, [f"{stats['layers'][i]['hit_rate']:.0%}" for i in at])
        rates.set_ylabel("cache hits")
        fig.colorbar(image, ax=[ax, rates], location="bottom", label="uses", shrink=0.6)
    shown = ",".join(map(str, layers))
    meta = {"Title": "lemonslice expert use",
            "Description": f"rows: blocks {shown}; columns: experts 0-{max(X - 1, 0)}"}
    with staged_output(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=meta)
    return target


def write_expert_stats(path: Path, cache: "ExpertCache") -> tuple[Path, Path]:
    """Write the statistics JSON to `path` and the heatmap beside it; (json path, png path)."""
    path = Path(path)
    png = heatmap_path(path)
    stats = expert_stats(cache)
    stats["heatmap"] = png.name
    # The picture first, so the JSON never names a heatmap that is not there.
    draw_heatmap(png, stats)
    write_text(path, json.dumps(stats, indent=1))
    return path, png
