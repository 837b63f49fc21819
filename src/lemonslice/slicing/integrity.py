"""Checks of a split directory made before a model is read from it.

`check_split` costs a stat and a header parse per file: every file present, of the manifest's
size, with a GGUF header whose tensor table matches its manifest entry. That catches a
truncated or swapped file and a manifest that disagrees with the files. Bytes changed inside
tensor data are caught by the verify stamp instead: a file whose size, mtime or inode differs
from what the last `verify` recorded gets a warning. `full=True` re-hashes everything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LemonsliceError
from ..gguf.constants import MANIFEST_NAME
from .atomic import STAMP_NAME
from .journal import pending
from .manifest import MAX_MANIFEST_BYTES, Manifest, load_manifest
from .verify import Problem, check_file, file_fingerprints, manifest_sha256, sha256_file, verify_split

_SHOWN_NAMES = 3
_WHAT = {"size": "size", "mtime_ns": "modified time", "ino": "inode"}


def _refusal(directory: Path, problems: list[Problem]) -> LemonsliceError:
    p = problems[0]
    more = f"{len(problems) - 1} more problem(s); " if len(problems) > 1 else ""
    return LemonsliceError(f"{directory / p.file}: {p.kind}: {p.detail} ({more}run lemonslice verify {directory})")


def _read_stamp(directory: Path) -> dict | None:
    """The stamp's record, None when there is none; raises ValueError when it is unreadable."""
    path = directory / STAMP_NAME
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError("too large")
        d = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(d["manifest_sha256"], str) or not isinstance(d["files"], dict):
            raise ValueError("wrong types")
    except (OSError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(str(e)) from None
    return d


def _changes(stamp: dict, now: dict[str, dict[str, int]], manifest: Manifest) -> dict[str, list[str]]:
    """Per file the manifest names: what differs from the stamp (empty dict: nothing)."""
    changed: dict[str, list[str]] = {}
    for f in manifest.files:
        was, cur = stamp["files"].get(f.name), now.get(f.name)
        if not isinstance(was, dict) or cur is None:
            changed[f.name] = ["not recorded"] if cur is not None else ["missing"]
        elif diff := [_WHAT[k] for k in _WHAT if was.get(k) != cur[k]]:
            changed[f.name] = diff
    return changed


def _warnings(directory: Path, manifest_changed: bool, changed: dict[str, list[str]]) -> list[str]:
    hint = f"run lemonslice verify {directory}"
    out = [f"{MANIFEST_NAME} changed since the last verify; {hint}"] if manifest_changed else []
    if len(changed) == 1:
        (name, what), = changed.items()
        out.append(f"{name} changed since the last verify ({', '.join(what)}); {hint}")
    elif changed:
        names = list(changed)
        shown = ", ".join(names[:_SHOWN_NAMES]) + (", …" if len(names) > _SHOWN_NAMES else "")
        out.append(f"{len(names)} files changed since the last verify ({shown}); {hint}")
    return out


def _hash_changed(directory: Path, m: Manifest, changed: dict[str, list[str]]) -> dict[str, list[str]]:
    """Hash the files the stamp shows changed: refuse an altered one, drop intact ones."""
    problems = []
    for name in list(changed):
        f = m.file(name)
        if (directory / name).exists() and sha256_file(directory / name) == f.sha256:
            del changed[name]
        elif (directory / name).exists():
            problems.append(Problem(name, "altered", "sha256 differs from the manifest's (changed since the last verify)"))
    if problems:
        raise _refusal(directory, problems)
    return changed


def check_split(directory: str | os.PathLike[str], full: bool = False, hash_changed: bool = False) -> list[str]:
    """Raise a one-line LemonsliceError naming the first damaged file; return warnings (files
    changed since the last verify). `full` hashes every file first, as `verify` does;
    `hash_changed` hashes only the files changed since then (for callers that read every byte).

    A file the stamp shows unchanged since its hash was checked skips the header parse (with a
    250k-token vocabulary in every header, ~0.1 s a file)."""
    directory = Path(directory)
    if (why := pending(directory)) is not None:
        raise LemonsliceError(f"{directory}: {why}")
    if full:
        problems = verify_split(directory)
        if problems:
            raise _refusal(directory, problems)
        return []
    m = load_manifest(directory)
    try:
        stamp = _read_stamp(directory)
    except ValueError:
        stamp = None
        unreadable = [f"{STAMP_NAME} in {directory} is unreadable; run lemonslice verify {directory}"]
    else:
        unreadable = []
    now = file_fingerprints(directory, m)
    manifest_changed = stamp is not None and manifest_sha256(directory) != stamp["manifest_sha256"]
    changed = _changes(stamp, now, m) if stamp is not None else {}
    trusted = stamp is not None and not manifest_changed
    root = directory.resolve()
    for f in m.files:
        if trusted and f.name not in changed:
            continue
        problems = check_file(directory, root, f)
        if problems:
            raise _refusal(directory, problems)
    if hash_changed and changed and not manifest_changed:
        changed = _hash_changed(directory, m, changed)
    return unreadable + (_warnings(directory, manifest_changed, changed) if stamp is not None else [])


def vouched(directory: Path, manifest: Manifest) -> set[str]:
    """The files whose size, mtime and inode are what the verify stamp recorded when it last
    hashed them against this very manifest: their hash need not be read again."""
    try:
        stamp = _read_stamp(directory)
    except ValueError:
        return set()
    if stamp is None or manifest_sha256(directory) != stamp["manifest_sha256"]:
        return set()
    changed = _changes(stamp, file_fingerprints(directory, manifest), manifest)
    return {f.name for f in manifest.files} - set(changed)
