"""Shipping commands: diff (what differs between two models, by the layer) and sync (update a
split directory by copying only the files that differ)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ._app import _human, _progress, app, err, out


def _equal_units(units: list) -> str:  # noqa: ANN001
    layers = [u.layer for u in units if u.status == "equal" and u.layer is not None]
    parts = ["shared"] if any(u.status == "equal" and u.layer is None for u in units) else []
    if layers:
        from ..surgery.plan import format_layers  # here: surgery loads torch, which other commands never need

        parts.append(("layer " if len(layers) == 1 else "layers ") + format_layers(layers))
    return ", ".join(parts) or "nothing"


def _print_unit(u) -> None:  # noqa: ANN001
    both = f"{_human(u.size_a)} -> {_human(u.size_b)}"
    sizes = {"added": _human(u.size_b), "removed": _human(u.size_a)}.get(u.status, both)
    line = f"{u.status}: {u.name} ({u.file}, {sizes})"
    if u.header_only:
        line += ": header only (metadata); every tensor equal"
    elif u.tensors:
        line += f": {len(u.tensors)} tensor(s) differ"
    out.print(line, highlight=False)
    width = max((len(t.name) for t in u.tensors), default=0)
    for t in u.tensors:
        what = {"added": t.b, "removed": t.a}.get(t.kind) or (t.a if t.a == t.b else f"{t.a} -> {t.b}")
        out.print(f"  {t.name:<{width}}  {t.kind:<7}  {what}", highlight=False)


@app.command()
def diff(
    a: Path = typer.Argument(..., help="A split directory or a .gguf file."),
    b: Path = typer.Argument(..., help="A split directory or a .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show which layers of B (and its shared tensors) are equal to A's, changed, added or removed, which
    tensors changed and how (type, shape, or bytes only), and the bytes that differ. Two split directories
    are compared by their manifests' sha256 (an equal file is never read; in a changed one the tensors of
    equal type and shape are hashed to name them); with a GGUF, every such tensor is hashed on both sides."""
    from ..slicing.diff import diff_models

    with _progress("diff") as cb:
        r = diff_models(a, b, progress=cb)
    for w in r.warnings:
        err.print(f"warning: {w}", highlight=False)
    if as_json:
        out.print_json(json.dumps(r.to_dict()))
        return
    out.print(f"A: {r.a} ({r.kind_a})  B: {r.b} ({r.kind_b})", highlight=False)
    out.print(f"equal: {_equal_units(r.units)}", highlight=False)
    for u in r.units:
        if u.status != "equal":
            _print_unit(u)
    kv = f"{len(r.kv_changed)} key(s) differ ({', '.join(r.kv_changed)})" if r.kv_changed else "equal"
    out.print(f"metadata: {kv}", highlight=False)
    moved = sum(u.status in ("changed", "added") for u in r.units)
    unit = "file(s)" if r.kind_b == "split" else "layer(s) or shared"
    out.print(
        f"{r.count('equal')} equal, {r.count('changed')} changed, {r.count('added')} added, {r.count('removed')} "
        f"removed; tensor bytes that differ: {_human(r.bytes_differ)}; to move A -> B: {moved} {unit}, "
        f"{_human(r.bytes_to_move)}; removed: {_human(r.bytes_removed)}; tensor data read: {_human(r.bytes_hashed)}",
        highlight=False)


@app.command()
def sync(
    src: Path = typer.Argument(..., help="Split directory to copy from."),
    dst: Path = typer.Argument(
        ..., help="Split directory to update: created when missing; files SRC no longer has are removed."),
    hardlink: bool = typer.Option(
        False, "--hardlink", help="Hard-link SRC's files instead of copying them, where both share a filesystem. "
        "A hard link is the same file: anything that later rewrites one of SRC's files in place changes DST too "
        "(lemonslice itself never does), so use it only when nothing will."),
    verify: bool = typer.Option(
        False, "--verify", help="Re-hash DST's files instead of trusting its verify stamp for the unchanged ones."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Make DST an exact copy of the split directory SRC, copying only the files DST lacks or has
    different (by the manifests' sha256 and sizes) as reflinks where the filesystem has them, else plain
    copies, each checked against SRC's manifest and renamed into place before the manifest is swapped in
    last. A sync killed while copying leaves DST as it was; one killed in the renames after is finished by
    the next sync (until then loads refuse DST and verify says why)."""
    from ..slicing.sync import same_manifest, sync_split

    try:
        with _progress("sync") as cb:
            r = sync_split(src, dst, hardlink=hardlink, rehash=verify, progress=cb)
    except KeyboardInterrupt:
        state = f"the sync had completed; {dst} matches {src}" if same_manifest(src, dst) else f"{dst} is as it was"
        err.print(f"interrupted; {state}", highlight=False)
        raise typer.Exit(130) from None
    for w in r.warnings:
        err.print(f"warning: {w}", highlight=False)
    if as_json:
        out.print_json(json.dumps(r.to_dict()))
        return
    if r.finished:
        out.print(f"finished an interrupted sync first ({len(r.finished)} file(s) staged by it)", highlight=False)
    rows = [("copied", n, "") for n in r.copied] + [("linked", n, f" ({h})") for n, h in r.linked.items()]
    for what, name, how in rows + [("removed", n, "") for n in r.removed]:
        out.print(f"{what:<7}  {name}  {_human(r.sizes[name])}{how}", highlight=False)
    out.print(
        f"synced {src} -> {dst}: copied {len(r.copied)} file(s) ({_human(r.total(r.copied))}), linked "
        f"{len(r.linked)} ({_human(r.total(r.linked))}), kept {len(r.kept)} ({_human(r.total(r.kept))}), "
        f"removed {len(r.removed)} ({_human(r.total(r.removed))})", highlight=False)
