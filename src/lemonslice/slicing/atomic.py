"""Stage output beside its target and move it into place only when complete.

A killed or failed run leaves the target as it was: no half-written set ever appears
under the target's name. Staging names carry the writer's pid so a later run can
remove what a killed one left behind.

`--force` replaces only what lemonslice could have written: an empty directory or one that
holds nothing but a split (the files its manifest.json names, the manifest and the verify
stamp), and a single file that is a GGUF, an empty file or a lemonslice JSON record.
Outputs get the modes open() and mkdir() give under the caller's umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import stat
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from ..errors import LemonsliceError
from ..gguf.constants import FORMAT_NAME, GGUF_MAGIC, MANIFEST_NAME
from .manifest import load_manifest

_STAGE_TAG = ".lemonslice-tmp-"
# Written by `verify` beside a split's manifest: each file's stat when its hash was last checked.
STAMP_NAME = ".lemonslice-verified.json"
# Where `pull` stages what it downloads into a split directory (removed when a pull completes).
PULL_DIR = ".pull"
# Where `sync` stages files inside a split directory, with its journal (see journal.py).
SYNC_DIR = ".lemonslice-sync"
# A JSON file larger than this is not one of lemonslice's records (checked before parsing).
_MAX_RECORD_BYTES = 64 << 20
_SHOWN_NAMES = 4


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(target: Path) -> None:
    for p in target.parent.glob(f".{target.name}{_STAGE_TAG}*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def current_umask() -> int:
    """The process umask, read from /proc where it can be: os.umask can only set it, and the
    set-and-restore would briefly give other threads a umask of 0."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_modes(tmp: Path) -> None:
    """Give a staged directory and what was written into it the modes mkdir() and open() give
    under the umask (mkdtemp makes it 0700). Hard-linked files share their inode, and so their
    mode, with a source file that is not ours to change."""
    umask = current_umask()
    os.chmod(tmp, 0o777 & ~umask)
    for root, dirs, files in os.walk(tmp):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                os.chmod(p, 0o777 & ~umask)
            elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                os.chmod(p, 0o666 & ~umask)


def _shown(names: list[str]) -> str:
    more = ", …" if len(names) > _SHOWN_NAMES else ""
    return ", ".join(names[:_SHOWN_NAMES]) + more


def _not_ours_dir(target: Path) -> str | None:
    """Why the non-empty directory `target` is not lemonslice's to replace; None when it holds
    only a split: the files its manifest names, the manifest and the verify stamp."""
    names = sorted(os.listdir(target))
    ours = {MANIFEST_NAME, STAMP_NAME}
    if MANIFEST_NAME in names:
        try:
            ours |= {f.name for f in load_manifest(target).files}
        except LemonsliceError as e:
            return f"its {MANIFEST_NAME} is not a valid {FORMAT_NAME} manifest ({e}); remove the directory yourself"
    foreign = []
    for n in names:
        st = os.lstat(target / n)
        if stat.S_ISDIR(st.st_mode):
            if n not in (PULL_DIR, SYNC_DIR):
                foreign.append(n + "/")
        elif n not in ours and not n.startswith(f".{STAMP_NAME}{_STAGE_TAG}"):
            foreign.append(n)
    if foreign:
        return f"it holds files lemonslice did not write ({_shown(foreign)}); remove them or choose another directory"
    return None


def check_target_dir(target: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse a target that is not a directory, holds an input, or holds anything but a split;
    an earlier split needs `force`."""
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise LemonsliceError(f"{target} exists and is not a directory")
        if any(target.iterdir()):
            for i in inputs:
                if _inside(i, target):
                    raise LemonsliceError(f"refusing to replace {target}: it holds the input {i}")
            why = _not_ours_dir(target)
            if why is not None:
                raise LemonsliceError(f"refusing to replace {target}: {why}")
            if not force:
                raise LemonsliceError(f"{target} holds an earlier lemonslice split; pass --force to replace it")


def _is_record(path: Path) -> bool:
    """A JSON object whose "format" names a lemonslice format (manifest, stamp, surgery sidecar)."""
    try:
        if path.stat().st_size > _MAX_RECORD_BYTES:
            return False
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("format"), str) and d["format"].startswith("lemonslice-")


def _not_ours_file(target: Path) -> str | None:
    if not target.is_file():
        return "it is not a regular file"
    try:
        with open(target, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    if head in (GGUF_MAGIC, b"") or _is_record(target):
        return None
    return "it is not a GGUF file or a record lemonslice wrote; remove it or choose another name"


def check_target_file(target: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse a target that is a directory or an input, or exists and is not a GGUF, an empty
    file or a lemonslice record; an existing one of those needs `force`."""
    target = Path(os.path.abspath(target))
    if target.is_dir():
        raise LemonsliceError(f"{target} is a directory")
    for i in inputs:
        if target.exists() and i.exists() and os.path.samefile(i, target):
            raise LemonsliceError(f"refusing to overwrite the input {i}")
        if i.is_dir() and _inside(target, i):
            raise LemonsliceError(f"refusing to write {target} inside the input {i}")
    if target.exists():
        why = _not_ours_file(target)
        if why is not None:
            raise LemonsliceError(f"refusing to replace {target}: {why}")
        if not force:
            raise LemonsliceError(f"{target} exists; pass --force to replace it")


@contextlib.contextmanager
def staged_dir(target: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield an empty directory beside `target`; rename it to `target` on success."""
    target = Path(os.path.abspath(target))
    check_target_dir(target, force, inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{_STAGE_TAG}{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _apply_modes(tmp)
        fsync_dir(tmp)
        check_target_dir(target, force, inputs)
        if target.exists():
            # After the swap the old set sits at `tmp` and is removed below.
            if not _exchange(tmp, target):
                old = target.parent / f".{target.name}{_STAGE_TAG}{os.getpid()}-old"
                os.rename(target, old)
                os.rename(tmp, target)
                tmp = old
            fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(target: Path, force: bool = False, inputs: tuple[Path, ...] = (), guard: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it to `target` on success. With `guard`
    off (results the program rewrites as it goes) any existing file is replaced."""
    target = Path(os.path.abspath(target))
    if guard:
        check_target_file(target, force, inputs)
    elif target.is_dir():
        raise LemonsliceError(f"{target} is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{_STAGE_TAG}{os.getpid()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates the staging file 0600, which would leave outputs unreadable to others.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_output(path: Path) -> Iterator[Path]:
    """A temporary path that replaces `path`, whatever it holds, on success."""
    with staged_file(path, force=True, guard=False) as tmp:
        yield tmp


def write_text(path: Path, text: str) -> None:
    with staged_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM over the commit (renames only, milliseconds), then act on them:
    a Ctrl-C should not be what leaves a mix of files. Only the main thread can do this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            signal.raise_signal(got[0])
