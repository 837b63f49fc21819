"""What a KV-cache type costs in quality: perplexity and mean KL divergence against an f32 cache.

    python bench/kv_quality.py --gguf gemma --ctx 8192 --windows 1

Each window of --ctx tokens is scored as llama-perplexity scores it (the first half builds the
state, each token of the second half is predicted from all before it). lemonslice runs one
sequence per cache type on the same weights, in lockstep, and compares each type's
next-token distribution with the f32 cache's: KL(p_f32 || p_type), averaged over the scored
tokens. llama.cpp (low-level API, same file, same token ids) does the same with its own f32
and q8_0 caches (flash attention on, which its quantized V cache needs).

The text is the licence texts Debian ships in /usr/share/common-licenses (English prose, on
every Debian machine), unless --text names files.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import LLAMA_KV, add_model_args, build  # noqa: E402

import torch  # noqa: E402

CHUNK = 256  # scored positions per forward
_keep_log_callback = None


class Score:
    """Running NLL of the targets and KL divergence against the f32 reference."""

    def __init__(self) -> None:
        self.nll, self.kl, self.n = 0.0, 0.0, 0

    def add(self, logp: torch.Tensor, ref_logp: torch.Tensor, targets: torch.Tensor) -> None:
        """logp, ref_logp [n, V] log-probabilities; targets [n]."""
        self.nll -= float(logp.gather(1, targets[:, None]).double().sum())
        self.kl += float((ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum())
        self.n += targets.shape[0]

    def result(self) -> dict:
        return {"ppl": math.exp(self.nll / self.n), "mean_kl": self.kl / self.n, "tokens": self.n}


def lemonslice_scores(model: Path, windows: list[list[int]], types: list[str], threads: int,
                      exact: bool = False) -> dict:
    from lemonslice.engine import Engine, runtime
    from lemonslice.models.caches import set_kv_types

    runtime.setup(threads=threads, exact=exact)
    engine = Engine(model)
    scores = {t: Score() for t in ["f32", *types]}
    for ids in windows:
        states = {}
        for t in scores:
            set_kv_types(t, t)
            states[t] = engine.new_state()
        half = len(ids) // 2
        engine.forward_batch(list(states.values()), [ids[:half]] * len(states))
        for s in range(half, len(ids) - 1, CHUNK):
            part = ids[s : min(s + CHUNK, len(ids) - 1)]
            targets = torch.tensor(ids[s + 1 : s + 1 + len(part)])
            out = engine.forward_batch(list(states.values()), [part] * len(states), logits="all")
            logps = {t: torch.log_softmax(o.float(), -1) for t, o in zip(states, out)}
            for t in scores:
                scores[t].add(logps[t], logps["f32"], targets)
            print(f"  lemonslice: {s + len(part) - half}/{len(ids) - 1 - half} scored", end="\r", flush=True)
    print()
    return {t: sc.result() for t, sc in scores.items()}


def llama_scores(model: Path, windows: list[list[int]], types: list[str], threads: int) -> dict:
    import llama_cpp
    import numpy as np

    log: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        log.append(text.decode("utf-8", "replace"))

    global _keep_log_callback
    _keep_log_callback = on_log
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    m = llama_cpp.llama_model_load_from_file(str(model).encode(), mp)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(m))
    ctx_len = len(windows[0])
    scores = {t: Score() for t in ["f32", *types]}
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    for ids in windows:
        ctxs = {}
        for t in scores:
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = ctx_len, 512, 512, 1
            cp.n_threads = cp.n_threads_batch = threads
            cp.type_k = cp.type_v = LLAMA_KV[t]
            cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            ctxs[t] = llama_cpp.llama_init_from_model(m, cp)
            if not ctxs[t]:
                raise SystemExit(f"llama.cpp could not make a {t} context: {''.join(log)[-2000:]}")

        def run(ctx: object, part: list[int], pos0: int, want: bool) -> np.ndarray | None:
            batch.n_tokens = len(part)
            for i, tok in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos0 + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = want
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise SystemExit(f"llama_decode failed at {pos0}")
            if not want:
                return None
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(part), n_vocab)).copy()

        half = len(ids) // 2
        for s in range(0, half, 512):
            for c in ctxs.values():
                run(c, ids[s : min(s + 512, half)], s, False)
        for s in range(half, len(ids) - 1, CHUNK):
            part = ids[s : min(s + CHUNK, len(ids) - 1)]
            targets = torch.tensor(ids[s + 1 : s + 1 + len(part)])
            logps = {t: torch.log_softmax(torch.from_numpy(run(c, part, s, True)), -1) for t, c in ctxs.items()}
            for t in scores:
                scores[t].add(logps[t], logps["f32"], targets)
            print(f"  llama.cpp: {s + len(part) - half}/{len(ids) - 1 - half} scored", end="\r", flush=True)
        print()
        for c in ctxs.values():
            llama_cpp.llama_free(c)
    return {t: sc.result() for t, sc in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, layers=8, vocab=248320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--types", default="f16,bf16,q8_0", help="lemonslice's cache types besides f32")
    ap.add_argument("--llama-types", default="q8_0", help="llama.cpp's cache types besides f32")
    ap.add_argument("--text", type=Path, nargs="*", default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--exact", action="store_true", help="lemonslice with float activations")
    ap.add_argument("--only-lemonslice", action="store_true")
    args = ap.parse_args()

    from lemonslice.text.tokenizer import Tokenizer
    from lemonslice.engine import WeightStore

    model, _, _ = build(args)
    files = args.text or sorted(p for p in Path("/usr/share/common-licenses").iterdir() if not p.is_symlink())
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    with WeightStore(model) as store:
        tokens = Tokenizer.from_gguf(store.metadata).encode(text, add_special=True, parse_special=False)
    n = min(args.windows, len(tokens) // args.ctx)
    if n < 1:
        sys.exit(f"the text has {len(tokens)} tokens, fewer than --ctx {args.ctx}")
    windows = [tokens[w * args.ctx : (w + 1) * args.ctx] for w in range(n)]
    print(f"{model.name}: {len(tokens)} tokens of text, {n} window(s) of {args.ctx}, {args.threads} threads")
    t0 = time.perf_counter()
    ours = lemonslice_scores(model, windows, args.types.split(","), args.threads, args.exact)
    t1 = time.perf_counter()
    theirs = {} if args.only_lemonslice else llama_scores(model, windows, args.llama_types.split(","), args.threads)
    print(f"(lemonslice {t1 - t0:.0f} s, llama.cpp {time.perf_counter() - t1:.0f} s)")
    print(f"{'engine':11} {'KV type':8} {'perplexity':>11} {'mean KL vs f32':>15}")
    for name, res in (("lemonslice", ours), ("llama.cpp", theirs)):
        for t, r in res.items():
            print(f"{name:11} {t:8} {r['ppl']:>11.4f} {r['mean_kl']:>15.3e}")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps({"model": str(model), "ctx": args.ctx, "windows": n, "lemonslice": ours,
                                   "llama.cpp": theirs}, indent=1))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
