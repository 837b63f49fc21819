"""Speculative decoding with the MTP head: acceptance and speed against plain greedy decoding,
for draft lengths K = 1..4, on a synthetic model built here (no download).

    python bench/mtp.py --threads 2 -n 64

The model is a synthetic qwen35moe (or --dense qwen35) with one MTP block, written once under
--workdir. A random MTP head would never be right, so the weights are shaped to give the head
something to predict: every block's output projections are scaled by --alpha, so each block
only nudges the residual stream and the next token depends mostly (not only) on the current
one; the MTP head's eh_proj passes its normed token embedding through and its head norm is
the trunk's output_norm, so it drafts what the trunk would say after the drafted token. Larger
--alpha makes the trunk more context-dependent and the drafts worse.

For each prompt, plain greedy decoding (`Engine.generate`) runs first, then
`lemonslice.engine.speculative.generate` for each K; the tokens must be identical. Reported:
drafted and accepted counts, the acceptance rate, trunk verify passes, tokens per pass, and
decode tokens/s with and without MTP (the first token comes out of the prefill in both, so
decode covers the other n-1 tokens).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

_OUT_KINDS = ("attn_output", "ssm_out", "ffn_down_exps", "ffn_down_shexp", "ffn_down")


def build(path: Path, args: argparse.Namespace) -> Path:
    """The synthetic model with an MTP block that drafts usefully (see the module doc)."""
    from lemonslice.gguf.writer import write_gguf
    from lemonslice.testing import encode_tensor, synthetic_tensors, tensor_values, tiny_qwen35, tiny_qwen35moe
    from lemonslice.testing.metadata import model_kv

    E = args.embd
    sizes = dict(
        mtp=True, n_layer=args.layers, n_embd=E, n_head=8, n_head_kv=2, head_dim=E // 8, rope_dim=E // 32,
        rope_sections=(E // 128, E // 256, E // 256, 0), ssm_d_state=E // 8, ssm_n_group=4, ssm_dt_rank=8,
        n_vocab=args.vocab, default_type=args.type, seed=args.seed,
    )
    if args.dense:
        cfg = tiny_qwen35(n_ff=4 * E, **sizes)
    else:
        cfg = tiny_qwen35moe(n_expert=args.experts, n_expert_used=4, n_ff_exp=E // 2, n_ff_shexp=E // 2, **sizes)
    specs = synthetic_tensors(cfg)
    values = {t.name: tensor_values(cfg, t.slot) for t in specs}
    for t in specs:
        v = values[t.name]
        if t.slot.kind in _OUT_KINDS:
            values[t.name] = v * args.alpha
        elif t.slot.kind == "nextn.eh_proj":
            v[:, :E] = np.eye(E, dtype=np.float32)  # [E, 2E]: keep the embedding half, drop the hidden half
            v[:, E:] = 0
        elif t.slot.kind == "nextn.shared_head_norm":
            values[t.name] = values["output_norm.weight"].copy()
    tmp = path.with_suffix(".tmp")
    write_gguf(tmp, model_kv(cfg), [(t.name, t.shape, t.ggml_type, encode_tensor(values[t.name], t.ggml_type))
                                    for t in specs])
    tmp.replace(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lemonslice-bench-mtp"))
    ap.add_argument("--layers", type=int, default=8, help="trunk layers")
    ap.add_argument("--embd", type=int, default=512, help="n_embd (a multiple of 256)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--type", default="Q8_0", help="type of the weight matrices")
    ap.add_argument("--dense", action="store_true", help="qwen35 (dense FFN) instead of qwen35moe")
    ap.add_argument("--alpha", type=float, default=0.02, help="scale of the blocks' output projections")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("-n", type=int, default=64, help="tokens to generate per prompt")
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each configuration; the fastest counts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.embd % 256:
        sys.exit("--embd must be a multiple of 256")

    import torch

    from lemonslice.engine import Engine
    from lemonslice.engine.speculative import generate

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    kind = "dense" if args.dense else f"moe-X{args.experts}"
    model = args.workdir / (f"mtp-{kind}-L{args.layers}-E{args.embd}-V{args.vocab}-{args.type}"
                            f"-a{args.alpha:g}-s{args.seed}.gguf")
    if not model.exists():
        print(f"building {model}…", flush=True)
        build(model, args)
    engine = Engine(model)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(256, args.vocab - 3) for _ in range(args.prompt)] for _ in range(args.prompts)]
    generate(engine, prompts[0][:4], 4, 1)  # warm-up: loads the MTP head
    engine.generate(prompts[0][:4], 4)
    print(f"model: {model.name} ({model.stat().st_size / 1e6:.1f} MB, {engine.args.arch}, "
          f"{engine.args.n_layer} layers + 1 MTP); {args.threads} threads; {args.prompts} prompts x "
          f"{args.prompt} tokens, {args.n} generated each", flush=True)

    # Per prompt, every configuration runs --repeat times, interleaved, and keeps its fastest
    # decode: a machine shared with other work then slows all of them alike, or none.
    ks = list(range(1, args.max_draft + 1))
    best: dict[int, list[float]] = {k: [] for k in [0, *ks]}  # K (0: plain) -> best decode seconds per prompt
    tokens = {k: 0 for k in best}
    counts = {k: [0, 0, 0] for k in ks}  # drafted, accepted, verify passes
    same = {k: True for k in ks}
    for p in prompts:
        times: dict[int, list[float]] = {k: [] for k in best}
        want = None
        for rep in range(args.repeat):
            for k in best:
                if k == 0:
                    want = engine.generate(p, args.n)
                    times[0].append(engine.stats.decode_seconds)
                    n_dec = engine.stats.decode_tokens
                else:
                    got, st = generate(engine, p, args.n, k)
                    times[k].append(st.decode_seconds)
                    n_dec = st.decode_tokens
                    same[k] &= got == want
                    if rep == 0:
                        counts[k] = [counts[k][0] + st.drafted, counts[k][1] + st.accepted, counts[k][2] + st.steps]
                if rep == 0:
                    tokens[k] += n_dec
        for k in best:
            best[k].append(min(times[k]))
    tps = {k: tokens[k] / sum(best[k]) for k in best}
    print(f"{'':10} {'drafted':>8} {'accepted':>9} {'accept %':>9} {'passes':>7} {'tok/pass':>9} "
          f"{'decode tok/s':>13} {'vs plain':>9}  same tokens")
    print(f"{'plain':10} {'':>8} {'':>9} {'':>9} {tokens[0]:>7} {1.0:>9.2f} {tps[0]:>13.2f} {1.0:>8.3f}x  -")
    for k in ks:
        drafted, accepted, steps = counts[k]
        print(f"{'MTP K=' + str(k):10} {drafted:>8} {accepted:>9} {100 * accepted / drafted:>8.1f}% {steps:>7} "
              f"{tokens[k] / steps:>9.2f} {tps[k]:>13.2f} {tps[k] / tps[0]:>8.3f}x  {same[k]}", flush=True)

if __name__ == "__main__":
    main()
