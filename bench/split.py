"""Split throughput against `cp` of the same file, side by side in one run.

Both sides make their output durable: `cp` is followed by `sync FILE`, and split fsyncs
each file before renaming its directory into place. With `--cache cold` (the default,
needs root) the page cache is dropped before every run, so both read the source from
disk, as they must for a model larger than free memory; `--cache hot` leaves it warm.

    python bench/split.py --size-gb 4 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from lemonslice.testing import write_large_random
from lemonslice.testing.measure import measure


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    m = measure(cmd)
    if m.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {m.stderr.strip()}")
    return m.wall_s, m.peak_rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0, help="smallest source size to build")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", choices=["cold", "hot", "both"], default="cold")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lemonslice-bench"))
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / "source.gguf"
    # One real-shape 35B-A3B layer is ~0.55 GB; shared tensors ~0.7 GB.
    n_layer = max(1, int((args.size_gb * 1e9 - 0.7e9) / 0.55e9) + 1)
    if not src.exists() or src.stat().st_size < args.size_gb * 1e9:
        print(f"building {src} with {n_layer} real-shape qwen35moe layers…", flush=True)
        write_large_random(src, n_layer=n_layer)
    size = src.stat().st_size
    lemonslice = str(Path(sys.executable).with_name("lemonslice"))
    cp_out, split_out = args.workdir / "cp.gguf", args.workdir / "split"
    modes = ["cold", "hot"] if args.cache == "both" else [args.cache]
    if "cold" in modes and os.geteuid() != 0:
        sys.exit("--cache cold needs root to drop the page cache; use --cache hot")

    print(f"source: {size / 1e9:.2f} GB, {os.cpu_count()} CPUs")
    print(f"{'cache':5} {'round':>5} {'cp s':>7} {'split s':>8} {'cp GB/s':>8} {'split GB/s':>10} {'ratio':>6} {'split RSS MB':>13}")
    for mode in modes:
        ratios, rss = [], []
        for i in range(args.rounds):
            for p in (cp_out, split_out):
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            if mode == "cold":
                drop_caches()
            t_cp, _ = timed(["sh", "-c", f"cp '{src}' '{cp_out}' && sync '{cp_out}'"])
            cp_out.unlink()
            if mode == "cold":
                drop_caches()
            t_split, peak = timed([lemonslice, "split", str(src), str(split_out)])
            shutil.rmtree(split_out)
            ratio = t_cp / t_split
            ratios.append(ratio)
            rss.append(peak)
            print(
                f"{mode:5} {i:>5} {t_cp:>7.2f} {t_split:>8.2f} {size / t_cp / 1e9:>8.2f} {size / t_split / 1e9:>10.2f} "
                f"{ratio:>6.2f} {peak / 1e6:>13.1f}",
                flush=True,
            )
        print(f"{mode}: median split/cp throughput ratio {statistics.median(ratios):.2f}, max split RSS {max(rss) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
