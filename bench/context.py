"""Speed and memory against context depth: lemonslice and llama.cpp side by side in one run.

    python bench/context.py --gguf gemma --depths 512,2048,8192,32768
    python bench/context.py --layers 8 --vocab 248320 --depths 32768 -n 8     # real-shape qwen35moe
    python bench/context.py --gguf gemma --cache-type f16 --png ctx.png

A thin wrapper over `lemonslice.eval.bench` (what `lemonslice bench` runs) that adds peak RSS:
at each depth D, each engine runs in a process of its own (peak RSS measured), prefills D
random prompt ids, then decodes N more, one forward each (greedy). Both use the same file and
thread count; llama.cpp runs with its defaults for context work (flash attention chosen by
llama.cpp, 512-token micro-batches, repacked weights unless --no-repack) and both with
--cache-type for keys and values. The KV memory of each is printed: lemonslice's from its
caches after the run, llama.cpp's from the "KV buffer size" lines of its load log.

Writes a table, --json (results) and --png (decode and prefill tok/s against depth).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import add_model_args, build  # noqa: E402

from lemonslice.eval import bench as eb  # noqa: E402
from lemonslice.eval.llama_bench import KV_TYPES  # noqa: E402


def measured_run(kind: str, spec: eb.BenchSpec) -> dict:
    """The engine's one depth row, with the peak RSS of its process."""
    from lemonslice.testing.measure import measure

    peaks: list[int] = []

    def launch(argv: list[str]) -> tuple[int, str]:
        m = measure(argv)
        peaks.append(m.peak_rss)
        return m.returncode, m.stderr

    row = eb.run_worker(kind, spec, launch)[0]
    return {**row, "peak_rss": peaks[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, layers=8, vocab=248320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default="512,2048,8192,32768", help="prompt lengths, comma-separated")
    ap.add_argument("-n", type=int, default=16, help="decode tokens at each depth")
    ap.add_argument("--cache-type", choices=list(KV_TYPES), default="f16", help="KV cache type of both engines")
    ap.add_argument("--only", choices=list(eb.ENGINES), action="append", help="run only these engines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-repack", action="store_true",
                    help="llama.cpp without its repacked weight buffers (whose AMX path crashes on some Xeons)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()

    model, _, _ = build(args)
    depths = [int(d) for d in args.depths.split(",")]
    vocab = eb.vocab_size(model)
    engines = [e for e in eb.ENGINES if not args.only or e in args.only]
    print(f"model: {model}; {args.threads} threads; KV cache {args.cache_type}; decode {args.n} tokens per depth")
    print(f"{'depth':>6} {'engine':11} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MB':>12} {'KV MB':>8}",
          flush=True)
    rows: list[dict] = []
    for d in depths:
        # One depth per process: the peak RSS is that depth's (its ids are a prefix of the longest's).
        spec = eb.make_spec(str(model), vocab, [d], 0, args.n, args.threads, seed=args.seed,
                            cache_type=args.cache_type, llama_repack=not args.no_repack)
        here = {e: measured_run(e, spec) for e in engines}
        rows += here.values()
        for e, r in here.items():
            print(f"{d:>6} {e:11} {r['prefill_tps']:>14.2f} {r['decode_tps']:>13.3f} {r['peak_rss'] / 1e6:>12.0f} "
                  f"{r['kv_bytes'] / 2**20:>8.1f}", flush=True)
        if len(here) == 2:
            a, b = here["lemonslice"], here["llama"]
            print(f"{d:>6} lemonslice / llama.cpp: decode {a['decode_tps'] / b['decode_tps']:.3f}x, prefill "
                  f"{a['prefill_tps'] / b['prefill_tps']:.3f}x, peak RSS {a['peak_rss'] / b['peak_rss']:.2f}x",
                  flush=True)
    for e in engines:
        mine = [r for r in rows if r["engine"] == e]
        if len(mine) > 1:
            print(f"{e}: decode at {mine[-1]['x']} / at {mine[0]['x']}: "
                  f"{mine[-1]['decode_tps'] / mine[0]['decode_tps']:.3f}")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps({"model": str(model), "threads": args.threads, "cache_type": args.cache_type,
                                   "rows": rows}, indent=1))
        os.replace(tmp, args.json)
    if args.png:
        eb.plot(rows, "depth", args.png, f"{model.name}, {args.threads} threads, KV {args.cache_type}")
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
