"""Safety at the terminal: `--force` replaces only what lemonslice wrote, outputs follow the
umask, and a damaged split is refused (or warned about) before any weight is read.

Commands run as real subprocesses of the installed console script. Expected values are
written out by hand (modes, file names) or come from hashlib and byte comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cli_util import one_line_error

from lemonslice.gguf.reader import open_gguf
from lemonslice.slicing import atomic, split_gguf, verify_split

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))
STAMP = ".lemonslice-verified.json"
STAGE_TAG = ".lemonslice-tmp-"
# split stamps what it wrote, as verify does.
SPLIT_FILES = sorted([STAMP, "manifest.json", "shared.gguf", *(f"layer_{i:04d}.gguf" for i in range(9))])
RUN = ("--prompt-ids", "1,2,3", "-n", "2", "--threads", "1")


def cli(*args, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    return subprocess.run([LEMONSLICE, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def warnings_of(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(d: Path) -> dict[str, str]:
    """Every entry under `d`, hidden ones too, with its content hash ("dir" for directories)."""
    return {str(p.relative_to(d)): "dir" if p.is_dir() else sha256(p) for p in sorted(d.rglob("*"))}


def flip_data_byte(path: Path) -> None:
    """Change one byte inside the last tensor's data: the header still parses, the size is kept."""
    with open_gguf(path) as r:
        t = r.tensors[-1]
        at = t.data_start + t.n_bytes // 2
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture(scope="session")
def syn_path(tmp_path_factory) -> Path:
    from lemonslice.testing import tiny_qwen35moe, write_synthetic

    path = tmp_path_factory.mktemp("safetysyn") / "tiny.gguf"
    write_synthetic(path, tiny_qwen35moe(mtp=True))
    return path


@pytest.fixture(scope="session")
def dense_path(tmp_path_factory) -> Path:
    from lemonslice.testing import tiny_qwen35, write_synthetic

    path = tmp_path_factory.mktemp("safetydense") / "dense.gguf"
    write_synthetic(path, tiny_qwen35())
    return path


@pytest.fixture
def verified(syn_copy) -> Path:
    """A private split copy with a verify stamp."""
    r = cli("verify", syn_copy)
    assert r.returncode == 0, r.stderr
    assert (syn_copy / STAMP).is_file()
    return syn_copy


# ---- --force ------------------------------------------------------------------------------


def _unrelated(out: Path) -> None:
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("notes")
    (out / "sub" / "thesis.txt").write_text("four years of work")


@pytest.mark.parametrize("cmd", ["split", "surgery", "mtp strip"])
def test_force_refuses_a_directory_with_unrelated_files(cmd, syn_path, syn_split, tmp_path):
    out = tmp_path / "out"
    _unrelated(out)
    before = listing(out)
    assert before == {"notes.txt": sha256(out / "notes.txt"), "sub": "dir",
                      "sub/thesis.txt": sha256(out / "sub" / "thesis.txt")}
    args = {"split": ("split", syn_path, out), "surgery": ("surgery", "repeat 1-2", syn_split, "-o", out),
            "mtp strip": ("mtp", "strip", syn_split, out)}[cmd]
    for force in ((), ("--force",)):
        r = cli(*args, *force)
        one_line_error(r, "refusing to replace", "it holds files lemonslice did not write (notes.txt, sub/)")
        assert "--force" not in r.stderr  # forcing would not help: say so by not suggesting it
        assert listing(out) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left beside it


def test_force_refuses_a_split_with_an_extra_file_or_a_broken_manifest(syn_path, syn_split, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(syn_split, out)
    (out / "notes.txt").write_text("mine")
    before = listing(out)
    one_line_error(cli("split", syn_path, out, "--force"), "lemonslice did not write (notes.txt)")
    assert listing(out) == before

    (out / "notes.txt").unlink()
    (out / "manifest.json").write_text('{"format": "something-else"}')
    before = listing(out)
    one_line_error(cli("split", syn_path, out, "--force"), "manifest.json is not a valid lemonslice-gguf-v1 manifest")
    assert listing(out) == before


@pytest.mark.parametrize("cmd", ["merge", "surgery", "mtp strip", "convert"])
@pytest.mark.parametrize("existing", ["notes.txt", "dir"])
def test_force_refuses_a_single_file_target_that_is_not_a_gguf(cmd, existing, syn_path, syn_split, tmp_path):
    target = tmp_path / "target.gguf"  # the name surgery takes for a single-file output
    if existing == "dir":
        _unrelated(target)
    else:
        target.write_text("my notes, not a model")
    before = listing(tmp_path)
    args = {"merge": ("merge", syn_split, target), "surgery": ("surgery", "repeat 1-2", syn_path, "-o", target),
            "mtp strip": ("mtp", "strip", syn_path, target),
            "convert": ("convert", tmp_path / "no-checkpoint", target)}[cmd]
    r = cli(*args, "--force")
    line = one_line_error(r, str(target))
    assert ("not a GGUF file" in line) if existing == "notes.txt" else ("directory" in line), line
    assert listing(tmp_path) == before


def test_force_swaps_an_earlier_split(syn_path, dense_path, tmp_path):
    out = tmp_path / "out"
    assert cli("split", dense_path, out).returncode == 0
    assert cli("verify", out).returncode == 0  # leaves a stamp, which must not block the swap
    old = {p.name: (p.stat().st_ino, sha256(p)) for p in out.iterdir()}
    assert STAMP in old

    one_line_error(cli("split", syn_path, out), "holds an earlier lemonslice split; pass --force")
    r = cli("split", syn_path, out, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == SPLIT_FILES  # a new stamp, the old one went with the old set
    assert json.loads((out / "manifest.json").read_text())["source"]["sha256"] == sha256(syn_path)
    assert verify_split(out) == []
    new_inodes = {p.stat().st_ino for p in out.iterdir()}
    assert not new_inodes & {ino for ino, _ in old.values()}
    old_hashes = {h for _, h in old.values()}
    assert not old_hashes & {sha256(p) for p in out.iterdir()}  # nothing of the dense split is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no old set


def test_force_swap_is_one_rename_exchange(syn_path, dense_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    split_gguf(dense_path, out)
    dir_inode = out.stat().st_ino
    swaps = []
    real = atomic._exchange

    def spy(a: Path, b: Path) -> bool:
        staged_inode = a.stat().st_ino
        ok = real(a, b)
        swaps.append((ok, staged_inode))
        return ok

    monkeypatch.setattr(atomic, "_exchange", spy)
    split_gguf(syn_path, out, force=True)
    (ok, staged_inode), = swaps
    assert ok  # renameat2(RENAME_EXCHANGE): the name never points at a missing or half-built set
    assert out.stat().st_ino == staged_inode != dir_inode
    assert verify_split(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- modes under the umask ----------------------------------------------------------------


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(umask, file_mode, dir_mode, syn_path, tmp_path):
    L = LEMONSLICE
    script = f"""set -e
umask {umask:03o}
{L} split {syn_path} s
{L} verify s
{L} merge s merged.gguf
{L} surgery 'repeat 1-2' {syn_path} -o rys.gguf
{L} surgery 'repeat 1-2' s -o rys-split
{L} mtp strip {syn_path} stripped.gguf
{L} mtp strip s stripped-split
{sys.executable} -c 'from lemonslice.slicing.atomic import write_text; write_text("notes.json", "{{}}")'
"""
    r = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.lstat().st_mode) for p in tmp_path.rglob("*")}
    expect = {}
    for name in modes:
        expect[name] = dir_mode if (tmp_path / name).is_dir() else file_mode
    assert modes == expect
    for name in ("s", "rys-split", "stripped-split", "merged.gguf", "rys.gguf", "rys.gguf.surgery.json",
                 "stripped.gguf", "notes.json", f"s/{STAMP}", "s/layer_0005.gguf", "rys-split/manifest.json"):
        assert name in modes, name


def test_group_writable_umask_gives_group_writable_outputs(syn_path, tmp_path):
    # umask 002: 0664 and 0775, so the modes come from the umask and not from a fixed 0644.
    from lemonslice.slicing import merge_split
    from lemonslice.slicing.atomic import write_text

    old = os.umask(0o002)
    try:
        split_gguf(syn_path, tmp_path / "s")
        merge_split(tmp_path / "s", tmp_path / "m.gguf")
        write_text(tmp_path / "notes.json", "{}")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes == {"s": 0o775, "m.gguf": 0o664, "notes.json": 0o664, **{f"s/{n}": 0o664 for n in SPLIT_FILES}}


# ---- damaged splits -----------------------------------------------------------------------


def test_flipped_byte_after_verify_warns_and_verify_flag_refuses(verified, tmp_path):
    flip_data_byte(verified / "layer_0005.gguf")
    r = cli("run", verified, *RUN)
    assert r.returncode == 0, r.stderr
    (w,) = warnings_of(r)
    assert w == (f"warning: layer_0005.gguf changed since the last verify (modified time); "
                 f"run lemonslice verify {verified}")

    one_line_error(cli("run", verified, *RUN, "--verify"), f"{verified}/layer_0005.gguf: altered: sha256")
    one_line_error(cli("merge", verified, tmp_path / "m.gguf", "--verify"), "layer_0005.gguf: altered: sha256")
    assert not (tmp_path / "m.gguf").exists()

    # Without --verify merge (which reads every byte anyway) hashes the changed file first.
    one_line_error(cli("merge", verified, tmp_path / "m.gguf"), f"{verified}/layer_0005.gguf: altered: sha256")
    assert not (tmp_path / "m.gguf").exists()


def test_64_bytes_overwritten_in_a_fresh_split_warn_run_and_stop_merge(syn_path, tmp_path):
    """The issue's case: a split never verified; split's own stamp makes the change visible."""
    out = tmp_path / "out"
    assert cli("split", syn_path, out).returncode == 0
    layer = out / "layer_0005.gguf"
    with open_gguf(layer) as g:
        off = g.tensors[-1].data_start  # 64 bytes of tensor data, each changed
    with open(layer, "r+b") as f:
        f.seek(off)
        old = f.read(64)
        f.seek(off)
        f.write(bytes(b ^ 0x5A for b in old))
    r = cli("run", out, *RUN)
    assert r.returncode == 0, r.stderr
    (w,) = warnings_of(r)
    assert w.startswith("warning: layer_0005.gguf changed since the last verify"), w
    one_line_error(cli("merge", out, tmp_path / "m.gguf"), f"{out}/layer_0005.gguf: altered: sha256")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("cmd,stamped", [("run", False), ("run", True), ("merge", False), ("merge", True),
                                         ("perplexity", False), ("chat", True), ("sweep", False)])
def test_truncated_layer_file_is_refused(cmd, stamped, syn_copy, tmp_path):
    if stamped:
        assert cli("verify", syn_copy).returncode == 0
    layer = syn_copy / "layer_0005.gguf"
    size = layer.stat().st_size
    os.truncate(layer, size - 64)
    text = tmp_path / "text.txt"
    text.write_text("some text to score\n")
    args = {"run": ("run", syn_copy, *RUN), "merge": ("merge", syn_copy, tmp_path / "m.gguf"),
            "perplexity": ("perplexity", syn_copy, text), "chat": ("chat", syn_copy),
            "sweep": ("sweep", syn_copy, "-o", tmp_path / "sweep", "--probes", "math", "--limit", "1")}[cmd]
    line = one_line_error(cli(*args))
    assert line == (f"error: {syn_copy}/layer_0005.gguf: truncated: {size - 64} bytes, manifest says {size} "
                    f"(run lemonslice verify {syn_copy})")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("cmd", ["run", "merge"])
def test_manifest_whose_size_disagrees_is_refused(cmd, verified, tmp_path):
    m = json.loads((verified / "manifest.json").read_text())
    entry = next(f for f in m["files"] if f["name"] == "layer_0003.gguf")
    real = entry["size"]
    entry["size"] = real + 32
    (verified / "manifest.json").write_text(json.dumps(m))
    args = ("run", verified, *RUN) if cmd == "run" else ("merge", verified, tmp_path / "m.gguf")
    one_line_error(cli(*args), f"layer_0003.gguf: truncated: {real} bytes, manifest says {real + 32}")


def test_header_that_disagrees_with_the_manifest_is_refused(syn_copy, tmp_path):
    # Same size, one tensor renamed inside the header: only a header parse sees it.
    layer = syn_copy / "layer_0002.gguf"
    with open_gguf(layer) as r:
        name = r.tensors[0].name
    data = layer.read_bytes()
    assert data.count(name.encode()) == 1
    layer.write_bytes(data.replace(name.encode(), name[:-1].encode() + b"X"))
    for args in (("run", syn_copy, *RUN), ("merge", syn_copy, tmp_path / "m.gguf")):
        one_line_error(cli(*args), f"layer_0002.gguf: altered: holds tensor {name[:-1]}X where the manifest lists {name}")


def test_wrong_manifest_hash_warns_after_verify_and_verify_flag_refuses(verified, tmp_path):
    m = json.loads((verified / "manifest.json").read_text())
    m["files"][3]["sha256"] = "0" * 64
    (verified / "manifest.json").write_text(json.dumps(m))
    name = m["files"][3]["name"]
    r = cli("merge", verified, tmp_path / "m.gguf")  # the files are intact: merge rebuilds the source
    assert r.returncode == 0, r.stderr
    assert warnings_of(r) == [f"warning: manifest.json changed since the last verify; run lemonslice verify {verified}"]
    one_line_error(cli("run", verified, *RUN, "--verify"), f"{name}: altered: sha256")


def test_stamp_is_not_an_extra_file_and_merge_ignores_it(verified, syn_path, tmp_path):
    r = cli("verify", verified)
    assert r.returncode == 0 and "all files intact" in r.stdout, r.stderr
    r = cli("merge", verified, tmp_path / "m.gguf")
    assert r.returncode == 0 and warnings_of(r) == [], r.stderr
    assert sha256(tmp_path / "m.gguf") == sha256(syn_path)
    stamp = json.loads((verified / STAMP).read_text())
    assert stamp["manifest_sha256"] == sha256(verified / "manifest.json")
    st = (verified / "layer_0005.gguf").stat()
    assert stamp["files"]["layer_0005.gguf"] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def test_verify_flag_on_a_single_file_is_refused(syn_path):
    one_line_error(cli("run", syn_path, *RUN, "--verify"), "--verify checks a split directory", str(syn_path))


def test_gemma_split_flipped_byte_and_truncation(gemma_path, tmp_path):
    g = tmp_path / "g"
    assert cli("split", gemma_path, g).returncode == 0
    assert cli("verify", g).returncode == 0
    flip_data_byte(g / "layer_0005.gguf")
    r = cli("run", g, "-p", "The capital of France is", "-n", "1")
    assert r.returncode == 0, r.stderr
    assert warnings_of(r) == [f"warning: layer_0005.gguf changed since the last verify (modified time); "
                              f"run lemonslice verify {g}"]
    one_line_error(cli("run", g, "-p", "x", "-n", "2", "--verify"), "layer_0005.gguf: altered")
    os.truncate(g / "layer_0005.gguf", 1000)
    one_line_error(cli("run", g, "-p", "x", "-n", "2"), "layer_0005.gguf: truncated: 1000 bytes")
