"""Heatmaps of a sweep: one PNG per probe, score minus baseline over (start i, end j)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..slicing.atomic import staged_output

if TYPE_CHECKING:
    from .sweep import SweepConfig

__all__ = ["delta_grid", "draw_heatmaps", "heatmap_path"]


def heatmap_path(outdir: Path, probe: str) -> Path:
    return Path(outdir) / f"heatmap_{probe}.png"


def delta_grid(rows: Sequence[dict[str, Any]], probe: str) -> tuple[list[int], list[int], list[list[float]]]:
    """(starts, ends, grid): grid[a][b] is the delta of block starts[a]..ends[b] (inclusive), NaN if not run."""
    cells = {(r["start"], r["end"]): r["delta"].get(probe, math.nan) for r in rows if r["start"] is not None}
    starts = sorted({i for i, _ in cells})
    ends = sorted({j for _, j in cells})
    grid = [[cells.get((i, j), math.nan) for j in ends] for i in starts]
    return starts, ends, grid


def draw_heatmaps(outdir: Path, config: "SweepConfig", rows: Sequence[dict[str, Any]]) -> list[Path]:
    """Write heatmap_<probe>.png for every probe (atomically); nothing if no candidate has run."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    base = next((r["scores"] for r in rows if r["config"] == "baseline"), None)
    written: list[Path] = []
    if base is None or not any(r["start"] is not None for r in rows):
        return written
    for probe in (p["name"] for p in config.probes):
        starts, ends, grid = delta_grid(rows, probe)
        finite = [abs(v) for row in grid for v in row if not math.isnan(v)]
        # Symmetric around 0 so "no change" is always the middle colour; avoid a zero-width scale.
        span = max(finite + [1e-9])
        fig = Figure(figsize=(1.2 + 0.6 * len(ends), 1.2 + 0.5 * len(starts)), layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(grid, cmap="RdYlGn", norm=Normalize(-span, span), aspect="auto")
        ax.set_xticks(range(len(ends)), [str(j) for j in ends])
        ax.set_yticks(range(len(starts)), [str(i) for i in starts])
        ax.set_xlabel("end j (block i..j runs twice, as --layers 'repeat i-j')")
        ax.set_ylabel("start i")
        ax.set_title(f"{probe}: score - baseline ({base[probe]:.4g})", fontsize=9)
        for a, row in enumerate(grid):
            for b, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(b, a, f"{v:+.3g}", ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax)
        target = heatmap_path(outdir, probe)
        with staged_output(target) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        written.append(target)
    return written
