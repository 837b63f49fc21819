"""Splitting a multi-GB file keeps peak memory small: measured on the split process itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lemonslice.testing import write_large_random

RSS_LIMIT = 150 * 1024 * 1024


def test_split_of_4gb_file_stays_under_150mb(tmp_path: Path) -> None:
    src = tmp_path / "big.gguf"
    write_large_random(src, n_layer=7)  # real 35B-A3B shapes
    assert src.stat().st_size >= 4 * 10**9
    cli = Path(sys.executable).with_name("lemonslice")
    p = subprocess.Popen([str(cli), "split", str(src), str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    stderr = p.stderr.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    peak = usage.ru_maxrss * 1024
    assert peak < RSS_LIMIT, f"split peaked at {peak / 2**20:.0f} MiB"
    assert len(list((tmp_path / "out").glob("layer_*.gguf"))) == 7
