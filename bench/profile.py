"""Where a token's time goes: time per op class for decode tokens and one prefill chunk.

    python bench/profile.py --gguf gemma --threads 2                 # the real Gemma 3 270M
    python bench/profile.py --layers 8 --vocab 248320                # real-shape qwen35moe
    python bench/profile.py --dense --layers 8 --vocab 248320        # real-shape dense qwen35
    python bench/profile.py --gguf gemma --exact --json prof.json    # float activations

The model is fully loaded (the bench models are built by bench/engine.py under --workdir).
Every op class is timed by wrapping the functions model code calls (quantized linear by
weight type, routed-expert linears, the MoE's routing/gather/combine, attention with RoPE
and its cache, the DeltaNet conv and delta rule, norms, embedding, LM head, sampling);
the time of an inner timed call is taken off its caller, so classes add up. What is left of
the measured wall time is Python and the small torch ops between them ("other").
The wrappers add about a microsecond per call, so "other" is slightly overstated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))


class OpTimer:
    """Exclusive time and calls per label, for the wrapped functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._child: list[float] = []
        self.in_moe = False

    def wrap(self, fn: Callable, label: Callable[..., str] | str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            name = label if isinstance(label, str) else label(*args, **kwargs)
            self._child.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.seconds[name] += dt - self._child.pop()
                self.calls[name] += 1
                if self._child:
                    self._child[-1] += dt

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument(timer: OpTimer) -> None:
    """Wrap the op functions where model code looks them up (module globals, class methods)."""
    from lemonslice.models import common, gemma3, qwen35, qwen35_layers

    def linear_label(prefix: str) -> Callable[..., str]:
        def label(x: Any, w: Any) -> str:
            kind = "linear in MoE" if timer.in_moe and prefix == "linear" else prefix
            return f"{kind} {w.ggml_type.name}"
        return label

    # Names looked up with hasattr: the script also profiles older trees (before/after tables).
    for mod in (qwen35_layers, gemma3, qwen35):
        mod.linear = timer.wrap(mod.linear, linear_label("linear"))
    common.linear = timer.wrap(common.linear, linear_label("lm head"))
    for mod in (qwen35_layers, gemma3, common):
        mod.rms_norm = timer.wrap(mod.rms_norm, "rms norm")
    for mod in (qwen35_layers, gemma3):
        mod.attend_each = timer.wrap(mod.attend_each, "attention (rope, cache, sdpa)")
    if hasattr(qwen35_layers, "swiglu_experts"):
        qwen35_layers.swiglu_experts = timer.wrap(qwen35_layers.swiglu_experts, "experts (swiglu, one call)")
    qwen35_layers.GatedDeltaNet._recur = timer.wrap(qwen35_layers.GatedDeltaNet._recur, "deltanet conv, norms")
    if hasattr(qwen35_layers, "pick_rule"):
        qwen35_layers.pick_rule = lambda T, pick=qwen35_layers.pick_rule: timer.wrap(pick(T), "deltanet rule")
    else:
        for name in ("delta_rule_recurrent", "delta_rule_chunked"):
            setattr(qwen35_layers, name, timer.wrap(getattr(qwen35_layers, name), "deltanet rule"))
    common.SharedWeights.embed = timer.wrap(common.SharedWeights.embed, "embedding")
    moe_call = qwen35_layers.MoE.__call__

    def moe(self: Any, x: Any) -> Any:
        timer.in_moe = True
        try:
            return moe_call(self, x)
        finally:
            timer.in_moe = False

    qwen35_layers.MoE.__call__ = timer.wrap(moe, "moe route/gather/combine")


def profile(model: str, prompt: list[int], n: int, threads: int, exact: bool) -> dict:
    from lemonslice.engine import Engine, runtime
    from lemonslice.engine.sampling import Sampler, SamplingParams

    engine = Engine(model)
    if exact:
        runtime.setup(threads=threads, exact=True)
    else:
        runtime.setup(threads=threads)
    timer = OpTimer()
    instrument(timer)
    sampler = Sampler(SamplingParams(temperature=0.0))
    sample = timer.wrap(sampler.sample, "sampling")
    compute = engine.compute
    engine.generate(prompt, 2)  # warm up: kernels built, first-call allocations of this size made

    result: dict[str, Any] = {}
    state = compute.new_state()
    timer.reset()
    t0 = time.perf_counter()
    logits = compute.forward([state], [prompt], logits="last")[0]
    tok = sample(logits[-1])
    result["prefill"] = _table(timer, time.perf_counter() - t0, len(prompt))
    timer.reset()
    t0 = time.perf_counter()
    for _ in range(n):
        logits = compute.forward([state], [[tok]], logits="last")[0]
        tok = sample(logits[-1])
    result["decode"] = _table(timer, time.perf_counter() - t0, n)
    return result


def _table(timer: OpTimer, wall: float, tokens: int) -> dict:
    rows = {k: {"ms": 1e3 * v, "calls": timer.calls[k]} for k, v in timer.seconds.items()}
    rows["other (python, small torch ops)"] = {"ms": 1e3 * (wall - sum(timer.seconds.values())), "calls": 0}
    return {"wall_ms": 1e3 * wall, "tokens": tokens, "ops": rows}


def show(phase: str, t: dict) -> None:
    per = t["tokens"]
    print(f"\n{phase}: {t['tokens']} tokens, {t['wall_ms']:.1f} ms, {t['tokens'] / t['wall_ms'] * 1e3:.2f} tok/s")
    print(f"  {'op class':34} {'ms/token':>9} {'share':>7} {'calls/token':>12}")
    for name, r in sorted(t["ops"].items(), key=lambda kv: -kv[1]["ms"]):
        print(f"  {name:34} {r['ms'] / per:>9.3f} {r['ms'] / t['wall_ms']:>7.1%} {r['calls'] / per:>12.1f}")


def main() -> None:
    import engine as bench_engine  # bench/engine.py: the bench models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_engine.add_model_args(ap, layers=8, vocab=248320)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prefill chunk length")
    ap.add_argument("-n", type=int, default=16, help="decode tokens")
    ap.add_argument("--exact", action="store_true", help="float activations (the default rounds them to 8 bits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the tables here")
    args = ap.parse_args()
    if args.prompt < 1 or args.n < 1:
        sys.exit("error: --prompt and -n must be >= 1")
    model, _, _ = bench_engine.build(args)
    rng = random.Random(args.seed)
    vocab = args.vocab
    if args.gguf:  # ids inside the file's vocabulary (Gemma's is 262144; an issue-24 bench file's may be small)
        from lemonslice.gguf.reader import GGUFReader

        with GGUFReader(model) as r:
            vocab = min(200_000, r.tensor_map["token_embd.weight"].shape[1])
    prompt = [rng.randrange(1000, vocab - 3) for _ in range(args.prompt)]
    print(f"model: {model}, {args.threads} threads, {'exact' if args.exact else '8-bit'} activations")
    result = profile(str(model), prompt, args.n, args.threads, args.exact)
    for phase in ("prefill", "decode"):
        show(phase, result[phase])
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")  # renamed into place: never half-written
        tmp.write_text(json.dumps({"model": str(model), "threads": args.threads, "exact": args.exact, **result},
                                  indent=1))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
