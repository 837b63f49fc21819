"""Summaries of a GGUF file or a split directory: hyperparameters, layer table, totals."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..gguf.constants import SHARED_FILE, Keys, block_index
from ..gguf.reader import GGUFReader, open_gguf
from .manifest import load_manifest
from .split import layer_roles

# Arrays longer than this are summarised by their length rather than listed.
_MAX_LISTED = 16


def file_type_name(value: Any) -> str | None:
    """llama.cpp's name of a `general.file_type` value, from gguf-py's table: 15 -> "Q4_K_M"."""
    from gguf import LlamaFileType

    try:
        name = LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def hyperparameters(r: GGUFReader) -> dict[str, Any]:
    """The architecture's own keys plus a few general and tokenizer facts."""
    arch = r.architecture or ""
    ft = r.get(Keys.FILE_TYPE)
    out: dict[str, Any] = {"architecture": arch, "name": r.get(Keys.NAME), "file_type": ft,
                           "file_type_name": file_type_name(ft)}
    for key, e in r.kv.items():
        if not key.startswith(arch + "."):
            continue
        short = key[len(arch) + 1 :]
        if e.count is not None and e.count > _MAX_LISTED:
            out[short] = f"[{e.count} items]"
            continue
        v = e.value
        out[short] = v.tolist() if isinstance(v, np.ndarray) else v
    tokens = r.kv.get(Keys.TOKENIZER_TOKENS)
    out["tokenizer"] = r.get(Keys.TOKENIZER_MODEL)
    out["vocab_size"] = tokens.count if tokens is not None else None
    return out


def _layer_row(index: int, role: str, tensors: list[tuple[str, int]]) -> dict[str, Any]:
    types = Counter(t for t, _ in tensors)
    return {
        "index": index,
        "role": role,
        "tensors": len(tensors),
        "bytes": sum(b for _, b in tensors),
        "types": dict(sorted(types.items())),
    }


def inspect_path(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of a `.gguf` file or a split directory."""
    path = Path(path)
    if path.is_dir():
        m = load_manifest(path)
        with open_gguf(path / SHARED_FILE) as r:
            hp = hyperparameters(r)
        shared = m.file(SHARED_FILE)
        shared_bytes = shared.n_bytes
        layers = [
            _layer_row(f.layer, f.role, [(t.type, t.bytes) for t in f.tensors])
            for f in sorted(m.layers, key=lambda f: f.layer)
        ]
        kind, files, size = "split", len(m.files), sum(f.size for f in m.files)
    else:
        with open_gguf(path) as r:
            hp = hyperparameters(r)
            roles = layer_roles(r)
            per: dict[int, list[tuple[str, int]]] = {b: [] for b in roles}
            shared_bytes = 0
            for t in r.tensors:
                b = block_index(t.name)
                if b is None:
                    shared_bytes += t.n_bytes
                else:
                    per[b].append((t.ggml_type.name, t.n_bytes))
            layers = [_layer_row(b, roles[b].value, per[b]) for b in sorted(per)]
            kind, files, size = "gguf", 1, r.file_size
    largest = max((row["bytes"] for row in layers), default=0)
    total = shared_bytes + sum(row["bytes"] for row in layers)
    return {
        "path": str(path),
        "kind": kind,
        "files": files,
        "file_bytes": size,
        "hyperparameters": hp,
        "layers": layers,
        "totals": {
            "layers": len(layers),
            "roles": dict(Counter(row["role"] for row in layers)),
            "tensor_bytes": total,
            "shared_bytes": shared_bytes,
            "largest_layer_bytes": largest,
            # Weights resident when streaming one layer at a time (activations and caches extra).
            "peak_one_layer_bytes": shared_bytes + largest,
        },
    }
