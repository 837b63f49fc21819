"""Atomic writes of result files (staged beside the target, renamed into place when complete)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ..slicing.atomic import staged_file


@contextlib.contextmanager
def staged_output(path: Path) -> Iterator[Path]:
    """A temporary path that replaces `path` on success; the file gets 0666 less the umask."""
    with staged_file(path, force=True) as tmp:
        # mkstemp creates the staging file 0600, which would leave results unreadable to others.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp


def write_text(path: Path, text: str) -> None:
    with staged_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
