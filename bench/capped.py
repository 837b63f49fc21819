"""lemonslice against llama.cpp under memory caps, each run in a fresh cgroup-v1 memory cgroup
(page cache included) from a cold page cache, on the Qwen3.5-35B-A3B-shaped Q4_K_M file.

    sudo .venv/bin/python bench/capped.py                          # 40 layers, caps 2,4,8 GiB, both variants
    sudo .venv/bin/python bench/capped.py --layers 4 --vocab 32000 --caps 1.5 --variants uniform
    sudo .venv/bin/python bench/capped.py --layers 8 --caps none,2 --engines lemonslice   # lossless check
    .venv/bin/python bench/capped.py --calibrate --layers 8 --vocab 32000 --skews 0,1,2
    .venv/bin/python bench/capped.py --clean                       # remove the built files

The model (`lemonslice.testing.write_large_random`, built once under --workdir) comes in two
routing variants: "uniform", the random router as written (close to uniform routing, the worst
case for an expert cache), and "skewed", whose router rows are scaled (`router_skew`) so that a
per-layer LRU cache of 64 of 256 experts hits about 65% and one of 128 about 80% in decode.

Each (variant, cap) runs `lemonslice run FILE --prompt-ids IDS -n N+1 --threads T --stats-json`
(no --max-memory unless passed: the engine finds the cgroup's limit) and llama.cpp
(llama-cpp-python's low-level API through bench/engine.py's worker: mmap, no extra buffer types,
F32 KV cache, the same ids, N greedy decode forwards). Cap "none" runs in a cgroup without a
limit (the full-load reference for the lossless check). Every run reports the cgroup's peak
memory, its OOM kills, the disk bytes read meanwhile (/proc/diskstats: keep the machine quiet)
and wall time. After a variant's runs, its routing is traced on the same ids (teacher forcing,
outside any cgroup) and the LRU hit curve of that routing is printed.

lemonslice's --stats-json keys used when present: expert_hits, expert_lookups,
decode_bytes_read, decode_compute_seconds, decode_read_seconds, decode_wait_seconds; otherwise
decode bytes come from /proc/diskstats samples over the decode window and the rest print '-'.
Results go to --out (JSON), lemonslice's and llama.cpp's output to logs/ beside it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

RESULT = "BENCH-RESULT "
STEP = "BENCH-STEP "
# router_skew of the skewed variant: `--calibrate --layers 8 --vocab 32000 -n 64` gave LRU hits of
# 64.2% (64 of 256 experts per layer) and 80.2% (128) with it, 66.1% and 80.3% over 16 tokens.
SKEW = 0.9
CURVE_SIZES = (16, 32, 64, 128, 192)
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
_DISK = re.compile(r"^(vd[a-z]+|sd[a-z]+|nvme[0-9]+n[0-9]+|xvd[a-z]+)$")
GiB = 1 << 30


# ---- routing: record it, and what an LRU expert cache would hit -------------------------------


def lru_hit_rates(trace: dict[int, np.ndarray], n_prompt: int, sizes=CURVE_SIZES) -> dict[int, float]:
    """Hit rate of a per-layer LRU cache of each size over routing `trace` (layer -> ids [T, k]),
    counted on the decode rows (from `n_prompt` on); the prompt's rows only warm the cache."""
    out = {}
    for size in sizes:
        hits = lookups = 0
        for rows in trace.values():
            cache: OrderedDict[int, None] = OrderedDict()
            for t, row in enumerate(rows.tolist()):
                for e in row:
                    hit = e in cache
                    if hit:
                        cache.move_to_end(e)
                    else:
                        cache[e] = None
                        if len(cache) > size:
                            cache.popitem(last=False)
                    if t >= n_prompt:
                        hits += hit
                        lookups += 1
        out[size] = hits / lookups if lookups else float("nan")
    return out


def format_curve(rates: dict[int, float]) -> str:
    return "  ".join(f"{size}: {100 * r:.1f}%" for size, r in rates.items())


class RouteRecorder:
    """Patches `MoE` so every routing call appends its expert ids [T, k] to `trace[layer]`.

    With `project`, routes as if each router's rows were orthogonal to `directions[layer]`
    (`project_routers`), a layer's direction being the mean router input of the first call that
    reaches it when it has none yet; with `skew`, as if the rows were scaled by `router_row_scales`.
    Either way the top-k is that of the file `build` would write, without writing it."""

    def __init__(self) -> None:
        self.trace: dict[int, list[np.ndarray]] = {}
        self.skew = 0.0
        self.project = False
        self.directions: dict[int, Any] = {}

    @contextmanager
    def installed(self) -> Iterator["RouteRecorder"]:
        from lemonslice.models import qwen35_layers as q

        init, route, rec = q.MoE.__init__, q.MoE.route, self

        def patched_init(self, args, bid, w, *rest, **kw):  # noqa: ANN001, ANN202
            init(self, args, bid, w, *rest, **kw)
            self._bench_layer = bid

        def patched_route(self, x):  # noqa: ANN001, ANN202
            w, ids = rec._route(self, x) if rec.skew or rec.project else route(self, x)
            rec.trace.setdefault(self._bench_layer, []).append(ids.cpu().numpy().copy())
            return w, ids

        q.MoE.__init__, q.MoE.route = patched_init, patched_route
        try:
            yield self
        finally:
            q.MoE.__init__, q.MoE.route = init, route

    def _route(self, moe: Any, x: Any) -> tuple[Any, Any]:
        import torch

        from lemonslice.ops import linear
        from lemonslice.testing.large import router_row_scales

        layer = moe._bench_layer
        logits = linear(x, moe.router).to(torch.float32)  # [T, X]
        if self.project:
            if layer not in self.directions:
                m = x.to(torch.float32).mean(0)  # [E]
                self.directions[layer] = m / m.norm()
            c = self.directions[layer]
            logits = logits - linear(c[None], moe.router).to(torch.float32) * (x.to(torch.float32) @ c)[:, None]
        if self.skew:
            logits = logits * torch.from_numpy(router_row_scales(logits.shape[-1], layer, self.skew))
        w, ids = logits.softmax(-1).topk(moe.args.n_expert_used, dim=-1)
        return w / w.sum(-1, keepdim=True), ids

    def take(self) -> dict[int, np.ndarray]:
        """The recorded routing, layer -> ids [T, k], and a fresh record."""
        if not self.trace:
            raise SystemExit("no routing was recorded: has MoE.route changed?")
        out = {layer: np.concatenate(parts) for layer, parts in sorted(self.trace.items())}
        self.trace = {}
        return out


def worker_trace(model: str, ids: list[int], n_layers: int, max_memory: int | None) -> dict:
    """Routing of `ids` in one teacher-forced forward through the first `n_layers` blocks (0: all;
    a block's routing depends only on the blocks before it, so a prefix gives it exactly)."""
    from lemonslice.engine import Engine, runtime

    rec = RouteRecorder()
    with rec.installed():
        engine = Engine(model, max_memory=max_memory, playlist=list(range(n_layers)) if n_layers else None)
        runtime.setup(threads=2, compact_heap=engine.streaming)
        engine.forward_hidden(ids)
    return {"routing": {str(k): v.tolist() for k, v in rec.take().items()}}


def worker_directions(model: str, ids: list[int], max_memory: int | None) -> dict:
    """Each layer's mean router input over `ids`, the routers before it already projected
    (what `project_routers` then removes from the file's routers)."""
    from lemonslice.engine import Engine, runtime

    rec = RouteRecorder()
    rec.project = True
    with rec.installed():
        engine = Engine(model, max_memory=max_memory)
        runtime.setup(threads=2, compact_heap=engine.streaming)
        engine.forward_hidden(ids)
    return {"directions": {str(k): v.tolist() for k, v in rec.directions.items()}}


def worker_calibrate(model: str, prompt: list[int], calib: list[int], n: int, skews: list[float]) -> dict:
    """For each skew, on a file written with centered weights and plain routers: the directions
    from `calib` (as `build` finds them), then greedy decoding of `n` tokens after `prompt` with
    the routers projected and scaled in memory; the LRU hit curve of its routing."""
    from lemonslice.engine import Engine, runtime

    rec = RouteRecorder()
    rec.project = True
    out = {}
    with rec.installed():
        engine = Engine(model)
        runtime.setup(threads=2)
        for skew in skews:
            t0 = time.perf_counter()
            rec.skew, rec.directions = skew, {}
            engine.reset()
            engine.forward_hidden(calib)
            rec.take()
            ids = engine.generate(prompt, n + 1)
            trace = rec.take()
            curve = lru_hit_rates(trace, len(prompt))
            curve16 = lru_hit_rates({k: v[: len(prompt) + 16] for k, v in trace.items()}, len(prompt))
            out[str(skew)] = {"curve": curve, "curve_16": curve16, "ids": ids, "s": time.perf_counter() - t0}
            print(f"skew {skew}: {format_curve(curve)} | first 16: {format_curve(curve16)} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return out


def worker_llama(model: str, prompt: list[int], n: int, threads: int) -> dict:
    """bench/engine.py's llama.cpp worker, with each llama_decode's time and disk reads printed
    as it ends (a run cut off by the timeout still tells its speed)."""
    import llama_cpp

    spec = importlib.util.spec_from_file_location("bench_engine", Path(__file__).with_name("engine.py"))
    assert spec is not None and spec.loader is not None
    engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine)
    decode = llama_cpp.llama_decode
    steps: list[tuple[float, int]] = []

    def timed_decode(ctx, batch):  # noqa: ANN001, ANN202
        d0, t0 = disk_read_bytes(), time.perf_counter()
        rc = decode(ctx, batch)
        steps.append((time.perf_counter() - t0, disk_read_bytes() - d0))
        print(STEP + json.dumps({"i": len(steps) - 1, "s": steps[-1][0], "read": steps[-1][1]}),
              file=sys.stderr, flush=True)
        return rc

    llama_cpp.llama_decode = timed_decode
    r = engine.worker_llama(model, prompt, n, threads, False)  # no repacked buffers (their AMX path crashes here)
    r["prefill_read_bytes"] = steps[0][1]
    r["decode_read_bytes"] = sum(read for _, read in steps[1:])
    return r


# ---- one command in a fresh memory cgroup ------------------------------------------------------


def disk_read_bytes() -> int:
    """Bytes read from whole disks since boot (machine-wide)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if len(f) > 5 and _DISK.match(f[2]):
            total += int(f[5]) * 512
    return total


class DiskSampler(threading.Thread):
    """(monotonic time, disk bytes read) every `period` seconds, to split a run's reads by phase."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period, self.samples, self.done = period, [(time.monotonic(), disk_read_bytes())], threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period):
            self.samples.append((time.monotonic(), disk_read_bytes()))

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.samples.append((time.monotonic(), disk_read_bytes()))

    def between(self, t0: float, t1: float) -> int:
        ts, bs = zip(*self.samples)
        return int(np.interp(t1, ts, bs) - np.interp(t0, ts, bs))


def run_in_cgroup(cmd: list[str], cap: int | None, log: Path, timeout: float) -> dict:
    """Run `cmd` in a new memory cgroup limited to `cap` bytes (None: no limit) after dropping the
    page cache; its output goes to `log`, each line stamped with the seconds since the start."""
    cg = CGROUP_V1 / f"lemonslice-capped.{os.getpid()}.{time.monotonic_ns()}"
    cg.mkdir()
    try:
        if cap is not None:
            (cg / "memory.limit_in_bytes").write_text(str(cap))
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        sampler = DiskSampler()
        sampler.start()
        t0 = time.monotonic()
        join = f'echo $$ > {cg}/cgroup.procs && exec "$@"'
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen(["sh", "-c", join, "sh", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, env=env)
        lines: list[tuple[float, str]] = []
        reader = threading.Thread(target=_copy_lines, args=(p, log, t0, lines), daemon=True)
        reader.start()
        timed_out = False
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        reader.join()
        t1 = time.monotonic()
        sampler.stop()
        oom = re.search(r"^oom_kill (\d+)", (cg / "memory.oom_control").read_text(), re.M)
        return {
            "rc": p.returncode, "timed_out": timed_out, "wall_s": t1 - t0, "cap": cap,
            "peak_bytes": int((cg / "memory.max_usage_in_bytes").read_text()),
            "failcnt": int((cg / "memory.failcnt").read_text()), "oom_kill": int(oom.group(1)) if oom else None,
            "disk_read_bytes": sampler.between(t0, t1), "lines": lines, "sampler": sampler, "t0": t0,
        }
    finally:
        for _ in range(50):  # the cgroup empties once the killed processes are reaped
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _copy_lines(p: subprocess.Popen, log: Path, t0: float, lines: list[tuple[float, str]]) -> None:
    with open(log, "w") as f:
        assert p.stdout is not None
        for raw in p.stdout:
            t = time.monotonic() - t0
            text = raw.decode("utf-8", "replace").rstrip("\n")
            lines.append((t, text))
            f.write(f"[{t:9.2f}] {text}\n")
            f.flush()


# ---- the runs ---------------------------------------------------------------------------------


def lemonslice_bin() -> str:
    here = Path(sys.executable).with_name("lemonslice")
    found = str(here) if here.exists() else shutil.which("lemonslice")
    if not found:
        sys.exit("lemonslice's command is not found beside this Python or on PATH: run with the project's venv")
    return found


def run_lemonslice(model: Path, cap: int | None, args: argparse.Namespace, prompt: list[int], tag: str) -> dict:
    stats_path = args.logdir / f"lemonslice-{tag}.stats.json"
    stats_path.unlink(missing_ok=True)
    cmd = [lemonslice_bin(), "run", str(model), "--prompt-ids", ",".join(map(str, prompt)), "-n", str(args.n + 1),
           "--threads", str(args.threads), "--stats-json", str(stats_path), *args.lemonslice_arg]
    if args.max_memory:
        cmd += ["--max-memory", args.max_memory]
    c = run_in_cgroup(cmd, cap, args.logdir / f"lemonslice-{tag}.log", args.timeout)
    r = _measured(c)
    gen = [(t, text) for t, text in c["lines"] if text.startswith("generated:")]
    if gen:
        r["ids"] = [int(x) for x in gen[-1][1].split(":", 1)[1].split()]
    if c["rc"] != 0 or not stats_path.exists():
        return r
    s = r["stats"] = json.loads(stats_path.read_text())
    r.update(prefill_s=s["prefill_seconds"], decode_tokens=s["decode_tokens"], decode_s=s["decode_seconds"])
    if "decode_bytes_read" in s:
        r["decode_read_bytes"], r["read_source"] = s["decode_bytes_read"], "engine"
    elif gen:
        # Decoding ends just before the ids are printed; machine-wide reads over that window.
        end = c["t0"] + gen[-1][0]
        r["decode_read_bytes"] = c["sampler"].between(end - r["decode_s"], end)
        r["read_source"] = "diskstats"
    if s.get("expert_lookups"):
        r["hit_rate"] = s["expert_hits"] / s["expert_lookups"]
    for key in ("compute", "read", "wait"):
        if f"decode_{key}_seconds" in s and r["decode_tokens"]:
            r[f"{key}_s_per_token"] = s[f"decode_{key}_seconds"] / r["decode_tokens"]
    return r


def run_llama(model: Path, cap: int | None, args: argparse.Namespace, prompt: list[int], tag: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "llama", "--model", str(model),
           "--threads", str(args.threads), "-n", str(args.n), "--prompt-ids", ",".join(map(str, prompt))]
    c = run_in_cgroup(cmd, cap, args.logdir / f"llama-{tag}.log", args.llama_timeout)
    r = _measured(c)
    res = [text for _, text in c["lines"] if text.startswith(RESULT)]
    steps = [json.loads(text[len(STEP):]) for _, text in c["lines"] if text.startswith(STEP)]
    if res:
        d = json.loads(res[-1][len(RESULT):])
        r.update(ids=d["ids"], load_s=d["load_s"], prefill_s=d["prefill_s"], decode_tokens=d["decode_tokens"],
                 decode_s=d["decode_s"], decode_read_bytes=d["decode_read_bytes"], read_source="diskstats")
    elif steps:  # cut off: the forwards that finished
        r.update(prefill_s=steps[0]["s"], decode_tokens=len(steps) - 1, decode_s=sum(x["s"] for x in steps[1:]),
                 decode_read_bytes=sum(x["read"] for x in steps[1:]), read_source="diskstats", partial=True)
    return r


def _measured(c: dict) -> dict:
    return {k: c[k] for k in ("rc", "timed_out", "wall_s", "cap", "peak_bytes", "failcnt", "oom_kill",
                              "disk_read_bytes")}


def run_worker(args: argparse.Namespace, kind: str, model: Path, ids: list[int], *extra: str) -> dict:
    """A trace or calibration worker, outside any cgroup; its stderr passes through."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--model", str(model),
           "--prompt-ids", ",".join(map(str, ids)), "-n", str(args.n), *extra]
    p = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    res = [ln for ln in p.stderr.splitlines() if ln.startswith(RESULT)]
    for ln in p.stderr.splitlines():
        if not ln.startswith(RESULT):
            print(f"  {kind}: {ln}", flush=True)
    if p.returncode != 0 or not res:
        sys.exit(f"{kind} worker failed (exit {p.returncode})")
    return json.loads(res[-1][len(RESULT):])


def trace_curve(args: argparse.Namespace, model: Path, prompt: list[int], ids: list[int]) -> dict:
    """The LRU hit curve of the file's routing on the prompt and the `ids` a run generated."""
    t0 = time.perf_counter()
    seq = prompt + ids[:-1]  # the last id is generated but never fed
    d = run_worker(args, "trace", model, seq, "--trace-layers", str(args.trace_layers),
                   "--trace-memory", str(args.trace_memory))
    trace = {int(k): np.asarray(v) for k, v in d["routing"].items()}
    curve = lru_hit_rates(trace, len(prompt))
    return {"layers": len(trace), "decode_tokens": len(seq) - len(prompt), "curve": curve,
            "seconds": time.perf_counter() - t0}


# ---- building the files -----------------------------------------------------------------------


def model_path(args: argparse.Namespace, variant: str) -> Path:
    skew = f"-skew{args.skew:g}" if variant == "skewed" else ""
    return args.workdir / f"qwen35moe-a3b-L{args.layers}-V{args.vocab}-{variant}{skew}.gguf"


def file_size(n_layer: int, n_vocab: int) -> int:
    from lemonslice.gguf.constants import FileType
    from lemonslice.gguf.writer import plan_file
    from lemonslice.testing import large_config, q4_k_m_tensors
    from lemonslice.testing.metadata import model_kv

    cfg = large_config(n_layer, n_vocab=n_vocab)
    specs = q4_k_m_tensors(cfg)
    return plan_file(model_kv(cfg, FileType.MOSTLY_Q4_K_M), [(t.name, t.shape, t.ggml_type) for t in specs]).size


def build(args: argparse.Namespace, variant: str) -> Path:
    """The variant's file, written once: zero-mean weights (`centered`: else every token routes to
    the same experts), routers scaled for "skewed", then ("uniform", "skewed") projected off each
    layer's mean router input, found by a forward pass over --calib-prompt ids ("raw": not)."""
    from lemonslice.testing import write_large_random
    from lemonslice.testing.large import project_routers

    path = model_path(args, variant)
    if path.exists():
        return path
    need = file_size(args.layers, args.vocab)
    free = shutil.disk_usage(args.workdir).free
    if free < need + (2 << 30):
        sys.exit(f"building {path.name} needs {need / 1e9:.1f} GB (+2 GB spare) under {args.workdir}, "
                 f"{free / 1e9:.1f} GB free: remove the other variant (--clean, or --remove-after)")
    print(f"building {path} ({need / 1e9:.1f} GB)…", flush=True)
    t0 = time.perf_counter()
    tmp = path.with_suffix(".partial.gguf")
    skew = args.skew if variant == "skewed" else 0.0
    write_large_random(tmp, args.layers, n_vocab=args.vocab, router_skew=skew, centered=True)
    print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    if variant != "raw":
        t1 = time.perf_counter()
        calib = make_prompt(args, args.seed + 1, args.calib_prompt)
        d = run_worker(args, "directions", tmp, calib, "--trace-memory", str(args.trace_memory))
        project_routers(tmp, {int(k): np.asarray(v) for k, v in d["directions"].items()})
        print(f"  routers projected in {time.perf_counter() - t1:.0f} s", flush=True)
    os.replace(tmp, path)
    return path


# ---- report -----------------------------------------------------------------------------------

HEAD = (f"{'engine':10} {'variant':8} {'cap':>5} {'decode tok/s':>12} {'prefill s':>9} {'MB read/tok':>11} "
        f"{'hit %':>6} {'compute/read/wait ms/tok':>24} {'peak MiB':>8} {'OOM':>3} {'wall s':>7} {'x llama':>7}  note")


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table_row(r: dict, llama: dict | None, ref_ids: list[int] | None) -> str:
    tps = r["decode_tokens"] / r["decode_s"] if r.get("decode_s") else None
    r["decode_tps"] = tps
    per_tok = r["decode_read_bytes"] / r["decode_tokens"] / 1e6 if r.get("decode_tokens") else None
    cwr = "/".join(_f(r.get(f"{k}_s_per_token") and 1e3 * r[f"{k}_s_per_token"], ".0f") for k in ("compute", "read", "wait"))
    ratio = None
    if r["engine"] == "lemonslice" and llama and tps and llama.get("decode_tps"):
        ratio = tps / llama["decode_tps"]
    notes = []
    if r["timed_out"]:
        notes.append(f"timeout ({r['decode_tokens'] if r.get('decode_tokens') is not None else 0} decode forwards done)")
    elif r["rc"] != 0:
        notes.append(f"exit {r['rc']}" + (" (killed)" if r["rc"] < 0 else ""))
    if r.get("read_source") == "diskstats" and r["engine"] == "lemonslice":
        notes.append("reads from diskstats")
    if ref_ids is not None and r.get("ids") is not None and r["engine"] == "lemonslice" and r["cap_label"] != "none":
        diff = next((i for i, (a, b) in enumerate(zip(r["ids"], ref_ids)) if a != b), None)
        notes.append("ids = uncapped" if diff is None and len(r["ids"]) == len(ref_ids) else f"ids differ at {diff}")
    return (f"{r['engine']:10} {r['variant']:8} {r['cap_label']:>5} {_f(tps, '.3f'):>12} {_f(r.get('prefill_s'), '.1f'):>9} "
            f"{_f(per_tok, '.0f'):>11} {_f(r.get('hit_rate') and 100 * r['hit_rate'], '.1f'):>6} {cwr:>24} "
            f"{r['peak_bytes'] / 2**20:>8.0f} {_f(r['oom_kill'], 'd'):>3} {r['wall_s']:>7.0f} {_f(ratio, '.1f'):>7}  "
            f"{'; '.join(notes)}")


def parse_cap(text: str) -> tuple[str, int | None]:
    """'none', a number of GiB, or a size with a unit (512MiB, 1.5GiB, 2GB)."""
    text = text.strip()
    if text == "none":
        return text, None
    units = {"": GiB, "MIB": 2**20, "GIB": GiB, "MB": 10**6, "GB": 10**9}
    num = text.rstrip("KMGiBkmgib ")
    unit = text[len(num):].strip().upper()
    if unit not in units:
        raise argparse.ArgumentTypeError(f"bad cap {text}")
    return text, int(float(num) * units[unit])


def make_prompt(args: argparse.Namespace, seed: int | None = None, n: int | None = None) -> list[int]:
    rng = random.Random(args.seed if seed is None else seed)  # ids from 1000 up: ordinary tokens
    return [rng.randrange(1000, args.vocab - 3) for _ in range(args.prompt if n is None else n)]


def calibrate(args: argparse.Namespace) -> None:
    model = build(args, "raw")
    prompt = make_prompt(args)
    calib = make_prompt(args, args.seed + 1, args.calib_prompt)
    print(f"calibrating on {model.name}: prompt {len(prompt)} ids, {args.n} decode tokens, routers projected "
          f"and scaled in memory; LRU hits per layer for {', '.join(map(str, CURVE_SIZES))} experts", flush=True)
    d = run_worker(args, "calibrate", model, prompt, "--skews", args.skews, "--calib-ids", ",".join(map(str, calib)))
    for skew, v in d.items():
        print(f"skew {skew:>5}: {format_curve({int(k): x for k, x in v['curve'].items()})}")
    args.out.write_text(json.dumps({"calibration": d, "model": str(model), "prompt": prompt}, indent=1))


def bench(args: argparse.Namespace, caps: list[tuple[str, int | None]]) -> None:
    prompt = make_prompt(args)
    results: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "prompt": prompt,
                               "runs": [], "curves": {}}
    print(f"{args.layers} layers, vocab {args.vocab}, {args.threads} threads, prompt {args.prompt} ids, "
          f"{args.n} decode tokens; caps {', '.join(c for c, _ in caps)}", flush=True)
    for variant in args.variants:
        model = build(args, variant)
        print(HEAD, flush=True)
        ref_ids = None
        for label, cap in caps:
            llama = None
            tag = f"{variant}-{label}"
            for engine in sorted(args.engines, key=lambda e: e != "llama"):  # llama first: the ratio
                r = (run_llama if engine == "llama" else run_lemonslice)(model, cap, args, prompt, tag)
                r.update(engine=engine, variant=variant, cap_label=label)
                if engine == "lemonslice" and label == "none":
                    ref_ids = r.get("ids")
                print(table_row(r, llama, ref_ids), flush=True)
                llama = r if engine == "llama" else llama
                results["runs"].append(r)
                args.out.write_text(json.dumps(results, indent=1))
        ids = next((r["ids"] for r in results["runs"] if r["variant"] == variant and r.get("ids")), None)
        if args.trace and ids:
            c = results["curves"][variant] = trace_curve(args, model, prompt, ids)
            print(f"{variant}: LRU hits per layer over {c['layers']} layers, {c['decode_tokens']} decode tokens "
                  f"({c['seconds']:.0f} s to trace): {format_curve(c['curve'])}", flush=True)
            args.out.write_text(json.dumps(results, indent=1))
        if args.remove_after:
            model.unlink()
    print(f"results: {args.out}; logs: {args.logdir}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-capped"), help="where the files are built")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: WORKDIR/capped-results.json)")
    ap.add_argument("--layers", type=int, default=40, help="trunk layers (about 0.53 GB each)")
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--caps", default="2,4,8", help="GiB (or 512MiB, 2GB...), comma-separated; 'none': no limit")
    ap.add_argument("--variants", default="uniform,skewed")
    ap.add_argument("--engines", default="lemonslice,llama")
    ap.add_argument("--skew", type=float, default=SKEW, help="router_skew of the skewed variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32, help="prompt ids")
    ap.add_argument("-n", type=int, default=16, help="decode tokens (forwards after the prefill)")
    ap.add_argument("--seed", type=int, default=0, help="of the prompt's ids")
    ap.add_argument("--max-memory", default=None, help="passed to lemonslice run (default: none, the cgroup's limit)")
    ap.add_argument("--lemonslice-arg", action="append", default=[], help="one more argument for lemonslice run")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per lemonslice run")
    ap.add_argument("--llama-timeout", type=float, default=900, help="seconds per llama.cpp run")
    ap.add_argument("--no-trace", dest="trace", action="store_false", help="skip the routing trace and hit curve")
    ap.add_argument("--trace-layers", type=int, default=0, help="trace the first N layers (0: all)")
    ap.add_argument("--trace-memory", type=int, default=4 * GiB, help="weight budget of the trace run, bytes")
    ap.add_argument("--remove-after", action="store_true", help="delete each variant's file after its runs")
    ap.add_argument("--clean", action="store_true", help="remove the built files under --workdir and stop")
    ap.add_argument("--calibrate", action="store_true",
                    help="print the LRU hit curve of the uniform file with routers scaled by each of --skews")
    ap.add_argument("--skews", default="0,0.8,1,1.2")
    ap.add_argument("--calib-prompt", type=int, default=64, help="ids whose mean router inputs are projected off")
    # worker mode
    ap.add_argument("--worker", choices=["llama", "trace", "directions", "calibrate"], help=argparse.SUPPRESS)
    ap.add_argument("--calib-ids", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        ids = [int(t) for t in args.prompt_ids.split(",")]
        if args.worker == "llama":
            r = worker_llama(args.model, ids, args.n, args.threads)
        elif args.worker == "trace":
            r = worker_trace(args.model, ids, args.trace_layers, args.trace_memory)
        elif args.worker == "directions":
            r = worker_directions(args.model, ids, args.trace_memory)
        else:
            calib = [int(t) for t in args.calib_ids.split(",")]
            r = worker_calibrate(args.model, ids, calib, args.n, [float(s) for s in args.skews.split(",")])
        print(RESULT + json.dumps(r), file=sys.stderr, flush=True)
        return
    if os.geteuid() != 0 and not (args.clean or args.calibrate):
        sys.exit("bench/capped.py needs root: it makes memory cgroups and drops the page cache (run it with sudo)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out = args.out or args.workdir / ("capped-calibration.json" if args.calibrate else "capped-results.json")
    args.logdir = args.out.parent / "logs"
    args.logdir.mkdir(parents=True, exist_ok=True)
    if args.clean:
        for f in args.workdir.glob("qwen35moe-a3b-*.gguf"):
            print(f"removing {f}")
            f.unlink()
        return
    if args.calibrate:
        calibrate(args)
        return
    args.variants = [v.strip() for v in args.variants.split(",")]
    args.engines = [e.strip() for e in args.engines.split(",")]
    if bad := [v for v in args.variants if v not in ("uniform", "skewed")] + \
            [e for e in args.engines if e not in ("lemonslice", "llama")]:
        sys.exit(f"unknown variant or engine: {', '.join(bad)}")
    caps = [parse_cap(c) for c in args.caps.split(",")]
    if not (CGROUP_V1 / "memory.limit_in_bytes").exists():
        sys.exit(f"bench/capped.py needs the cgroup-v1 memory controller at {CGROUP_V1}")
    if "llama" in args.engines and args.layers < 4:
        sys.exit("llama.cpp needs a full-attention layer: use --layers >= 4 (or --engines lemonslice)")
    bench(args, caps)


if __name__ == "__main__":
    main()
