"""The sweep command: RYS layer-repeat search scored on probe suites."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
)
from rich.table import Table

from ..errors import LemonsliceError
from ._app import _VERIFY_HELP, _check_model, _default_budget, _human, _parse_size, app, err, out


def _parse_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if m is None:
        raise LemonsliceError(f"--range must look like 8-31 (layers i to j, inclusive), got {text!r}")
    return int(m.group(1)), int(m.group(2))


class _Progress:
    """An items bar with elapsed time and ETA on stderr, plus one line per finished configuration
    (the only output when stderr is not a terminal, e.g. a log file)."""

    def __init__(self, n_todo: int) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            "eta", TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal,
        )
        self.task = self.bar.add_task("sweep", total=None)
        self.t0 = time.monotonic()
        self.done = self.total = self.rows = 0
        self.n_todo = n_todo

    def item(self, done: int, total: int, label: str) -> None:
        self.done, self.total = done, total
        self.bar.update(self.task, completed=done, total=total, description=f"sweep {label}")

    def row(self, row: dict) -> None:
        self.rows += 1
        elapsed = time.monotonic() - self.t0
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        scores = ", ".join(
            f"{p} {v:.4g}" + ("" if row["config"] == "baseline" else f" ({row['delta'][p]:+.3g})")
            for p, v in row["scores"].items())
        self.bar.console.print(
            f"[{self.rows}/{self.n_todo}] {row['config']}: {scores}; {row['seconds']:.0f} s, eta {_duration(left)}",
            markup=False, highlight=False)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _check_options(limit: Optional[int], threads: Optional[int], prompt_style: str) -> None:
    if limit is not None and limit < 1:
        raise LemonsliceError(f"--limit must be >= 1, got {limit}")
    if threads is not None and threads < 1:
        raise LemonsliceError(f"--threads must be >= 1, got {threads}")
    if prompt_style not in ("auto", "chat", "completion"):
        raise LemonsliceError(f"--prompt-style must be auto, chat or completion, got {prompt_style}")


@app.command()
def sweep(
    model: Path = typer.Argument(..., help="A .gguf file or a split directory."),
    outdir: Optional[Path] = typer.Option(
        None, "-o", "--output", metavar="OUTDIR", help="Results directory (required); rerun with it to resume."),
    old_outdir: Optional[Path] = typer.Option(None, "--out", hidden=True),  # the spelling before -o/--output
    block: int = typer.Option(8, "--block", help="Layers per repeated block."),
    stride: int = typer.Option(4, "--stride", help="Step between block starts."),
    layer_range: Optional[str] = typer.Option(
        None, "--range", metavar="I-J",
        help="Blocks lie within layers I..J, inclusive like --layers (default: all layers)."),
    probes: str = typer.Option(
        "math,eq,reasoning", "--probes", help="Comma-separated built-in suite names or JSONL paths."),
    thinking: bool = typer.Option(False, "--thinking/--no-thinking", help="Let the chat template open a think block."),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", help="Reply length cap (default: math 24, reasoning 24, eq 48; 1024 with --thinking)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N items of each suite."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help="Jinja chat template file to use."),
    prompt_style: str = typer.Option(
        "auto", "--prompt-style",
        help="chat (the chat template), completion ('Question: …\\nAnswer:' for base models) or auto: chat when "
        "the GGUF carries a chat template, else completion."),
    max_memory: Optional[str] = typer.Option(
        None, "--max-memory", help="Weight budget, e.g. 2GB; a larger model is streamed a layer at a time."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads."),
    verify: bool = typer.Option(False, "--verify", help=_VERIFY_HELP),
) -> None:
    """Score the baseline and every repeated block i-j (inclusive, as `--layers "repeat i-j"`) on probe
    suites; writes CSV, JSON and heatmaps."""
    from ..engine import Engine, WeightStore, runtime
    from ..eval import ChatPrompter, chat_template_for, load_suites, make_config, run_sweep
    from ..text.tokenizer import Tokenizer

    outdir = outdir or old_outdir
    if outdir is None:
        raise LemonsliceError("give the results directory: -o/--output OUTDIR")

    # Cheap checks first: bad probe files or options fail before the model is loaded.
    suites = load_suites(probes)
    rng = _parse_range(layer_range) if layer_range is not None else None
    _check_options(limit, threads, prompt_style)
    budget = _parse_size(max_memory) if max_memory else _default_budget()[0]
    _check_model(model, verify)
    # The tokenizer first: its build scratch then does not stack on top of the weights.
    store = WeightStore(model)
    tokenizer = Tokenizer.from_gguf(store.metadata)
    engine = Engine(store, max_memory=budget)
    runtime.setup(threads=threads, compact_heap=engine.streaming)  # process-wide: once, here
    template = chat_template_for(engine.store.metadata, str(chat_template) if chat_template else None,
                                 style=prompt_style)
    prompter = ChatPrompter(tokenizer, template, thinking=thinking)
    config = make_config(engine, suites, prompter, block=block, stride=stride, layer_range=rng,
                         limit=limit, max_new_tokens=max_new_tokens)
    n_cand = len(config.candidates())
    mode = "streaming" if engine.streaming else "full load"
    err.print(f"{engine.args.arch}: {engine.args.n_layer} layers, {_human(engine.weight_bytes)} of weights, {mode}; "
              f"{n_cand - 1} blocks + baseline, {sum(p['items'] for p in config.probes)} items each; "
              f"template: {template.origin}", highlight=False)

    interval = getattr(engine.args, "full_attention_interval", None)
    if interval and block % interval:
        # The runtime playlist keeps every block's own kind; a written GGUF needs the per-layer key.
        err.print(f"note: --block {block} is not a multiple of full_attention_interval={interval}; `surgery` "
                  "writes such a playlist with its per-layer recurrent_layers key", highlight=False)

    def resumed(done: int, total: int) -> None:
        err.print(f"resuming {outdir}: {done} of {total} configurations already done", highlight=False)
        bar.n_todo = total - done

    bar = _Progress(n_cand)
    try:
        with bar.bar:
            rows = run_sweep(engine, suites, prompter, config, outdir, progress=bar.item, on_resume=resumed,
                             on_row=bar.row)
    except KeyboardInterrupt:
        # Unlike the file commands, a sweep keeps what it finished: say so instead of "nothing was written".
        err.print(f"interrupted; finished configurations are saved in {outdir}: rerun the same command to resume",
                  highlight=False)
        raise typer.Exit(130) from None
    _print_rows(rows, [p["name"] for p in config.probes])
    out.print(f"results: {outdir / 'results.csv'}, {outdir / 'results.json'}; heatmaps: {outdir}/heatmap_*.png")


def _print_rows(rows: list[dict], probes: list[str]) -> None:
    table = Table("config", "layers", *probes, "s")
    for r in rows:
        cells = []
        for p in probes:
            delta = r["delta"].get(p, 0.0)
            cells.append(f"{r['scores'][p]:.4g}" + ("" if r["config"] == "baseline" else f" ({delta:+.3g})"))
        table.add_row(r["config"], str(r["n_layers"]), *cells, f"{r['seconds']:.0f}")
    out.print(table)
