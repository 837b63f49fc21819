"""Stage output beside its target and move it into place only when complete.

A killed or failed run leaves the target as it was: no half-written set ever appears
under the target's name. Staging names carry the writer's pid so a later run can
remove what a killed one left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import LemonsliceError

_STAGE_TAG = ".lemonslice-tmp-"


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


def check_target_dir(target: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise LemonsliceError(f"{target} exists and is not a directory")
        if any(target.iterdir()):
            if not force:
                raise LemonsliceError(f"{target} is not empty; pass --force to replace it")
            for i in inputs:
                if _inside(i, target):
                    raise LemonsliceError(f"refusing to replace {target}: it holds the input {i}")


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
def staged_file(target: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it to `target` on success."""
    target = Path(os.path.abspath(target))
    if target.is_dir():
        raise LemonsliceError(f"{target} is a directory")
    for i in inputs:
        if target.exists() and i.exists() and os.path.samefile(i, target):
            raise LemonsliceError(f"refusing to overwrite the input {i}")
        if i.is_dir() and _inside(target, i):
            raise LemonsliceError(f"refusing to write {target} inside the input {i}")
    if target.exists() and not force:
        raise LemonsliceError(f"{target} exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{_STAGE_TAG}{os.getpid()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_output(path: Path) -> Iterator[Path]:
    """A temporary path that replaces `path` on success; the file gets 0666 less the umask."""
    with staged_file(path, force=True) as tmp:
        # mkstemp creates the staging file 0600, which would leave results unreadable to others.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp


def write_text(path: Path, text: str) -> None:
    with staged_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
