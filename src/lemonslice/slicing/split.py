"""Split a monolithic GGUF into shared.gguf, one layer_NNNN.gguf per block, and manifest.json.

The source is read once, sequentially. Each chunk feeds the source's sha256 and the
sha256 of the output file it lands in, on two hashing threads, while the tensor bytes
are copied between the files inside the kernel (copy_file_range).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LemonsliceError
from ..gguf.constants import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYER_FILE,
    MANIFEST_NAME,
    SHARED_FILE,
    Keys,
    Role,
    ValueType,
    arch_key,
    block_index,
    classify_block,
)
from ..gguf.reader import GGUFReader, TensorInfo, open_gguf
from ..gguf.writer import FilePlan, copy_range, encode_kv, plan_file
from .atomic import staged_dir
from .manifest import FileEntry, Manifest, SourceInfo, TensorEntry
from .verify import stamp_written

Progress = Callable[[int, int], None]
CHUNK = 8 << 20
# Chunks in flight between the reader and the hashing threads (bounds memory).
IN_FLIGHT = 4
# Non-tensor bytes kept in the manifest for a byte-exact merge are capped at this.
MAX_GAP_BYTES = 1 << 20


@dataclass
class _Out:
    entry: FileEntry
    plan: FilePlan
    fd: int
    hasher: "hashlib._Hash"
    hashed_to: int  # bytes of the output fed to its hasher so far (header included)


def layer_roles(reader: GGUFReader) -> dict[int, Role]:
    """Each block's role, decided from its tensors."""
    groups: dict[int, list[str]] = defaultdict(list)
    for t in reader.tensors:
        b = block_index(t.name)
        if b is not None:
            groups[b].append(t.name)
    hybrid = any(classify_block(n, False) == Role.RECURRENT for n in groups.values())
    return {b: classify_block(groups[b], hybrid) for b in sorted(groups)}


def _ls_kvs(layer: int, role: Role) -> list[bytes]:
    return [
        encode_kv(Keys.LS_FORMAT, ValueType.STRING, FORMAT_NAME),
        encode_kv(Keys.LS_LAYER_INDEX, ValueType.INT32, layer),
        encode_kv(Keys.LS_ROLE, ValueType.STRING, role.value),
    ]


class _Hasher(threading.Thread):
    """Runs hash updates in order on its own thread; hashlib drops the GIL for large buffers."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            try:
                # Poll: an interrupt landing inside queue.put can lose the wakeup.
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if job is None:
                return
            fn, args = job
            try:
                if self.error is None:
                    fn(*args)
            except BaseException as e:  # surfaced by the main thread
                self.error = e

    def submit(self, fn, *args) -> None:
        self.jobs.put((fn, args))

    def finish(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error


class _Copier(threading.Thread):
    """Copies whole tensors kernel-side in source order. It runs ahead of the hashing
    pass, so on a cold cache it does the disk reads and the hashers find pages cached."""

    def __init__(self, src_fd: int, jobs: list[tuple[int, int, int, int]]):
        super().__init__(daemon=True)
        self.src_fd = src_fd
        self.jobs = jobs  # (source offset, output fd, output offset, length)
        self.stop = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for src_off, out_fd, dst_off, n in self.jobs:
                if self.stop:
                    return
                copy_range(self.src_fd, src_off, out_fd, dst_off, n)
        except BaseException as e:  # surfaced by the main thread
            self.error = e

    def finish(self, cancel: bool) -> None:
        self.stop = cancel
        self.join()
        if self.error is not None:
            raise self.error


def split_gguf(
    src: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    force: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    src = Path(src)
    reader = open_gguf(src)
    try:
        with staged_dir(Path(outdir), force, inputs=(src,)) as tmp:
            return _split(reader, src, tmp, progress)
    finally:
        reader.close()


def _split(reader: GGUFReader, src: Path, tmp: Path, progress: Progress | None) -> Manifest:
    st0 = os.fstat(reader.fileno())
    arch = reader.architecture
    roles = layer_roles(reader)
    block_count = reader.get(arch_key(Keys.BLOCK_COUNT, arch)) if arch else None

    base_kvs, reserved = [], {}
    for e in reader.kv.values():
        if e.key.startswith(Keys.LS_PREFIX):
            reserved[e.key] = base64.b64encode(e.raw).decode()
        else:
            base_kvs.append(e.raw)

    groups: dict[str, list[TensorInfo]] = defaultdict(list)
    for t in reader.tensors:
        b = block_index(t.name)
        groups[SHARED_FILE if b is None else LAYER_FILE.format(index=b)].append(t)
    names = [SHARED_FILE] + [LAYER_FILE.format(index=b) for b in roles]

    outs: dict[str, _Out] = {}
    dest: dict[str, tuple[_Out, int]] = {}  # tensor name -> (output, absolute offset there)
    try:
        for name in names:
            layer = None if name == SHARED_FILE else int(name[6:-5])
            role = Role.SHARED if layer is None else roles[layer]
            ts = groups[name]
            by_offset = sorted(ts, key=lambda t: t.offset)
            plan = plan_file(
                base_kvs + _ls_kvs(-1 if layer is None else layer, role),
                [(t.name, t.shape, t.ggml_type) for t in ts],
                reader.alignment,
                data_order=[t.name for t in by_offset],
            )
            fd = os.open(tmp / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            entry = FileEntry(
                name, role.value, layer, len(ts), plan.size, "",
                [TensorEntry(t.name, t.ggml_type.name, list(t.shape), t.n_bytes, t.offset) for t in ts],
            )
            header = plan.padded_header()
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, plan.size)
            # Hash the header now and drop it: with a real vocabulary each is ~10 MB.
            out = _Out(entry, dataclasses.replace(plan, header=b""), fd, hashlib.sha256(header), plan.data_offset)
            outs[name] = out
            del header
            for pt in plan.tensors:
                dest[pt.name] = (out, plan.data_offset + pt.offset)
        try:
            src_sha256, gaps = _stream(reader, outs, dest, progress)
        except EOFError:
            raise LemonsliceError(f"{src} changed during the split (it shrank); nothing was written") from None
        st1 = os.fstat(reader.fileno())
        if (st1.st_size, st1.st_mtime_ns, st1.st_ino) != (st0.st_size, st0.st_mtime_ns, st0.st_ino):
            raise LemonsliceError(f"{src} changed during the split; nothing was written")
        for out in outs.values():
            os.fsync(out.fd)
    finally:
        for out in outs.values():
            os.close(out.fd)

    manifest = Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        architecture=arch,
        block_count=int(block_count) if isinstance(block_count, int) else None,
        alignment=reader.alignment,
        source=SourceInfo(
            name=src.name,
            size=reader.file_size,
            sha256=src_sha256,
            gguf_version=reader.version,
            data_offset=reader.data_offset,
            kv_order=list(reader.kv),
            tensor_order=[t.name for t in reader.tensors],
            reserved_kv=reserved,
            nonzero_gaps=gaps,
        ),
        files=[outs[n].entry for n in names],
    )
    mpath = tmp / MANIFEST_NAME
    mpath.write_text(manifest.to_json(), encoding="utf-8")
    with open(mpath, "rb") as f:
        os.fsync(f.fileno())
    # The outputs were hashed as written: a later change to one warns at load, as after verify.
    stamp_written(tmp, manifest)
    return manifest


def _stream(
    reader: GGUFReader, outs: dict[str, _Out], dest: dict[str, tuple[_Out, int]], progress: Progress | None
) -> tuple[str, list[tuple[int, str]]]:
    """One sequential pass over the source: hash it, hash each output, copy tensors."""
    src_hash = hashlib.sha256()
    src_hasher, out_hasher = _Hasher(), _Hasher()
    src_hasher.start()
    out_hasher.start()
    slots = threading.Semaphore(IN_FLIGHT)
    pending: dict[int, int] = {}  # id(buffer) -> hashers still using it
    lock = threading.Lock()
    pool: list[bytearray] = []

    def release(buf: bytearray) -> None:
        with lock:
            pending[id(buf)] -= 1
            if pending[id(buf)] == 0:
                del pending[id(buf)]
                pool.append(buf)
                slots.release()

    def feed(out: _Out, view: memoryview, upto: int) -> None:
        # Zero padding before `upto`, then `view`, keeps each output's hash in file order.
        if upto > out.hashed_to:
            out.hasher.update(bytes(upto - out.hashed_to))
        out.hasher.update(view)
        out.hashed_to = upto + len(view)

    # A wide readahead window: on a cold cache the disk, not the hashing, sets the pace.
    os.posix_fadvise(reader.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    spans = sorted((t.data_start, t.data_start + t.n_bytes, t.name) for t in reader.tensors)
    copier = _Copier(reader.fileno(), [(a, dest[n][0].fd, dest[n][1], b - a) for a, b, n in spans])
    copier.start()
    gaps: list[tuple[int, str]] = []
    gap_total = 0
    size, fd = reader.file_size, reader.fileno()
    ti = 0
    pos = 0
    done = False
    try:
        while pos < size:
            slots.acquire()
            with lock:
                buf = pool.pop() if pool else bytearray(CHUNK)
            n = min(CHUNK, size - pos)
            view = memoryview(buf)[:n]
            got = os.preadv(fd, [view], pos)
            if got != n:
                raise LemonsliceError(f"{reader.path} changed during the split (it ended early); nothing was written")
            end = pos + n
            with lock:
                pending[id(buf)] = 2
            src_hasher.submit(lambda v, b: (src_hash.update(v), release(b)), view, buf)

            jobs = []
            cur = pos
            while cur < end:
                while ti < len(spans) and spans[ti][1] <= cur:
                    ti += 1
                nxt = spans[ti][0] if ti < len(spans) else size
                if cur < nxt:
                    # Bytes outside any tensor: the header (rebuilt on merge) or padding.
                    stop = min(nxt, end)
                    lo = max(cur, reader.header_end)
                    if lo < stop and bytes(view[lo - pos : stop - pos]).strip(b"\0"):
                        gap_total += stop - lo
                        if gap_total > MAX_GAP_BYTES:
                            raise LemonsliceError(
                                f"{reader.path} holds over {MAX_GAP_BYTES} bytes of non-zero data outside its "
                                "tensors; a byte-exact split is not possible"
                            )
                        gaps.append((lo, base64.b64encode(bytes(view[lo - pos : stop - pos])).decode()))
                    cur = stop
                    continue
                t_start, t_end, tname = spans[ti]
                stop = min(t_end, end)
                out, dst = dest[tname]
                jobs.append((out, view[cur - pos : stop - pos], dst + (cur - t_start)))
                cur = stop
            out_hasher.submit(lambda js, b: ([feed(*j) for j in js], release(b)), jobs, buf)
            pos = end
            if progress:
                progress(pos, size)
            if src_hasher.error or out_hasher.error or copier.error:
                break
        done = True
    finally:
        copier.finish(cancel=not done)
        src_hasher.finish()
        out_hasher.finish()

    for out in outs.values():
        if out.hashed_to < out.plan.size:
            out.hasher.update(bytes(out.plan.size - out.hashed_to))
        out.entry.sha256 = out.hasher.hexdigest()
    return src_hash.hexdigest(), gaps
