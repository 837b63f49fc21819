"""`lemonslice diff` and `lemonslice sync` on a 12-layer synthetic qwen35moe and a "fine-tune"
of it that differs in exactly three layers.

The fine-tune is written by the test: the tensors it re-draws with another seed or re-encodes
as F16 are listed in RESEED and RETYPE below, and every expectation (which layers changed,
which tensors and how, the byte totals) is worked out from those lists and the bytes the test
wrote, never from the code under test. Commands run as the installed console script; the
interruption tests crash a real sync process at chosen points.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_util import one_line_error

from lemonslice.gguf.constants import GGMLType
from lemonslice.gguf.writer import write_gguf
from lemonslice.slicing import split_gguf
from lemonslice.slicing import diff as diff_mod
from lemonslice.slicing import sync as sync_mod
from lemonslice.slicing.sync import sync_split
from lemonslice.testing import encode_tensor, synthetic_tensors, tensor_values, tiny_qwen35moe, write_synthetic
from lemonslice.testing.metadata import model_kv

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
STAMP = ".lemonslice-verified.json"
SYNC_DIR = ".lemonslice-sync"
N_LAYER = 12
# The fine-tune: per layer, which tensor kinds get values of another seed, and which are re-encoded as F16.
RESEED = {2: lambda kind: True, 5: lambda kind: kind.endswith("_exps"), 9: lambda kind: kind == "attn_norm"}
RETYPE = {9: {"ffn_down_exps"}}
CHANGED = sorted(RESEED.keys() | RETYPE.keys())


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def contents(d: Path) -> dict[str, str]:
    """Each entry of a split directory with its hash ("dir" for a directory); the verify stamp
    is not part of a split."""
    return {p.name: "dir" if p.is_dir() else sha256(p) for p in sorted(d.iterdir()) if p.name != STAMP}


def stats(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.iterdir() if p.suffix == ".gguf"}


def layer_file(i: int) -> str:
    return f"layer_{i:04d}.gguf"


def write_finetune(path: Path, config) -> dict[str, tuple[str, int]]:  # noqa: ANN001
    """Write the fine-tune of `config`; return each tensor it changed -> (how, its byte size)."""
    other = config.replace(seed=config.seed + 1)
    tensors, changed = [], {}
    for t in synthetic_tensors(config):
        layer, kind = t.slot.layer, t.slot.kind
        retype = kind in RETYPE.get(layer, ())
        reseed = layer in RESEED and RESEED[layer](kind)
        typ = GGMLType.F16 if retype else t.ggml_type
        data = encode_tensor(tensor_values(other if reseed else config, t.slot), typ)
        tensors.append((t.name, t.shape, typ, data))
        if retype or reseed:
            changed[t.name] = ("type" if retype else "bytes", data.nbytes)
    write_gguf(path, model_kv(config), tensors)
    return changed


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("ship")
    config = tiny_qwen35moe(n_layer=N_LAYER)
    write_synthetic(d / "a.gguf", config)
    changed = write_finetune(d / "b.gguf", config)
    # The same model with an MTP block: one more layer, and metadata that differs.
    write_synthetic(d / "c.gguf", config.replace(mtp=True))
    for n in "abc":
        split_gguf(d / f"{n}.gguf", d / n)
    return SimpleNamespace(dir=d, config=config, changed=changed)


def expected_tensors(pair, layer: int) -> dict[str, str]:  # noqa: ANN001
    return {n: how for n, (how, _) in pair.changed.items() if n.startswith(f"blk.{layer}.")}


def b_tensor_bytes(pair, layers) -> int:  # noqa: ANN001
    """B's tensor bytes in `layers`, from the tensors the test wrote (re-typed ones at F16)."""
    total = 0
    for t in synthetic_tensors(pair.config):
        if t.slot.layer in layers:
            same = encode_tensor(tensor_values(pair.config, t.slot), t.ggml_type).nbytes
            total += pair.changed[t.name][1] if t.name in pair.changed else same
    return total


# ---- diff ----------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b", [("a", "b"), ("a.gguf", "b.gguf"), ("a", "b.gguf"), ("a.gguf", "b")])
def test_diff_names_exactly_the_changed_layers_and_tensors(pair, a, b):
    r = cli("diff", pair.dir / a, pair.dir / b, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    units = {u["layer"]: u for u in d["units"]}
    assert sorted(units, key=lambda x: -1 if x is None else x) == [None, *range(N_LAYER)]
    assert [k for k, u in units.items() if u["status"] == "changed"] == CHANGED
    assert all(units[k]["status"] == "equal" and not units[k]["tensors"] for k in units if k not in CHANGED)
    for layer in CHANGED:
        got = {t["name"]: t["kind"] for t in units[layer]["tensors"]}
        assert got == expected_tensors(pair, layer), layer
        assert units[layer]["file"] == layer_file(layer) and not units[layer]["header_only"]
    retyped = next(t for t in units[9]["tensors"] if t["kind"] == "type")
    assert retyped["a"].startswith("Q8_0 ") and retyped["b"].startswith("F16 ")
    assert d["counts"] == {"equal": N_LAYER + 1 - len(CHANGED), "changed": len(CHANGED), "added": 0, "removed": 0}
    assert d["kv_changed"] == []
    assert d["bytes_differ"] == sum(nbytes for _, nbytes in pair.changed.values())
    if b == "b":  # by the layer file: the three files sync would copy
        assert d["bytes_to_move"] == sum((pair.dir / "b" / layer_file(i)).stat().st_size for i in CHANGED)
    else:
        assert d["bytes_to_move"] == b_tensor_bytes(pair, CHANGED)


def test_diff_text_output(pair):
    r = cli("diff", pair.dir / "a", pair.dir / "b")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "equal: shared, layers 0-1,3-4,6-8,10-11" in lines
    assert [ln.split(" (")[0] for ln in lines if ln.startswith("changed: ")] == [f"changed: layer {i}" for i in CHANGED]
    assert any(ln.split() == ["blk.9.ffn_down_exps.weight", "type", "Q8_0", "32x64x8", "->", "F16", "32x64x8"]
               for ln in lines), r.stdout
    assert "metadata: equal" in lines
    assert lines[-1].startswith(f"{N_LAYER + 1 - len(CHANGED)} equal, {len(CHANGED)} changed, 0 added, 0 removed;")


def test_diff_of_splits_reads_only_the_changed_files(pair, tmp_path, monkeypatch):
    """Equal files are decided by the manifests alone: A's layer 0 with its tensor bytes altered
    (size and header intact) still counts as equal, with a warning, and no data of it is read."""
    a = tmp_path / "a"
    shutil.copytree(pair.dir / "a", a)
    with open(a / layer_file(0), "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\x55" * 64)
    read: list[str] = []
    real = diff_mod._hash_spans

    def spy(spans, tick):  # noqa: ANN001, ANN202
        read.extend(os.readlink(f"/proc/self/fd/{fd}") for fd, _, _ in spans)
        return real(spans, tick)

    monkeypatch.setattr(diff_mod, "_hash_spans", spy)
    r = diff_mod.diff_models(a, pair.dir / "b")
    assert [u.layer for u in r.units if u.status == "changed"] == CHANGED
    assert {Path(p).name for p in read} == {layer_file(i) for i in CHANGED}
    assert any(layer_file(0) in w and "changed since the last verify" in w for w in r.warnings), r.warnings


def test_diff_header_only_changes_and_an_added_layer(pair):
    """With an MTP block the model's metadata changes, and every split file repeats it."""
    d = json.loads(cli("diff", pair.dir / "a", pair.dir / "c", "--json").stdout)
    units = {u["layer"]: u for u in d["units"]}
    assert units[N_LAYER]["status"] == "added" and units[N_LAYER]["size_a"] == 0
    assert all(units[k]["status"] == "changed" and units[k]["header_only"] and not units[k]["tensors"]
               for k in units if k != N_LAYER)
    assert "qwen35moe.block_count" in d["kv_changed"]
    g = json.loads(cli("diff", pair.dir / "a.gguf", pair.dir / "c.gguf", "--json").stdout)
    assert [u["layer"] for u in g["units"] if u["status"] != "equal"] == [N_LAYER]
    assert g["kv_changed"] == d["kv_changed"]
    back = json.loads(cli("diff", pair.dir / "c.gguf", pair.dir / "a", "--json").stdout)
    assert [(u["layer"], u["status"]) for u in back["units"] if u["status"] != "equal"] == [(N_LAYER, "removed")]


def test_diff_bad_inputs(pair, tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("diff", pair.dir / "a", tmp_path / "missing"), "missing")
    one_line_error(cli("diff", tmp_path / "notes.txt", pair.dir / "b"), "not a GGUF")
    one_line_error(cli("diff", pair.dir / "a", tmp_path / "empty"), "manifest.json")


# ---- sync ----------------------------------------------------------------------------------


@pytest.fixture
def dst(pair, tmp_path) -> Path:
    """A deployed copy of model A."""
    out = tmp_path / "deployed"
    shutil.copytree(pair.dir / "a", out)
    return out


def test_sync_copies_only_the_changed_layers(pair, dst):
    before = stats(dst)
    r = cli("sync", pair.dir / "b", dst, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    moved = [f["file"] for f in d["copied"] + d["linked"]]  # linked: a reflink where the filesystem has them
    assert sorted(moved) == [layer_file(i) for i in CHANGED]
    sizes = sum((pair.dir / "b" / n).stat().st_size for n in moved)
    assert d["bytes"]["copied"] + d["bytes"]["linked"] == sizes
    assert d["removed"] == [] and len(d["kept"]) == N_LAYER + 1 - len(CHANGED)
    after = stats(dst)
    assert {n for n in after if after[n] != before[n]} == set(moved)
    assert cli("verify", dst).returncode == 0
    assert contents(dst) == contents(pair.dir / "b")
    assert not (dst / SYNC_DIR).exists()

    again = json.loads(cli("sync", pair.dir / "b", dst, "--json").stdout)
    assert again["copied"] == again["linked"] == [] and again["bytes"]["kept"] == sum(
        (pair.dir / "b" / n).stat().st_size for n in contents(pair.dir / "b") if n.endswith(".gguf"))
    assert stats(dst) == after


def test_sync_text_output_and_removed_files(pair, tmp_path):
    new = tmp_path / "new"
    r = cli("sync", pair.dir / "c", new)  # created; every file copied
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith(f"synced {pair.dir / 'c'} -> {new}: ")
    r = cli("sync", pair.dir / "b", new)
    assert r.returncode == 0, r.stderr
    assert f"removed  {layer_file(N_LAYER)}" in r.stdout
    # The MTP model's metadata differs, so every file is B's now; the extra layer is gone.
    assert ", removed 1 (" in r.stdout.splitlines()[-1]
    assert contents(new) == contents(pair.dir / "b") and cli("verify", new).returncode == 0


def test_sync_into_an_empty_directory_with_hardlinks(pair, tmp_path):
    out = tmp_path / "linked"
    out.mkdir()
    d = json.loads(cli("sync", pair.dir / "b", out, "--hardlink", "--json").stdout)
    assert {f["how"] for f in d["linked"]} == {"hardlink"} and d["copied"] == []
    files = [n for n in contents(out) if n.endswith(".gguf")]
    assert all((out / n).stat().st_ino == (pair.dir / "b" / n).stat().st_ino for n in files)
    assert contents(out) == contents(pair.dir / "b") and cli("verify", out).returncode == 0


def test_sync_failing_midway_leaves_the_old_model(pair, dst, monkeypatch):
    calls = []
    real = sync_mod._place

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(27, "File too large")
        return real(*args, **kwargs)

    monkeypatch.setattr(sync_mod, "_place", failing)
    old = contents(dst)
    with pytest.raises(OSError):
        sync_split(pair.dir / "b", dst)
    assert contents(dst) == old and not (dst / SYNC_DIR).exists()
    assert cli("verify", dst).returncode == 0
    monkeypatch.setattr(sync_mod, "_place", real)
    sync_split(pair.dir / "b", dst)
    assert contents(dst) == contents(pair.dir / "b")


# A sync process that dies (os._exit, as a kill would) at one point: inside the second file's copy,
# or right after the first file is renamed into place.
CRASH = """
import os, sys
from lemonslice.slicing import sync
where = sys.argv[3]
if where == "staging":
    real, n = sync._place, []
    def place(*a, **k):
        n.append(1)
        if len(n) == 2:
            os._exit(9)
        return real(*a, **k)
    sync._place = place
else:
    real_rename = os.rename
    def rename(a, b):
        real_rename(a, b)
        if os.path.basename(os.path.dirname(os.fspath(a))) == ".lemonslice-sync" and os.fspath(b).endswith(".gguf"):
            os._exit(9)
    os.rename = rename
sync.sync_split(sys.argv[1], sys.argv[2])
"""


def crash_sync(src: Path, dst: Path, where: str) -> None:
    r = subprocess.run([sys.executable, "-c", CRASH, str(src), str(dst), where], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr


def test_sync_killed_while_staging_leaves_the_old_model(pair, dst):
    old = contents(dst)
    crash_sync(pair.dir / "b", dst, "staging")
    assert (dst / SYNC_DIR).is_dir()  # what the killed sync staged is left behind, and ignored
    assert {n: h for n, h in contents(dst).items() if n != SYNC_DIR} == old
    assert cli("verify", dst).returncode == 0
    r = cli("sync", pair.dir / "b", dst)
    assert r.returncode == 0 and "finished an interrupted sync" not in r.stdout, r.stderr
    assert contents(dst) == contents(pair.dir / "b") and cli("verify", dst).returncode == 0


def test_sync_killed_between_renames_is_reported_and_finished(pair, dst, tmp_path):
    crash_sync(pair.dir / "b", dst, "renames")
    first = layer_file(CHANGED[0])
    assert sha256(dst / first) == sha256(pair.dir / "b" / first)  # moved; the manifest is still A's
    v = cli("verify", dst)
    assert v.returncode == 1
    problems = {ln.split(": ")[0]: ln for ln in v.stderr.splitlines()[:-1]}
    assert set(problems) == {SYNC_DIR + "/", first}, v.stderr
    assert f"after moving 1 of {len(CHANGED)} files into place ({first})" in problems[SYNC_DIR + "/"]
    # Loads refuse the mix of files.
    one_line_error(cli("merge", dst, tmp_path / "m.gguf"), "a sync was interrupted", "lemonslice sync again")
    r = cli("sync", pair.dir / "b", dst)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"finished an interrupted sync first ({len(CHANGED)} file(s)")
    assert contents(dst) == contents(pair.dir / "b") and cli("verify", dst).returncode == 0


# `lemonslice sync` sent SIGTERM (as `kill` would) while it stages the second file, or once the
# journal has committed it: the first stops with DST as it was, the second finishes its renames first.
TERM = """
import os, signal, sys
from lemonslice.slicing import sync
where = sys.argv[3]
real_place, real_finish, n = sync._place, sync.finish, []
def place(*a, **k):
    n.append(1)
    if where == "staging" and len(n) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_place(*a, **k)
def finish(d):
    if where == "commit" and (d / ".lemonslice-sync" / "journal.json").exists():
        os.kill(os.getpid(), signal.SIGTERM)
    return real_finish(d)
sync._place, sync.finish = place, finish
from lemonslice.cli import main
sys.argv = ["lemonslice", "sync", sys.argv[1], sys.argv[2]]
main()
"""


@pytest.mark.parametrize("where", ["staging", "commit"])
def test_sync_terminated(pair, dst, where):
    old = contents(dst)
    r = subprocess.run([sys.executable, "-c", TERM, str(pair.dir / "b"), str(dst), where], capture_output=True,
                       text=True)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    if where == "staging":
        assert r.stderr.strip() == f"interrupted; {dst} is as it was"
        assert contents(dst) == old
    else:
        assert r.stderr.strip() == f"interrupted; the sync had completed; {dst} matches {pair.dir / 'b'}"
        assert contents(dst) == contents(pair.dir / "b")
    assert cli("verify", dst).returncode == 0


def test_sync_refusals(pair, dst, tmp_path):
    b = pair.dir / "b"
    (tmp_path / "file").write_text("x")
    one_line_error(cli("sync", tmp_path / "file", tmp_path / "x"), "not a directory")
    (tmp_path / "plain").mkdir()
    one_line_error(cli("sync", tmp_path / "plain", tmp_path / "x"), "manifest.json")
    one_line_error(cli("sync", b, tmp_path / "file"), "not a directory")
    one_line_error(cli("sync", b, b), "inside")
    one_line_error(cli("sync", b, b / "sub"), "inside")
    assert not (b / "sub").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    one_line_error(cli("sync", b, other), "not a lemonslice split directory")
    (dst / "notes.txt").write_text("mine\n")
    one_line_error(cli("sync", b, dst), "notes.txt")
    (dst / "notes.txt").unlink()

    # A damaged SRC: a layer file cut short.
    bad = tmp_path / "bad"
    shutil.copytree(b, bad)
    with open(bad / layer_file(3), "r+b") as f:
        f.truncate(1000)
    one_line_error(cli("sync", bad, dst), layer_file(3), "truncated")
    # Manifest names are checked as verify checks them: no paths out of the directory.
    m = json.loads((bad / "manifest.json").read_text())
    m["files"][1]["name"] = "../escape.gguf"
    (bad / "manifest.json").write_text(json.dumps(m))
    one_line_error(cli("sync", bad, dst), "../escape.gguf")
    (dst / "manifest.json").write_text(json.dumps(m))
    one_line_error(cli("sync", b, dst), "../escape.gguf")


def test_sync_refuses_a_directory_another_sync_holds(pair, dst):
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        one_line_error(cli("sync", pair.dir / "b", dst), "another lemonslice sync")
    finally:
        os.close(fd)
