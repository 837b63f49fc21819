"""Streaming GGUF writer.

A file is planned first (`plan_file`: header bytes and every tensor's offset), then its
tensor data is streamed in: from in-memory buffers (`write_gguf`) or copied kernel-side
from another file (`copy_range`).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .constants import (
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    NUMPY_DTYPES,
    SCALAR_FORMATS,
    WRITE_VERSION,
    GGMLType,
    ValueType,
)
from .reader import align_up, tensor_nbytes


def encode_string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def encode_kv(key: str, vtype: ValueType, value: Any, item_type: ValueType | None = None) -> bytes:
    """One KV record: key, value type, value."""
    out = [encode_string(key), struct.pack("<I", vtype)]
    if vtype == ValueType.STRING:
        out.append(encode_string(value))
    elif vtype == ValueType.ARRAY:
        assert item_type is not None and item_type != ValueType.ARRAY
        items = list(value)
        out.append(struct.pack("<IQ", item_type, len(items)))
        if item_type == ValueType.STRING:
            out.extend(encode_string(v) for v in items)
        else:
            out.append(np.asarray(items, dtype=NUMPY_DTYPES[item_type]).tobytes())
    else:
        out.append(struct.pack(SCALAR_FORMATS[vtype], value))
    return b"".join(out)


def encode_tensor_info(name: str, shape: Sequence[int], ggml_type: GGMLType, offset: int) -> bytes:
    return (
        encode_string(name)
        + struct.pack("<I", len(shape))
        + struct.pack(f"<{len(shape)}Q", *shape)
        + struct.pack("<IQ", int(ggml_type), offset)
    )


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    n_bytes: int
    offset: int  # relative to the data section


@dataclass(frozen=True)
class FilePlan:
    header: bytes  # magic .. last tensor info, without padding
    data_offset: int  # absolute start of the data section
    tensors: list[PlannedTensor]  # in header order
    size: int  # total file size, trailing padding included
    alignment: int

    def padded_header(self) -> bytes:
        return self.header + b"\0" * (self.data_offset - len(self.header))


def plan_file(
    kv_records: Sequence[bytes],
    tensors: Iterable[tuple[str, Sequence[int], GGMLType]],
    alignment: int = DEFAULT_ALIGNMENT,
    data_order: Sequence[str] | None = None,
    version: int = WRITE_VERSION,
) -> FilePlan:
    """Lay out a GGUF file. `data_order` (tensor names) sets the order of the data,
    which may differ from the order of the tensor infos."""
    specs = [(n, tuple(int(d) for d in s), GGMLType(t)) for n, s, t in tensors]
    sizes = {n: tensor_nbytes(s, t) for n, s, t in specs}
    offsets: dict[str, int] = {}
    pos = 0
    for name in data_order if data_order is not None else [n for n, _, _ in specs]:
        offsets[name] = pos
        pos = align_up(pos + sizes[name], alignment)
    assert len(offsets) == len(specs), "data_order must name every tensor once"
    parts = [GGUF_MAGIC, struct.pack("<IQQ", version, len(specs), len(kv_records)), *kv_records]
    parts += [encode_tensor_info(n, s, t, offsets[n]) for n, s, t in specs]
    header = b"".join(parts)
    data_offset = align_up(len(header), alignment)
    planned = [PlannedTensor(n, s, t, sizes[n], offsets[n]) for n, s, t in specs]
    return FilePlan(header, data_offset, planned, data_offset + pos, alignment)


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    """Copy bytes between files inside the kernel (copy_file_range, else sendfile)."""
    while length > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)
        except OSError as e:
            if e.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                raise
            os.lseek(dst_fd, dst_offset, os.SEEK_SET)
            n = os.sendfile(dst_fd, src_fd, src_offset, length)
        if n == 0:
            raise EOFError(f"source ended {length} bytes early at offset {src_offset}")
        src_offset += n
        dst_offset += n
        length -= n


def write_gguf(
    path: str | os.PathLike[str],
    kv_records: Sequence[bytes],
    tensors: Sequence[tuple[str, Sequence[int], GGMLType, Any]],
    alignment: int = DEFAULT_ALIGNMENT,
) -> FilePlan:
    """Write a GGUF whose tensor data comes from in-memory buffers (numpy arrays or bytes)."""
    plan = plan_file(kv_records, [(n, s, t) for n, s, t, _ in tensors], alignment)
    with open(path, "wb") as f:
        f.write(plan.padded_header())
        for (name, _, _, data), pt in zip(tensors, plan.tensors):
            b = memoryview(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data).cast("B")
            if len(b) != pt.n_bytes:
                raise ValueError(f"tensor {name}: {len(b)} bytes given, {pt.n_bytes} expected")
            f.seek(plan.data_offset + pt.offset)
            f.write(b)
        f.truncate(plan.size)
    return plan
