"""A lean, validating GGUF reader.

The header is parsed from bytes read with `pread`, growing the read only as far as the
header needs, so a hostile file costs little time or memory. Every KV pair keeps its raw
bytes and order; values are decoded only when asked for. Tensor data is reached through
a lazily created read-only mmap.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .constants import (
    BLOCK_SIZES,
    DEFAULT_ALIGNMENT,
    GGML_MAX_DIMS,
    GGUF_MAGIC,
    MAX_ALIGNMENT,
    NUMPY_DTYPES,
    SCALAR_FORMATS,
    SUPPORTED_VERSIONS,
    GGMLType,
    Keys,
    ValueType,
)
from .errors import (
    AlignmentError,
    BadMagicError,
    BadStringError,
    BadValueTypeError,
    CountError,
    DimensionError,
    DuplicateKeyError,
    DuplicateTensorError,
    GGUFError,
    NestedArrayError,
    TensorRangeError,
    TruncatedError,
    UnknownTensorTypeError,
    UnsupportedVersionError,
)

_I64_MAX = (1 << 63) - 1
_FIRST_READ = 1 << 20
# Smallest encoded sizes, used to reject counts before looping over them.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8


class _NeedMore(Exception):
    """The header runs past the bytes read so far (but maybe not past the file)."""


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class KVEntry:
    key: str
    vtype: ValueType
    # Byte span of the whole record (key, type and value) in the file.
    start: int
    end: int
    # Where the value starts (after the value type).
    value_start: int
    # For arrays: element type and count.
    item_type: ValueType | None = None
    count: int | None = None
    _reader: "GGUFReader | None" = field(default=None, repr=False, compare=False)

    @property
    def raw(self) -> bytes:
        assert self._reader is not None
        return self._reader._pread(self.start, self.end - self.start)

    @property
    def value(self) -> Any:
        assert self._reader is not None
        return self._reader._decode_value(self)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (the row length) first
    ggml_type: GGMLType
    offset: int  # relative to the data section
    n_bytes: int
    data_start: int  # absolute file offset of the first byte

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLType) -> int:
    block, type_size = BLOCK_SIZES[ggml_type]
    if shape and shape[0] % block:
        raise DimensionError(
            f"row of {shape[0]} elements is not a multiple of the {ggml_type.name} block size {block}"
        )
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


class GGUFReader:
    """Reads and validates a GGUF file's header; tensor data is memory-mapped on demand.

    Raises a subclass of `GGUFError` for every kind of malformed input.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd = -1
        self._mmap: mmap.mmap | None = None
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            st = os.fstat(self._fd)
            self.file_size = st.st_size
            self._parse_growing()
        except BaseException:
            # close() marks the fd closed, so __del__ cannot close a reused descriptor later.
            self.close()
            raise

    # ---- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def fileno(self) -> int:
        """The open descriptor of the file (for pread and kernel-side copies)."""
        return self._fd

    def __enter__(self) -> "GGUFReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- parsing --------------------------------------------------------------------

    def _pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise TruncatedError(f"{self.path}: file ended at byte {offset + len(data)}, expected {offset + size}")
        return data

    def _parse_growing(self) -> None:
        size = min(self.file_size, _FIRST_READ)
        while True:
            buf = os.pread(self._fd, size, 0)
            if len(buf) < size:
                # The file shrank after fstat; growing the read again would never finish.
                raise TruncatedError(f"{self.path}: file shrank to {len(buf)} bytes while being read")
            try:
                self._parse(buf)
                return
            except _NeedMore:
                if len(buf) >= self.file_size:
                    raise TruncatedError(f"{self.path}: header runs past the end of the file ({self.file_size} bytes)")
                size = min(self.file_size, size * 4)

    def _parse(self, buf: bytes) -> None:
        p = _Cursor(buf, self.file_size, self.path)
        if self.file_size < 4:
            raise TruncatedError(f"{self.path}: file is {self.file_size} bytes, too short for a GGUF header")
        magic = p.take(4)
        if magic != GGUF_MAGIC:
            raise BadMagicError(
                f"{self.path}: not a GGUF file (it starts with bytes {magic.hex(' ')}, not {GGUF_MAGIC.decode()})")
        version = p.u32()
        if version not in SUPPORTED_VERSIONS:
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            hint = " (big-endian GGUF is not supported)" if swapped in SUPPORTED_VERSIONS else ""
            raise UnsupportedVersionError(f"{self.path}: unsupported GGUF version {version}{hint}")
        self.version = version
        tensor_count = p.u64()
        kv_count = p.u64()
        remaining = self.file_size - p.pos
        if kv_count * _MIN_KV_BYTES > remaining:
            raise CountError(f"{self.path}: KV count {kv_count} cannot fit in a {self.file_size}-byte file")
        if tensor_count * _MIN_TENSOR_INFO_BYTES > remaining:
            raise CountError(f"{self.path}: tensor count {tensor_count} cannot fit in a {self.file_size}-byte file")

        kvs: dict[str, KVEntry] = {}
        for _ in range(kv_count):
            start = p.pos
            key = p.string("KV key")
            if key in kvs:
                raise DuplicateKeyError(f"{self.path}: duplicate KV key {key!r}")
            vtype = p.value_type(key)
            value_start = p.pos
            item_type = count = None
            if vtype == ValueType.ARRAY:
                item_type = p.value_type(key)
                if item_type == ValueType.ARRAY:
                    raise NestedArrayError(f"{self.path}: KV {key!r} is a nested array, which is not supported")
                count = p.u64()
                p.skip_array(item_type, count, key)
            else:
                p.skip_value(vtype, key)
            kvs[key] = KVEntry(key, vtype, start, p.pos, value_start, item_type, count, self)
        self.kv = kvs
        self.header_kv_end = p.pos

        alignment = DEFAULT_ALIGNMENT
        al = kvs.get(Keys.ALIGNMENT)
        if al is not None:
            if al.vtype != ValueType.UINT32:
                raise AlignmentError(f"{self.path}: {Keys.ALIGNMENT} must be uint32, got {al.vtype.name}")
            alignment = struct.unpack_from("<I", buf, al.value_start)[0]
            if alignment == 0 or alignment & (alignment - 1):
                raise AlignmentError(f"{self.path}: alignment {alignment} is not a power of two")
            if alignment > MAX_ALIGNMENT:
                raise AlignmentError(f"{self.path}: alignment {alignment} is larger than {MAX_ALIGNMENT}")
        self.alignment = alignment

        infos: list[tuple[str, tuple[int, ...], GGMLType, int]] = []
        seen: set[str] = set()
        for _ in range(tensor_count):
            name = p.string("tensor name")
            if name in seen:
                raise DuplicateTensorError(f"{self.path}: duplicate tensor {name!r}")
            seen.add(name)
            n_dims = p.u32()
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise DimensionError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (1..{GGML_MAX_DIMS} allowed)")
            shape = tuple(p.u64() for _ in range(n_dims))
            raw_type = p.u32()
            try:
                ggml_type = GGMLType(raw_type)
            except ValueError:
                raise UnknownTensorTypeError(f"{self.path}: tensor {name!r} has unknown ggml type {raw_type}") from None
            offset = p.u64()
            n = 1
            for d in shape:
                if d > _I64_MAX:
                    raise DimensionError(f"{self.path}: tensor {name!r} dimension {d} is too large")
                n *= d
                if n > _I64_MAX:
                    raise DimensionError(f"{self.path}: tensor {name!r} shape {'x'.join(map(str, shape))} overflows 64 bits")
            infos.append((name, shape, ggml_type, offset))
        self.header_end = p.pos

        self.data_offset = align_up(self.header_end, alignment)
        if infos and self.data_offset > self.file_size:
            raise TruncatedError(f"{self.path}: data section would start at {self.data_offset}, past the end of the file")
        data_size = max(0, self.file_size - self.data_offset)

        tensors: list[TensorInfo] = []
        for name, shape, ggml_type, offset in infos:
            try:
                n_bytes = tensor_nbytes(shape, ggml_type)
            except DimensionError as e:
                raise DimensionError(f"{self.path}: tensor {name!r}: {e}") from None
            if offset % alignment:
                raise TensorRangeError(f"{self.path}: tensor {name!r} offset {offset} is not aligned to {alignment}")
            if offset + n_bytes > data_size:
                raise TensorRangeError(
                    f"{self.path}: tensor {name!r} data [{offset}, {offset + n_bytes}) lies past the end of the "
                    f"{data_size}-byte data section"
                )
            tensors.append(TensorInfo(name, shape, ggml_type, offset, n_bytes, self.data_offset + offset))
        by_offset = sorted(tensors, key=lambda t: (t.offset, t.n_bytes))
        for a, b in zip(by_offset, by_offset[1:]):
            if a.offset + a.n_bytes > b.offset:
                raise TensorRangeError(f"{self.path}: tensors {a.name!r} and {b.name!r} overlap")
        self.tensors = tensors
        self.tensor_map = {t.name: t for t in tensors}

    # ---- values ---------------------------------------------------------------------

    def _decode_value(self, e: KVEntry) -> Any:
        raw = self._pread(e.value_start, e.end - e.value_start)
        if e.vtype == ValueType.STRING:
            return _decode_str(raw[8:], self.path, e.key)
        if e.vtype != ValueType.ARRAY:
            return struct.unpack_from(SCALAR_FORMATS[e.vtype], raw)[0]
        assert e.item_type is not None and e.count is not None
        body = memoryview(raw)[12:]
        if e.item_type == ValueType.STRING:
            out, pos = [], 0
            for _ in range(e.count):
                (ln,) = struct.unpack_from("<Q", body, pos)
                out.append(_decode_str(bytes(body[pos + 8 : pos + 8 + ln]), self.path, e.key))
                pos += 8 + ln
            return out
        arr = np.frombuffer(body, dtype=NUMPY_DTYPES[e.item_type], count=e.count)
        return arr.astype(bool) if e.item_type == ValueType.BOOL else arr.copy()

    def get(self, key: str, default: Any = None) -> Any:
        e = self.kv.get(key)
        return default if e is None else e.value

    @property
    def architecture(self) -> str | None:
        v = self.get(Keys.ARCHITECTURE)
        return v if isinstance(v, str) else None

    # ---- tensor data ----------------------------------------------------------------

    @cached_property
    def _map(self) -> mmap.mmap:
        self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        return self._mmap

    def tensor_bytes(self, name: str) -> memoryview:
        """The tensor's raw bytes, as a zero-copy view of the mapped file."""
        t = self.tensor_map[name]
        return memoryview(self._map)[t.data_start : t.data_start + t.n_bytes]

    def tensor_array(self, name: str) -> np.ndarray:
        """Raw data as numpy: float/int types shaped in numpy order, quantized types as uint8 rows."""
        t = self.tensor_map[name]
        buf = self.tensor_bytes(name)
        np_shape = tuple(reversed(t.shape))
        plain = {
            GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.F64: np.float64,
            GGMLType.I8: np.int8, GGMLType.I16: np.int16, GGMLType.I32: np.int32, GGMLType.I64: np.int64,
        }
        if t.ggml_type in plain:
            return np.frombuffer(buf, dtype=plain[t.ggml_type]).reshape(np_shape)
        if t.ggml_type == GGMLType.BF16:
            return np.frombuffer(buf, dtype=np.uint16).reshape(np_shape)
        block, type_size = BLOCK_SIZES[t.ggml_type]
        row_bytes = t.shape[0] // block * type_size
        return np.frombuffer(buf, dtype=np.uint8).reshape(*np_shape[:-1], row_bytes)


class _Cursor:
    """Bounds-checked little-endian reads over the header bytes read so far."""

    def __init__(self, buf: bytes, file_size: int, path: Path):
        self.buf = buf
        self.file_size = file_size
        self.path = path
        self.pos = 0

    def _need(self, n: int, what: str = "header") -> None:
        end = self.pos + n
        if end > self.file_size:
            raise TruncatedError(f"{self.path}: {what} at byte {self.pos} runs past the end of the file")
        if end > len(self.buf):
            raise _NeedMore

    def take(self, n: int) -> bytes:
        self._need(n)
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def u32(self) -> int:
        self._need(4)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self._need(8)
        (v,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64()
        if n > self.file_size - self.pos:
            raise CountError(f"{self.path}: {what} length {n} at byte {self.pos - 8} is larger than the file")
        return _decode_str(self.take(n), self.path, what)

    def value_type(self, key: str) -> ValueType:
        raw = self.u32()
        try:
            return ValueType(raw)
        except ValueError:
            raise BadValueTypeError(f"{self.path}: KV {key!r} has unknown value type {raw}") from None

    def skip_value(self, vtype: ValueType, key: str) -> None:
        if vtype == ValueType.STRING:
            n = self.u64()
            if n > self.file_size - self.pos:
                raise CountError(f"{self.path}: KV {key!r} string length {n} is larger than the file")
            self._need(n)
            self.pos += n
        else:
            self._need(struct.calcsize(SCALAR_FORMATS[vtype]))
            if vtype == ValueType.BOOL and self.buf[self.pos] > 1:
                raise BadValueTypeError(f"{self.path}: KV {key!r} bool has value {self.buf[self.pos]}")
            self.pos += struct.calcsize(SCALAR_FORMATS[vtype])

    def skip_array(self, item_type: ValueType, count: int, key: str) -> None:
        remaining = self.file_size - self.pos
        if item_type == ValueType.STRING:
            if count * 8 > remaining:
                raise CountError(f"{self.path}: KV {key!r} array of {count} strings cannot fit in the file")
            buf, pos, end = self.buf, self.pos, len(self.buf)
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                if pos + 8 > end:
                    self.pos = pos
                    self._need(8, f"KV {key!r} array")
                (n,) = unpack(buf, pos)
                pos += 8 + n
                if pos > end:
                    self.pos = pos - n
                    if n > self.file_size - self.pos:
                        raise CountError(f"{self.path}: KV {key!r} string length {n} is larger than the file")
                    self._need(n, f"KV {key!r} array")
            self.pos = pos
            return
        size = count * struct.calcsize(SCALAR_FORMATS[item_type])
        if size > remaining:
            raise CountError(f"{self.path}: KV {key!r} array of {count} items cannot fit in the file")
        self._need(size)
        if item_type == ValueType.BOOL and self.buf[self.pos : self.pos + size].translate(None, b"\0\1"):
            raise BadValueTypeError(f"{self.path}: KV {key!r} bool array holds a value other than 0 or 1")
        self.pos += size


def _decode_str(b: bytes, path: Path, what: str) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise BadStringError(f"{path}: {what} is not valid UTF-8") from None


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """Open a GGUF file, turning OS errors into `GGUFError`s with the path in them."""
    try:
        return GGUFReader(path)
    except GGUFError:
        raise
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from None
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except PermissionError:
        raise GGUFError(f"{path}: permission denied") from None
