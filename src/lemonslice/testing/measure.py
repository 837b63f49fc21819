"""Peak memory of a command, measured so that the caller's own size does not leak in.

Linux carries a process's RSS high-water mark across exec, and a child forked (or
vforked) from a large process starts from the parent's. So the command is run as the
grandchild of a small launcher, whose fresh image is what the command is forked from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

_LAUNCHER = """
import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, ru = os.wait4(p.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": ru.ru_maxrss,
                  "wall_s": time.perf_counter() - t, "stderr": err.decode(errors="replace")}))
"""


@dataclass(frozen=True)
class Measured:
    returncode: int
    peak_rss: int  # bytes
    wall_s: float
    stderr: str


def measure(cmd: list[str]) -> Measured:
    """Run `cmd`; return its exit code, peak RSS, wall time and stderr."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True, check=True)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return Measured(d["rc"], d["maxrss_kb"] * 1024, d["wall_s"], d["stderr"])
