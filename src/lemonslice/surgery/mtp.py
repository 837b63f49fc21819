"""Add a Qwen3.5 multi-token-prediction (MTP, `nextn`) block to a GGUF file or split
directory that lacks one (`inject_mtp`), or take it out again (`strip_mtp`).

Injection reads only the checkpoint's `mtp.*` tensors (through the shard index when there
is one) and names, transforms and types them exactly as `lemonslice convert` does. The
block is appended after the trunk: the trunk's tensor infos, offsets and bytes are kept,
the new tensors' data follows the old data section, `block_count` grows, the
`nextn_predict_layers` key is added after the last architecture key, and
`attention.recurrent_layers` (when present) gains `false` for the MTP block. Stripping
undoes each of these, so `strip(inject(x))` is `x` byte for byte.

A split directory is rewritten as `split` would split the new monolithic file (every file
carries the new KV pairs, the MTP block gets a `layer_NNNN.gguf` of role `mtp`), and its
manifest describes that monolithic file, which `merge` rebuilds exactly; `source.name` is
kept. Output is staged and renamed into place only when complete.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..convert.hf import HFCheckpoint
from ..convert.pipeline import OUT_TYPES, encode_tensor, tensor_type
from ..convert.qwen35 import HParams, OutTensor, architecture_of, canonical_names, plan_mtp_tensors, read_hparams
from ..engine.store import Metadata
from ..errors import LemonsliceError
from ..gguf.constants import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GGUF_MAGIC,
    LAYER_FILE,
    MANIFEST_NAME,
    SHARED_FILE,
    GGMLType,
    Keys,
    Role,
    Tensors,
    ValueType,
    arch_key,
    block_index,
    classify_block,
)
from ..gguf.reader import GGUFReader, align_up, open_gguf, tensor_nbytes
from ..gguf.writer import copy_range, encode_kv, encode_tensor_info, plan_file
from ..models.qwen35_args import ARCHES, ModelArgs
from ..slicing.atomic import staged_dir, staged_file
from ..slicing.manifest import FileEntry, Manifest, SourceInfo, TensorEntry
from ..slicing.verify import require_intact, sha256_file

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)
_CHUNK = 64 << 20
_NEXTN_MARK = ".nextn."


@dataclass(frozen=True)
class MTPResult:
    path: Path
    arch: str
    n_layer: int  # trunk blocks
    nextn_predict_layers: int  # after the operation
    tensors: int  # tensors added (inject) or removed (strip)
    tensor_bytes: int  # their bytes
    size: int  # bytes written: the file, or every file of the split directory


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order
    ggml_type: GGMLType
    n_bytes: int
    offset: int  # in the (monolithic) data section
    src: Optional[Path] = None  # file holding the bytes, and their absolute offset there
    start: int = 0
    make: Optional[Callable[[], memoryview]] = None  # new tensors: the encoded bytes


@dataclass
class _Model:
    """A GGUF file or split directory seen as one monolithic file."""

    path: Path
    manifest: Optional[Manifest]  # None for a .gguf file
    reader: GGUFReader  # the file, or shared.gguf: the model's KV pairs
    kvs: list[tuple[str, bytes]]  # every KV record of the monolithic file, in order
    tensors: list[_Tensor]  # in tensor-info order
    alignment: int
    version: int
    data_len: int  # bytes from the data section's start to the end of the file
    gaps: list[tuple[int, bytes]]  # non-zero bytes outside tensors, by data-section offset

    @property
    def meta(self) -> Metadata:
        return Metadata(self.reader.kv)

    @property
    def arch(self) -> str:
        arch = self.reader.architecture
        if arch not in ARCHES:
            raise LemonsliceError(f"{self.path}: architecture {arch!r} has no MTP support (need one of {', '.join(ARCHES)})")
        return arch

    def close(self) -> None:
        self.reader.close()


def _open(path: Path) -> _Model:
    if path.is_dir():
        m = require_intact(path)
        reader = open_gguf(path / SHARED_FILE)
        kvs = []
        for key in m.source.kv_order:
            if key in m.source.reserved_kv:
                kvs.append((key, base64.b64decode(m.source.reserved_kv[key])))
            elif key in reader.kv:
                kvs.append((key, reader.kv[key].raw))
            else:
                raise LemonsliceError(f"{path}: shared.gguf lacks the source's KV {key!r}")
        where: dict[str, _Tensor] = {}
        for f in m.files:
            with open_gguf(path / f.name) as r:
                for t in f.tensors:
                    info = r.tensor_map[t.name]
                    where[t.name] = _Tensor(t.name, info.shape, info.ggml_type, info.n_bytes, t.offset,
                                            path / f.name, info.data_start)
        gaps = []
        for off, b64 in m.source.nonzero_gaps:
            if off < m.source.data_offset:
                raise LemonsliceError(f"{path}: the source has non-zero bytes in its header padding; "
                                      "its header cannot be rewritten")
            gaps.append((off - m.source.data_offset, base64.b64decode(b64)))
        tensors = [where[n] for n in m.source.tensor_order]
        return _Model(path, m, reader, kvs, tensors, m.alignment, m.source.gguf_version,
                      m.source.size - m.source.data_offset, gaps)
    reader = open_gguf(path)
    tensors = [_Tensor(t.name, t.shape, t.ggml_type, t.n_bytes, t.offset, path, t.data_start) for t in reader.tensors]
    kvs = [(k, e.raw) for k, e in reader.kv.items()]
    return _Model(path, None, reader, kvs, tensors, reader.alignment, reader.version,
                  reader.file_size - reader.data_offset, [])


def _is_mtp(name: str, n_layer: int) -> bool:
    b = block_index(name)
    return b is not None and (b >= n_layer or _NEXTN_MARK in name)


def _new_kvs(model: _Model, arch: str, block_count: int, n_mtp: int) -> list[tuple[str, bytes]]:
    """The model's KV records with block_count, recurrent_layers and nextn_predict_layers set for
    `block_count` blocks of which the last `n_mtp` are MTP blocks."""
    bc, rec, nx = (arch_key(k, arch) for k in (Keys.BLOCK_COUNT, Keys.RECURRENT_LAYERS, Keys.NEXTN_PREDICT_LAYERS))
    kv = model.reader.kv
    out: list[tuple[str, bytes]] = []
    for key, raw in model.kvs:
        if key == bc:
            raw = encode_kv(key, kv[key].vtype, block_count)
        elif key == rec and kv[key].vtype == ValueType.ARRAY and kv[key].count != 1:
            flags = [bool(f) for f in kv[key].value][: block_count - n_mtp]
            if len(flags) != block_count - n_mtp:
                raise LemonsliceError(f"{model.path}: {key} has {kv[key].count} entries, fewer than the "
                                      f"{block_count - n_mtp} trunk blocks")
            raw = encode_kv(key, ValueType.ARRAY, flags + [False] * n_mtp, kv[key].item_type)
        elif key == nx:
            if not n_mtp:
                continue
            raw = encode_kv(key, kv[key].vtype, n_mtp)
        out.append((key, raw))
    if n_mtp and nx not in kv:
        last = max((i for i, (k, _) in enumerate(out) if k.startswith(arch + ".")), default=len(out) - 1)
        out.insert(last + 1, (nx, encode_kv(nx, ValueType.UINT32, n_mtp)))
    return out


# ---- inject ------------------------------------------------------------------------------------


def _check_fits(model: _Model, args: ModelArgs, h: HParams, hf_dir: Path) -> None:
    if args.nextn_predict_layers or any(_is_mtp(t.name, args.n_layer) for t in model.tensors):
        raise LemonsliceError(f"{model.path} already has an MTP block; remove it first with `lemonslice mtp strip`")
    pairs = [
        ("trunk layers", args.n_layer, h.n_layer), ("embedding length", args.n_embd, h.n_embd),
        ("attention heads", args.n_head, h.n_head), ("KV heads", args.n_head_kv, h.n_head_kv),
        ("attention head size", args.head_dim, h.head_dim),
    ]
    if h.moe:
        pairs += [("experts", args.n_expert, h.n_expert), ("expert FFN length", args.n_ff_exp, h.n_ff_exp),
                  ("shared-expert FFN length", args.n_ff_shexp, h.n_ff)]
    else:
        pairs.append(("FFN length", args.n_ff, h.n_ff))
    embd = next((t for t in model.tensors if t.name == Tensors.TOKEN_EMBD), None)
    if embd is not None:
        pairs.append(("vocabulary size", embd.shape[1], h.n_vocab))
    for what, base_v, hf_v in pairs:
        if int(base_v) != int(hf_v):
            raise LemonsliceError(f"{hf_dir} does not fit {model.path}: {what} is {hf_v} in the checkpoint, "
                                  f"{base_v} in the base")
    if tuple(args.recurrent[: args.n_layer]) != tuple(h.recurrent):
        raise LemonsliceError(f"{hf_dir} does not fit {model.path}: the layer types (recurrent / attention) differ")


def inject_mtp(
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    hf_dir: str | os.PathLike[str],
    out_type: str = "bf16",
    force: bool = False,
    progress: Optional[Progress] = None,
) -> MTPResult:
    """Write `base` plus the MTP block of the Hugging Face checkpoint `hf_dir` to `out`
    (a .gguf file for a .gguf base, a split directory for a split directory)."""
    if out_type not in OUT_TYPES:
        raise LemonsliceError(f"unknown output type {out_type!r} (choose from {', '.join(OUT_TYPES)})")
    base, out, hf_dir = Path(base), Path(out), Path(hf_dir)
    _check_paths(base, out)
    model = _open(base)
    try:
        arch = model.arch
        args = ModelArgs.from_gguf(model.meta)
        with HFCheckpoint.open(hf_dir) as ckpt:
            if architecture_of(ckpt) != arch:
                raise LemonsliceError(f"{hf_dir} is a {architecture_of(ckpt)} checkpoint, {base} is {arch}")
            canon = canonical_names(ckpt.names())
            h = read_hparams(ckpt, canon, want_mtp=True)
            if h.n_mtp == 0:
                raise LemonsliceError(f"{hf_dir}: the checkpoint has no mtp.* tensors")
            _check_fits(model, args, h, hf_dir)
            planned = plan_mtp_tensors(ckpt, canon, h)
            gtype = OUT_TYPES[out_type]
            added: list[_Tensor] = []
            pos = align_up(model.data_len, model.alignment)
            for t in planned:
                g = tensor_type(t, gtype)
                shape = tuple(reversed(t.shape))  # ggml order: the row first
                n = tensor_nbytes(shape, g)
                added.append(_Tensor(t.name, shape, g, n, pos, make=_encoder(t, g, n)))
                pos = align_up(pos + n, model.alignment)
            kvs = _new_kvs(model, arch, args.n_layer + h.n_mtp, h.n_mtp)
            size = _write(model, out, kvs, model.tensors + added, pos, model.gaps, model.data_len,
                          args.n_layer + h.n_mtp, force, progress)
    finally:
        model.close()
    return MTPResult(out, arch, args.n_layer, h.n_mtp, len(added), sum(t.n_bytes for t in added), size)


def _encoder(t: OutTensor, g: GGMLType, n_bytes: int) -> Callable[[], memoryview]:
    def make() -> memoryview:
        data = t.make()
        if tuple(data.shape) != t.shape:
            raise LemonsliceError(f"{t.name}: made shape {'x'.join(map(str, data.shape))}, "
                                  f"planned {'x'.join(map(str, t.shape))}")
        buf = memoryview(encode_tensor(data.numpy(), g)).cast("B")
        if len(buf) != n_bytes:
            raise LemonsliceError(f"{t.name}: {len(buf)} bytes encoded, {n_bytes} planned")
        return buf
    return make


# ---- strip -------------------------------------------------------------------------------------


def strip_mtp(
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    force: bool = False,
    progress: Optional[Progress] = None,
) -> MTPResult:
    """Write `base` without its MTP blocks to `out` (same kind of output as the base)."""
    base, out = Path(base), Path(out)
    _check_paths(base, out)
    model = _open(base)
    try:
        arch = model.arch
        args = ModelArgs.from_gguf(model.meta)
        removed = [t for t in model.tensors if _is_mtp(t.name, args.n_layer)]
        if not removed and not args.nextn_predict_layers:
            raise LemonsliceError(f"{base} has no MTP block")
        if not args.nextn_predict_layers:
            raise LemonsliceError(f"{base} has nextn tensors but nextn_predict_layers is 0; it is inconsistent")
        kept = [t for t in model.tensors if not _is_mtp(t.name, args.n_layer)]
        kept_end = max(t.offset + t.n_bytes for t in kept)
        if all(t.offset >= kept_end for t in removed):
            # The MTP data is the tail (as `inject` leaves it): keep every other byte where it is.
            data_len = min((t.offset for t in removed), default=model.data_len)
            gaps = [(o, b) for o, b in model.gaps if o + len(b) <= data_len]
            verbatim = data_len
        else:
            kept, data_len = _repack(kept, model.alignment)
            gaps, verbatim = [], 0
        kvs = _new_kvs(model, arch, args.n_layer, 0)
        size = _write(model, out, kvs, kept, data_len, gaps, verbatim, args.n_layer, force, progress)
    finally:
        model.close()
    return MTPResult(out, arch, args.n_layer, 0, len(removed), sum(t.n_bytes for t in removed), size)


def _repack(tensors: list[_Tensor], alignment: int) -> tuple[list[_Tensor], int]:
    """New offsets, packed in the old data order; returns the tensors (info order) and the data length."""
    new: dict[str, int] = {}
    pos = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        new[t.name] = pos
        pos = align_up(pos + t.n_bytes, alignment)
    out = [_Tensor(t.name, t.shape, t.ggml_type, t.n_bytes, new[t.name], t.src, t.start, t.make) for t in tensors]
    return out, pos


# ---- writing -----------------------------------------------------------------------------------


def _check_paths(base: Path, out: Path) -> None:
    if not base.exists():
        raise LemonsliceError(f"{base}: no such file or directory")
    if base.is_dir() and out.exists() and not out.is_dir():
        raise LemonsliceError(f"{out} exists and is not a directory (the base is a split directory)")
    if not base.is_dir() and out.is_dir():
        raise LemonsliceError(f"{out} is a directory (the base is a .gguf file)")


def _header(kvs: list[tuple[str, bytes]], tensors: list[_Tensor], version: int) -> bytes:
    head = GGUF_MAGIC + struct.pack("<IQQ", version, len(tensors), len(kvs))
    infos = [encode_tensor_info(t.name, t.shape, t.ggml_type, t.offset) for t in tensors]
    return head + b"".join(r for _, r in kvs) + b"".join(infos)


class _Fds:
    """Read descriptors of the source files, opened once."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def __call__(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


class _Tick:
    def __init__(self, total: int, progress: Optional[Progress]):
        self.done, self.total, self.progress = 0, total, progress

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, self.total)


def _copy(fds: _Fds, t: _Tensor, dst_fd: int, dst: int, tick: _Tick) -> None:
    if t.make is not None:
        buf = t.make()
        os.pwrite(dst_fd, buf, dst)
    else:
        copy_range(fds(t.src), t.start, dst_fd, dst, t.n_bytes)
    tick(t.n_bytes)


def _write(
    model: _Model, out: Path, kvs: list[tuple[str, bytes]], tensors: list[_Tensor], data_len: int,
    gaps: list[tuple[int, bytes]], verbatim: int, block_count: int, force: bool, progress: Optional[Progress],
) -> int:
    """Write the new model of `block_count` blocks; for a .gguf output the first `verbatim` bytes of
    the old data section are copied as they are, the rest tensor by tensor. Returns the bytes written."""
    fds = _Fds()
    try:
        if model.manifest is None:
            with staged_file(out, force, inputs=(model.path,)) as tmp:
                return _write_file(model, tmp, kvs, tensors, data_len, verbatim, fds, progress)
        with staged_dir(out, force, inputs=(model.path,)) as tmp:
            return _write_split(model, tmp, kvs, tensors, data_len, gaps, block_count, fds, progress)
    finally:
        fds.close()


def _write_file(
    model: _Model, path: Path, kvs: list[tuple[str, bytes]], tensors: list[_Tensor], data_len: int,
    verbatim: int, fds: _Fds, progress: Optional[Progress],
) -> int:
    header = _header(kvs, tensors, model.version)
    data_offset = align_up(len(header), model.alignment)
    tick = _Tick(verbatim + sum(t.n_bytes for t in tensors if t.offset >= verbatim), progress)
    fd = os.open(path, os.O_RDWR | os.O_TRUNC)
    try:
        os.pwrite(fd, header, 0)
        os.ftruncate(fd, data_offset + data_len)
        src = fds(model.path) if verbatim else -1
        src_start = model.reader.data_offset
        for lo in range(0, verbatim, _CHUNK):
            n = min(_CHUNK, verbatim - lo)
            copy_range(src, src_start + lo, fd, data_offset + lo, n)
            tick(n)
        for t in tensors:
            if t.offset >= verbatim:
                _copy(fds, t, fd, data_offset + t.offset, tick)
        os.fsync(fd)
    finally:
        os.close(fd)
    return data_offset + data_len


def _ls_kvs(layer: int, role: Role) -> list[bytes]:
    """The three keys every split file adds (see the lemonslice-gguf-v1 format)."""
    return [
        encode_kv(Keys.LS_FORMAT, ValueType.STRING, FORMAT_NAME),
        encode_kv(Keys.LS_LAYER_INDEX, ValueType.INT32, layer),
        encode_kv(Keys.LS_ROLE, ValueType.STRING, role.value),
    ]


def _write_split(
    model: _Model, tmp: Path, kvs: list[tuple[str, bytes]], tensors: list[_Tensor], data_len: int,
    gaps: list[tuple[int, bytes]], block_count: int, fds: _Fds, progress: Optional[Progress],
) -> int:
    """Write the files `split` would make of the new monolithic file, then its manifest."""
    m = model.manifest
    tensor_bytes = sum(t.n_bytes for t in tensors)
    tick = _Tick(2 * tensor_bytes, progress)
    groups: dict[int | None, list[_Tensor]] = {}
    for t in tensors:
        groups.setdefault(block_index(t.name), []).append(t)
    blocks = sorted(b for b in groups if b is not None)
    hybrid = any(classify_block([t.name for t in groups[b]], False) == Role.RECURRENT for b in blocks)
    file_kvs = [r for k, r in kvs if not k.startswith(Keys.LS_PREFIX)]
    placed: dict[str, tuple[Path, int]] = {}  # tensor -> (its new file, absolute offset there)
    entries: list[FileEntry] = []
    for b in [None, *blocks]:
        ts = groups.get(b, [])
        role = Role.SHARED if b is None else classify_block([t.name for t in ts], hybrid)
        name = SHARED_FILE if b is None else LAYER_FILE.format(index=b)
        plan = plan_file(file_kvs + _ls_kvs(-1 if b is None else b, role),
                         [(t.name, t.shape, t.ggml_type) for t in ts], model.alignment,
                         data_order=[t.name for t in sorted(ts, key=lambda t: t.offset)])
        path = tmp / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.pwrite(fd, plan.padded_header(), 0)
            os.ftruncate(fd, plan.size)
            for t, pt in zip(ts, plan.tensors):
                _copy(fds, t, fd, plan.data_offset + pt.offset, tick)
                placed[t.name] = (path, plan.data_offset + pt.offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        entries.append(FileEntry(
            name, role.value, b, len(ts), plan.size, sha256_file(path),
            [TensorEntry(t.name, t.ggml_type.name, list(t.shape), t.n_bytes, t.offset) for t in ts],
        ))

    header = _header(kvs, tensors, model.version)
    data_offset = align_up(len(header), model.alignment)
    sha = _hash_monolith(header, data_offset, data_len, tensors, placed, gaps, fds, tick)
    arch = model.arch
    manifest = Manifest(
        format=FORMAT_NAME, format_version=FORMAT_VERSION, architecture=arch,
        block_count=block_count, alignment=model.alignment,
        source=SourceInfo(
            name=m.source.name, size=data_offset + data_len, sha256=sha, gguf_version=model.version,
            data_offset=data_offset, kv_order=[k for k, _ in kvs], tensor_order=[t.name for t in tensors],
            reserved_kv=dict(m.source.reserved_kv),
            nonzero_gaps=[(data_offset + o, base64.b64encode(b).decode()) for o, b in gaps],
        ),
        files=entries,
    )
    mpath = tmp / MANIFEST_NAME
    mpath.write_text(manifest.to_json(), encoding="utf-8")
    with open(mpath, "rb") as f:
        os.fsync(f.fileno())
    return sum(e.size for e in entries) + mpath.stat().st_size


def _hash_monolith(
    header: bytes, data_offset: int, data_len: int, tensors: list[_Tensor], placed: dict[str, tuple[Path, int]],
    gaps: list[tuple[int, bytes]], fds: _Fds, tick: _Tick,
) -> str:
    """sha256 of the monolithic file the split directory stands for, read from the new files."""
    h = hashlib.sha256(header)
    zeros = bytes(min(_CHUNK, max(data_offset, data_len)))

    def pad(n: int) -> None:
        while n > 0:
            h.update(zeros[: min(n, len(zeros))])
            n -= min(n, len(zeros))

    pad(data_offset - len(header))
    segs = sorted([(t.offset, t.n_bytes, t.name) for t in tensors] + [(o, len(b), b) for o, b in gaps],
                  key=lambda s: s[0])
    pos = 0
    buf = bytearray(_CHUNK)
    for off, n, what in segs:
        pad(off - pos)
        if isinstance(what, bytes):
            h.update(what)
        else:
            path, start = placed[what]
            fd = fds(path)
            done = 0
            while done < n:
                view = memoryview(buf)[: min(_CHUNK, n - done)]
                got = os.preadv(fd, [view], start + done)
                if got <= 0:
                    raise LemonsliceError(f"{path}: ended early while hashing {what}")
                h.update(view[:got])
                done += got
            tick(n)
        pos = off + n
    pad(data_len - pos)
    return h.hexdigest()
