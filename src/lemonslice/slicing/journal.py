"""The journal of a `sync` into a split directory: what makes an interrupted one finishable.

A sync stages every new or changed file in `.lemonslice-sync/` inside the directory, hashed
and fsynced, beside the new manifest. Writing the journal there (`journal.json`: the files to
move into place, then the files to remove) is its commit point; from then on the sync is only
ever finished, never undone. `finish` renames the staged files over the old ones, then the
staged manifest over the old manifest, then removes what the new manifest no longer names and
the staging directory.

Before the journal is written the directory is the old model (a staging directory without a
journal is ignored, and removed by the next sync). After the manifest's rename it is the new
one (an unremoved old file is an extra file that `verify` names). In between its files are a
mix: loads refuse it, `verify` reports it (`pending`), and `finish`, which every sync runs
first, completes it from the staged files alone.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import LemonsliceError
from ..gguf.constants import MANIFEST_NAME
from .atomic import STAMP_NAME, SYNC_DIR, fsync_dir
from .manifest import check_file_name

JOURNAL_NAME = "journal.json"
_FORMAT = "lemonslice-sync-v1"
_MAX_JOURNAL_BYTES = 16 << 20
_SHOWN_NAMES = 3


@dataclass(frozen=True)
class Journal:
    move: list[str]  # staged files renamed into place, in this order
    remove: list[str]  # files deleted once the new manifest is in place


def _names(d: dict, key: str) -> list[str]:
    v = d.get(key)
    if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
        raise ValueError(f"'{key}' is not a list of names")
    for n in v:
        check_file_name(n)  # the manifest's rule: no paths, no '..'
    return v


def read_journal(directory: Path) -> Journal | None:
    """The committed sync's journal; None when no sync has committed."""
    path = directory / SYNC_DIR / JOURNAL_NAME
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > _MAX_JOURNAL_BYTES:
            raise ValueError("too large")
        d = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"format is not {_FORMAT}")
        return Journal(_names(d, "move"), _names(d, "remove"))
    except (OSError, UnicodeDecodeError, ValueError, LemonsliceError) as e:
        raise LemonsliceError(f"{path}: not a valid sync journal ({e}); remove {path.parent} and sync again") from None


def write_journal(directory: Path, journal: Journal) -> None:
    """Commit a sync: everything it staged must already be fsynced."""
    stage = directory / SYNC_DIR
    tmp = stage / f"{JOURNAL_NAME}.tmp"
    record = {"format": _FORMAT, "move": journal.move, "remove": journal.remove}
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, stage / JOURNAL_NAME)
    fsync_dir(stage)


def pending(directory: Path) -> str | None:
    """One line on how an interrupted sync left the files a mix of two models; None when it did
    not (no committed sync, or its new manifest already in place)."""
    j = read_journal(directory)
    stage = directory / SYNC_DIR
    if j is None or not (stage / MANIFEST_NAME).exists():
        return None
    moved = [n for n in j.move if not (stage / n).exists()]
    shown = ", ".join(moved[:_SHOWN_NAMES]) + (", …" if len(moved) > _SHOWN_NAMES else "")
    return (f"a sync was interrupted after moving {len(moved)} of {len(j.move)} files into place"
            f"{f' ({shown})' if moved else ''}, before its manifest; run the same lemonslice sync again to finish it")


def finish(directory: Path) -> Journal | None:
    """Complete a committed sync and return its journal; None when there was none (an
    uncommitted staging directory is removed)."""
    stage = directory / SYNC_DIR
    j = read_journal(directory)
    if j is None:
        if stage.exists():
            shutil.rmtree(stage)
            fsync_dir(directory)
        return None
    if (stage / MANIFEST_NAME).exists():
        # The stamp describes the old files; loads must not trust it for the new ones.
        (directory / STAMP_NAME).unlink(missing_ok=True)
        for name in j.move:
            if (stage / name).exists():
                os.rename(stage / name, directory / name)
        fsync_dir(directory)
        os.rename(stage / MANIFEST_NAME, directory / MANIFEST_NAME)
        fsync_dir(directory)
    for name in j.remove:
        (directory / name).unlink(missing_ok=True)
    shutil.rmtree(stage)
    fsync_dir(directory)
    return j
