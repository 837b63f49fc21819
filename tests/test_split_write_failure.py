"""A write that fails midway (disk full, file-size limit) leaves no new set behind."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from lemonslice.testing import tiny_qwen35moe, write_synthetic

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))


def _limit_file_size() -> None:
    # Writes past 64 KiB fail with EFBIG, as they would on a full disk with ENOSPC.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_split_failing_write_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_synthetic(src, tiny_qwen35moe(mtp=True))
    before = src.read_bytes()
    out = tmp_path / "split"
    r = subprocess.run(
        [LEMONSLICE, "split", str(src), str(out)], capture_output=True, text=True, preexec_fn=_limit_file_size
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "File too large" in lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]
    assert src.read_bytes() == before


def test_split_with_existing_set_keeps_it_when_write_fails(tmp_path: Path) -> None:
    src = tmp_path / "tiny.gguf"
    write_synthetic(src, tiny_qwen35moe())
    out = tmp_path / "split"
    subprocess.run([LEMONSLICE, "split", str(src), str(out)], check=True, capture_output=True)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    r = subprocess.run(
        [LEMONSLICE, "split", "--force", str(src), str(out)], capture_output=True, text=True,
        preexec_fn=_limit_file_size,
    )
    assert r.returncode != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split", "tiny.gguf"]
