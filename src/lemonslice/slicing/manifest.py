"""manifest.json of a lemonslice-gguf-v1 split directory: schema, loading and validation."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LemonsliceError
from ..gguf.constants import FORMAT_NAME, FORMAT_VERSION, LAYER_FILE_RE, MANIFEST_NAME, SHARED_FILE, Role

# A manifest larger than this is refused before parsing (a real 40-layer one is ~300 KB).
MAX_MANIFEST_BYTES = 64 << 20


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


def check_file_name(name: str) -> None:
    """Manifest file names are plain names inside the directory: no paths, no '..'."""
    if name == SHARED_FILE or LAYER_FILE_RE.match(name):
        return
    raise LemonsliceError(f"manifest: file name {name!r} is not shared.gguf or layer_NNNN.gguf")


def _parse(d: Any) -> Manifest:
    if not isinstance(d, dict):
        raise LemonsliceError("manifest: top level is not an object")
    fmt = _req(d, "format", str, "manifest")
    if fmt != FORMAT_NAME:
        raise LemonsliceError(f"manifest: format {fmt!r} is not {FORMAT_NAME}")
    ver = _req(d, "format_version", int, "manifest")
    if ver != FORMAT_VERSION:
        raise LemonsliceError(f"manifest: format_version {ver} is not supported (expected {FORMAT_VERSION})")
    s = _req(d, "source", dict, "manifest")
    source = SourceInfo(
        name=_req(s, "name", str, "source"),
        size=_req(s, "size", int, "source"),
        sha256=_req(s, "sha256", str, "source"),
        gguf_version=_req(s, "gguf_version", int, "source"),
        data_offset=_req(s, "data_offset", int, "source"),
        kv_order=_req(s, "kv_order", list, "source"),
        tensor_order=_req(s, "tensor_order", list, "source"),
        reserved_kv=s.get("reserved_kv", {}),
        nonzero_gaps=[tuple(g) for g in s.get("nonzero_gaps", [])],
    )
    files = []
    seen: set[str] = set()
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
        tensors = []
        for j, t in enumerate(_req(f, "tensors", list, where)):
            tw = f"{where}.tensors[{j}]"
            if not isinstance(t, dict):
                raise LemonsliceError(f"manifest: {tw} is not an object")
            tensors.append(
                TensorEntry(
                    _req(t, "name", str, tw), _req(t, "type", str, tw), _req(t, "shape", list, tw),
                    _req(t, "bytes", int, tw), _req(t, "offset", int, tw),
                )
            )
        files.append(
            FileEntry(
                name, role, layer, _req(f, "tensor_count", int, where), _req(f, "size", int, where),
                _req(f, "sha256", str, where), tensors,
            )
        )
    if SHARED_FILE not in seen:
        raise LemonsliceError("manifest: no shared.gguf entry")
    al = _req(d, "alignment", int, "manifest")
    return Manifest(fmt, ver, d.get("architecture"), d.get("block_count"), al, source, files)


def load_manifest(directory: str | os.PathLike[str]) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise LemonsliceError(f"{directory} is not a directory")
    if not path.is_file():
        raise LemonsliceError(f"{path}: missing; is {directory} a lemonslice split directory?")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise LemonsliceError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LemonsliceError(f"{path}: not valid JSON ({e})") from None
    return _parse(d)
