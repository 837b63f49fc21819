"""Bring a split directory to a peer's version, fetching only the files it lacks or holds in
another version (`lemonslice pull`; peers run `lemonslice serve-layers`).

The manifest comes from the first peer that answers and passes the same checks as a local one
(file names are `shared.gguf` or `layer_NNNN.gguf`, so nothing can be written outside DST).
Files stream into `DST/.pull/NAME.part`, hashed as they arrive, a few connections at once,
spread over the peers; a sidecar `NAME.part.json` records the sha256 the part is for, so a
later run resumes it with a Range request (after re-hashing what is there) or discards it when
the version changed. A file whose bytes are short, cut off or hash to something else is fetched
again from another peer, and the peer is named in a warning. Only when every file is complete
and checked are they renamed into DST; the new manifest goes in last (atomically), and files
it no longer names are removed after that. Until then DST is its old model: a failure (a peer
with bad bytes only, a full disk) leaves only `.pull/`, which the next run reuses or cleans.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import queue
import shutil
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from ..errors import LemonsliceError
from ..gguf.constants import LAYER_FILE_RE, MANIFEST_NAME, SHARED_FILE
from . import fetch
from .atomic import _STAGE_TAG, PULL_DIR, fsync_dir, signals_held, write_text
from .integrity import vouched
from .journal import pending
from .manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest, parse_manifest
from .verify import is_split_aside, sha256_file, stamp_written

log = logging.getLogger(__name__)

# bytes done, bytes in all, files done, files in all
Progress = Callable[[int, int, int, int], None]
_CONNECT_S = 5.0
# Body bytes received per read, per connection. Small enough to stay in a core's L2 cache
# between the socket, the hash and the write: 1 MiB took twice the system time here.
_BUFFER = 256 << 10
# Bytes gathered per part before one O_DIRECT write; a multiple of the page size.
_OUT = 8 << 20
_PAGE = 4096
# Seconds between progress reports.
_REPORT_S = 0.1
_SIDECAR = ".part.json"
_SHOWN = 3


@dataclass
class PullResult:
    manifest: Manifest
    source: str  # the peer whose manifest was installed
    fetched: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    resumed_bytes: int = 0  # bytes of earlier runs' parts that were kept
    received: dict[str, int] = field(default_factory=dict)  # peer -> bytes received this run

    @property
    def bytes_received(self) -> int:
        return sum(self.received.values())


class _Stop(Exception):
    """Another file's write failed or the run was interrupted: stop this one where it is."""


class _WriteFailed(LemonsliceError):
    pass


@dataclass
class _Part:
    """What `.pull/NAME.part` holds: its length, the hash of those bytes, and where they came
    from (None: an earlier run). Received bytes gather in `out`, a page-aligned buffer written
    with O_DIRECT where the file system takes it: no copy into the page cache, and nothing
    left for the fsync to wait on."""

    entry: FileEntry
    path: Path
    fd: int
    offset: int  # bytes received and hashed; the file holds offset - fill of them
    hasher: "hashlib._Hash"
    sources: set[str | None]
    out: mmap.mmap | None = None
    fill: int = 0

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        self.offset, self.hasher, self.sources, self.fill = 0, hashlib.sha256(), set(), 0

    def space(self) -> memoryview:
        """Where the next received bytes go (at most _BUFFER of them)."""
        if self.out is None:
            self.out = mmap.mmap(-1, _OUT)
        if self.fill == _OUT:
            self.flush()
        return memoryview(self.out)[self.fill: self.fill + _BUFFER]

    def took(self, n: int) -> None:
        # Hashed at once, while the bytes are still in the CPU's cache from the socket. A write
        # that fails stops the pull, and the next run hashes the part again from the disk.
        view = memoryview(self.out)[self.fill: self.fill + n]
        self.hasher.update(view)
        self.fill += n
        self.offset += n

    def flush(self) -> None:
        """Write what the buffer holds; a tail that is not whole pages goes through the cache."""
        if not self.fill:
            return
        whole = self.fill & ~(_PAGE - 1) if _direct(self.fd) else 0
        try:
            _write_all(self.fd, memoryview(self.out)[:whole], self.offset - self.fill)
            if whole < self.fill:
                _buffered(self.fd)
                _write_all(self.fd, memoryview(self.out)[whole: self.fill], self.offset - self.fill + whole)
        except OSError as e:
            raise _WriteFailed(f"cannot write {self.path}: {e.strerror or e}") from None
        finally:
            self.fill = 0

    def close(self) -> None:
        self.out = None  # not mmap.close(): a traceback may still hold a view of it


def _write_all(fd: int, view: memoryview, at: int) -> None:
    while view:
        n = os.pwrite(fd, view, at)
        at += n
        view = view[n:]


def _open_direct(path: Path) -> int:
    """`path` opened for writing, with O_DIRECT when the file system allows it (not tmpfs)."""
    flags = os.O_RDWR | os.O_CREAT
    try:
        return os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o666)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return os.open(path, flags, 0o666)


def _direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


def _buffered(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~getattr(os, "O_DIRECT", 0))


def _sync_and_close(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise _WriteFailed(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


@dataclass
class _Run:
    """Shared by the fetching threads."""

    peers: list[str]
    stage: Path
    retries: int
    progress: Progress | None
    warn: Callable[[str], None]
    timeout: float
    total: int
    files_total: int
    reported: float = 0.0
    done: int = 0
    files_done: int = 0
    resumed: int = 0  # bytes of earlier runs' parts kept
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    received: dict[str, int] = field(default_factory=dict)
    # Complete parts are fsynced on a thread of their own, so a connection goes on to its next
    # file while the kernel writes the last one out (per-file fsyncs cost ~1 s of 6 here).
    syncer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="fsync"))
    synced: list[Future] = field(default_factory=list)

    def done_with(self, part: _Part) -> None:
        """A complete, checked part: make it durable (in the background) and count it."""
        fd, part.fd = part.fd, -1
        self.synced.append(self.syncer.submit(_sync_and_close, fd, part.path))
        self.tick(0, file_done=True)

    def tick(self, n: int, peer: str | None = None, file_done: bool = False, resumed: bool = False) -> None:
        with self.lock:
            self.done += n
            self.resumed += n if resumed else 0
            self.files_done += file_done
            if peer is not None:
                self.received[peer] = self.received.get(peer, 0) + n
            now = time.monotonic()
            if self.progress and (file_done or now - self.reported >= _REPORT_S):
                self.reported = now
                self.progress(self.done, self.total, self.files_done, self.files_total)


def _peer_url(url: str) -> str:
    u = url.strip().removesuffix("/" + MANIFEST_NAME).rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise LemonsliceError(f"{url}: a peer is an http:// or https:// URL (lemonslice serve-layers)")
    return u


def _describe(e: Exception) -> str:
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect ({e})"
    return str(e) or type(e).__name__


def fetch_manifest(client: httpx.Client, peers: list[str]) -> tuple[Manifest, bytes, str]:
    """(manifest, its bytes, the peer) from the first peer that answers. A peer that answers
    with a manifest that fails a check stops the pull: nothing has been written yet."""
    failures = []
    for peer in peers:
        url = f"{peer}/{MANIFEST_NAME}"
        try:
            with client.stream("GET", url) as r:
                if r.status_code != 200:
                    failures.append(f"{peer}: HTTP {r.status_code}")
                    continue
                raw = bytearray()
                for chunk in r.iter_raw():
                    raw += chunk
                    if len(raw) > MAX_MANIFEST_BYTES:
                        raise LemonsliceError(f"{url}: larger than {MAX_MANIFEST_BYTES} bytes")
        except httpx.HTTPError as e:
            failures.append(f"{peer}: {_describe(e)}")
            continue
        try:
            return parse_manifest(bytes(raw), url), bytes(raw), peer
        except LemonsliceError as e:
            raise LemonsliceError(f"{url}: {e}") from None
    raise LemonsliceError(f"no peer answered with a manifest ({'; '.join(failures)})")


def _old_manifest(dst: Path, warn: Callable[[str], None]) -> Manifest | None:
    if not (dst / MANIFEST_NAME).exists():
        return None
    try:
        return parse_manifest((dst / MANIFEST_NAME).read_bytes(), str(dst / MANIFEST_NAME))
    except LemonsliceError as e:
        warn(f"{e}; every file is fetched again")
        return None


def _check_dst(dst: Path) -> None:
    """DST is a directory that holds nothing but a split (or is empty): pull never touches
    another file, and `verify` would count one as extra."""
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise LemonsliceError(f"{dst} exists and is not a directory")
    if not dst.exists():
        return
    if (why := pending(dst)) is not None:
        # Finishing that sync later would rename its staged files over what pull puts in.
        raise LemonsliceError(f"{dst}: {why}")
    stage = dst / PULL_DIR
    if stage.is_symlink() or (stage.exists() and not stage.is_dir()):
        raise LemonsliceError(f"refusing to pull into {dst}: {stage} is not a directory")
    foreign = []
    for n in sorted(os.listdir(dst)):
        ours = n in (SHARED_FILE, MANIFEST_NAME) or LAYER_FILE_RE.match(n) or is_split_aside(n)
        if not (ours or n.startswith(f".{MANIFEST_NAME}{_STAGE_TAG}")):
            foreign.append(n + ("/" if (dst / n).is_dir() else ""))
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (", …" if len(foreign) > _SHOWN else "")
        raise LemonsliceError(f"refusing to pull into {dst}: it holds files lemonslice did not write ({shown})")


def _held(dst: Path, old: Manifest | None, new: Manifest) -> set[str]:
    """Names whose DST file already holds the new manifest's bytes. DST's manifest is believed
    only for a file of the size it records that the verify stamp shows unchanged since it was
    hashed; another file of the right size is hashed (after a pull killed among its renames,
    that is how the files already renamed are found)."""
    if old is None:
        return set()
    vouched_now = vouched(dst, old)
    held, to_hash = set(), []
    for e in new.files:
        try:
            st = os.lstat(dst / e.name)
            was = old.file(e.name)
        except (OSError, KeyError):
            continue
        if not stat.S_ISREG(st.st_mode) or not st.st_size == was.size == e.size:
            continue
        if e.name not in vouched_now:
            to_hash.append(e.name)
        elif was.sha256 == e.sha256:
            held.add(e.name)
    with ThreadPoolExecutor(max_workers=2) as ex:
        digests = list(ex.map(lambda n: sha256_file(dst / n), to_hash))
    held |= {n for n, d in zip(to_hash, digests) if d == new.file(n).sha256}
    return held


def _lock(stage: Path) -> int:
    fd = os.open(stage / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise LemonsliceError(f"another pull into {stage.parent} is running") from None
        raise
    return fd


def _clean_stage(stage: Path, need: list[FileEntry]) -> None:
    """Drop what earlier runs left that this one will not resume."""
    keep = {"lock"} | {f"{e.name}.part" for e in need} | {f"{e.name}{_SIDECAR}" for e in need}
    for p in stage.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _open_part(stage: Path, e: FileEntry) -> _Part:
    """The part file of `e`, its existing bytes re-hashed; a part for another version (its
    sidecar names another sha256) or one longer than the file is discarded."""
    path, sidecar = stage / f"{e.name}.part", stage / f"{e.name}{_SIDECAR}"
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        same = record == {"sha256": e.sha256, "size": e.size}
    except (OSError, ValueError):
        same = False
    if not same:
        path.unlink(missing_ok=True)
        try:
            write_text(sidecar, json.dumps({"sha256": e.sha256, "size": e.size}) + "\n")
        except OSError as err:
            raise _WriteFailed(f"cannot write {sidecar}: {err.strerror or err}") from None
    fd = _open_direct(path)
    part = _Part(e, path, fd, 0, hashlib.sha256(), set())
    if os.fstat(fd).st_size > e.size:
        part.restart()
    else:
        part.offset = os.fstat(fd).st_size
        part.hasher = hashlib.sha256() if not part.offset else _hash_prefix(path, part.offset)
        part.sources = {None} if part.offset else set()
        if part.offset % _PAGE:
            _buffered(fd)  # O_DIRECT writes must start on a page boundary
    return part


def _hash_prefix(path: Path, n: int) -> "hashlib._Hash":
    h = hashlib.sha256()
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while n > 0 and (got := f.readinto(memoryview(buf)[: min(n, len(buf))])):
            h.update(memoryview(buf)[:got])
            n -= got
    return h


def _check_response(r: fetch.Reply, part: _Part) -> tuple[str, bool] | None:
    """Why the response cannot continue the part, and whether the peer is out for this file
    (a 5xx may pass); None when its body is the rest of the file (or all of it, on a 200)."""
    e = part.entry
    if r.status == 206:
        cr = r.headers.get("content-range", "")
        if cr != f"bytes {part.offset}-{e.size - 1}/{e.size}":
            return f"answered bytes={part.offset}- with Content-Range {cr!r}", True
    elif r.status == 412:
        etag = r.headers.get("etag", "?")
        return f"holds another version (ETag {etag}, the manifest's sha256 is {e.sha256[:16]}…)", True
    elif r.status != 200:
        return f"HTTP {r.status}", r.status < 500
    etag = r.headers.get("etag")
    if etag is not None and etag.removeprefix("W/") != f'"{e.sha256}"':
        return f"holds another version (ETag {etag}, the manifest's sha256 is {e.sha256[:16]}…)", True
    want = e.size - (part.offset if r.status == 206 else 0)
    if r.length is not None and r.length != want:
        return f"sends {r.length} bytes where {want} are expected", True
    return None


def _attempt(run: _Run, part: _Part, peer: str) -> tuple[str, bool] | None:
    """Fetch the rest of the part from `peer` (all of it if the peer ignores the range). None
    once the part is complete; else why not, and whether the peer is out for this file."""
    e = part.entry
    # If-Match: a peer with another version answers 412 instead of sending its file.
    headers = {"If-Match": f'"{e.sha256}"'}
    if part.offset:
        headers |= {"Range": f"bytes={part.offset}-", "If-Range": f'"{e.sha256}"'}
    try:
        with fetch.get(f"{peer}/{e.name}", headers, connect_s=min(run.timeout, _CONNECT_S),
                       timeout=run.timeout) as r:
            why = _check_response(r, part)
            if why is not None:
                return why
            if r.status == 200 and part.offset:
                run.tick(-part.offset)
                part.restart()
            part.sources.add(peer)
            while part.offset < e.size:
                if run.stop.is_set():
                    raise _Stop
                n = r.read_into(part.space()[: e.size - part.offset])
                if n == 0:
                    break
                part.took(n)
                run.tick(n, peer)
            if r.length is None and r.read_into(memoryview(bytearray(1))):
                run.tick(-part.offset)
                part.restart()
                return f"sent more than the manifest's {e.size} bytes", True
    except fetch.FetchError as err:
        return str(err), False
    finally:
        part.flush()  # the file holds every byte counted, whatever happened
    if part.offset < e.size:
        return f"the connection closed at byte {part.offset} of {e.size}", False
    return None


def _check_hash(run: _Run, part: _Part, peer: str | None) -> tuple[str, bool] | None:
    """None when the complete part hashes to the manifest's sha256. Otherwise the part is
    discarded; the peer is out for this file only if all of the part came from it."""
    e = part.entry
    digest = part.hasher.hexdigest()
    if digest == e.sha256:
        return None
    sources = part.sources
    run.tick(-part.offset)
    part.restart()
    why = f"sha256 {digest[:16]}… differs from the manifest's {e.sha256[:16]}…"
    if peer is not None and sources == {peer}:
        return f"sent bad bytes ({why})", True
    names = sorted("an earlier run" if s is None else s for s in sources)
    return f"the part pieced together from {', '.join(names)} is bad ({why}); fetching it whole", False


def _fetch(run: _Run, e: FileEntry, k: int) -> None:
    """One file into its part, trying the peers from the k-th on (so files spread over them),
    each again on a later round only after a dropped connection or a server error."""
    part = _open_part(run.stage, e)
    try:
        run.tick(part.offset, resumed=True)
        if part.offset == e.size and _check_hash(run, part, None) is None:
            run.done_with(part)
            return
        order = run.peers[k % len(run.peers):] + run.peers[: k % len(run.peers)]
        out: set[str] = set()
        failures: dict[str, str] = {}
        for rnd in range(1 + run.retries):
            if rnd and run.stop.wait(min(4.0, 0.5 * 2 ** rnd)):
                raise _Stop
            for peer in (p for p in order if p not in out):
                if run.stop.is_set():
                    raise _Stop
                result = _attempt(run, part, peer) or _check_hash(run, part, peer)
                if result is None:
                    run.done_with(part)
                    return
                failures[peer], gone = result
                out |= {peer} if gone else set()
                run.warn(f"{peer}: {e.name}: {failures[peer]}")
            if len(out) == len(order):
                break
        tried = "; ".join(f"{p}: {w}" for p, w in failures.items())
        raise LemonsliceError(f"{e.name}: no peer served it intact ({tried})")
    finally:
        part.close()
        if part.fd >= 0:
            os.close(part.fd)


def _fetch_all(run: _Run, need: list[FileEntry], connections: int) -> None:
    """Every needed file into its part, `connections` at a time. A write failure stops all of
    them at once; a file no peer serves intact fails alone (the others still complete)."""
    todo: queue.SimpleQueue[tuple[int, FileEntry]] = queue.SimpleQueue()
    for k, e in enumerate(need):
        todo.put((k, e))
    fatal: list[BaseException] = []
    failed: list[LemonsliceError] = []

    def worker() -> None:
        while not run.stop.is_set():
            try:
                k, e = todo.get_nowait()
            except queue.Empty:
                return
            try:
                _fetch(run, e, k)
            except _Stop:
                return
            except LemonsliceError as err:
                if isinstance(err, _WriteFailed):
                    fatal.append(err)
                    run.stop.set()
                    return
                failed.append(err)
            except BaseException as err:  # noqa: BLE001  (re-raised in the calling thread)
                fatal.append(err)
                run.stop.set()
                return

    n = max(1, min(connections, len(need)))
    ex = ThreadPoolExecutor(max_workers=n, thread_name_prefix="pull")
    try:
        for f in [ex.submit(worker) for _ in range(n)]:
            f.result()
    except BaseException:
        run.stop.set()
        raise
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        run.syncer.shutdown(wait=True)
    fatal += [f.exception() for f in run.synced if f.exception() is not None]
    if fatal:
        raise fatal[0]
    if failed:
        more = f" ({len(failed) - 1} more file(s) failed)" if len(failed) > 1 else ""
        raise LemonsliceError(f"{failed[0]}{more}")


def _install(dst: Path, stage: Path, new: Manifest, raw: bytes, old: Manifest | None,
             need: list[FileEntry]) -> list[str]:
    """Rename the fetched files into DST, then the new manifest (staged and synced before any
    rename, so no write can fail half-way), then remove what the new manifest no longer names."""
    target = dst / MANIFEST_NAME
    same = target.is_file() and target.read_bytes() == raw
    if not same:
        try:
            with open(stage / MANIFEST_NAME, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _WriteFailed(f"cannot write {stage / MANIFEST_NAME}: {e.strerror or e}") from None
    for e in need:
        if os.stat(stage / f"{e.name}.part").st_size != e.size:
            raise LemonsliceError(f"{stage / e.name}.part is not {e.size} bytes long")
    with signals_held():
        for e in need:
            os.replace(stage / f"{e.name}.part", dst / e.name)
        fsync_dir(dst)
        if not same:
            os.replace(stage / MANIFEST_NAME, target)
            fsync_dir(dst)
    names = {f.name for f in new.files}
    removed = [f.name for f in old.files if f.name not in names] if old is not None else []
    for n in removed:
        (dst / n).unlink(missing_ok=True)
    if removed:
        fsync_dir(dst)
    stamp_written(dst, new)
    shutil.rmtree(stage, ignore_errors=True)
    return removed


def pull(urls: list[str], dst: str | os.PathLike[str], *, connections: int = 4, retries: int = 2,
         timeout: float = 30.0, progress: Progress | None = None,
         on_warning: Callable[[str], None] | None = None) -> PullResult:
    """Make `dst` the split directory the peers at `urls` serve (see the module's docstring).
    `timeout` bounds each connect and each read; `retries` is how many more rounds a file gets
    over the peers that dropped a connection or answered with a server error."""
    warn = on_warning or log.warning
    peers = list(dict.fromkeys(_peer_url(u) for u in urls))
    if not peers:
        raise LemonsliceError("pull needs at least one peer URL")
    if connections < 1 or retries < 0:
        raise LemonsliceError("--connections must be at least 1 and --retries at least 0")
    dst = Path(os.path.abspath(dst))
    timeouts = httpx.Timeout(timeout, connect=min(timeout, _CONNECT_S))
    # No proxies from the environment: the files themselves go straight to the peers.
    with httpx.Client(timeout=timeouts, follow_redirects=False, trust_env=False) as client:
        new, raw, source = fetch_manifest(client, peers)
        _check_dst(dst)
        dst.mkdir(parents=True, exist_ok=True)
        stage = dst / PULL_DIR
        stage.mkdir(exist_ok=True)
        lock = _lock(stage)
        try:
            old = _old_manifest(dst, warn)
            held = _held(dst, old, new)
            need = sorted((e for e in new.files if e.name not in held), key=lambda e: -e.size)
            _clean_stage(stage, need)
            run = _Run(peers, stage, retries, progress, warn, timeout, sum(e.size for e in need), len(need))
            try:
                _fetch_all(run, need, connections)
                removed = _install(dst, stage, new, raw, old, need)
            except LemonsliceError as e:
                raise LemonsliceError(f"{e}; {dst} is unchanged ({PULL_DIR}/ keeps what was fetched)") from None
        finally:
            os.close(lock)
    return PullResult(new, source, [e.name for e in need], [e.name for e in new.files if e.name in held],
                      removed, run.resumed, run.received)
