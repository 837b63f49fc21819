"""Stage assignment: which contiguous playlist positions each pipeline stage runs.

`--stages 0-19,20-39` names the ranges (inclusive, in order, covering every position once);
`--stages N` splits the playlist into N contiguous ranges whose weight bytes (from the
manifest, or the single file's header) are as even as they can be. Nothing here reads a weight.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import LemonsliceError
from ..gguf.constants import SHARED_FILE
from ..gguf.model import ModelFiles

__all__ = ["StageFiles", "assign_nodes", "balanced", "layer_bytes", "parse_stages", "resolve_stages", "stage_files"]

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_SYNTAX = "give N (that many stages, balanced by bytes) or position ranges such as 0-19,20-39"


def parse_stages(spec: str) -> int | list[tuple[int, int]]:
    """The syntax of --stages alone: a stage count, or ranges [a, b) from 'a-b' (inclusive) and 'a'."""
    text = spec.strip()
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise LemonsliceError(f"--stages {spec}: needs at least one stage")
        return n
    ranges = []
    for part in text.split(","):
        m = _RANGE.fullmatch(part.strip())
        if m is None:
            raise LemonsliceError(f"--stages {spec}: cannot read {part.strip()!r}; {_SYNTAX}")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise LemonsliceError(f"--stages {spec}: {part.strip()} runs backwards")
        ranges.append((a, b + 1))
    return ranges


def _show(r: tuple[int, int]) -> str:
    return f"{r[0]}-{r[1] - 1}" if r[1] - r[0] > 1 else str(r[0])


def resolve_stages(spec: str, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """The ranges [a, b) of --stages for a playlist whose positions hold `sizes` bytes each; one-line
    errors for ranges out of range, overlapping, leaving a gap, or out of order."""
    parsed = parse_stages(spec)
    n = len(sizes)
    if isinstance(parsed, int):
        if parsed > n:
            raise LemonsliceError(f"--stages {spec}: the playlist has only {n} positions")
        return balanced(sizes, parsed)
    for r in parsed:
        if r[1] > n:
            raise LemonsliceError(f"--stages {spec}: {_show(r)} is out of range (positions 0-{n - 1})")
    for prev, r in zip(parsed, parsed[1:]):
        if r[0] < prev[0]:
            raise LemonsliceError(f"--stages {spec}: {_show(r)} lies before {_show(prev)}; give the ranges in order")
        if r[0] < prev[1]:
            raise LemonsliceError(f"--stages {spec}: {_show(r)} overlaps {_show(prev)}; each position runs once")
    at = 0
    for r in [*parsed, (n, n)]:
        if r[0] > at:
            gap = (at, r[0])
            what = f"position {gap[0]} is" if gap[1] - gap[0] == 1 else f"positions {_show(gap)} are"
            raise LemonsliceError(f"--stages {spec}: {what} in no stage")
        at = r[1]
    return parsed


def balanced(sizes: Sequence[int], n: int) -> list[tuple[int, int]]:
    """`n` contiguous ranges [a, b) covering `sizes` whose largest byte sum is the least possible
    (ties: the earliest cuts), each with at least one position."""
    if not 1 <= n <= len(sizes):
        raise LemonsliceError(f"cannot cut {len(sizes)} positions into {n} stages")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    L = len(sizes)
    # best[k][j]: the least largest sum cutting the first j positions into k ranges; cut[k][j]: the last cut.
    best = [[float("inf")] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for j in range(k, L - (n - k) + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    out, j = [], L
    for k in range(n, 0, -1):
        out.append((cut[k][j], j))
        j = cut[k][j]
    return out[::-1]


def layer_bytes(files: ModelFiles, playlist: Sequence[int]) -> list[int]:
    """Weight bytes of each playlist position: from manifest.json for a split directory (no layer
    file is opened), else from the single file's header."""
    if files.manifest is not None:
        by_layer = {f.layer: f.n_bytes for f in files.manifest.layers}
        return [by_layer.get(b, 0) for b in playlist]
    return [files.nbytes(b) for b in playlist]


@dataclass(frozen=True)
class StageFiles:
    """The files a stage opens: where they live and their sizes (a node must hold all of them)."""

    directory: str
    sizes: dict[str, int]


def stage_files(files: ModelFiles, playlist: Sequence[int], positions: tuple[int, int]) -> StageFiles:
    """shared.gguf and the layer files of positions [a, b) of a split directory, with the sizes the
    manifest records; the single file of a monolithic GGUF."""
    if files.manifest is None:
        path = Path(files.path).resolve()
        return StageFiles(str(path.parent), {path.name: path.stat().st_size})
    blocks = set(playlist[positions[0]:positions[1]])
    sizes = {f.name: f.size for f in files.manifest.files if f.layer in blocks or f.name == SHARED_FILE}
    return StageFiles(str(Path(files.path).resolve()), sizes)


def assign_nodes(ranges: Sequence[tuple[int, int]], need: Sequence[StageFiles],
                 held: dict[str, set[str]]) -> list[str]:
    """Per stage, the node (of `held`: node -> the files it holds, in the cluster's order) to run
    it on: one holding all of the stage's files, the one given the fewest stages so far."""
    load = dict.fromkeys(held, 0)
    out = []
    for i, f in enumerate(need):
        fits = [node for node, files in held.items() if set(f.sizes) <= files]
        if not fits:
            a, b = ranges[i]
            where = f"stage {i + 1} of {len(ranges)} (positions {a}-{b - 1})"
            missing = sorted(set(f.sizes) - set().union(*held.values()))
            if missing:
                more = f" and {len(missing) - 1} more of its files" if len(missing) > 1 else ""
                raise LemonsliceError(f"{where}: no Ray node holds {f.directory}/{missing[0]}{more} "
                                      "(with the manifest's size)")
            raise LemonsliceError(f"{where}: no Ray node holds all of its files under {f.directory}; "
                                  "put them on one host")
        best = min(fits, key=lambda node: load[node])
        load[best] += 1
        out.append(best)
    return out
