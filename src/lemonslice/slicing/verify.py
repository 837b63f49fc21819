"""Check a split directory against its manifest: every file present, whole and unaltered."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LemonsliceError
from ..gguf.constants import MANIFEST_NAME, WRITE_VERSION, Keys
from ..gguf.errors import GGUFError
from ..gguf.reader import open_gguf
from .atomic import _STAGE_TAG, PULL_DIR, STAMP_NAME, SYNC_DIR, write_text
from .journal import pending
from .manifest import FileEntry, Manifest, load_manifest

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Problem:
    file: str
    kind: str  # missing, extra, truncated, oversized, altered, invalid, unsafe, interrupted
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
    """The file's GGUF header against its manifest entry: version, tensor names, types and
    shapes in order, role and layer index."""
    try:
        with open_gguf(path) as r:
            version = r.version
            tensors = [(t.name, t.ggml_type.name, list(t.shape)) for t in r.tensors]
            role = r.get(Keys.LS_ROLE)
            layer = r.get(Keys.LS_LAYER_INDEX)
    except GGUFError as e:
        return [Problem(f.name, "invalid", str(e))]
    if version != WRITE_VERSION:
        return [Problem(f.name, "invalid", f"GGUF version {version}, split files are version {WRITE_VERSION}")]
    out = []
    names = [t[0] for t in tensors]
    want_names = [t.name for t in f.tensors]
    if len(names) != f.tensor_count:
        out.append(Problem(f.name, "altered", f"has {len(names)} tensors, manifest lists {f.tensor_count}"))
    elif names != want_names:
        have, want = next((a, b) for a, b in zip(names, want_names) if a != b)
        out.append(Problem(f.name, "altered", f"holds tensor {have} where the manifest lists {want}"))
    else:
        for (name, typ, shape), t in zip(tensors, f.tensors):
            if (typ, shape) != (t.type, t.shape):
                dims = "x".join(map(str, shape))
                want = "x".join(map(str, t.shape))
                out.append(Problem(f.name, "altered", f"tensor {name} is {typ} {dims}, manifest says {t.type} {want}"))
                break
    if role != f.role:
        out.append(Problem(f.name, "altered", f"role {role!r}, manifest says {f.role!r}"))
    want_layer = -1 if f.layer is None else f.layer
    if layer != want_layer:
        out.append(Problem(f.name, "altered", f"layer index {layer}, manifest says {want_layer}"))
    return out


def check_file(directory: Path, root: Path, f: FileEntry) -> list[Problem]:
    """Everything but the hash: present, a regular file inside `root` (the resolved directory),
    the manifest's size, and a GGUF header that matches the entry."""
    path = directory / f.name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [Problem(f.name, "missing", "listed in the manifest but not present")]
    if stat.S_ISLNK(st.st_mode):
        target = path.resolve()
        if not target.is_relative_to(root) or target.parent != root:
            return [Problem(f.name, "unsafe", f"symlink points outside the directory ({target})")]
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        return [Problem(f.name, "invalid", "not a regular file")]
    if st.st_size < f.size:
        return [Problem(f.name, "truncated", f"{st.st_size} bytes, manifest says {f.size}")]
    if st.st_size > f.size:
        return [Problem(f.name, "oversized", f"{st.st_size} bytes, manifest says {f.size}")]
    return _check_structure(path, f)


def _fingerprint(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def file_fingerprints(directory: Path, manifest: Manifest) -> dict[str, dict[str, int]]:
    """size, mtime_ns and inode of each file the manifest names that is present (links followed)."""
    out = {}
    for f in manifest.files:
        try:
            out[f.name] = _fingerprint(os.stat(directory / f.name))
        except OSError:
            continue
    return out


def manifest_sha256(directory: Path) -> str:
    return hashlib.sha256((directory / MANIFEST_NAME).read_bytes()).hexdigest()


def is_split_aside(name: str) -> bool:
    """The verify stamp, what a killed write of it left, or an unfinished pull's or sync's staging
    directory: not part of the split, never an extra file (a sync's mix of files is reported apart)."""
    return name in (STAMP_NAME, PULL_DIR, SYNC_DIR) or name.startswith(f".{STAMP_NAME}{_STAGE_TAG}")


def _stamp(directory: Path, m: Manifest | None, before: dict[str, dict[str, int]], manifest_hash: str) -> None:
    """Record the files as hashed (`m` None: remove the stamp). A file that changed while it was
    hashed gets no stamp. A read-only directory keeps whatever it has: the stamp is a convenience."""
    try:
        if m is None or file_fingerprints(directory, m) != before or manifest_sha256(directory) != manifest_hash:
            (directory / STAMP_NAME).unlink(missing_ok=True)
            return
        record = {"format": "lemonslice-verified-v1", "manifest_sha256": manifest_hash, "files": before}
        write_text(directory / STAMP_NAME, json.dumps(record, indent=1) + "\n")
    except OSError as e:
        log.warning("could not update %s in %s (%s)", STAMP_NAME, directory, e.strerror or e)


def stamp_written(directory: Path, m: Manifest) -> None:
    """Stamp a split its writer has just hashed on the way out, so a later change warns at load."""
    _stamp(directory, m, file_fingerprints(directory, m), manifest_sha256(directory))


def verify_split(directory: str | os.PathLike[str], progress: Progress | None = None,
                 stamp: bool = False) -> list[Problem]:
    """All problems found; an empty list means the directory is intact. With `stamp`, a clean
    result is recorded in the directory's verify stamp (and a stale stamp removed otherwise)."""
    directory = Path(directory)
    m: Manifest = load_manifest(directory)
    manifest_hash = manifest_sha256(directory)
    before = file_fingerprints(directory, m)
    root = directory.resolve()
    problems: list[Problem] = []
    if (why := pending(directory)) is not None:
        problems.append(Problem(SYNC_DIR + "/", "interrupted", why))
    to_hash: list[tuple[Path, FileEntry]] = []
    for f in m.files:
        found = check_file(directory, root, f)
        problems += found
        if not found:
            to_hash.append((directory / f.name, f))

    listed = {f.name for f in m.files} | {MANIFEST_NAME}
    for p in sorted(directory.iterdir()):
        if p.name not in listed and not is_split_aside(p.name):
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
    if stamp:
        _stamp(directory, None if problems else m, before, manifest_hash)
    return sorted(problems, key=lambda p: p.file)


def require_intact(directory: str | os.PathLike[str]) -> Manifest:
    """Load a split directory, failing with the first problem if any file is off."""
    problems = verify_split(directory)
    if problems:
        raise LemonsliceError(f"{directory}: {problems[0]} ({len(problems)} problem(s); run `lemonslice verify`)")
    return load_manifest(directory)
