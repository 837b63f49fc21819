"""Per-type speed of the quantized linear: one 2048x2048 weight, one activation row.

    python bench/kernels.py                      # every type, 2 threads, best of 3 runs
    python bench/kernels.py --types Q2_K IQ4_XS  # some types
    python bench/kernels.py --exact              # float activations (LEMONSLICE_EXACT=1)

Each type's weight is random floats through llama.cpp's own quantizer (an importance matrix of
ones where llama.cpp needs one); F32/F16/BF16 are the floats themselves. A run times `linear` on
one row for about `--seconds` and keeps the median call; the table shows the best run's ms per
product and GB/s of weight bytes read (the weight's bytes divided by that time).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lemonslice.gguf.constants import GGMLType
from lemonslice.ops import QuantWeight, linear, set_exact

TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "F32", "F16", "BF16", "Q2_K", "Q3_K", "MXFP4", "IQ4_NL", "IQ4_XS",
         "IQ3_S", "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]
N = 2048


def weight(name: str, rows: np.ndarray) -> QuantWeight:
    """The rows as a `name` weight, written by llama.cpp's quantizer."""
    t = GGMLType[name]
    if t == GGMLType.F32:
        raw = rows.view(np.uint8)
    elif t == GGMLType.F16:
        raw = rows.astype(np.float16).view(np.uint8)
    elif t == GGMLType.BF16:
        raw = (rows.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        from lemonslice.surgery.quantizer import quantize_rows, requires_imatrix

        imatrix = np.ones(rows.shape[1], np.float32) if requires_imatrix(int(t)) else None
        raw = quantize_rows(rows, int(t), imatrix)
    return QuantWeight(torch.from_numpy(np.ascontiguousarray(raw)), t, (rows.shape[1], rows.shape[0]))


def time_one(w: QuantWeight, x: torch.Tensor, seconds: float) -> float:
    """Median seconds per product over about `seconds` of calls (the median, not the mean: on a
    shared machine a preempted thread stalls a call by a whole time slice now and then)."""
    linear(x, w)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        linear(x, w)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--exact", action="store_true", help="float activations instead of 8-bit ones")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    set_exact(args.exact)
    rows = np.random.default_rng(0).standard_normal((N, N)).astype(np.float32)
    x = torch.randn(1, N, generator=torch.Generator().manual_seed(0))
    print(f"{'type':8} {'ms/product':>10} {'GB/s':>7}")
    for name in args.types:
        w = weight(name, rows)
        best = min(time_one(w, x, args.seconds) for _ in range(args.runs))
        print(f"{name:8} {best * 1e3:10.3f} {w.raw.numel() / best / 1e9:7.2f}", flush=True)


if __name__ == "__main__":
    main()
