"""LoRA commands: `lemonslice lora merge`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import _human, _progress, app, err, new_app, out

lora_app = new_app(no_args_is_help=True, help="Merge LoRA adapters into a model, layer by layer.")
app.add_typer(lora_app, name="lora")


# Set here: the example keyed "merge" in _app is the top-level `lemonslice merge`'s.
@lora_app.command(epilog="Example:\n\nlemonslice lora merge model-split/ my-adapter/ merged-split/ --layers 30-39")
def merge(
    src: Path = typer.Argument(..., help="Source model: a .gguf file or a split directory."),
    adapter: Path = typer.Argument(
        ..., help="A PEFT LoRA adapter directory (adapter_model.safetensors + adapter_config.json).",
    ),
    out_path: Path = typer.Argument(
        ..., metavar="OUT", help="NAME.gguf writes one GGUF (plus NAME.gguf.lora.json); any other name writes a "
        "split directory whose unchanged files are hard links to the source's.",
    ),
    layers: Optional[str] = typer.Option(
        None, "--layers", help="Layers to merge into, e.g. 30-39 or 0-3,8 (default: every layer); the adapter's "
        "modules in other layers are left out.",
    ),
    scale: float = typer.Option(1.0, "--scale", help="Multiplies the adapter's own lora_alpha / r."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT."),
) -> None:
    """Merge W + scale * B @ A into the chosen layers; each tensor keeps its ggml type."""
    from ..surgery.lora import merge_lora
    from ..surgery.plan import format_layers, parse_layers

    chosen = parse_layers(layers, "--layers") if layers is not None else None
    with _progress("lora merge") as cb:
        r = merge_lora(src, adapter, out_path, chosen, scale, force=force, progress=cb)
    for w in r.warnings:
        err.print(f"warning: {w}", markup=False, highlight=False)
    kind = "split directory" if r.split else "GGUF"
    out.print(f"wrote {kind} {out_path}: merged {r.merged_modules} module(s) into {len(r.tensors)} tensor(s) of "
              f"layers {format_layers(r.layers)} (scale {scale:g}), {_human(r.written_bytes)} written")
    if r.skipped_modules:
        out.print(f"left out {len(r.skipped_modules)} module(s) outside --layers")
    if r.split:
        out.print(f"{len(r.linked)} file(s) shared with the source by link")
        out.print(f"provenance: {out_path / 'manifest.json'} (\"lora\")")
    else:
        out.print(f"provenance: {out_path.with_name(out_path.name + '.lora.json')}")
