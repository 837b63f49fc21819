"""Layer surgery: `lemonslice surgery PLAN SRC -o OUT`."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import _human, _progress, app, err, out


@app.command()
def surgery(
    plan: str = typer.Argument(
        ..., help="A plan: a spec such as 'repeat 27-30' or '0-30,27-30,31-39' "
        "(clauses: repeat A-B or A-BxN; drop LIST; exit-after K; replace I=MODEL:J; prune-experts LIST N "
        "stats=FILE or prune-experts LIST keep=IDS), or a .yaml/.json plan file.",
    ),
    src: Path = typer.Argument(..., help="Source model: a .gguf file or a split directory."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="NAME.gguf writes one GGUF (plus NAME.gguf.surgery.json); "
        "any other name writes a split directory.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the playlist and layout report; write nothing."),
) -> None:
    """Re-lay a model's blocks as a plan says: repeat, drop, cut or borrow layers, prune routed experts."""
    from ..surgery.plan import SourceModel, load_plan, resolve_for
    from ..surgery.prune import plan_prunes, prune_lines
    from ..surgery.write import surgery as write_surgery

    p = load_plan(plan)
    if dry_run:
        with SourceModel(src) as base:
            entries, donors, report = resolve_for(p, base)
            for d in donors.values():
                d.close()
            prunes = plan_prunes(p, base, entries)
        order = " ".join(str(e.layer) if e.source is None else f"{Path(e.source).name}:{e.layer}" for e in entries)
        out.print(f"{len(entries)} layers (source has {base.n_layer}): {order}")
        for line in prune_lines(prunes):
            out.print(line, markup=False, highlight=False)
        if report is not None:
            out.print(report.message)
            for w in report.warnings:
                err.print(f"warning: {w}", markup=False, highlight=False)
        return
    with _progress("surgery") as cb:
        r = write_surgery(p, src, output, force=force, progress=cb)
    if r.report is not None:
        (out if r.report.ok else err).print(r.report.message, markup=False, highlight=False)
        if r.report.ok and r.layout_key is not None:
            err.print(f"{r.layout_key} written (one flag per block), as the source has it", markup=False,
                      highlight=False)
        for w in r.report.warnings:
            err.print(f"warning: {w}", markup=False, highlight=False)
    mtp = r.block_count - r.n_trunk
    kind = "split directory" if r.split else "GGUF"
    extra = f" + {mtp} MTP" if mtp else ""
    out.print(f"wrote {kind} {output}: {r.n_trunk} layers{extra} (source: {r.record['source']['trunk_layers']}), "
              f"{_human(r.written_bytes)} written")
    rows = {row["layer"]: row["pruned_experts"] for row in r.record["layers"] if "pruned_experts" in row}
    for line in prune_lines(rows):
        out.print(line, markup=False, highlight=False)
    experts = r.record.get("routed_experts")
    if experts is not None and not experts["llama_cpp_loadable"]:
        err.print(f"warning: MoE layers now have {len(set(experts['per_block']))} expert counts: lemonslice runs "
                  "this, llama.cpp (one expert_count per model) refuses it", markup=False, highlight=False)
    elif experts is not None:
        out.print(f"every MoE layer has {experts['expert_count']} experts: expert_count set to that",
                  markup=False, highlight=False)
    if r.split:
        out.print(f"{len(r.linked)} file(s) shared with the source by link: {', '.join(r.linked) or 'none'}")
        out.print(f"provenance: {output / 'manifest.json'} (\"surgery\")")
    else:
        out.print(f"provenance: {output.with_name(output.name + '.surgery.json')}")
