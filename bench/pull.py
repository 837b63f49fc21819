"""`lemonslice pull` against `curl` fetching the same files from the same `serve-layers`.

One server (`lemonslice serve-layers SPLIT` on 127.0.0.1) serves a real-shape split; each round
fetches every file into an empty directory twice: with `lemonslice pull -j N` (hashes as it
writes, fsyncs each file, checks every sha256, renames into place) and with one
`curl --parallel --parallel-max N` holding as many connections, followed by `sync` of what it
wrote, since pull's files are durable when it returns. With `--cache cold` (root) the page
cache is dropped before every run, so the server reads the split from disk each time; `hot`
leaves it warm. Pull's peak RSS is its VmHWM from /proc, read until it exits. Every
downloaded copy is removed at the end.

    python bench/pull.py --split /tmp/lemonslice-bench-engine/qwen35moe-a3b-L8-V248320-X256.split
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_SPLIT = Path("/tmp/lemonslice-bench-engine/qwen35moe-a3b-L8-V248320-X256.split")
LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/stats", timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("serve-layers did not start")
            time.sleep(0.1)


def vmhwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_polled(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes: VmHWM, polled until the process exits) of a command."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, vmhwm_kb(p.pid) or 0)
        time.sleep(0.02)
    wall = time.perf_counter() - t
    _, err = p.communicate()
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {err.strip()}")
    return wall, peak * 1024


def run_curl(url: str, names: list[str], dst: Path, connections: int) -> tuple[float, float]:
    """(wall seconds of curl alone, of curl then sync of its files)."""
    dst.mkdir(parents=True)
    cmd = ["curl", "--silent", "--show-error", "--no-progress-meter", "--fail",
           "--parallel", "--parallel-max", str(connections)]
    for n in names:
        cmd += ["-o", str(dst / n), f"{url}/{n}"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    fetched = time.perf_counter() - t
    subprocess.run(["sync", *(str(dst / n) for n in names)], check=True)
    return fetched, time.perf_counter() - t


def one_round(r: int, args: argparse.Namespace, url: str, names: list[str],
              size: int) -> tuple[float, int, float, float]:
    """(pull's wall, its peak RSS, curl's wall, curl + sync's wall) into empty directories; the
    order alternates between rounds, so neither always runs first."""
    got: dict[str, tuple] = {}
    for what in (("pull", "curl") if r % 2 == 0 else ("curl", "pull")):
        dst = args.workdir / what
        shutil.rmtree(dst, ignore_errors=True)
        if args.cache == "cold":
            drop_caches()
        if what == "pull":
            got[what] = run_polled([args.lemonslice, "pull", url, str(dst), "-j", str(args.connections)])
        else:
            got[what] = run_curl(url, names, dst, args.connections)
            if sum((dst / n).stat().st_size for n in names) != size:
                sys.exit("curl fetched the wrong number of bytes")
        shutil.rmtree(dst, ignore_errors=True)
    (wall, peak), (fetched, synced) = got["pull"], got["curl"]
    print(f"round {r + 1}: pull {wall:6.2f} s ({size / wall / 1e9:.2f} GB/s, peak RSS {peak / 1e6:.0f} MB); "
          f"curl {fetched:6.2f} s, curl + sync {synced:6.2f} s ({size / synced / 1e9:.2f} GB/s)", flush=True)
    return wall, peak, fetched, synced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", type=Path, default=DEFAULT_SPLIT, help="split directory to serve")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lemonslice-bench-pull"))
    ap.add_argument("--connections", "-j", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", choices=["cold", "hot"], default="cold")
    ap.add_argument("--lemonslice", default=LEMONSLICE, help="the lemonslice executable to time")
    args = ap.parse_args()
    if not (args.split / "manifest.json").is_file():
        sys.exit(f"{args.split} is not a split directory (python bench/engine.py builds the default one)")
    if args.cache == "cold" and os.geteuid() != 0:
        sys.exit("--cache cold needs root to drop the page cache; use --cache hot")
    if shutil.which("curl") is None:
        sys.exit("curl is not installed")
    names = [f["name"] for f in json.loads((args.split / "manifest.json").read_text())["files"]]
    size = sum((args.split / n).stat().st_size for n in names)
    print(f"{args.split}: {len(names)} files, {size / 1e9:.2f} GB; {os.cpu_count()} CPUs; "
          f"{args.connections} connections; {args.cache} page cache", flush=True)
    start_wall, start_peak = run_polled([args.lemonslice, "--version"])
    print(f"lemonslice start-up (--version): {start_wall:.2f} s, peak RSS {start_peak / 1e6:.0f} MB", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = open(args.workdir / "serve-layers.log", "w")
    server = subprocess.Popen([LEMONSLICE, "serve-layers", str(args.split), "--port", str(port)],
                              stdout=log, stderr=log)
    try:
        wait_up(url, server)
        results = [one_round(r, args, url, names, size) for r in range(args.rounds)]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        for what in ("pull", "curl"):
            shutil.rmtree(args.workdir / what, ignore_errors=True)
    p, c, cs = (statistics.median(x[i] for x in results) for i in (0, 2, 3))
    peak = max(x[1] for x in results)
    print(f"median: pull {p:.2f} s, curl {c:.2f} s, curl + sync {cs:.2f} s; pull's speed is "
          f"{cs / p:.2f}x curl + sync's ({c / p:.2f}x curl alone); pull peak RSS {peak / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
