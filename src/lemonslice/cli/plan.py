"""`plan`: what fits where, for lemonslice and for llama-server, before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from ..errors import LemonsliceError
from ._app import _check_model, _human, _parse_size, app, out
from .bench import _print_table
from .run import _MODEL_HELP

_KV_TYPES = ("f16", "f32", "bf16", "q8_0")


@app.command("plan")
def plan_cmd(
    model: Path = typer.Argument(..., help=_MODEL_HELP),
    ram: Optional[str] = typer.Option(None, "--ram", help="RAM for the process, e.g. 16GiB (page cache included). "
                                      "Default: no limit."),
    vram: List[str] = typer.Option([], "--vram", help="VRAM of one GPU, e.g. 8GiB (repeat per GPU); llama.cpp only."),
    ctx: int = typer.Option(4096, "-c", "--ctx", help="Context per sequence in tokens."),
    parallel: int = typer.Option(1, "--parallel", "-np", help="Sequences served at once (llama-server -np)."),
    cache_type: str = typer.Option("f16", "--cache-type", help="KV cache type: f16, f32, bf16 or q8_0."),
    as_json: bool = typer.Option(False, "--json", help="Print the plans as JSON."),
) -> None:
    """Plan memory for MODEL at a context: lemonslice's resident weights, expert cache, peak and
    `run` flags, and a llama-server command line with its buffers per device, from the tensor
    sizes alone. Refuses, with the shortfall, budgets that cannot run the model."""
    from ..engine import WeightStore
    from ..plan import model_facts, plan_lemonslice, plan_llama

    ram_b = _size("--ram", ram) if ram is not None else None
    vram_b = [_size("--vram", v) for v in vram]
    if parallel < 1:
        raise LemonsliceError(f"--parallel must be >= 1, got {parallel}")
    if cache_type not in _KV_TYPES:
        raise LemonsliceError(f"--cache-type must be one of {', '.join(_KV_TYPES)}, got {cache_type!r}")
    _check_model(model)
    with WeightStore(model) as store:
        facts = model_facts(store)
        if ctx < 1 or (facts.context_length is not None and ctx > facts.context_length):
            raise LemonsliceError(f"-c/--ctx must be between 1 and the model's context length "
                                  f"{facts.context_length}, got {ctx}")
        types = (cache_type, cache_type)
        ours, ours_err = _attempt(lambda: plan_lemonslice(store, facts, ram_b, ctx, parallel, types))
        llama, llama_err = _attempt(lambda: plan_llama(facts, ram_b, vram_b, ctx, parallel, types))
    if ours is None and llama is None:
        raise LemonsliceError(f"nothing fits: {ours_err}; llama.cpp: {llama_err}")
    doc = _document(model, facts, ctx, parallel, cache_type, ours, llama)
    doc["lemonslice"]["refused"], doc["llama_cpp"]["refused"] = ours_err, llama_err
    if as_json:
        out.print_json(json.dumps(doc))
        return
    _print(doc)


def _attempt(make: Any) -> tuple[Any, Optional[str]]:
    """(plan, None), or (None, why) when the budgets cannot run the model that way."""
    try:
        return make(), None
    except LemonsliceError as e:
        return None, str(e)


def _size(flag: str, text: str) -> int:
    n = _parse_size(text)
    if n <= 0:
        raise LemonsliceError(f"{flag} must be a positive size, got {text!r}")
    return n


def _document(model: Path, facts: Any, ctx: int, parallel: int, cache_type: str, ours: Any,
              llama: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": str(model), "arch": facts.arch, "ctx": ctx, "parallel": parallel,
                           "cache_type": cache_type, "weights": facts.tensor_bytes, "lemonslice": {},
                           "llama_cpp": {}}
    if ours is not None:
        tp, flags = ours.tensors, ours.flags()
        doc["lemonslice"] = {
            "mode": ours.mode, "peak": ours.peak, "parts": ours.parts,
            "resident_tensors": None if tp is None else len(tp.resident),
            "expert_cache": None if tp is None else tp.expert_cache,
            "read_per_token": ours.read_per_token,
            "run": ["lemonslice", "run", str(model), *flags],
            "serve": ["lemonslice", "serve", str(model), "--ctx", str(ctx), "--parallel", str(parallel), *flags[2:]],
        }
    if llama is not None:
        doc["llama_cpp"] = {
            "argv": llama.argv,
            "devices": [{"name": d.name, "peak": d.peak, "budget": d.budget, "buffers": d.buffers}
                        for d in llama.devices],
            "notes": llama.notes,
        }
    return doc


def _print(doc: dict[str, Any]) -> None:
    out.print(f"{doc['model']}: {doc['arch']}, {_human(doc['weights'])} of weights, context {doc['ctx']}"
              f" x {doc['parallel']}, KV cache {doc['cache_type']}", highlight=False)
    for name, key, show in (("lemonslice", "lemonslice", _print_ours), ("llama.cpp", "llama_cpp", _print_llama)):
        if doc[key]["refused"]:
            out.print(f"{name}: refused: {doc[key]['refused']}", highlight=False)
        else:
            show(doc)


def _print_ours(doc: dict[str, Any]) -> None:
    ls = doc["lemonslice"]
    t = Table(title=f"lemonslice ({ls['mode']} load)", title_justify="left")
    t.add_column("part")
    t.add_column("bytes", justify="right")
    for k, v in ls["parts"].items():
        t.add_row(k, _human(v))
    t.add_row("peak", _human(ls["peak"]), style="bold")
    _print_table(t)
    if ls["expert_cache"] is not None:
        out.print(f"resident tensors: {ls['resident_tensors']}; expert cache {_human(ls['expert_cache'])}; read per "
                  f"token: at most {_human(ls['read_per_token'])}", highlight=False)
    out.print("  " + " ".join(ls["run"]), highlight=False, soft_wrap=True)
    out.print("  " + " ".join(ls["serve"]), highlight=False, soft_wrap=True)


def _print_llama(doc: dict[str, Any]) -> None:
    t = Table(title="llama.cpp", title_justify="left")
    for c in ("device", "buffers", "peak", "budget"):
        t.add_column(c, justify="right" if c in ("peak", "budget") else "left")
    for d in doc["llama_cpp"]["devices"]:
        bufs = ", ".join(f"{k} {_human(v)}" for k, v in d["buffers"].items() if v)
        t.add_row(d["name"], bufs, _human(d["peak"]), "-" if d["budget"] is None else _human(d["budget"]))
    _print_table(t)
    out.print("  " + " ".join(doc["llama_cpp"]["argv"]), highlight=False, soft_wrap=True)
    for n in doc["llama_cpp"]["notes"]:
        out.print(f"note: {n}", highlight=False)
