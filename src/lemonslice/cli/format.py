"""Format commands: split, merge, verify, inspect, convert."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import LemonsliceError
from ._app import _VERIFY_HELP, _human, _parse_size, _progress, app, err, out


@app.command()
def split(
    model: Path = typer.Argument(..., help="Monolithic GGUF file."),
    outdir: Path = typer.Argument(..., help="Directory to write shared.gguf, layer_NNNN.gguf and manifest.json to."),
    force: bool = typer.Option(
        False, "--force", help="Replace an OUTDIR that holds an earlier split (never one holding other files)."),
) -> None:
    """Split a GGUF into one file per block plus shared.gguf and manifest.json."""
    from ..slicing import split_gguf

    with _progress("split") as cb:
        m = split_gguf(model, outdir, force=force, progress=cb)
    n_layers = len(m.layers)
    out.print(f"wrote {n_layers} layer files + shared.gguf to {outdir} (source sha256 {m.source.sha256[:16]}…)")


@app.command()
def merge(
    outdir: Path = typer.Argument(..., help="Split directory."),
    model: Path = typer.Argument(..., help="GGUF file to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing MODEL (a GGUF file)."),
    verify: bool = typer.Option(False, "--verify", help=_VERIFY_HELP),
) -> None:
    """Rebuild the monolithic GGUF; checks it byte for byte against the source's sha256."""
    from ..slicing import merge_split

    def warn(w: str) -> None:
        err.print(f"warning: {w}", highlight=False)

    with _progress("merge") as cb:
        digest = merge_split(outdir, model, force=force, progress=cb, verify=verify, on_warning=warn)
    out.print(f"wrote {model}: sha256 {digest} matches the source")


@app.command()
def verify(outdir: Path = typer.Argument(..., help="Split directory.")) -> None:
    """Re-hash every file and check names, counts, sizes and roles against the manifest; when all
    is well, leave a stamp (.lemonslice-verified.json) so a later load notices a changed file."""
    from ..slicing import verify_split

    with _progress("verify") as cb:
        problems = verify_split(outdir, progress=cb, stamp=True)
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
        if k == "file_type" and hp.get("file_type_name"):
            t.add_row(k, f"{hp['file_type_name']} ({v})")
        elif v is not None and k != "file_type_name":
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
    budget: Optional[str] = typer.Option(
        None, "--budget", metavar="SIZE", help="Also show what `run --max-memory SIZE` would keep resident, read "
        "per token and give the expert cache (reads no weight)."),
    ctx: int = typer.Option(4096, "-c", "--ctx-size", help="Context length for the KV cache sizes shown."),
) -> None:
    """Show hyperparameters, a layer table and totals; with --budget, the residency plan for it."""
    from ..slicing import inspect_path

    # The plan first: a budget too small fails with its one line before anything is printed.
    plan = _budget_plan(path, _parse_size(budget)) if budget is not None else None
    if ctx < 1:
        raise LemonsliceError(f"-c/--ctx-size must be >= 1, got {ctx}")
    s = inspect_path(path)
    s["kv_cache"] = {"ctx": ctx, "bytes": _kv_sizes(path, ctx)}
    if as_json:
        if plan is not None:
            s["budget_plan"] = {k: getattr(plan, k) for k in _PLAN_FIELDS} | {"resident_tensors": len(plan.resident)}
        out.print_json(json.dumps(s, default=str))
        return
    _print_summary(s)
    sizes = ", ".join(f"{t} {_human(b)}" for t, b in s["kv_cache"]["bytes"].items())
    out.print(f"KV cache of one sequence at {ctx} tokens (keys and values of one type): {sizes}")
    if plan is not None:
        out.print("\n".join(plan.lines(_human)))


def _kv_sizes(path: Path, ctx: int) -> dict[str, int]:
    """KV-cache bytes at `ctx` positions per cache type, from the hyper-parameters alone."""
    from ..engine import WeightStore
    from ..engine.state import kv_cache_bytes
    from ..ops.kv import KV_TYPES

    with WeightStore(path) as store:
        return {t: kv_cache_bytes(store.family, store.args, ctx, (t, t)) for t in KV_TYPES}


# TensorPlan's byte counts, as `inspect --budget --json` shows them.
_PLAN_FIELDS = ("budget", "minimum", "shared_bytes", "resident_bytes", "streamed_bytes_per_token", "scratch",
                "expert_cache", "expert_bytes_per_token")


def _budget_plan(path: Path, budget: int):  # noqa: ANN202
    """The per-tensor plan of `budget` for the model at `path`, from its headers alone."""
    from ..engine import WeightStore
    from ..engine.residency import budget_plan

    with WeightStore(path) as store:
        return budget_plan(store, budget)


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
    from ..convert import convert_hf

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("convert", total=None)
        r = convert_hf(hf_dir, model, out_type, force=force, mtp=not no_mtp,
                       progress=lambda done, total: bar.update(task, completed=done, total=total))
    mtp = f" + {r.nextn_predict_layers} MTP" if r.nextn_predict_layers else ""
    out.print(f"wrote {model}: {r.arch}, {r.block_count - r.nextn_predict_layers} layers{mtp}, "
              f"{r.n_tensors} tensors, {_human(r.n_bytes)} ({out_type})")
