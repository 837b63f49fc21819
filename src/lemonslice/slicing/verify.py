"""Check a split directory against its manifest: every file present, whole and unaltered."""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LemonsliceError
from ..gguf.constants import MANIFEST_NAME, Keys
from ..gguf.errors import GGUFError
from ..gguf.reader import open_gguf
from .manifest import FileEntry, Manifest, load_manifest

Progress = Callable[[int, int], None]
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Problem:
    file: str
    kind: str  # missing, extra, truncated, oversized, altered, invalid, unsafe
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.kind}: {self.detail}"


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if on_bytes:
                on_bytes(n)
    return h.hexdigest()


def _check_structure(path: Path, f: FileEntry) -> list[Problem]:
    try:
        with open_gguf(path) as r:
            names = [t.name for t in r.tensors]
            role = r.get(Keys.LS_ROLE)
            layer = r.get(Keys.LS_LAYER_INDEX)
    except GGUFError as e:
        return [Problem(f.name, "invalid", str(e))]
    out = []
    if len(names) != f.tensor_count or names != [t.name for t in f.tensors]:
        out.append(Problem(f.name, "altered", f"has {len(names)} tensors, manifest lists {f.tensor_count}"))
    if role != f.role:
        out.append(Problem(f.name, "altered", f"role {role!r}, manifest says {f.role!r}"))
    want_layer = -1 if f.layer is None else f.layer
    if layer != want_layer:
        out.append(Problem(f.name, "altered", f"layer index {layer}, manifest says {want_layer}"))
    return out


def verify_split(directory: str | os.PathLike[str], progress: Progress | None = None) -> list[Problem]:
    """All problems found; an empty list means the directory is intact."""
    directory = Path(directory)
    m: Manifest = load_manifest(directory)
    root = directory.resolve()
    problems: list[Problem] = []
    to_hash: list[tuple[Path, FileEntry]] = []
    for f in m.files:
        path = directory / f.name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            problems.append(Problem(f.name, "missing", "listed in the manifest but not present"))
            continue
        if stat.S_ISLNK(st.st_mode):
            target = path.resolve()
            if not target.is_relative_to(root) or target.parent != root:
                problems.append(Problem(f.name, "unsafe", f"symlink points outside the directory ({target})"))
                continue
            st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            problems.append(Problem(f.name, "invalid", "not a regular file"))
            continue
        if st.st_size < f.size:
            problems.append(Problem(f.name, "truncated", f"{st.st_size} bytes, manifest says {f.size}"))
            continue
        if st.st_size > f.size:
            problems.append(Problem(f.name, "oversized", f"{st.st_size} bytes, manifest says {f.size}"))
            continue
        structural = _check_structure(path, f)
        problems += structural
        if not structural:
            to_hash.append((path, f))

    listed = {f.name for f in m.files} | {MANIFEST_NAME}
    for p in sorted(directory.iterdir()):
        if p.name not in listed:
            problems.append(Problem(p.name, "extra", "present but not in the manifest"))

    total = sum(f.size for _, f in to_hash)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    with ThreadPoolExecutor(max_workers=2) as ex:
        digests = list(ex.map(lambda pf: sha256_file(pf[0], tick), to_hash))
    for (path, f), d in zip(to_hash, digests):
        if d != f.sha256:
            problems.append(Problem(f.name, "altered", f"sha256 {d[:16]}… differs from the manifest's {f.sha256[:16]}…"))
    return sorted(problems, key=lambda p: p.file)


def require_intact(directory: str | os.PathLike[str]) -> Manifest:
    """Load a split directory, failing with the first problem if any file is off."""
    problems = verify_split(directory)
    if problems:
        raise LemonsliceError(f"{directory}: {problems[0]} ({len(problems)} problem(s); run `lemonslice verify`)")
    return load_manifest(directory)
