"""Requantizing by the layer: `lemonslice requant SRC OUT --plan PLAN`."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import _human, _progress, app, err, out


@app.command()
def requant(
    src: Path = typer.Argument(..., help="Source model (F32/F16/BF16): a .gguf file or a split directory."),
    output: Path = typer.Argument(
        ..., metavar="OUT", help="NAME.gguf writes one GGUF (plus NAME.gguf.requant.json); any other name writes "
        "a split directory.",
    ),
    plan: str = typer.Option(
        ..., "--plan", help="'shared=Q8_0; 0-9=Q4_K_M; 10-29=Q3_K_M; *.attn_*=Q6_K' (llama.cpp file types for "
        "shared and layer ranges, ggml types for tensor-name globs), or a .yaml/.json file of the same pairs.",
    ),
    allow_requantize: bool = typer.Option(
        False, "--allow-requantize", help="Accept a quantized source (its tensors are dequantized and quantized again).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    threads: int = typer.Option(0, "--threads", "-t", help="Threads of llama.cpp's quantizer (0: every core)."),
) -> None:
    """Quantize chosen layers and tensors with llama.cpp's own quantizer; the rest keeps the source's bytes."""
    from ..surgery.requant import requant as run_requant
    from ..surgery.requant_plan import load_requant_plan

    p = load_requant_plan(plan)
    with _progress("requant") as cb:
        r = run_requant(src, output, p, allow_requantize=allow_requantize, force=force, n_threads=threads,
                        progress=cb)
    for w in r.warnings:
        err.print(f"warning: {w}", markup=False, highlight=False)
    parts = ["shared" if b is None else str(b) for b in r.changed]
    kind = "split directory" if r.split else "GGUF"
    out.print(f"wrote {kind} {output}: plan {p.spec}; llama.cpp runs: {', '.join(r.runs)}; "
              f"changed: {', '.join(parts) or 'nothing'}; {_human(r.written_bytes)} written")
    if r.split:
        out.print(f"{len(r.linked)} file(s) shared with the source by link: {', '.join(r.linked) or 'none'}")
        out.print(f"record: {output / 'manifest.json'} (\"requant\")")
    else:
        out.print(f"record: {output.with_name(output.name + '.requant.json')}")
