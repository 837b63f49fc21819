"""MTP commands: `lemonslice mtp inject` and `lemonslice mtp strip`."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import _human, _progress, app, new_app, out

mtp_app = new_app(
    no_args_is_help=True, help="Add or remove the multi-token-prediction (MTP, nextn) block of a Qwen3.5 model.",
)
app.add_typer(mtp_app, name="mtp")


@mtp_app.command()
def inject(
    base: Path = typer.Argument(..., metavar="BASE", help="A .gguf file or a split directory without an MTP block."),
    out_path: Path = typer.Argument(..., metavar="OUT", help="Output: a .gguf file, or a directory for a split BASE."),
    from_dir: Path = typer.Option(
        ..., "--from", help="Hugging Face checkpoint directory holding the mtp.* tensors (config.json, *.safetensors).",
    ),
    out_type: str = typer.Option(
        "bf16", "--type", help="Type of the MTP matrices: bf16, q8_0, f16 or f32 (norms and routers stay f32).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT."),
) -> None:
    """Append the checkpoint's MTP block to BASE; the trunk's tensors are copied unchanged."""
    from ..surgery.mtp import inject_mtp

    with _progress("inject") as cb:
        r = inject_mtp(base, out_path, from_dir, out_type, force=force, progress=cb)
    out.print(f"wrote {out_path}: {r.arch}, {r.n_layer} layers + {r.nextn_predict_layers} MTP; "
              f"added {r.tensors} tensors, {_human(r.tensor_bytes)} ({out_type})")


@mtp_app.command()
def strip(
    base: Path = typer.Argument(..., metavar="BASE", help="A .gguf file or a split directory with an MTP block."),
    out_path: Path = typer.Argument(..., metavar="OUT", help="Output: a .gguf file, or a directory for a split BASE."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT."),
) -> None:
    """Remove the MTP block; undoes `mtp inject` byte for byte."""
    from ..surgery.mtp import strip_mtp

    with _progress("strip") as cb:
        r = strip_mtp(base, out_path, force=force, progress=cb)
    out.print(f"wrote {out_path}: {r.arch}, {r.n_layer} layers; removed {r.tensors} tensors, {_human(r.tensor_bytes)}")
