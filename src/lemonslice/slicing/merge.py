"""Rebuild the monolithic GGUF from a split directory, byte for byte."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import struct
from pathlib import Path
from typing import Callable

from ..errors import LemonsliceError
from ..gguf.constants import GGUF_MAGIC, Keys
from ..gguf.reader import GGUFReader, open_gguf
from ..gguf.writer import copy_range, encode_tensor_info
from .atomic import check_target_file, staged_file
from .integrity import check_split
from .manifest import Manifest, load_manifest

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)
_HASH_CHUNK = 8 << 20


def _open_files(directory: Path, manifest: Manifest) -> dict[str, GGUFReader]:
    readers: dict[str, GGUFReader] = {}
    for f in manifest.files:
        path = directory / f.name
        if not path.is_file():
            raise LemonsliceError(f"{path}: missing; run `lemonslice verify {directory}`")
        r = open_gguf(path)
        readers[f.name] = r
        have = [t.name for t in r.tensors]
        want = [t.name for t in f.tensors]
        if have != want:
            raise LemonsliceError(f"{path}: tensors differ from the manifest; run `lemonslice verify {directory}`")
    return readers


def merge_split(
    directory: str | os.PathLike[str],
    target: str | os.PathLike[str],
    force: bool = False,
    progress: Progress | None = None,
    verify: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> str:
    """Write the monolithic file; returns its sha256, which must equal the source's. The split
    is checked first (`check_split`; with `verify`, every file hashed); its warnings go to
    `on_warning`, else to the log."""
    directory = Path(directory)
    check_target_file(Path(target), force, inputs=(directory,))  # before any hashing
    # Merge reads every byte anyway, so files changed since the last verify are hashed first.
    for w in check_split(directory, full=verify, hash_changed=True):
        (on_warning or log.warning)(w)
    m = load_manifest(directory)
    readers = _open_files(directory, m)
    try:
        with staged_file(Path(target), force, inputs=(directory,)) as tmp:
            digest = _merge(m, readers, tmp, progress)
            if digest != m.source.sha256:
                raise LemonsliceError(
                    f"merged file's sha256 {digest[:16]}… differs from the source's {m.source.sha256[:16]}…; "
                    f"the split was modified (run `lemonslice verify {directory}`); nothing was written"
                )
            return digest
    finally:
        for r in readers.values():
            r.close()


def _header(m: Manifest, readers: dict[str, GGUFReader]) -> bytes:
    shared = readers["shared.gguf"]
    records = []
    for key in m.source.kv_order:
        if key in m.source.reserved_kv:
            records.append(base64.b64decode(m.source.reserved_kv[key]))
        elif key.startswith(Keys.LS_PREFIX) or key not in shared.kv:
            raise LemonsliceError(f"shared.gguf lacks the source's KV {key!r}")
        else:
            records.append(shared.kv[key].raw)
    where = {t.name: (f.name, t.offset) for f in m.files for t in f.tensors}
    infos = []
    for name in m.source.tensor_order:
        if name not in where:
            raise LemonsliceError(f"manifest lists no file for the source tensor {name!r}")
        fname, offset = where[name]
        t = readers[fname].tensor_map[name]
        infos.append(encode_tensor_info(name, t.shape, t.ggml_type, offset))
    head = GGUF_MAGIC + struct.pack("<IQQ", m.source.gguf_version, len(infos), len(records))
    return head + b"".join(records) + b"".join(infos)


def _merge(m: Manifest, readers: dict[str, GGUFReader], tmp: Path, progress: Progress | None) -> str:
    header = _header(m, readers)
    if len(header) > m.source.data_offset:
        raise LemonsliceError("rebuilt header is longer than the source's; the manifest does not match the files")
    total = m.source.size
    with open(tmp, "r+b") as out:
        out.write(header)
        out.truncate(total)
        for offset, b64 in m.source.nonzero_gaps:
            out.seek(offset)
            out.write(base64.b64decode(b64))
        out.flush()
        done = 0
        for f in m.files:
            r = readers[f.name]
            for t in f.tensors:
                info = r.tensor_map[t.name]
                if info.n_bytes != t.bytes:
                    raise LemonsliceError(f"{f.name}: tensor {t.name} has {info.n_bytes} bytes, manifest says {t.bytes}")
                dst = m.source.data_offset + t.offset
                if dst + t.bytes > total:
                    raise LemonsliceError(f"manifest places {t.name} past the end of the source")
                copy_range(r.fileno(), info.data_start, out.fileno(), dst, t.bytes)
                done += t.bytes
                if progress:
                    progress(done // 2, total)
        # Hash what was written, read back from the page cache.
        h = hashlib.sha256()
        buf = bytearray(_HASH_CHUNK)
        view = memoryview(buf)
        pos = 0
        while pos < total:
            n = os.preadv(out.fileno(), [view[: min(_HASH_CHUNK, total - pos)]], pos)
            h.update(view[:n])
            pos += n
            if progress:
                progress(total // 2 + pos // 2, total)
        os.fsync(out.fileno())
    return h.hexdigest()


def split_source_sha256(directory: str | os.PathLike[str], m: Manifest, progress: Progress | None = None) -> str:
    """sha256 of the monolithic file `merge` would rebuild from `directory`'s files laid out as `m`
    says, computed without writing it (for a writer whose new files change tensor bytes only)."""
    directory = Path(directory)
    readers = _open_files(directory, m)
    try:
        header = _header(m, readers)
        h = hashlib.sha256(header)
        # (absolute offset, length, reader and tensor or the gap's bytes), in file order.
        segs: list[tuple[int, int, object]] = [(off, len(b), b) for off, b in
                                               ((o, base64.b64decode(s)) for o, s in m.source.nonzero_gaps)]
        segs += [(m.source.data_offset + t.offset, t.bytes, (readers[f.name], t.name)) for f in m.files
                 for t in f.tensors]
        pos = len(header)
        buf = bytearray(_HASH_CHUNK)
        for off, n, what in sorted(segs, key=lambda s: s[0]):
            h.update(bytes(off - pos))
            if isinstance(what, bytes):
                h.update(what)
            else:
                r, name = what
                start = r.tensor_map[name].data_start
                for lo in range(0, n, _HASH_CHUNK):
                    view = memoryview(buf)[: min(_HASH_CHUNK, n - lo)]
                    if os.preadv(r.fileno(), [view], start + lo) != len(view):
                        raise LemonsliceError(f"{directory}: a file ended early while hashing {name}")
                    h.update(view)
                    if progress:
                        progress(off + lo + len(view), m.source.size)
            pos = off + n
        h.update(bytes(m.source.size - pos))
        return h.hexdigest()
    finally:
        for r in readers.values():
            r.close()
