"""Splitting a multi-GB file keeps peak memory small: measured on the split process itself."""

from __future__ import annotations

import sys
from pathlib import Path

from lemonslice.testing import write_large_random
from lemonslice.testing.measure import measure

RSS_LIMIT = 150 * 1024 * 1024


def test_split_of_4gb_file_stays_under_150mb(tmp_path: Path) -> None:
    src = tmp_path / "big.gguf"
    write_large_random(src, n_layer=7)  # real 35B-A3B shapes
    assert src.stat().st_size >= 4 * 10**9
    cli = Path(sys.executable).with_name("lemonslice")
    m = measure([str(cli), "split", str(src), str(tmp_path / "out")])
    assert m.returncode == 0, m.stderr
    assert m.peak_rss < RSS_LIMIT, f"split peaked at {m.peak_rss / 2**20:.0f} MiB"
    assert len(list((tmp_path / "out").glob("layer_*.gguf"))) == 7


def test_measure_does_not_inherit_the_callers_size() -> None:
    ballast = bytearray(600 << 20)  # the caller grows well past the limit
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    m = measure([sys.executable, "-c", "pass"])
    assert m.returncode == 0
    assert m.peak_rss < 100 << 20
