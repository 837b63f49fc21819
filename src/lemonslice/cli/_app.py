"""The shared Typer app, consoles and helpers of every command module."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..errors import LemonsliceError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Run and reshape GGUF models one layer at a time.",
)
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)
log = logging.getLogger("lemonslice")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


@contextmanager
def _progress(label: str) -> Iterator:
    """A byte progress bar on stderr; yields the callback the library calls."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(text: str) -> int:
    """'2GB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise LemonsliceError(f"cannot read size {text!r} (e.g. 2GB, 512MiB)")
    try:
        return int(float(m.group(1)) * _SIZE_UNITS[unit])
    except ValueError:
        raise LemonsliceError(f"cannot read size {text!r} (e.g. 2GB, 512MiB)") from None


def _default_budget() -> int | None:
    """80% of MemAvailable: weights that would crowd out the page cache are streamed instead."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 * 8 // 10
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


_VERIFY_HELP = "Re-hash every file of a split directory against its manifest first; refuse on any problem."


def _check_model(model: Path, verify: bool = False) -> None:
    """Check a split directory against its manifest before a weight is read (sizes and headers;
    with `verify`, every file hashed), printing its warnings. A single GGUF's header is
    validated when it is opened; there is no recorded hash to check it against."""
    from ..slicing.integrity import check_split

    if not model.is_dir():
        if verify:
            raise LemonsliceError(f"--verify checks a split directory against its manifest; {model} is a single file")
        return
    for w in check_split(model, full=verify):
        err.print(f"warning: {w}", highlight=False)
