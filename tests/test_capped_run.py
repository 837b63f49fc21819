"""A run under a memory cap: the budget comes from the cgroup, nothing is OOM-killed, the
expert cache both hits and misses, and the tokens equal a full load's.

The model is a 600 MB qwen35moe with the real layer shapes, 4 layers of 64 experts and a
small vocabulary. As root, `lemonslice run` runs in a fresh cgroup-v1 memory cgroup of
1 GiB with no --max-memory (the budget is detected); otherwise with --max-memory 200MiB.
The full-load reference is another `lemonslice run` with a budget above the model's size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lemonslice.testing import write_large_random

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
PROMPT = "3,17,101,250,7,7,42,511,1000,2047,5,6"
N_NEW = 10
CAP = 1 << 30
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def _cgroup_ok() -> bool:
    return os.geteuid() == 0 and (CGROUP_ROOT / "memory.limit_in_bytes").exists()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("capped")
    yield write_large_random(d / "model.gguf", 4, n_vocab=8192, n_expert=64, centered=True)
    shutil.rmtree(d, ignore_errors=True)


def _run(model: Path, stats: Path, *extra: str, cgroup: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [LEMONSLICE, "run", str(model), "--prompt-ids", PROMPT, "-n", str(N_NEW), "--threads", "2",
           "--stats-json", str(stats), *extra]
    if cgroup is not None:
        # Enter the cgroup before exec, so the whole process (and its page cache) is charged.
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "_", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _ids(r: subprocess.CompletedProcess) -> list[int]:
    m = re.search(r"^generated: ([\d ]+)$", r.stdout, re.M)
    assert m, r.stdout + r.stderr
    return [int(t) for t in m.group(1).split()]


def test_capped_run_equals_full_load(model: Path, tmp_path: Path) -> None:
    full = _run(model, tmp_path / "full.json", "--max-memory", "100GB")
    assert full.returncode == 0 and "full load" in full.stderr, full.stderr
    if _cgroup_ok():
        cg = CGROUP_ROOT / f"lemonslice-test-{os.getpid()}"
        cg.mkdir()
        try:
            (cg / "memory.limit_in_bytes").write_text(str(CAP))
            capped = _run(model, tmp_path / "cap.json", cgroup=cg)
            peak = int((cg / "memory.max_usage_in_bytes").read_text())
            oom = (cg / "memory.oom_control").read_text()
        finally:
            cg.rmdir()
        assert "oom_kill 0" in oom
        assert peak <= CAP
        assert "cgroup limit 1.0 GiB" in capped.stderr, capped.stderr
    else:
        capped = _run(model, tmp_path / "cap.json", "--max-memory", "200MiB")
    assert capped.returncode == 0, capped.stderr
    print(f"\nFIGURE: {capped.stderr}")
    assert _ids(capped) == _ids(full)

    s = json.loads((tmp_path / "cap.json").read_text())
    size = model.stat().st_size
    assert s["streaming"] and s["budget"] < size
    # Resident tensors and the expert cache fit the budget; the cache both hit and missed.
    assert s["resident_bytes"] + s["expert_cache_bytes"] <= s["budget"]
    assert 0 < s["expert_hits"] < s["expert_lookups"]
    # 4 layers x 8 experts per decode step at most; each step looks up at least one per layer.
    steps = s["decode_tokens"]
    assert 4 * steps <= s["expert_lookups"] <= 4 * 8 * steps
    assert 0 < s["decode_bytes_read"] < size
