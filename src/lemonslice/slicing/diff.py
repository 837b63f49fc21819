"""Compare two models by the layer: which blocks, and the shared tensors, are equal, changed,
added or removed, and for a changed one which tensors differ and how.

Either side is a split directory or a single GGUF. Between two splits the manifests decide:
a file whose sha256 and size agree is equal and is never opened. In a file whose hash differs,
types and shapes come from the manifests, and the tensors whose type and shape agree are
hashed in both files to tell changed bytes from a header-only change (the KV metadata, which
every split file repeats). With a GGUF on either side there is no file hash to go by, so
every tensor whose type and shape agree is hashed on both sides, in 8 MiB reads.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import LemonsliceError
from ..gguf.constants import LAYER_FILE, SHARED_FILE
from ..gguf.model import ModelFiles
from .integrity import check_split
from .manifest import FileEntry

Progress = Callable[[int, int], None]
_CHUNK = 8 << 20


@dataclass(frozen=True)
class TensorChange:
    name: str
    kind: str  # type, shape, bytes (same type and shape), added, removed
    a: str | None  # "Q8_0 64x128" in A; None when added
    b: str | None
    bytes_a: int
    bytes_b: int


@dataclass
class UnitDiff:
    layer: int | None  # None: the shared tensors
    status: str  # equal, changed, added, removed
    file: str  # shared.gguf or layer_NNNN.gguf: its file in a split
    size_a: int  # the file's bytes in a split, the unit's tensor bytes in a GGUF; 0 where absent
    size_b: int
    tensors: list[TensorChange] = field(default_factory=list)  # of a changed unit
    header_only: bool = False  # changed split files whose tensors are all equal

    @property
    def name(self) -> str:
        return "shared" if self.layer is None else f"layer {self.layer}"


@dataclass
class DiffReport:
    a: str
    b: str
    kind_a: str  # split or gguf
    kind_b: str
    units: list[UnitDiff]
    kv_changed: list[str]  # model metadata keys added, removed or changed (lemonslice's own left out)
    bytes_differ: int  # B's bytes of the tensors A lacks: changed and added ones, added units' included
    bytes_to_move: int  # B's size of the changed and added units: what turning A into B by the layer moves
    bytes_removed: int  # A's bytes of removed units and removed tensors
    bytes_hashed: int  # tensor data read to compare (both sides)
    warnings: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(u.status == status for u in self.units)

    def to_dict(self) -> dict:
        d = asdict(self)
        for u, du in zip(self.units, d["units"]):
            du["name"] = u.name
        d["counts"] = {s: self.count(s) for s in ("equal", "changed", "added", "removed")}
        return d


class _Side:
    """One model's units (None: shared; N: block N) and their tensors, from the manifest for a
    split (no file opened) and from the header for a GGUF."""

    def __init__(self, files: ModelFiles):
        self.files = files
        self.kind = "split" if files.manifest is not None else "gguf"
        self.entries: dict[int | None, FileEntry] = {f.layer: f for f in files.manifest.files} if files.manifest else {}
        self.units = [u for u in (None, *files.layers) if u is not None or self.tensors(None)]

    def tensors(self, layer: int | None) -> dict[str, tuple[str, list[int], int]]:
        """name -> (type, shape, bytes), in file order."""
        if self.kind == "split":
            f = self.entries.get(layer)
            return {t.name: (t.type, list(t.shape), t.bytes) for t in f.tensors} if f else {}
        infos = (self.files.info(n) for n in self.files.tensor_names(layer))
        return {t.name: (t.ggml_type.name, list(t.shape), t.n_bytes) for t in infos}

    def size(self, layer: int | None) -> int:
        f = self.entries.get(layer)
        return f.size if f else sum(t[2] for t in self.tensors(layer).values())

    def span(self, name: str) -> tuple[int, int, int]:
        t = self.files.info(name)
        return self.files.fd_of(name), t.data_start, t.n_bytes


def _desc(t: tuple[str, list[int], int]) -> str:
    return f"{t[0]} {'x'.join(map(str, t[1]))}"


def _structure(name: str, ta: dict, tb: dict) -> TensorChange | None:
    """How tensor `name` differs by its header alone; None when type and shape agree."""
    a, b = ta.get(name), tb.get(name)
    if a is None or b is None:
        kind = "added" if a is None else "removed"
    elif a[0] != b[0]:
        kind = "type"
    elif a[1] != b[1]:
        kind = "shape"
    else:
        return None
    return TensorChange(name, kind, a and _desc(a), b and _desc(b), a[2] if a else 0, b[2] if b else 0)


def _hash_spans(spans: list[tuple[int, int, int]], tick: Callable[[int], None]) -> list[str]:
    """sha256 of each (fd, offset, length) range, read in chunks into one buffer."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    out = []
    for fd, start, n in spans:
        h = hashlib.sha256()
        pos, end = start, start + n
        while pos < end:
            k = os.preadv(fd, [view[: min(_CHUNK, end - pos)]], pos)
            if k == 0:
                raise LemonsliceError(f"a file ended {end - pos} bytes early while it was compared (did it change?)")
            h.update(view[:k])
            pos += k
            tick(k)
        out.append(h.hexdigest())
    return out


def _hash_both(sa: _Side, sb: _Side, names: list[str], progress: Progress | None) -> tuple[dict, dict, int]:
    """Tensor data hashes of `names` in A and in B, one thread per side, each in file order."""
    spans = [sorted((side.span(n), n) for n in names) for side in (sa, sb)]
    total = sum(s[0][2] for side in spans for s in side)
    done = 0
    lock = threading.Lock()

    def tick(k: int) -> None:
        nonlocal done
        with lock:
            done += k
            if progress:
                progress(done, total)

    with ThreadPoolExecutor(max_workers=2) as ex:
        digests = list(ex.map(lambda side: _hash_spans([s for s, _ in side], tick), spans))
    maps = [{n: d for (_, n), d in zip(side, ds)} for side, ds in zip(spans, digests)]
    return maps[0], maps[1], total


def _unit(layer: int | None, sa: _Side, sb: _Side) -> tuple[UnitDiff, list[str]]:
    """The unit's diff as far as headers and manifests tell, and the tensors left to hash."""
    file = SHARED_FILE if layer is None else LAYER_FILE.format(index=layer)
    ta, tb = sa.tensors(layer), sb.tensors(layer)
    u = UnitDiff(layer, "changed", file, sa.size(layer) if ta else 0, sb.size(layer) if tb else 0)
    if not ta or not tb:
        u.status = "added" if not ta else "removed"
        return u, []
    ea, eb = sa.entries.get(layer), sb.entries.get(layer)
    if ea and eb and (ea.sha256, ea.size) == (eb.sha256, eb.size):
        u.status = "equal"
        return u, []
    to_hash = []
    for name in [*ta, *(n for n in tb if n not in ta)]:
        change = _structure(name, ta, tb)
        if change is None:
            to_hash.append(name)
        else:
            u.tensors.append(change)
    return u, to_hash


def _kv_changes(fa: ModelFiles, fb: ModelFiles) -> list[str]:
    ka = {e.key: e.raw for e in fa.metadata.entries}
    kb = {e.key: e.raw for e in fb.metadata.entries}
    return sorted(k for k in ka.keys() | kb.keys() if ka.get(k) != kb.get(k))


def diff_models(a: str | os.PathLike[str], b: str | os.PathLike[str], progress: Progress | None = None) -> DiffReport:
    """Compare model A with model B (see the module's docstring); `progress` counts tensor bytes hashed."""
    a, b = Path(a), Path(b)
    warnings: list[str] = []
    for p in (a, b):
        if not p.exists():
            raise LemonsliceError(f"{p}: no such file or directory")
        if p.is_dir():
            warnings += check_split(p)
    with ModelFiles(a) as fa, ModelFiles(b) as fb:
        sa, sb = _Side(fa), _Side(fb)
        layers = sorted(set(sa.units) | set(sb.units), key=lambda x: -1 if x is None else x)
        pending = [_unit(layer, sa, sb) for layer in layers]
        names = [n for _, hashed in pending for n in hashed]
        da, db, hashed_bytes = _hash_both(sa, sb, names, progress)
        units = []
        for u, hashed in pending:
            ta, tb = sa.tensors(u.layer), sb.tensors(u.layer)
            u.tensors += [TensorChange(n, "bytes", _desc(ta[n]), _desc(tb[n]), ta[n][2], tb[n][2])
                          for n in hashed if da[n] != db[n]]
            order: dict[str, int] = {}
            for i, n in enumerate([*ta, *tb]):
                order.setdefault(n, i)
            u.tensors.sort(key=lambda t: order[t.name])
            if u.status == "changed" and not u.tensors:
                u.header_only = sa.kind == sb.kind == "split"
                u.status = "changed" if u.header_only else "equal"
            units.append(u)
        kv = _kv_changes(fa, fb)
        added = sum(t[2] for u in units if u.status == "added" for t in sb.tensors(u.layer).values())
    moved = [u for u in units if u.status in ("changed", "added")]
    removed = [u for u in units if u.status == "removed"]
    return DiffReport(
        str(a), str(b), sa.kind, sb.kind, units, kv,
        bytes_differ=sum(t.bytes_b for u in units for t in u.tensors) + added,
        bytes_to_move=sum(u.size_b for u in moved),
        bytes_removed=sum(u.size_a for u in removed)
        + sum(t.bytes_a for u in units for t in u.tensors if t.kind == "removed"),
        bytes_hashed=hashed_bytes,
        warnings=warnings,
    )
