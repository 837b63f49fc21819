"""Make a split directory an exact copy of another, moving only the files that differ.

What differs is read from the two manifests (a file's sha256 and size) and from DST's own
files: one whose size or hash does not match DST's manifest counts as changed. A DST file's
hash is taken from its verify stamp when the stamp shows the file unchanged since it was
hashed against this manifest, else read again.

New and changed files are staged in DST/.lemonslice-sync/ as reflinks (copy-on-write clones)
where the filesystem has them, else as kernel-side copies, or with `hardlink` as hard links;
each is fsynced and hashed against SRC's manifest before the journal commits the sync and
`journal.finish` moves them into place (journal.py says what an interruption leaves).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import LemonsliceError
from ..gguf.constants import LAYER_FILE_RE, MANIFEST_NAME, SHARED_FILE
from ..gguf.writer import copy_range
from .atomic import SYNC_DIR, fsync_dir, signals_held
from .integrity import check_split, vouched
from .journal import Journal, finish, write_journal
from .manifest import FileEntry, Manifest, load_manifest
from .verify import is_split_aside, sha256_file, stamp_written

Progress = Callable[[int, int], None]
_CHUNK = 8 << 20
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_NO_SHARING = (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EPERM, errno.ENOSYS, errno.EMLINK)
_SHOWN_NAMES = 4


@dataclass
class SyncReport:
    src: str
    dst: str
    copied: list[str] = field(default_factory=list)
    linked: dict[str, str] = field(default_factory=dict)  # name -> "reflink" or "hardlink": no bytes written
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # of each file above (DST's size for a removed one)
    finished: list[str] = field(default_factory=list)  # moved into place for an earlier, interrupted sync
    warnings: list[str] = field(default_factory=list)

    def total(self, names: "list[str] | dict[str, str]") -> int:
        return sum(self.sizes[n] for n in names)

    def to_dict(self) -> dict:
        def files(names: "list[str] | dict[str, str]") -> list[dict]:
            return [{"file": n, "bytes": self.sizes[n]} | ({"how": names[n]} if isinstance(names, dict) else {})
                    for n in names]

        return {
            "src": self.src, "dst": self.dst, "copied": files(self.copied), "linked": files(self.linked),
            "kept": files(self.kept), "removed": files(self.removed), "finished_interrupted_sync": self.finished,
            "bytes": {k: self.total(getattr(self, k)) for k in ("copied", "linked", "kept", "removed")},
            "warnings": self.warnings,
        }


class _Tick:
    """Byte progress over the whole sync; the total grows as the work becomes known. Called
    from the hashing threads too."""

    def __init__(self, progress: Progress | None):
        self.progress, self.done, self.total = progress, 0, 0
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.progress:
                self.progress(self.done, self.total)


def _is_split_name(name: str) -> bool:
    return name == SHARED_FILE or LAYER_FILE_RE.match(name) is not None


def _inside(a: Path, b: Path) -> bool:
    return a.resolve().is_relative_to(b.resolve())


def _check_paths(src: Path, dst: Path) -> None:
    if dst.exists() and not dst.is_dir():
        raise LemonsliceError(f"{dst} exists and is not a directory")
    if _inside(dst, src) or _inside(src, dst):
        raise LemonsliceError(f"refusing to sync {src} into {dst}: one lies inside the other")


def _dst_manifest(dst: Path) -> Manifest | None:
    """DST's manifest; None when DST is empty. Refuses a directory that is not a split, or
    one that holds files a split does not (they would survive the sync)."""
    names = sorted(os.listdir(dst))
    if MANIFEST_NAME not in names:
        if names:
            raise LemonsliceError(f"refusing to sync into {dst}: it is not empty and has no {MANIFEST_NAME} "
                                  "(not a lemonslice split directory)")
        return None
    m = load_manifest(dst)
    foreign = []
    for n in names:
        if n == MANIFEST_NAME or is_split_aside(n):
            continue
        if not _is_split_name(n) or not (dst / n).is_file():
            foreign.append(n + ("/" if (dst / n).is_dir() else ""))
    if foreign:
        more = ", …" if len(foreign) > _SHOWN_NAMES else ""
        raise LemonsliceError(f"refusing to sync into {dst}: it holds files a split does not "
                              f"({', '.join(foreign[:_SHOWN_NAMES])}{more}); remove them or choose another directory")
    return m


def _kept(dst: Path, md: Manifest | None, ms: Manifest, rehash: bool, tick: _Tick) -> set[str]:
    """SRC's files DST already has: the same sha256 and size in both manifests, and DST's file
    a regular file that matches its own manifest."""
    if md is None:
        return set()
    have = {f.name: f for f in md.files}
    same = [f for f in ms.files if f.name in have and (have[f.name].sha256, have[f.name].size) == (f.sha256, f.size)]
    candidates = []
    for f in same:
        p = dst / f.name
        if not p.is_symlink() and p.is_file() and p.stat().st_size == f.size:
            candidates.append(f)
    trusted = set() if rehash else vouched(dst, md)
    to_hash = [f for f in candidates if f.name not in trusted]
    tick.total += sum(f.size for f in to_hash)
    with ThreadPoolExecutor(max_workers=2) as ex:
        digests = list(ex.map(lambda f: sha256_file(dst / f.name, tick), to_hash))
    hashed = {f.name for f, d in zip(to_hash, digests) if d == f.sha256}
    return {f.name for f in candidates if f.name in trusted} | hashed


def _hardlink(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst)
        return True
    except OSError as e:
        if e.errno not in _NO_SHARING:
            raise
        return False


def _reflink(src_fd: int, dst_fd: int) -> bool:
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return True
    except OSError as e:
        if e.errno not in _NO_SHARING:
            raise
        return False


def _place(src: Path, tmp: Path, size: int, hardlink: bool, tick: _Tick) -> str:
    """Put SRC's file at `tmp` (fsynced); how: "hardlink", "reflink" or "copy"."""
    if hardlink and _hardlink(src, tmp):
        tick(size)
        return "hardlink"
    with open(src, "rb") as s:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            how = "reflink" if _reflink(s.fileno(), fd) else "copy"
            if how == "reflink":
                tick(size)
            for off in range(0, size if how == "copy" else 0, _CHUNK):
                n = min(_CHUNK, size - off)
                copy_range(s.fileno(), off, fd, off, n)
                tick(n)
            os.fsync(fd)
        finally:
            os.close(fd)
    return how


def _stage(src: Path, dst: Path, fetch: list[FileEntry], manifest: bytes, ms: Manifest, hardlink: bool,
           tick: _Tick) -> dict[str, str]:
    """Stage SRC's files `fetch` and its manifest in DST's sync directory, each checked against
    SRC's manifest; on any failure the staging directory is removed and DST is as it was."""
    stage = dst / SYNC_DIR
    stage.mkdir()
    how: dict[str, str] = {}
    try:
        for f in fetch:
            how[f.name] = _place(src / f.name, stage / f.name, f.size, hardlink, tick)
            got = os.stat(stage / f.name).st_size
            digest = sha256_file(stage / f.name, tick) if got == f.size else None
            if digest != f.sha256:
                what = "sha256 differs from its manifest's" if digest else f"{got} bytes, its manifest says {f.size}"
                raise LemonsliceError(f"{src / f.name}: {what} (run lemonslice verify {src}); {dst} was not changed")
        with open(stage / MANIFEST_NAME, "wb") as fh:
            fh.write(manifest)
            fh.flush()
            os.fsync(fh.fileno())
        if load_manifest(stage) != ms:
            raise LemonsliceError(f"{src / MANIFEST_NAME} changed during the sync; {dst} was not changed")
        fsync_dir(stage)
    except BaseException:
        finish(dst)  # no journal yet: this removes the staging directory
        raise
    return how


@contextlib.contextmanager
def _locked(dst: Path) -> Iterator[None]:
    fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LemonsliceError(f"{dst}: another lemonslice sync is writing it") from None
        yield
    finally:
        os.close(fd)


def same_manifest(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> bool:
    """Whether DST's manifest is SRC's, byte for byte (after an interrupted sync: which model DST holds)."""
    try:
        return (Path(src) / MANIFEST_NAME).read_bytes() == (Path(dst) / MANIFEST_NAME).read_bytes()
    except OSError:
        return False


def sync_split(src: str | os.PathLike[str], dst: str | os.PathLike[str], hardlink: bool = False,
               rehash: bool = False, progress: Progress | None = None) -> SyncReport:
    """Make DST an exact copy of the split SRC (see the module's docstring). `rehash` hashes
    DST's files rather than trusting its verify stamp."""
    src, dst = Path(src), Path(dst)
    report = SyncReport(str(src), str(dst), warnings=check_split(src))
    _check_paths(src, dst)
    ms = load_manifest(src)
    manifest = (src / MANIFEST_NAME).read_bytes()
    dst.mkdir(parents=True, exist_ok=True)
    with _locked(dst):
        earlier = finish(dst)
        report.finished = earlier.move if earlier else []
        md = _dst_manifest(dst)
        tick = _Tick(progress)
        kept = _kept(dst, md, ms, rehash, tick)
        fetch = [f for f in ms.files if f.name not in kept]
        listed = {f.name for f in ms.files}
        remove = sorted(n for n in os.listdir(dst) if _is_split_name(n) and n not in listed)
        report.sizes = {f.name: f.size for f in ms.files} | {n: os.stat(dst / n).st_size for n in remove}
        stale = md is None or (dst / MANIFEST_NAME).read_bytes() != manifest
        if fetch or remove or stale:
            tick.total += sum(f.size for f in fetch) * 2
            how = _stage(src, dst, fetch, manifest, ms, hardlink, tick)
            with signals_held():
                write_journal(dst, Journal([f.name for f in fetch], remove))
                finish(dst)
            report.copied = [n for n, h in how.items() if h == "copy"]
            report.linked = {n: h for n, h in how.items() if h != "copy"}
            report.removed = remove
        report.kept = [f.name for f in ms.files if f.name in kept]
        # Every file was just hashed or vouched for by the stamp: a later change warns at load.
        stamp_written(dst, ms)
    return report
