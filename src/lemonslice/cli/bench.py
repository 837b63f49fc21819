"""Measuring commands: `profile` (time and reads per layer) and `bench` (tok/s against context
depth and chat turn, lemonslice beside llama.cpp)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import LemonsliceError
from ..slicing.atomic import write_text
from ._app import _check_model, _default_budget, _human, _parse_size, app, err, out
from .run import _MEMORY_HELP, _MODEL_HELP, _THREADS_HELP, _open_engine


def _print_table(t: Table) -> None:
    """At its natural width: a pipe or a log file would otherwise get 80 columns."""
    from rich.measure import Measurement

    width = out.width
    if not out.is_terminal:
        out.width = max(width, Measurement.get(out, out.options.update_width(400), t).maximum)
    try:
        out.print(t)
    finally:
        out.width = width


def _positive(name: str, value: Optional[int], least: int = 1) -> None:
    if value is not None and value < least:
        raise LemonsliceError(f"{name} must be >= {least}, got {value}")


def _context_length(store: Any) -> int | None:
    from ..gguf.constants import Keys, arch_key

    n = store.metadata.get(arch_key(Keys.CONTEXT_LENGTH, store.arch or ""))
    return int(n) if n is not None else None


def _check_context(store: Any, need: int, what: str) -> None:
    limit = _context_length(store)
    if limit is not None and need > limit:
        raise LemonsliceError(f"{what} needs {need} positions, above the model's context length {limit}")


# ---- profile --------------------------------------------------------------------------------


def _profile_table(prof: Any) -> Table:
    t = Table(title="time and reads per layer (per token)", title_justify="left")
    for c in ("part", "role", "bytes", "decode ms", "prefill ms", "decode read", "prefill read",
              "expert hits/misses"):
        t.add_column(c, justify="left" if c in ("part", "role") else "right")
    for r in prof.rows:
        d, p = r.phases["decode"], r.phases["prefill"]
        hm = f"{d['expert_hits']}/{d['expert_misses']}" if d["expert_lookups"] else "-"
        t.add_row(r.part, r.role, _human(r.nbytes), f"{d['ms_per_token']:.3f}", f"{p['ms_per_token']:.3f}",
                  _human(int(d["bytes_read_per_token"])), _human(int(p["bytes_read_per_token"])), hm)
    return t


@app.command()
def profile(
    model: Path = typer.Argument(..., help=_MODEL_HELP),
    tokens: int = typer.Option(32, "--tokens", help="Decode tokens to time."),
    prompt: int = typer.Option(512, "--prompt", help="Prompt tokens (random ids) to prefill first."),
    json_out: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the profile as JSON."),
    png: Optional[Path] = typer.Option(None, "--png", metavar="FILE", help="Write a bar chart of time per layer."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help=_THREADS_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=_MEMORY_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt's random ids."),
) -> None:
    """Time every layer of a prefill and of decode tokens: role, bytes, ms per token, bytes read
    and expert-cache hits per layer (embedding and head too), against the measured time."""
    from ..engine import WeightStore
    from ..eval.bench import random_ids
    from ..eval.profile import plot_profile
    from ..eval.profile import profile as run_profile

    _positive("--tokens", tokens)
    _positive("--prompt", prompt)
    with WeightStore(model) as store:
        _check_context(store, prompt + tokens + 1, f"--prompt {prompt} with --tokens {tokens}")
    engine, _ = _open_engine(model, max_memory, threads)
    ids = random_ids(engine.n_vocab, prompt, random.Random(seed))
    prof = run_profile(engine, ids, tokens)
    _print_table(_profile_table(prof))
    for phase in ("decode", "prefill"):
        wall, parts = prof.per_token_ms(phase), prof.parts_ms(phase)
        out.print(f"{phase}: layers + embedding + head {parts:.3f} ms/token, measured {wall:.3f} ms/token "
                  f"({parts / wall:.1%}; {prof.tokens[phase]} tokens)", highlight=False)
    if json_out is not None:
        doc = {"model": str(model), "threads": threads, "max_memory": max_memory, **prof.to_json()}
        write_text(json_out, json.dumps(doc, indent=1) + "\n")
        err.print(f"wrote {json_out}", highlight=False)
    if png is not None:
        plot_profile(prof, png, f"{model.name}: {len(prof.rows) - 2} layers")
        err.print(f"wrote {png}", highlight=False)


# ---- bench ----------------------------------------------------------------------------------


def _parse_depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise LemonsliceError(f"--depths must be comma-separated token counts, e.g. 512,1024, got {text!r}") from None
    if not depths or min(depths) < 1:
        raise LemonsliceError(f"--depths must be positive token counts, e.g. 512,1024, got {text!r}")
    return depths


def _rate(row: Optional[dict], key: str) -> str:
    return f"{row[key]:.2f}" if row else "-"


def _bench_table(rows: list[dict], kind: str, engines: list[str]) -> Table:
    from ..eval.bench import LABELS, summary

    t = Table(title=f"tok/s by {kind}", title_justify="left")
    t.add_column(kind, justify="right")
    t.add_column("context", justify="right")
    for e in engines:
        t.add_column(f"{LABELS[e]} prefill", justify="right")
        t.add_column(f"{LABELS[e]} decode", justify="right")
    if len(engines) == 2:
        t.add_column("decode ratio", justify="right")
    for s in summary(rows, kind):
        cells = [str(s["x"]), str(s["context"])]
        for e in engines:
            cells += [_rate(s.get(e), "prefill_tps"), _rate(s.get(e), "decode_tps")]
        if len(engines) == 2 and s.get("llama", {}).get("decode_tps"):
            cells.append(f"{s['lemonslice']['decode_tps'] / s['llama']['decode_tps']:.2f}x")
        t.add_row(*cells)
    return t


def _bench_spec(model: Path, depths: list[int], turns: int, n: int, threads: int, user_tokens: int,
                max_memory: Optional[str], llama: bool, cache_type: str, seed: int) -> Any:
    from ..engine import WeightStore
    from ..eval.bench import make_spec, vocab_size
    from ..eval.llama_bench import KV_TYPES

    if cache_type not in KV_TYPES:
        raise LemonsliceError(f"--cache-type must be one of {', '.join(KV_TYPES)}, got {cache_type}")
    if llama and model.is_dir():
        raise LemonsliceError(f"--llama needs a .gguf file (llama.cpp cannot read a split directory); "
                              f"make one with: lemonslice merge {model} model.gguf")
    _check_model(model)
    budget = _parse_size(max_memory) if max_memory else _default_budget()[0]
    with WeightStore(model) as store:
        spec = make_spec(str(model), vocab_size(model), depths, turns, n, threads, user_tokens, seed,
                         cache_type=cache_type, max_memory=budget)
        _check_context(store, max(depths) + n + 1, f"depth {max(depths)} with -n {n}")
        _check_context(store, spec.n_ctx, f"{turns} turns of {user_tokens} + {n + 1} tokens")
    return spec


@app.command()
def bench(
    model: Path = typer.Argument(..., help=_MODEL_HELP),
    llama: bool = typer.Option(False, "--llama", help="Also run llama.cpp (llama-cpp-python) on the same file."),
    depths: str = typer.Option("512,1024,2048,4096,8192", "--depths", help="Context depths (prompt tokens)."),
    turns: int = typer.Option(5, "--turns", help="Turns of the multi-turn chat."),
    n: int = typer.Option(32, "-n", "--n-predict", help="Decode tokens at each depth and in each turn."),
    user_tokens: int = typer.Option(128, "--user-tokens", help="Tokens of each turn's user message."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads of both engines "
                                          "(default: the CPUs this process may use)."),
    cache_type: str = typer.Option("f16", "--cache-type", help="KV cache type of both engines: f16, f32, bf16, q8_0."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=_MEMORY_HELP),
    csv_out: Optional[Path] = typer.Option(None, "--csv", metavar="FILE", help="Write every row as CSV."),
    json_out: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the run as JSON."),
    png: Optional[str] = typer.Option(None, "--png", metavar="PREFIX",
                                      help="Write PREFIX-depth.png and PREFIX-turns.png (tok/s plots)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompt ids."),
) -> None:
    """Prompt and generation tok/s at each context depth and in each turn of a chat, each engine in
    its own process on the same file and threads."""
    import os

    from ..eval import bench as eb

    depth_list = _parse_depths(depths)
    _positive("--turns", turns)
    _positive("-n", n)
    _positive("--user-tokens", user_tokens)
    _positive("--threads", threads)
    threads = threads or len(os.sched_getaffinity(0))
    spec = _bench_spec(model, depth_list, turns, n, threads, user_tokens, max_memory, llama, cache_type, seed)
    engines = ["lemonslice", "llama"] if llama else ["lemonslice"]
    err.print(f"{model}: depths {', '.join(map(str, depth_list))}; {turns} turns of {user_tokens} user tokens; "
              f"{n} decode tokens each; {threads} threads; KV cache {cache_type}", highlight=False)
    rows: list[dict] = []
    for e in engines:
        err.print(f"running {eb.LABELS[e]}…", highlight=False)
        rows += eb.run_worker(e, spec)
    for kind in ("depth", "turn"):
        _print_table(_bench_table(rows, kind, engines))
    if csv_out is not None:
        eb.write_csv(rows, csv_out)
    if json_out is not None:
        eb.write_json(spec, rows, json_out)
    if png is not None:
        title = f"{model.name}, {threads} threads, KV {cache_type}"
        for kind, suffix in (("depth", "depth"), ("turn", "turns")):
            eb.plot(rows, kind, Path(f"{png}-{suffix}.png"), title)
    for path in [p for p in (csv_out, json_out) if p] + ([f"{png}-depth.png", f"{png}-turns.png"] if png else []):
        err.print(f"wrote {path}", highlight=False)
