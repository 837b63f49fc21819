"""Speed and memory against context depth: lemonslice and llama.cpp side by side in one run.

    python bench/context.py --gguf gemma --depths 512,2048,8192,32768
    python bench/context.py --layers 8 --vocab 248320 --depths 32768 -n 8     # real-shape qwen35moe
    python bench/context.py --gguf gemma --cache-type f16 --png ctx.png

At each depth D, each engine (in its own subprocess, peak RSS measured) prefills D random
prompt tokens, then decodes N more, one forward each (greedy). Both use the same file and
thread count; llama.cpp runs with its defaults for context work (f16 KV cache unless
--cache-type says otherwise, flash attention chosen by llama.cpp, 512-token micro-batches,
repacked weights unless --no-repack). lemonslice uses --cache-type for its keys and
values. The KV memory of each is printed: lemonslice's from its caches after the run,
llama.cpp's from the "KV buffer size" lines of its load log.

Writes a table, --json (results) and --png (decode and prefill tok/s against depth).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import LLAMA_KV, RESULT, add_model_args, build, worker_llama  # noqa: E402



def worker_lemonslice(model: str, prompt: list[int], n: int, threads: int, cache_type: str) -> dict:
    from lemonslice.engine import Engine, runtime
    from lemonslice.models.caches import AttentionCache

    runtime.setup(threads=threads, kv_types=(cache_type, cache_type))
    t0 = time.perf_counter()
    engine = Engine(model)
    load_s = time.perf_counter() - t0
    ids = engine.generate(prompt, n + 1)  # the first token comes out of the prefill
    s = engine.stats
    kv = sum(c.nbytes for c in engine.state.caches if isinstance(c, AttentionCache))
    return {"load_s": load_s, "prefill_s": s.prefill_seconds, "decode_s": s.decode_seconds,
            "decode_tokens": s.decode_tokens, "ids": ids, "kv_bytes": kv}


def run_worker(kind: str, model: Path, args: argparse.Namespace, prompt: list[int]) -> dict:
    from lemonslice.testing.measure import measure

    with tempfile.NamedTemporaryFile("w", suffix=".ids") as ids:  # 32K ids are too long for argv
        ids.write(",".join(map(str, prompt)))
        ids.flush()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--model", str(model),
               "--threads", str(args.threads), "-n", str(args.n), "--cache-type", args.cache_type,
               *(["--no-repack"] if args.no_repack else []), "--prompt-ids", ids.name]
        m = measure(cmd)
    lines = [ln for ln in m.stderr.splitlines() if ln.startswith(RESULT)]
    if m.returncode != 0 or not lines:
        sys.exit(f"{kind} worker failed (exit {m.returncode}):\n{m.stderr.strip()[-3000:]}")
    r = {**json.loads(lines[-1][len(RESULT):]), "peak_rss": m.peak_rss}
    r["prefill_tps"] = len(prompt) / r["prefill_s"]
    r["decode_tps"] = r["decode_tokens"] / r["decode_s"] if r["decode_s"] else 0.0
    return r


def plot(results: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    from lemonslice.slicing.atomic import staged_output

    fig = Figure(figsize=(10, 4))
    for ax, rate in zip(fig.subplots(1, 2), ("decode_tps", "prefill_tps")):
        for engine, by_depth in results.items():
            depths = sorted(by_depth, key=int)
            ax.plot([int(d) for d in depths], [by_depth[d][rate] for d in depths], marker="o",
                    label="llama.cpp" if engine == "llama" else engine)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context depth (tokens)")
        ax.set_ylabel(rate.replace("_tps", " tok/s"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with staged_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, layers=8, vocab=248320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default="512,2048,8192,32768", help="prompt lengths, comma-separated")
    ap.add_argument("-n", type=int, default=16, help="decode tokens at each depth")
    ap.add_argument("--cache-type", choices=list(LLAMA_KV), default="f16", help="KV cache type of both engines")
    ap.add_argument("--only", choices=["lemonslice", "llama"], action="append", help="run only these engines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-repack", action="store_true",
                    help="llama.cpp without its repacked weight buffers (whose AMX path crashes on some Xeons)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--worker", choices=["lemonslice", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        prompt = [int(t) for t in Path(args.prompt_ids).read_text().split(",")]
        if args.worker == "lemonslice":
            r = worker_lemonslice(args.model, prompt, args.n, args.threads, args.cache_type)
        else:  # repacked weights: this CPU runs them (bench/engine.py races both)
            r = worker_llama(args.model, prompt, args.n, args.threads, not args.no_repack, args.cache_type)
        print(RESULT + json.dumps(r), file=sys.stderr, flush=True)
        return

    model, _, _ = build(args)
    depths = [int(d) for d in args.depths.split(",")]
    vocab = 200_000 if args.gguf else args.vocab
    rng = random.Random(args.seed)
    longest = [rng.randrange(1000, vocab - 3) for _ in range(max(depths))]
    engines = [e for e in ("lemonslice", "llama") if not args.only or e in args.only]
    print(f"model: {model}; {args.threads} threads; KV cache {args.cache_type}; decode {args.n} tokens per depth")
    print(f"{'depth':>6} {'engine':11} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MB':>12} "
          f"{'KV MB':>8}  first tokens", flush=True)
    results: dict[str, dict[str, dict]] = {e: {} for e in engines}
    for d in depths:
        for e in engines:
            r = run_worker(e, model, args, longest[:d])
            results[e][str(d)] = r
            print(f"{d:>6} {e:11} {r['prefill_tps']:>14.2f} {r['decode_tps']:>13.3f} {r['peak_rss'] / 1e6:>12.0f} "
                  f"{r['kv_bytes'] / 2**20:>8.1f}  {' '.join(map(str, r['ids'][:4]))}", flush=True)
        if len(engines) == 2:
            a, b = results["lemonslice"][str(d)], results["llama"][str(d)]
            print(f"{d:>6} lemonslice / llama.cpp: decode {a['decode_tps'] / b['decode_tps']:.3f}x, prefill "
                  f"{a['prefill_tps'] / b['prefill_tps']:.3f}x, peak RSS {a['peak_rss'] / b['peak_rss']:.2f}x",
                  flush=True)
    for e in engines:
        by = results[e]
        lo, hi = str(min(depths)), str(max(depths))
        if lo != hi:
            print(f"{e}: decode at {hi} / at {lo}: {by[hi]['decode_tps'] / by[lo]['decode_tps']:.3f}")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps({"model": str(model), "threads": args.threads, "cache_type": args.cache_type,
                                   "results": results}, indent=1))
        os.replace(tmp, args.json)
    if args.png:
        plot(results, args.png, f"{model.name}, {args.threads} threads, KV {args.cache_type}")
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
