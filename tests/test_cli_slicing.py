"""The `lemonslice` command line on split directories: verify's reports, merge's hash check,
atomic output (--force, refusing to clobber inputs), a split killed or terminated midway,
and `inspect --json`.

Commands run as real subprocesses of the installed console script, so exit codes, stderr
and signal handling are the user's. Expected values come from gguf-py, hashlib, byte
comparison or are written out by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from gguf_refs import GEMMA_SHA256, GEMMA_SIZE, GGUFPy

from lemonslice.gguf.constants import GGMLType, ValueType
from lemonslice.gguf.writer import encode_kv, plan_file
from lemonslice.slicing import verify_split

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
STAGE_TAG = ".lemonslice-tmp-"
KINDS = ("missing", "extra", "truncated", "oversized", "altered", "invalid", "unsafe")
PROBLEM_LINE = re.compile(rf"^.+?: ({'|'.join(KINDS)}): ")
BLK = re.compile(r"^blk\.(\d+)\.")



def cli(*args, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    # A plain non-terminal environment: no forced width or colour.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run(
        [LEMONSLICE, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, r.stderr)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(8 << 20):
            h.update(b)
    return h.hexdigest()


def snapshot(d: Path) -> dict[str, str]:
    """Every entry under `d` (hidden ones too) with its content hash."""
    return {
        str(p.relative_to(d)): (sha256(p) if p.is_file() and not p.is_symlink() else "dir" if p.is_dir() else "link")
        for p in sorted(d.rglob("*"))
    }


def stage_dirs(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}{STAGE_TAG}*"))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def mid_tensor_offset(path: Path) -> int:
    t = GGUFPy(path).tensors[0]
    return int(t.data_offset) + int(t.n_bytes) // 2


def edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


# The verify stamp: split records the files it hashed on the way out.
SPLIT_FILES = sorted([".lemonslice-verified.json", "manifest.json", "shared.gguf",
                      *(f"layer_{i:04d}.gguf" for i in range(9))])


# ---- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def syn_path(tmp_path_factory) -> Path:
    from lemonslice.testing import tiny_qwen35moe, write_synthetic

    path = tmp_path_factory.mktemp("clisyn") / "tiny.gguf"
    write_synthetic(path, tiny_qwen35moe(mtp=True, type_overrides={"experts": "Q4_0", "attention": "F16"}))
    return path


@pytest.fixture(scope="session")
def gemma_cli_split(gemma_path, tmp_path_factory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("gemmacli") / "gemma-split"
    r = cli("split", gemma_path, out)
    assert r.returncode == 0, r.stderr
    yield out
    shutil.rmtree(out, ignore_errors=True)


def write_big(path: Path, n_blocks: int = 10, n: int = 4096) -> Path:
    """~500 MB GGUF with the project's writer: per block a 32 MB F16 and an 18 MB Q8_0
    tensor of random bytes (tiled from an 8 MB pool, so it is written in well under a second)."""
    kvs = [
        encode_kv("general.architecture", ValueType.STRING, "llama"),
        encode_kv("llama.block_count", ValueType.UINT32, n_blocks),
    ]
    tensors = [("token_embd.weight", (n, 64), GGMLType.F16), ("output_norm.weight", (n,), GGMLType.F32)]
    for b in range(n_blocks):
        tensors += [(f"blk.{b}.attn_q.weight", (n, n), GGMLType.F16), (f"blk.{b}.ffn_up.weight", (n, n), GGMLType.Q8_0)]
    plan = plan_file(kvs, tensors)
    pool = np.random.default_rng(0).bytes(8 << 20)
    with open(path, "wb") as f:
        f.write(plan.padded_header())
        for i, pt in enumerate(plan.tensors):
            f.seek(plan.data_offset + pt.offset)
            left, k = pt.n_bytes, i * 4099
            while left:
                chunk = pool[k % len(pool) :][:left]
                f.write(chunk)
                left -= len(chunk)
                k = 0
        f.truncate(plan.size)
    return path


@pytest.fixture(scope="session")
def big_path(tmp_path_factory) -> Iterator[Path]:
    path = write_big(tmp_path_factory.mktemp("big") / "big.gguf")
    yield path
    path.unlink()


# ---- 1. round trips through the CLI -------------------------------------------------


def test_cli_round_trip_synthetic(syn_path, tmp_path):
    r = cli("split", syn_path, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == SPLIT_FILES
    r = cli("verify", tmp_path / "out")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = cli("merge", tmp_path / "out", tmp_path / "merged.gguf")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "merged.gguf").read_bytes() == syn_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.gguf", "out"]


def test_cli_verify_gemma_split(gemma_cli_split):
    # (The byte-exact Gemma merge is covered through the library in test_slicing.py.)
    r = cli("verify", gemma_cli_split)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    src = json.loads((gemma_cli_split / "manifest.json").read_text())["source"]
    assert (src["size"], src["sha256"]) == (GEMMA_SIZE, GEMMA_SHA256)


# ---- 3. verify ---------------------------------------------------------------------------

# case -> the (file, kind) problems verify must report, or None where the manifest
# itself is refused (then: the one-line error must contain the `needle`).
VERIFY_CASES = {
    "missing": ({("layer_0004.gguf", "missing")}, None),
    "extra": ({("notes.txt", "extra")}, None),
    "truncated": ({("layer_0004.gguf", "truncated")}, None),
    "flipped": ({("layer_0004.gguf", "altered")}, None),
    "oversized": ({("layer_0004.gguf", "oversized")}, None),
    "symlink_out": ({("layer_0004.gguf", "unsafe")}, None),
    "dotdot": (None, "'../x.gguf'"),
    "absolute": (None, "ABSOLUTE"),  # the absolute path of a copy beside the directory
    "subdir": (None, "'sub/layer_0004.gguf'"),
    "not_json": (None, "manifest.json"),
    "wrong_format": (None, "lemonslice-gguf-v0"),
    # File names that happen to look like console markup must come out verbatim.
    "extra_markup_name": ({("[bold]notes", "extra")}, None),
    "markup_manifest_name": (None, "'[/x]layer_0004.gguf'"),
}


def damage(d: Path, case: str, tmp_path: Path) -> None:
    victim = d / "layer_0004.gguf"
    rename = lambda name: edit_manifest(d, lambda m: m["files"][5].update(name=name))  # noqa: E731
    assert json.loads((d / "manifest.json").read_text())["files"][5]["name"] == victim.name
    if case == "missing":
        victim.unlink()
    elif case == "extra":
        (d / "notes.txt").write_text("hi")
    elif case == "extra_markup_name":
        (d / "[bold]notes").write_text("hi")
    elif case == "truncated":
        os.truncate(victim, victim.stat().st_size - 5)
    elif case == "oversized":
        with open(victim, "ab") as f:
            f.write(b"\0" * 32)
    elif case == "flipped":
        size = victim.stat().st_size
        flip(victim, mid_tensor_offset(victim))
        assert victim.stat().st_size == size
    elif case == "symlink_out":
        outside = tmp_path / "outside"
        outside.mkdir()
        shutil.move(victim, outside / victim.name)  # the right bytes, in the wrong place
        victim.symlink_to(outside / victim.name)
    elif case == "dotdot":
        shutil.copy(victim, d.parent / "x.gguf")
        rename("../x.gguf")
    elif case == "absolute":
        shutil.copy(victim, d.parent / victim.name)
        rename(str(d.parent / victim.name))
    elif case == "subdir":
        (d / "sub").mkdir()
        shutil.copy(victim, d / "sub" / victim.name)
        rename("sub/layer_0004.gguf")
    elif case == "markup_manifest_name":
        rename("[/x]layer_0004.gguf")
    elif case == "not_json":
        (d / "manifest.json").write_text('{"format": "lemonslice-gguf-v1", "files": [')
    elif case == "wrong_format":
        edit_manifest(d, lambda m: m.update(format="lemonslice-gguf-v0"))
    else:
        raise AssertionError(case)


def test_cli_verify_intact(syn_copy):
    r = cli("verify", syn_copy.name, cwd=syn_copy.parent)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and "Traceback" not in r.stdout


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_cli_verify_reports(syn_copy, tmp_path, case):
    want, needle = VERIFY_CASES[case]
    damage(syn_copy, case, tmp_path)
    r = cli("verify", syn_copy.name, cwd=syn_copy.parent)
    if want is None:
        if needle == "ABSOLUTE":
            needle = repr(str(syn_copy.parent / "layer_0004.gguf"))
        assert_one_line_error(r, needle)
        return
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    got = {(m.group(0).rsplit(": ", 2)[0], m.group(1)) for line in lines if (m := PROBLEM_LINE.match(line))}
    assert got == want, r.stderr
    # Each problem is one line; at most one other line (the summary), nothing wrapped.
    others = [line for line in lines if not PROBLEM_LINE.match(line)]
    assert len(others) <= 1, r.stderr
    # The library agrees.
    assert {(p.file, p.kind) for p in verify_split(syn_copy)} == want


# ---- 4. merge refuses a modified split ----------------------------------------------------


def test_cli_merge_hash_mismatch(syn_copy, tmp_path):
    victim = syn_copy / "layer_0006.gguf"
    flip(victim, mid_tensor_offset(victim))
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    r = cli("merge", syn_copy, target_dir / "model.gguf")
    assert_one_line_error(r, "sha256")
    assert list(target_dir.iterdir()) == []  # no output and no temporary file


# A manifest damaged in fields verify does not look at must still give a one-line error.
BAD_MANIFEST_FIELDS = {
    "reserved_kv_not_base64": lambda m: (
        m["source"]["reserved_kv"].update({"lemonslice.x": "!!not base64"}),
        m["source"]["kv_order"].append("lemonslice.x"),
    ),
    "kv_order_not_strings": lambda m: m["source"].update(kv_order=[1, 2]),
    "tensor_offset_negative": lambda m: m["files"][1]["tensors"][0].update(offset=-64),
    "gap_malformed": lambda m: m["source"].update(nonzero_gaps=[[1, 2, 3]]),
    "gap_negative_offset": lambda m: m["source"].update(nonzero_gaps=[[-5, "AAAA"]]),
}


@pytest.mark.parametrize("case", list(BAD_MANIFEST_FIELDS))
def test_cli_merge_damaged_manifest_one_line_error(syn_copy, tmp_path, case):
    edit_manifest(syn_copy, BAD_MANIFEST_FIELDS[case])
    target_dir = tmp_path / "target"
    target_dir.mkdir()
    r = cli("merge", syn_copy, target_dir / "model.gguf")
    assert_one_line_error(r)
    assert list(target_dir.iterdir()) == []


# ---- 5. atomic output and refusing to clobber ---------------------------------------------


def test_split_non_empty_outdir_needs_force(syn_path, syn_split, tmp_path):
    # An earlier split, one file damaged: --force replaces it (unrelated files are refused: test_safety.py).
    out = tmp_path / "out"
    shutil.copytree(syn_split, out)
    (out / "layer_0000.gguf").write_bytes(b"old")
    before = snapshot(out)
    r = cli("split", syn_path, out)
    assert_one_line_error(r, "--force")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    r = cli("split", syn_path, out, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == SPLIT_FILES  # replaced, not mixed
    assert verify_split(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old set left


def test_split_into_empty_existing_outdir(syn_path, tmp_path):
    (tmp_path / "out").mkdir()
    r = cli("split", syn_path, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == SPLIT_FILES
    assert verify_split(tmp_path / "out") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["model.gguf", "sub/model.gguf"])
def test_split_force_refuses_outdir_holding_input(syn_path, tmp_path, where):
    out = tmp_path / "out"
    (out / where).parent.mkdir(parents=True)
    shutil.copyfile(syn_path, out / where)
    want = sha256(syn_path)
    before = snapshot(out)
    r = cli("split", out / where, out, "--force")
    assert_one_line_error(r)
    assert sha256(out / where) == want
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_split_outdir_that_is_the_input_file(syn_path, tmp_path):
    src = tmp_path / "model.gguf"
    shutil.copyfile(syn_path, src)
    r = cli("split", src, src, "--force")
    assert_one_line_error(r)
    assert sha256(src) == sha256(syn_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_merge_existing_target_needs_force(syn_path, syn_copy, tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"GGUF old contents")  # an earlier GGUF; anything else is refused (test_safety.py)
    r = cli("merge", syn_copy, target)
    assert_one_line_error(r, "--force")
    assert target.read_bytes() == b"GGUF old contents"
    r = cli("merge", syn_copy, target, "--force")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == syn_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "split"]


@pytest.mark.parametrize("target", ["layer_0001.gguf", "manifest.json", "shared.gguf", "new.gguf", "."])
def test_merge_refuses_to_overwrite_its_input(syn_copy, target):
    before = snapshot(syn_copy)
    r = cli("merge", syn_copy, syn_copy / target, "--force")
    assert_one_line_error(r)
    assert snapshot(syn_copy) == before
    assert verify_split(syn_copy) == []


# ---- 6. killed or terminated midway ------------------------------------------------------


def start_split_and_wait_for_bytes(src: Path, out: Path, min_bytes: int = 16 << 20) -> subprocess.Popen:
    """Start `lemonslice split` and return once its staging dir holds `min_bytes` of written
    output (allocated blocks: output files may be sized up front)."""
    p = subprocess.Popen([LEMONSLICE, "split", str(src), str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        staged = 0
        for d in stage_dirs(out.parent, out.name):
            try:
                staged += sum(f.stat().st_blocks * 512 for f in d.iterdir())
            except FileNotFoundError:
                pass
        if staged >= min_bytes:
            return p
        if p.poll() is not None:
            raise AssertionError(f"split ended (rc {p.returncode}) before it could be interrupted; enlarge the file")
        time.sleep(0.002)
    p.kill()
    raise AssertionError("no staged output appeared within 60 s")


def test_split_killed_midway_leaves_no_set(big_path, tmp_path):
    out = tmp_path / "out"
    p = start_split_and_wait_for_bytes(big_path, out)
    p.kill()
    p.wait(timeout=30)
    p.stderr.close()
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()
    stale = stage_dirs(tmp_path, "out")
    assert stale and all(f"{STAGE_TAG}{p.pid}-" in s.name for s in stale)

    r = cli("split", big_path, out)
    assert r.returncode == 0, r.stderr
    assert not any(s.exists() for s in stale)  # the killed run's staging dir was cleaned up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    r = cli("verify", out)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["size"] == big_path.stat().st_size
    assert len([f for f in m["files"] if f["layer"] is not None]) == 10

    # The same for merge: a killed merge leaves no target, and the next one cleans up.
    merged = tmp_path / "merged.gguf"
    p = subprocess.Popen([LEMONSLICE, "merge", str(out), str(merged)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:  # the temporary file is sized up front: wait for written (allocated) bytes
        temps = stage_dirs(tmp_path, merged.name)
        try:
            written = sum(t.stat().st_blocks * 512 for t in temps)
        except FileNotFoundError:
            written = 0
        if written >= 16 << 20:
            break
        assert p.poll() is None, "merge ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    p.kill()
    p.wait(timeout=30)
    assert not merged.exists()
    stale = stage_dirs(tmp_path, merged.name)
    assert stale and all(f"{STAGE_TAG}{p.pid}-" in t.name for t in stale)
    r = cli("merge", out, merged)
    assert r.returncode == 0, r.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["merged.gguf", "out"]
    assert sha256(merged) == sha256(big_path)
    merged.unlink()
    shutil.rmtree(out)  # 0.5 GB; pytest keeps recent temp dirs


def test_split_terminated_midway_cleans_up(big_path, tmp_path):
    out = tmp_path / "out"
    p = start_split_and_wait_for_bytes(big_path, out)
    p.send_signal(signal.SIGTERM)
    try:
        _, stderr = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("split did not exit within 30 s of SIGTERM") from None
    assert p.returncode not in (0, None)
    assert b"Traceback" not in stderr, stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging dir left behind


# A SIGTERM becomes a KeyboardInterrupt (cli._on_term) at whatever bytecode the main thread
# is running. This lands it at one precise, legal spot, deterministically: inside the
# queue.put of a chunk for the output-hashing thread, after Condition.notify has woken that
# thread and before it is taken off the waiter list. The split must still unwind promptly.
INTERRUPT_IN_NOTIFY = r"""
import inspect, sys, threading
from pathlib import Path
from lemonslice.slicing import split as split_mod
from lemonslice.slicing import split_gguf

src, out = Path(sys.argv[1]), Path(sys.argv[2])
lines, first = inspect.getsourcelines(threading.Condition.notify)
target = [first + i for i, l in enumerate(lines) if "waiters.remove(waiter)" in l][0]
hashers = []
_init = split_mod._Hasher.__init__
def init(self):
    _init(self)
    hashers.append(self)
split_mod._Hasher.__init__ = init  # only records the instances
split_mod.CHUNK = 4096
state = {"armed": False, "fired": False}

def local(frame, event, arg):
    if (event == "line" and frame.f_lineno == target and state["armed"] and len(hashers) == 2
            and frame.f_locals["self"] is hashers[1].jobs.not_empty):
        state["armed"], state["fired"] = False, True
        raise KeyboardInterrupt
    return local

def tracer(frame, event, arg):
    return local if frame.f_code is threading.Condition.notify.__code__ else None

def progress(done, total):
    if done >= total // 4 and not state["fired"]:
        state["armed"] = True

sys.settrace(tracer)
try:
    split_gguf(src, out, progress=progress)
    result = "completed"
except KeyboardInterrupt:
    result = "interrupted"
sys.settrace(None)
print(result, state["fired"], out.exists(), sorted(p.name for p in out.parent.iterdir()))
"""


def test_split_interrupt_inside_queue_put_does_not_hang(syn_path, tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_IN_NOTIFY)
    work = tmp_path / "work"
    work.mkdir()
    try:
        r = subprocess.run([sys.executable, str(script), str(syn_path), str(work / "out")],
                           capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            "split_gguf hung after a KeyboardInterrupt inside queue.put (Condition.notify): "
            "_stream's finally joins a hashing thread that never wakes"
        ) from None
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["interrupted", "True", "False", "[]"], r.stdout


# ---- 8. inspect --json ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def gemma_ref(gemma_path):
    """Per-layer and shared tensor bytes from gguf-py's read of the source."""
    r = GGUFPy(gemma_path)
    layers: dict[int, list[int]] = {}
    shared = 0
    for t in r.tensors:
        m = BLK.match(t.name)
        if m is None:
            shared += int(t.n_bytes)
        else:
            layers.setdefault(int(m.group(1)), []).append(int(t.n_bytes))
    return shared, layers


def test_inspect_json_gemma(gemma_path, gemma_cli_split, gemma_ref):
    shared, layers = gemma_ref
    largest = max(sum(v) for v in layers.values())
    for path in (gemma_path, gemma_cli_split):
        r = cli("inspect", "--json", path)
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        rows = s["layers"]
        assert len(rows) == 18 == len(layers)
        assert [row["index"] for row in rows] == list(range(18))
        assert all(row["role"] == "dense" for row in rows)
        assert all(row["tensors"] == 13 == len(layers[row["index"]]) for row in rows)
        for row in rows:
            assert row["bytes"] == sum(layers[row["index"]])
        t = s["totals"]
        assert t["layers"] == 18
        assert t["shared_bytes"] == shared
        assert t["largest_layer_bytes"] == largest
        assert t["peak_one_layer_bytes"] == shared + largest
        assert t["tensor_bytes"] == shared + sum(sum(v) for v in layers.values())
        if path == gemma_path:
            assert s["kind"] == "gguf"
            assert s["file_bytes"] == GEMMA_SIZE
        else:
            assert s["kind"] == "split"
            assert s["file_bytes"] == sum(p.stat().st_size for p in gemma_cli_split.glob("*.gguf"))
        assert s["hyperparameters"]["architecture"] == "gemma3"
