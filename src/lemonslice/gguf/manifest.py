"""manifest.json of a lemonslice-gguf-v1 split directory: schema, loading and validation."""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LemonsliceError
from .constants import FORMAT_NAME, FORMAT_VERSION, LAYER_FILE_RE, MANIFEST_NAME, SHARED_FILE, GGMLType, Role

# A manifest larger than this is refused before parsing (a real 40-layer one is ~300 KB).
MAX_MANIFEST_BYTES = 64 << 20
# Written by `verify` beside the manifest: what each file's stat looked like when its hash was checked.
STAMP_NAME = ".lemonslice-verified.json"


@dataclass
class TensorEntry:
    name: str
    type: str
    shape: list[int]
    bytes: int
    offset: int  # offset in the source's data section, for a byte-exact merge


@dataclass
class FileEntry:
    name: str
    role: str
    layer: int | None
    tensor_count: int
    size: int
    sha256: str
    tensors: list[TensorEntry] = field(default_factory=list)

    @property
    def n_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)


@dataclass
class SourceInfo:
    name: str
    size: int
    sha256: str
    gguf_version: int
    data_offset: int
    kv_order: list[str]
    tensor_order: list[str]
    # Raw KV records of source keys named lemonslice.*, which split files redefine (base64).
    reserved_kv: dict[str, str] = field(default_factory=dict)
    # Bytes outside any tensor that are not zero: [absolute offset, base64].
    nonzero_gaps: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class Manifest:
    format: str
    format_version: int
    architecture: str | None
    block_count: int | None
    alignment: int
    source: SourceInfo
    files: list[FileEntry]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def layers(self) -> list[FileEntry]:
        return [f for f in self.files if f.layer is not None]


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise LemonsliceError(f"manifest: {where} lacks '{key}'")
    v = d[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is int):
        raise LemonsliceError(f"manifest: {where}.{key} has the wrong type")
    return v


def _count(d: dict[str, Any], key: str, where: str) -> int:
    v = _req(d, key, int, where)
    if v < 0:
        raise LemonsliceError(f"manifest: {where}.{key} is negative")
    return v


def _sha256(d: dict[str, Any], key: str, where: str) -> str:
    v = _req(d, key, str, where)
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise LemonsliceError(f"manifest: {where}.{key} is not a sha256 hex digest")
    return v


def _b64(v: Any, where: str) -> bytes:
    if not isinstance(v, str):
        raise LemonsliceError(f"manifest: {where} is not a base64 string")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise LemonsliceError(f"manifest: {where} is not valid base64") from None


def _names(d: dict[str, Any], key: str, where: str) -> list[str]:
    v = _req(d, key, list, where)
    if not all(isinstance(x, str) for x in v):
        raise LemonsliceError(f"manifest: {where}.{key} holds a non-string")
    if len(set(v)) != len(v):
        raise LemonsliceError(f"manifest: {where}.{key} repeats a name")
    return v


def check_file_name(name: str) -> None:
    """Manifest file names are plain names inside the directory: no paths, no '..'."""
    if name == SHARED_FILE or LAYER_FILE_RE.match(name):
        return
    raise LemonsliceError(f"manifest: file name {name!r} is not shared.gguf or layer_NNNN.gguf")


def _parse_source(s: dict[str, Any]) -> SourceInfo:
    size = _count(s, "size", "source")
    version = _req(s, "gguf_version", int, "source")
    if version not in (2, 3):
        raise LemonsliceError(f"manifest: source.gguf_version {version} is not 2 or 3")
    data_offset = _count(s, "data_offset", "source")
    if data_offset > size:
        raise LemonsliceError("manifest: source.data_offset lies past the source's end")
    reserved = s.get("reserved_kv", {})
    if not isinstance(reserved, dict):
        raise LemonsliceError("manifest: source.reserved_kv is not an object")
    for k, v in reserved.items():
        _b64(v, f"source.reserved_kv[{k!r}]")
    gaps = s.get("nonzero_gaps", [])
    if not isinstance(gaps, list):
        raise LemonsliceError("manifest: source.nonzero_gaps is not a list")
    for i, g in enumerate(gaps):
        where = f"source.nonzero_gaps[{i}]"
        if not (isinstance(g, list) and len(g) == 2 and isinstance(g[0], int) and not isinstance(g[0], bool)):
            raise LemonsliceError(f"manifest: {where} is not [offset, base64]")
        if g[0] < 0 or g[0] + len(_b64(g[1], where)) > size:
            raise LemonsliceError(f"manifest: {where} lies outside the source")
    return SourceInfo(
        name=_req(s, "name", str, "source"),
        size=size,
        sha256=_sha256(s, "sha256", "source"),
        gguf_version=version,
        data_offset=data_offset,
        kv_order=_names(s, "kv_order", "source"),
        tensor_order=_names(s, "tensor_order", "source"),
        reserved_kv=reserved,
        nonzero_gaps=[tuple(g) for g in gaps],
    )


def _parse_tensor(t: Any, where: str) -> TensorEntry:
    if not isinstance(t, dict):
        raise LemonsliceError(f"manifest: {where} is not an object")
    typ = _req(t, "type", str, where)
    if typ not in GGMLType.__members__:
        raise LemonsliceError(f"manifest: {where}.type {typ!r} is not a ggml type")
    shape = _req(t, "shape", list, where)
    if not 1 <= len(shape) <= 4 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
        raise LemonsliceError(f"manifest: {where}.shape is not 1 to 4 non-negative integers")
    return TensorEntry(_req(t, "name", str, where), typ, shape, _count(t, "bytes", where), _count(t, "offset", where))


def _parse(d: Any) -> Manifest:
    if not isinstance(d, dict):
        raise LemonsliceError("manifest: top level is not an object")
    fmt = _req(d, "format", str, "manifest")
    if fmt != FORMAT_NAME:
        raise LemonsliceError(f"manifest: format {fmt!r} is not {FORMAT_NAME}")
    ver = _req(d, "format_version", int, "manifest")
    if ver != FORMAT_VERSION:
        raise LemonsliceError(f"manifest: format_version {ver} is not supported (expected {FORMAT_VERSION})")
    source = _parse_source(_req(d, "source", dict, "manifest"))
    al = _req(d, "alignment", int, "manifest")
    if al <= 0 or al & (al - 1):
        raise LemonsliceError(f"manifest: alignment {al} is not a power of two")
    files = []
    seen: set[str] = set()
    tensor_names: list[str] = []
    for i, f in enumerate(_req(d, "files", list, "manifest")):
        where = f"files[{i}]"
        if not isinstance(f, dict):
            raise LemonsliceError(f"manifest: {where} is not an object")
        name = _req(f, "name", str, where)
        check_file_name(name)
        if name in seen:
            raise LemonsliceError(f"manifest: file {name} is listed twice")
        seen.add(name)
        role = _req(f, "role", str, where)
        if role not in {r.value for r in Role}:
            raise LemonsliceError(f"manifest: {where} has unknown role {role!r}")
        layer = f.get("layer")
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 0):
            raise LemonsliceError(f"manifest: {where}.layer is not a non-negative integer")
        tensors = [_parse_tensor(t, f"{where}.tensors[{j}]") for j, t in enumerate(_req(f, "tensors", list, where))]
        count = _count(f, "tensor_count", where)
        if count != len(tensors):
            raise LemonsliceError(f"manifest: {where}.tensor_count {count} but {len(tensors)} tensors listed")
        tensor_names += [t.name for t in tensors]
        files.append(FileEntry(name, role, layer, count, _count(f, "size", where), _sha256(f, "sha256", where), tensors))
    if SHARED_FILE not in seen:
        raise LemonsliceError("manifest: no shared.gguf entry")
    if sorted(tensor_names) != sorted(source.tensor_order):
        raise LemonsliceError("manifest: the files' tensors differ from source.tensor_order")
    return Manifest(fmt, ver, d.get("architecture"), d.get("block_count"), al, source, files)


def load_manifest(directory: str | os.PathLike[str]) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise LemonsliceError(f"{directory} is not a directory")
    if not path.is_file():
        raise LemonsliceError(f"{path}: missing; is {directory} a lemonslice split directory?")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise LemonsliceError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, where: str) -> Manifest:
    """A manifest's bytes (read from a file, or received from a peer) with every check of
    `load_manifest`; `where` names the origin in errors."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise LemonsliceError(f"{where}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LemonsliceError(f"{where}: not valid JSON ({e})") from None
    return _parse(d)
