"""Pipelines across machines (lemonslice.pipeline) on a local Ray cluster of this machine.

The module's cluster is a real head node (`ray start --head` on loopback, 2 CPUs, a temp dir of
its own) started and stopped by the test itself; at the end every process of that session
(those whose command line names its temp dir, and their descendants) is killed by pid, and
none may be left.

* --stages specs: one-line errors for overlaps, gaps, ranges out of range or order, bad syntax;
  `--stages N` cuts with the least largest share (against brute force); each stage goes to a
  host that holds its files (two made-up hosts holding half the layers each);
* an Engine limited to positions [a, b) opens only its files, reads only their bytes, and stages
  chained by hand give the whole engine's logits bit for bit;
* 2- and 3-stage pipelines of a tiny qwen35moe split and of the real Gemma 3 270M give the
  greedy tokens of one process's `Engine.generate`, and the prefill's logits bit for bit (the
  prompt goes down in chunks of 4, several in flight); each stage opened only its own layer
  files, and the layer bytes it read equal its range's tensor bytes in the manifest;
* a stage whose worker process is killed mid-generation ends the run with a one-line error
  naming the stage and its host, in well under 30 s, and the other stages are ended;
* `lemonslice run --stages` prints what a plain `run` prints; SIGTERM mid-run (with a local Ray
  started by the command) leaves no stage and no Ray process behind.

`pytest -s` prints per-stage peak RSS and timings on lines starting with `FIGURE:`.
"""

from __future__ import annotations

import os

# Ray registers a Linux node under the address of its default route unless clusters are off:
# set before Ray is imported, every process of this module's cluster uses 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import itertools
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lemonslice.engine import Budget, Engine, Streamed
from lemonslice.engine.generation import Session
from lemonslice.engine.sampling import Sampler, SamplingParams
from lemonslice.errors import LemonsliceError
from lemonslice.gguf.manifest import load_manifest
from lemonslice.pipeline import balanced, parse_stages, resolve_stages
from lemonslice.pipeline.stages import assign_nodes, stage_files
from lemonslice.slicing import split_gguf
from lemonslice.testing import tiny_qwen35moe, write_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BIN = Path(sys.executable).parent
LEMONSLICE, RAY = str(BIN / "lemonslice"), str(BIN / "ray")
PROMPT = [2, 151, 37, 229, 81, 63, 17, 101, 250, 7, 42]
N_NEW = 8
F32 = ("f32", "f32")  # the library's default cache types, which the reference engine uses


def figure(text: str) -> None:
    print(f"\nFIGURE: {text}", flush=True)


# ---- the cluster ----------------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, command line, state) of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        out[int(d.name)] = (int(rest[1]), cmd, rest[0])
    return out


def session_pids(tmp: str) -> set[int]:
    """Live processes of the Ray session under `tmp`: those naming it, and their descendants."""
    procs = _processes()
    found = {p for p, (_, cmd, _) in procs.items() if tmp in cmd}
    while True:
        more = {p for p, (pp, _, _) in procs.items() if pp in found} - found
        if not more:
            break
        found |= more
    return {p for p in found if procs[p][2] != "Z"}


def kill_session(tmp: str) -> None:
    """SIGKILL every process of the session by pid, and wait for them to go (at most 20 s)."""
    deadline = time.monotonic() + 20
    while (pids := session_pids(tmp)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def ray_env():
    """Ray's settings for this module's processes (this one, `ray start`, the CLI's): no usage
    report, and token authentication with a token of our own in the environment, so nothing is
    read from or written to ~/.ray whatever is there."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        yield


@pytest.fixture(scope="module")
def cluster():
    """A Ray head node of this machine (loopback, 2 CPUs, its own temp dir); this process is
    connected to it, so every Pipeline here joins it. Yields its address."""
    import ray

    tmp = tempfile.mkdtemp(prefix="lsray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    t0 = time.perf_counter()
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                    "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", tmp,
                    "--object-store-memory", str(100 << 20)],
                   check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        ray.init(address=address, logging_level="error", log_to_driver=False)
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}, ray.nodes()
        figure(f"ray start --head and connect: {time.perf_counter() - t0:.1f} s")
        yield address
    finally:
        ray.shutdown()
        kill_session(tmp)
        left = session_pids(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


# ---- models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pipe")
    out = d / "split"
    split_gguf(write_synthetic(d / "moe.gguf", tiny_qwen35moe()), out)
    return out


@pytest.fixture(scope="module")
def gemma(gemma_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipe_gemma") / "split"
    split_gguf(gemma_path, out)
    return out


_REFERENCE: dict[Path, tuple[list[int], torch.Tensor]] = {}


def reference(model: Path) -> tuple[list[int], torch.Tensor]:
    """One process's greedy tokens after PROMPT and its prefill logits, prompt fed 4 at a time."""
    if model not in _REFERENCE:
        engine = Engine(model, prefill_chunk=4)
        _REFERENCE[model] = (engine.generate(PROMPT, N_NEW), engine.logits(PROMPT))
        engine.close()
    return _REFERENCE[model]


def greedy(engine, n: int) -> list[int]:  # noqa: ANN001
    return list(Session(engine).generate(PROMPT, Sampler(SamplingParams(temperature=0.0)), n))


def layer_file_bytes(model: Path) -> dict[int, tuple[str, int]]:
    """Block -> (its layer file, the file's tensor bytes), from the manifest."""
    return {f.layer: (f.name, f.n_bytes) for f in load_manifest(model).layers}


# ---- stage specs and balancing (no Ray) -----------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("0-3,3-7", "--stages 0-3,3-7: 3-7 overlaps 0-3; each position runs once"),
    ("0-2,4-7", "--stages 0-2,4-7: position 3 is in no stage"),
    ("0-2,5-7", "--stages 0-2,5-7: positions 3-4 are in no stage"),
    ("0-5", "--stages 0-5: positions 6-7 are in no stage"),
    ("0-8", "--stages 0-8: 0-8 is out of range (positions 0-7)"),
    ("4-7,0-3", "--stages 4-7,0-3: 0-3 lies before 4-7; give the ranges in order"),
    ("3-1,4-7", "--stages 3-1,4-7: 3-1 runs backwards"),
    ("9", "--stages 9: the playlist has only 8 positions"),
    ("0", "--stages 0: needs at least one stage"),
    ("0-3;4-7", "--stages 0-3;4-7: cannot read '0-3;4-7'; give N (that many stages, balanced by bytes) "
                "or position ranges such as 0-19,20-39"),
])
def test_bad_stage_specs_are_one_line_errors(spec, message):
    with pytest.raises(LemonsliceError) as e:
        resolve_stages(spec, [1] * 8)
    assert str(e.value) == message


def test_stage_specs_and_balancing():
    assert parse_stages(" 3 ") == 3
    assert resolve_stages("0-3,4,5-7", [1] * 8) == [(0, 4), (4, 5), (5, 8)]
    assert resolve_stages("2", [9, 1, 1, 1, 1, 1, 1, 9]) == [(0, 4), (4, 8)]
    assert balanced([10, 1, 1, 1, 1, 10], 3) == [(0, 1), (1, 5), (5, 6)]
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 50) for _ in range(rng.randint(1, 9))]
        n = rng.randint(1, len(sizes))
        got = balanced(sizes, n)
        assert got[0][0] == 0 and got[-1][1] == len(sizes) and all(a < b for a, b in got)
        assert all(x[1] == y[0] for x, y in zip(got, got[1:]))
        # Brute force over every set of cuts: none has a smaller largest stage.
        best = min(max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes))))
                   for cuts in itertools.combinations(range(1, len(sizes)), n - 1))
        assert max(sum(sizes[a:b]) for a, b in got) == best


def test_each_stage_goes_to_a_host_holding_its_files(tiny):
    """Two hosts that each hold manifest.json, shared.gguf and half of the layer files."""
    from lemonslice.gguf.model import ModelFiles

    files = ModelFiles(tiny)
    ranges = resolve_stages("0-3,4-7", [1] * 8)
    need = [stage_files(files, list(range(8)), r) for r in ranges]
    assert set(need[0].sizes) == {"shared.gguf", *(f"layer_{i:04d}.gguf" for i in range(4))}
    halves = {"host-a": set(need[1].sizes), "host-b": set(need[0].sizes)}
    assert assign_nodes(ranges, need, halves) == ["host-b", "host-a"]
    both = {"a": set(need[0].sizes) | set(need[1].sizes), "b": set(need[0].sizes) | set(need[1].sizes)}
    assert assign_nodes(ranges, need, both) == ["a", "b"]  # spread over the hosts that can
    with pytest.raises(LemonsliceError, match=r"^stage 1 of 2 \(positions 0-3\): no Ray node holds .*/layer_0000\.gguf "
                                              r"and 3 more of its files \(with the manifest's size\)$"):
        assign_nodes(ranges, need, {"host-a": set(need[1].sizes)})
    split = {"a": {"shared.gguf", "layer_0000.gguf", "layer_0001.gguf"}, "b": set(need[0].sizes) - {"layer_0000.gguf"}}
    with pytest.raises(LemonsliceError, match="no Ray node holds all of its files under"):
        assign_nodes(ranges[:1], need[:1], split)


# ---- an engine on part of the playlist (no Ray) --------------------------------------------


@pytest.mark.parametrize("plan", [None, Streamed(1), Budget(300 << 10)], ids=["full", "streamed", "budget"])
def test_engine_on_a_range_reads_only_its_layers(tiny, plan):
    whole = Engine(tiny)
    want = whole.logits(PROMPT[:5] + [300, 12])
    files = layer_file_bytes(tiny)
    stages = [Engine(tiny, positions=r, plan=plan) for r in [(0, 3), (3, 5), (5, 8)]]
    x: object = PROMPT[:5] + [300, 12]
    for e in stages[:-1]:
        x = e.forward_batch([e.state], [x])[0]
    got = stages[-1].forward_batch([stages[-1].state], [x], logits="all")[0]
    assert torch.equal(got, want)
    for e in stages:
        a, b = e.positions
        opened = sorted(p.name for p in e.store.open_files())
        assert opened == sorted([files[i][0] for i in range(a, b)] + ["shared.gguf"])
        assert sum(c.length > 0 for c in e.state.caches) == b - a  # no state for other positions
        if plan is None:
            assert e.store.resident_bytes - e.residency.shared_bytes == sum(files[i][1] for i in range(a, b))
    assert stages[1].residency.shared_bytes == 0  # between the ends: no embedding, no head
    with pytest.raises(LemonsliceError, match=r"positions \[3, 5\) do not start the playlist"):
        stages[1].forward_batch([stages[1].state], [[1, 2]])
    with pytest.raises(LemonsliceError, match=r"positions \[0, 3\) do not end the playlist"):
        stages[0].forward_batch([stages[0].state], [[1, 2]], logits="last")
    with pytest.raises(LemonsliceError, match=r"lie outside this engine's positions \[3, 5\)"):
        stages[1].forward_batch([stages[1].state], [x], start=2, stop=5)


# ---- pipelines ------------------------------------------------------------------------------


def check_stage_reports(model: Path, reports: list[dict], label: str) -> None:
    files = layer_file_bytes(model)
    for r in reports:
        a, b = r["positions"]
        assert r["files"] == sorted([files[i][0] for i in range(a, b)] + ["shared.gguf"])
        assert r["layer_bytes"] == sum(files[i][1] for i in range(a, b))
        # What the process grew by is its own weights and some scratch, never the other stages' layers.
        assert r["peak_rss"] - r["rss_before_open"] < r["weight_bytes"] + (100 << 20)
        figure(f"{label} stage {r['index'] + 1} positions {a}-{b - 1}: layers {r['layer_bytes'] / 1e6:.2f} MB, "
               f"shared {r['shared_bytes'] / 1e6:.2f} MB, peak RSS {r['peak_rss'] / 1e6:.1f} MB "
               f"({r['rss_before_open'] / 1e6:.1f} MB before opening)")
    assert reports[0]["shared_bytes"] > 0 and reports[-1]["shared_bytes"] > 0
    assert all(r["shared_bytes"] == 0 for r in reports[1:-1])


@pytest.mark.parametrize("model, spec", [("tiny", "2"), ("tiny", "0-2,3-4,5-7"), ("gemma", "0-8,9-17"),
                                         ("gemma", "3")])
def test_pipeline_gives_one_process_tokens(cluster, request, model, spec):
    from lemonslice.pipeline import Pipeline

    path = request.getfixturevalue(model)
    want_ids, want_logits = reference(path)
    t0 = time.perf_counter()
    with Pipeline(path, spec, threads=1, kv_types=F32, prefill_chunk=4) as pipe:
        opened = time.perf_counter() - t0
        assert len(pipe.ranges) == (2 if spec in ("2", "0-8,9-17") else 3)
        assert greedy(pipe, N_NEW) == want_ids
        pipe.reset()
        assert torch.equal(pipe.forward(PROMPT, all_logits=True), want_logits)
        check_stage_reports(path, pipe.reports(), f"{model} {spec}")
    figure(f"{model} --stages {spec}: opened in {opened:.1f} s, whole test {time.perf_counter() - t0:.1f} s")


def test_killed_stage_ends_the_run_with_one_line(cluster, tiny):
    from lemonslice.pipeline import Pipeline

    pipe = Pipeline(tiny, "3", threads=1)
    try:
        pids = pipe.pids()
        host = pipe.opened[1]["host"]
        tokens = Session(pipe).generate(PROMPT, Sampler(SamplingParams(temperature=0.0)), 10_000)
        for _ in range(3):
            next(tokens)
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.perf_counter()
        with pytest.raises(LemonsliceError) as e:
            for _ in tokens:
                pass
        took = time.perf_counter() - t0
    finally:
        pipe.close()
    a, b = pipe.ranges[1]
    message = str(e.value)
    figure(f"killed stage 2: error after {took:.2f} s: {message}")
    assert took < 30
    assert "\n" not in message
    assert message.startswith(f"stage 2 of 3 (positions {a}-{b - 1}) on {host} (")
    assert message.endswith("died (its worker process died); the run is over")
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{p}").exists() and _processes().get(p, (0, "", "Z"))[2] != "Z" for p in pids):
        assert time.monotonic() < deadline, "the other stages were not ended"
        time.sleep(0.2)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LEMONSLICE, "run", *args], capture_output=True, text=True, timeout=300)


def test_cli_stages_prints_what_a_plain_run_prints(cluster, gemma):
    common = ["-p", "The capital of France is", "-n", "16", "--temp", "0", "--threads", "1"]
    t0 = time.perf_counter()
    plain = run_cli(str(gemma), *common)
    t1 = time.perf_counter()
    staged = run_cli(str(gemma), *common, "--stages", "2", "--ray-address", cluster)
    figure(f"CLI: plain run {t1 - t0:.1f} s, --stages 2 {time.perf_counter() - t1:.1f} s")
    assert plain.returncode == 0, plain.stderr
    assert staged.returncode == 0, staged.stderr
    assert staged.stdout == plain.stdout and plain.stdout.strip()
    assert "gemma3: 18 layers in 2 stages" in staged.stderr and "stage 2 peak RSS" in staged.stderr
    bad = run_cli(str(gemma), *common, "--stages", "0-8,10-17")
    assert (bad.returncode, bad.stdout, bad.stderr) == (1, "", "error: --stages 0-8,10-17: position 9 is in no stage\n")


def test_cli_sigterm_leaves_nothing_behind(tiny, tmp_path):
    """Without --ray-address the command starts a local Ray of its own; SIGTERM in the middle of
    a long generation ends the command, its stages and that Ray."""
    tmp = tempfile.mkdtemp(prefix="lsrt", dir="/tmp")
    env = os.environ | {"RAY_TMPDIR": tmp}
    proc = subprocess.Popen([LEMONSLICE, "run", str(tiny), "--prompt-ids", "3,17,101", "-n", "1000000", "--threads",
                             "1", "--stages", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        pids = []
        deadline = time.monotonic() + 120
        while len(pids) < 2:
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, f"no stage started (exit {proc.poll()})"
            if line.startswith("stage "):
                pids.append(int(line.split("pid ")[1].split(")")[0]))
        time.sleep(1.0)  # well into decoding
        assert session_pids(tmp), "the local Ray is not running under RAY_TMPDIR"
        proc.send_signal(signal.SIGTERM)
        t0 = time.perf_counter()
        rc = proc.wait(timeout=60)
        figure(f"SIGTERM: the command ended in {time.perf_counter() - t0:.1f} s (exit {rc})")
        assert rc != 0
        deadline = time.monotonic() + 20
        while session_pids(tmp) or any(_processes().get(p, (0, "", "Z"))[2] != "Z" for p in pids):
            assert time.monotonic() < deadline, f"left behind: {session_pids(tmp)}"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_session(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_serve_on_stages_gives_each_slot_one_process_replies(cluster, tiny):
    """`serve --stages`: three slots' concurrent greedy chats through a 2-stage pipeline (a
    step's sequences in two groups, stage 1 running one while stage 2 runs the other) equal a
    one-process server's replies."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from serve_util import serving

    from lemonslice.pipeline import Pipeline
    from lemonslice.server.service import ModelService
    from lemonslice.text.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(tiny / "shared.gguf")
    chats = [[{"role": "user", "content": f"{i}: lemons, layers and stages " * (3 + 2 * i)}] for i in range(3)]

    def replies(load) -> list[str]:  # noqa: ANN001
        with serving(load) as url:
            def ask(messages: list[dict]) -> str:
                r = httpx.post(f"{url}/v1/chat/completions", timeout=300,
                               json={"messages": messages, "temperature": 0, "max_tokens": 12})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]

            with ThreadPoolExecutor(3) as pool:
                return list(pool.map(ask, chats))

    want = replies(lambda: ModelService(Engine(tiny), tok, parallel=3))
    pipe = Pipeline(tiny, "2", address=cluster, threads=1, kv_types=F32)
    assert replies(lambda: ModelService(pipe, tok, parallel=3)) == want
    assert pipe.failed is False and not pipe._actors  # the server closed the stages when it stopped
