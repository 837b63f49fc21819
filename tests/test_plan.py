"""`lemonslice plan`, and what its predictions rest on, against independent references.

* llama.cpp's own buffer sizes, printed when llama-cpp-python loads a model and makes a context
  with llama-server's settings (swa_full off, one sequence, F16 K/V, 512-token micro-batches),
  are the reference for the llama.cpp plan's buffers.
* lemonslice's KV cache is worked out by hand from gguf-py's reading of Gemma's header and
  llama.cpp's per-layer sliding-window flags, and checked against the engine's caches after
  `reserve_context`.
* O_DIRECT reads of resident tensors equal gguf-py's tensor bytes, and so do the buffered reads
  the store falls back to.
* `run -c` (which claims the KV cache at the start) generates what `run` without it does.
* Bad input through the console script: one `error:` line and exit 1 (2 for an unknown flag).
* A cold run in a fresh cgroup-v1 memory cgroup peaks near the plan's prediction.

The cgroup test comes first: it wants a page cache as cold as possible, and later tests of this
file load torch and llama.cpp into the pytest process (a library that another process holds
mapped stays in memory through drop_caches and is charged to that process's cgroup, not to the
measured one). lemonslice and torch are therefore imported inside the tests.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from cli_util import one_line_error
from gguf_refs import GGUFPy

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
PROSE = ("The history of the telephone begins with the acoustic experiments of the early nineteenth century. "
         "Inventors in several countries tried to carry the human voice over a wire, and by the 1870s the race "
         "to patent a working device had become intense. Within a few decades exchanges linked whole cities, "
         "and the operator at the switchboard became a familiar figure.")
MIB = 1 << 20


def cli(*args: object) -> subprocess.Popen:
    """The console script, started (so that several can run at once); `done` waits for it."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.Popen([LEMONSLICE, *map(str, args)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def done(p: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def plan_json(model: Path, *args: object) -> dict:
    """`lemonslice plan MODEL ARGS --json`, parsed (each command line run once per session)."""
    return json.loads(_plan_json(str(model), tuple(map(str, args))))


@functools.lru_cache(maxsize=None)
def _plan_json(model: str, args: tuple[str, ...]) -> str:
    r = done(cli("plan", model, *args, "--json"))
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    """The tiny qwen35moe (8 layers: 6 Gated DeltaNet, 2 attention; 8 experts)."""
    from lemonslice.testing import tiny_qwen35moe, write_synthetic

    path = tmp_path_factory.mktemp("plan") / "moe.gguf"
    write_synthetic(path, tiny_qwen35moe())
    return path


@pytest.fixture(scope="module")
def gemma_py(gemma_path) -> GGUFPy:
    return GGUFPy(gemma_path)


# ---- 6. a cold run in a memory cgroup peaks where the plan says ------------------------------


@dataclass
class CgroupRun:
    rc: int
    stdout: str
    stderr: str
    peak: int  # memory.max_usage_in_bytes: RSS and page cache charged to the cgroup
    oom_kill: int


_serial = itertools.count()


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A fresh cgroup-v1 memory cgroup limited to `limit` bytes (page cache included); removed
    after (as ../shared/tools/capped.sh does)."""
    cg = CGROUP_ROOT / f"lemonslice-test-plan-{os.getpid()}-{next(_serial)}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        yield cg
    finally:
        for _ in range(50):  # the child has exited; its exit may take a moment to leave the cgroup
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run_capped(limit: int, cmd: list[str], cold: bool = True) -> CgroupRun:
    """`cmd` in a fresh memory cgroup, entered before exec so that all it maps and reads is
    charged there; with `cold`, after dropping the machine's clean page cache."""
    with memory_cgroup(limit) as cg:
        if cold:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3")
        wrapped = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "_", *cmd]
        r = subprocess.run(wrapped, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        peak = int((cg / "memory.max_usage_in_bytes").read_text())
        oom = re.search(r"^oom_kill (\d+)$", (cg / "memory.oom_control").read_text(), re.M)
    return CgroupRun(r.returncode, r.stdout, r.stderr, peak, int(oom[1]) if oom else 0)


def _holders_of_torch() -> list[int]:
    """Pids of processes that map torch's main library: its pages stay resident through
    drop_caches and are not charged to a new cgroup."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if "libtorch_cpu" in (d / "maps").read_text():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_cold_run_in_a_cgroup_peaks_as_planned(gemma_path, request):
    # A real cgroup: the test machine runs as root with a cgroup-v1 memory controller.
    assert os.geteuid() == 0 and (CGROUP_ROOT / "memory.limit_in_bytes").exists(), "needs root and cgroup-v1 memory"
    doc = plan_json(gemma_path, "-c", 4096)
    ours = doc["lemonslice"]
    assert ours["mode"] == "full" and ours["refused"] is None
    argv = ours["run"]
    assert argv[:3] == ["lemonslice", "run", str(gemma_path)]
    assert argv[3:5] == ["-c", "4096"] and "--max-memory" not in argv
    predicted = ours["peak"]
    limit = predicted * 3 // 2
    holders = _holders_of_torch()

    r = run_capped(limit, [LEMONSLICE, *argv[1:], "-p", PROSE, "-n", "8"])
    assert r.oom_kill == 0, r
    assert r.rc == 0, r.stderr
    assert "full load" in r.stderr, r.stderr
    assert r.peak <= limit

    if holders:
        # torch's pages are held (and charged) elsewhere: the measured peak misses them. The
        # plan's fixed part (BASE) was calibrated as the peak of the tiny 8-layer model's cold
        # run, so run that too here, under the same conditions, and add what it fell short of
        # its own prediction.
        tiny = plan_json(request.getfixturevalue("tiny_moe"), "-c", 4096)["lemonslice"]
        t = run_capped(tiny["peak"] * 3 // 2, [LEMONSLICE, *tiny["run"][1:], "-p", "hello world", "-n", "8"])
        assert t.rc == 0 and t.oom_kill == 0, t
        measured = r.peak + (tiny["peak"] - t.peak)
        how = (f"{r.peak / 1e6:.0f} MB + {(tiny['peak'] - t.peak) / 1e6:.0f} MB the tiny model's run fell short of "
               f"its plan (torch held by pids {holders})")
    else:
        measured, how = r.peak, f"{r.peak / 1e6:.0f} MB"
    print(f"\nFIGURE: Gemma -c 4096 cold: predicted {predicted / 1e6:.0f} MB, measured {how}, "
          f"error {(measured - predicted) / predicted:+.1%}")
    assert abs(measured - predicted) <= 0.15 * predicted, (measured, predicted)


# ---- 1. llama.cpp's buffers: the plan against what llama.cpp prints ------------------------

_BUFFER_LINES = {
    "model (mapped)": r"CPU_Mapped model buffer size =\s*([\d.]+) MiB",
    "KV": r"KV buffer size =\s*([\d.]+) MiB",
    "RS": r"RS buffer size =\s*([\d.]+) MiB",
    "output": r"output buffer size =\s*([\d.]+) MiB",
    "compute": r"compute buffer size =\s*([\d.]+) MiB",
}


def llama_load_log(path: Path, n_ctx: int) -> str:
    """llama.cpp's log of loading `path` and making a context as llama-server does by default:
    swa_full off, one sequence, F16 K/V, n_batch 2048 and n_ubatch 512, flash attention auto."""
    import llama_cpp
    from llama_ref import _context, _model, _watch, llama_log

    with _watch(f"load {path}"), _model(path) as model:  # CPU only, use_extra_bufts off (AMX crashes)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.swa_full = n_ctx, 1, False
        cp.n_batch, cp.n_ubatch = 2048, 512
        cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F16
        cp.n_threads = cp.n_threads_batch = 1
        cp.no_perf = True
        with _context(model, cp):
            pass
    return llama_log()


def printed_buffers(log: str) -> dict[str, float]:
    """MiB per buffer as llama.cpp printed them (the KV lines of a sliding-window model summed)."""
    return {k: sum(float(x) for x in re.findall(p, log)) for k, p in _BUFFER_LINES.items()}


@pytest.fixture(scope="module")
def llama_logs(gemma_path, tiny_moe) -> dict[str, str]:
    return {"gemma@4096": llama_load_log(gemma_path, 4096), "gemma@32768": llama_load_log(gemma_path, 32768),
            "moe@4096": llama_load_log(tiny_moe, 4096)}


def _planned(path: Path, ctx: int) -> dict[str, int]:
    from lemonslice.engine import WeightStore
    from lemonslice.plan import model_facts, plan_llama

    with WeightStore(path) as store:
        plan = plan_llama(model_facts(store), None, [], ctx)
    assert [d.name for d in plan.devices] == ["CPU"]
    return plan.devices[0].buffers


_CASES = [("gemma", 4096), ("gemma", 32768), ("moe", 4096)]


@pytest.mark.parametrize("name,ctx", _CASES)
def test_llama_buffers_equal_what_llama_cpp_prints(name, ctx, llama_logs, gemma_path, tiny_moe):
    log = llama_logs[f"{name}@{ctx}"]
    got = printed_buffers(log)
    assert got["model (mapped)"] > 0 and got["KV"] > 0 and got["compute"] > 0, log[-3000:]
    if name == "moe":
        assert "RS buffer size" in log  # the recurrent layers' state
    planned = _planned(gemma_path if name == "gemma" else tiny_moe, ctx)
    for key in ("model (mapped)", "KV", "RS", "output"):
        # llama.cpp prints MiB with two decimals.
        assert abs(planned[key] / MIB - got[key]) <= 0.01, (key, planned[key] / MIB, got[key])


@pytest.mark.parametrize("name,ctx", _CASES)
def test_llama_compute_buffer_within_10_percent(name, ctx, llama_logs, gemma_path, tiny_moe):
    # The plan does not model llama.cpp's graph allocator, only the buffer's large parts.
    got = printed_buffers(llama_logs[f"{name}@{ctx}"])["compute"]
    planned = _planned(gemma_path if name == "gemma" else tiny_moe, ctx)["compute"] / MIB
    assert abs(planned - got) <= 0.10 * got, (planned, got)


@pytest.mark.parametrize("ctx", [4096, 32768])
def test_plan_json_llama_argv(gemma_path, ctx):
    argv = plan_json(gemma_path, "-c", ctx)["llama_cpp"]["argv"]
    assert argv[:3] == ["llama-server", "-m", str(gemma_path)]
    pairs = dict(zip(argv[3::2], argv[4::2]))
    assert pairs == {"-c": str(ctx), "-np": "1", "-ctk": "f16", "-ctv": "f16", "-ngl": "0"}, argv


# ---- 2. lemonslice's KV cache by hand --------------------------------------------------------


def test_gemma_kv_cache_by_hand(gemma_path, gemma_py, llama_logs):
    import torch

    from lemonslice.engine import Engine, WeightStore
    from lemonslice.models import AttentionCache
    from lemonslice.models.caches import kv_types, set_kv_types
    from lemonslice.plan import model_facts
    from lemonslice.plan.ours import kv_bytes

    # The header, through gguf-py.
    f = gemma_py.fields
    meta = {k: f[f"gemma3.{k}"].contents() for k in ("block_count", "attention.sliding_window",
                                                     "attention.head_count_kv", "attention.key_length",
                                                     "attention.value_length", "context_length")}
    assert meta == {"block_count": 18, "attention.sliding_window": 512, "attention.head_count_kv": 1,
                    "attention.key_length": 256, "attention.value_length": 256, "context_length": 32768}
    # Which layers are windowed is not in this header (no sliding_window_pattern key): llama.cpp
    # applies Gemma 3's pattern and prints it per layer ("is_swa"); every 6th layer is global.
    assert not any("sliding_window_pattern" in k for k in f)
    swa = {int(i): s == "1" for i, s in re.findall(r"layer\s+(\d+) assigned to device CPU, is_swa = (\d)",
                                                 llama_logs["gemma@4096"])}
    globals_ = [i for i in range(18) if not swa[i]]
    assert globals_ == [5, 11, 17]

    ctx, chunk, window = 4096, 512, 512
    rows = {i: ctx if i in globals_ else min(ctx, window + chunk) for i in range(18)}
    per_row = 2 * 1 * 256 * 2  # K and V, 1 KV head, head size 256, f16
    want = sum(rows.values()) * per_row
    assert want == (3 * 4096 + 15 * 1024) * 1024 == 27 * MIB

    with WeightStore(gemma_path) as store:
        assert kv_bytes(model_facts(store), ctx, ("f16", "f16"), chunk) == want
    # What `lemonslice plan` reports for the same context and type (its default prefill chunk).
    assert plan_json(gemma_path, "-c", ctx)["lemonslice"]["parts"]["kv cache"] == want

    # The library's default KV type is f32; `run` and `plan` default to f16, as llama.cpp.
    before = kv_types()
    set_kv_types("f16", "f16")
    engine = Engine(gemma_path)
    try:
        assert engine.prefill_chunk == chunk
        engine.reserve_context(ctx)
        caches = engine.caches
        assert len(caches) == 18 and all(isinstance(c, AttentionCache) for c in caches)
        assert {i: c.k.shape[0] for i, c in enumerate(caches)} == rows
        assert {i: c.v.shape[0] for i, c in enumerate(caches)} == rows
        assert all(c.k.dtype == c.v.dtype == torch.float16 and c.k.shape[1:] == (1, 256) for c in caches)
        assert sum(c.k.nbytes + c.v.nbytes for c in caches) == want
        assert all(c.length == 0 for c in caches)  # room claimed, nothing stored
    finally:
        engine.close()
        set_kv_types(*before)


# ---- 3. run -c claims the cache at the start and generates the same ---------------------------


def test_run_with_ctx_generates_what_run_without_does(gemma_path):
    base = ["run", gemma_path, "-p", "The history of the telephone", "-n", 12, "--threads", 1]
    a, b = cli(*base), cli(*base, "-c", 4096)
    a, b = done(a), done(b)
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    assert "stop: length (12 tokens)" in a.stderr and "stop: length (12 tokens)" in b.stderr, (a.stderr, b.stderr)
    assert a.stdout.strip() and b.stdout == a.stdout, (a.stdout, b.stdout)


# ---- 4. O_DIRECT reads are byte-exact -----------------------------------------------------------


def _raw(t) -> np.ndarray:  # noqa: ANN001  (a gguf-py ReaderTensor)
    return np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)


def _check_reads(store, tensors, want_direct: bool) -> None:  # noqa: ANN001
    for t in tensors:
        info = store.info(t.name)
        assert int(t.n_bytes) == info.n_bytes
        got = store._read(t.name, info.data_start, info.n_bytes, drop=True)
        assert got.dtype == np.uint8 and got.shape == (info.n_bytes,)
        assert np.array_equal(got, _raw(t)), t.name
        assert store._direct.get(str(store.file_of(t.name)))[1] is want_direct, t.name


def test_direct_reads_equal_gguf_py(gemma_path, gemma_py):
    from lemonslice.engine import WeightStore

    with WeightStore(gemma_path) as store:
        assert len(store.tensor_names(None)) + sum(len(store.tensor_names(i)) for i in range(18)) \
            == len(gemma_py.tensors) == 236
        for t in gemma_py.tensors:
            assert store.info(t.name).data_start == t.data_offset  # gguf-py's absolute offset
        # O_DIRECT is what this (ext4) file system gives; offsets are 32-aligned, not 4096-aligned.
        assert any(t.data_offset % 4096 for t in gemma_py.tensors)
        _check_reads(store, gemma_py.tensors, want_direct=True)


def test_direct_reads_of_a_split_equal_the_gguf(gemma_path, gemma_py, tmp_path):
    from lemonslice.engine import WeightStore
    from lemonslice.slicing import split_gguf

    split_gguf(gemma_path, tmp_path / "split")
    with WeightStore(tmp_path / "split") as store:
        assert store.manifest is not None
        files = {store.file_of(t.name) for t in gemma_py.tensors}
        assert len(files) == 19  # shared.gguf and one file per block
        _check_reads(store, gemma_py.tensors, want_direct=True)


def test_buffered_fallback_reads_equal_gguf_py(gemma_path, gemma_py, tmp_path):
    from lemonslice.engine import WeightStore
    from lemonslice.engine.experts import DirectFiles

    class NoDirect(DirectFiles):
        """A file system that refuses O_DIRECT at open."""

        def get(self, path: str) -> tuple[int, bool]:
            with self._lock:
                if path not in self._fds:
                    self._fds[path] = (os.open(path, os.O_RDONLY), False)
                return self._fds[path]

    with WeightStore(gemma_path) as store:
        store._direct.close()
        store._direct = NoDirect()
        _check_reads(store, gemma_py.tensors, want_direct=False)

    # One that accepts the open but fails the read: the store falls back for that file and
    # reads it buffered from then on. A directory's descriptor fails every read (EISDIR).
    with WeightStore(gemma_path) as store:
        store._direct._fds[str(gemma_path)] = (os.open(tmp_path, os.O_RDONLY), True)
        _check_reads(store, gemma_py.tensors[:3], want_direct=False)


# ---- 5. bad input ---------------------------------------------------------------------------------


def test_plan_bad_input_one_error_line(gemma_path):
    cases = {
        "--ram 100MB": (["--ram", "100MB"], ["nothing fits", "lemonslice needs at least", "short",
                                              "llama.cpp:", "more than the budget"]),
        "-c 0": (["-c", "0"], ["-c/--ctx", "32768", "got 0"]),
        "-c 32769": (["-c", "32769"], ["-c/--ctx", "32768", "got 32769"]),
        "--ram abc": (["--ram", "abc"], ["'abc'"]),
        "--cache-type q5": (["--cache-type", "q5"], ["--cache-type", "'q5'"]),
        "--parallel 0": (["--parallel", "0"], ["--parallel", "got 0"]),
    }
    started = {k: cli("plan", gemma_path, *args) for k, (args, _) in cases.items()}
    frob = cli("plan", gemma_path, "--frob")
    for k, p in started.items():
        r = done(p)
        assert r.stdout == "", (k, r.stdout)
        one_line_error(r, *cases[k][1])
    r = done(frob)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.strip() == "error: No such option: --frob (see 'lemonslice plan -h')", r.stderr


def test_plan_only_llama_fits(gemma_path):
    r = done(cli("plan", gemma_path, "--ram", "600MB"))
    assert r.returncode == 0, r.stderr
    refused = [ln for ln in r.stdout.splitlines() if ln.startswith("lemonslice: refused:")]
    assert len(refused) == 1 and "lemonslice needs at least" in refused[0] and "short" in refused[0], r.stdout
    assert "llama-server -m" in r.stdout and "llama.cpp: refused" not in r.stdout, r.stdout


def test_plan_stated_minimum_is_enough(gemma_path):
    from lemonslice.engine import WeightStore
    from lemonslice.errors import LemonsliceError
    from lemonslice.plan import model_facts, plan_lemonslice

    with WeightStore(gemma_path) as store:
        facts = model_facts(store)
        with pytest.raises(LemonsliceError) as e:
            plan_lemonslice(store, facts, 100 * 10**6, 4096)
        need = float(re.search(r"needs at least ([\d.]+) MiB", str(e.value))[1])
        plan_lemonslice(store, facts, int((need + 0.1) * MIB), 4096)  # the stated minimum (rounded up)


def test_run_refuses_a_context_whose_kv_cache_cannot_fit(gemma_path):
    # 100M positions of Gemma's 3 global layers: 3 x 1e8 x (256 + 256) x 2 bytes = 286.1 GiB, more
    # than any machine here has free; refused before anything is claimed.
    r = done(cli("run", gemma_path, "-p", "hi", "-n", "2", "-c", 100_000_000))
    line = one_line_error(r)
    assert "a context of 100000000 tokens needs 286.1 GiB of KV cache" in line and "free" in line, line
