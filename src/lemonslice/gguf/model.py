"""A model's files, opened once: a split directory (manifest.json + shared.gguf + layer files)
or a single .gguf, with its metadata and the open readers of every file it has touched.

Everything above (the engine's weight store and residency, surgery's source models, the
tokenizer through `metadata`) takes this one object instead of parsing the model again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import LemonsliceError
from .constants import SHARED_FILE, GGMLType, Keys, Role, block_index, classify_block
from .manifest import Manifest, load_manifest
from .reader import GGUFReader, KVEntry, TensorInfo, open_gguf


class Metadata(Mapping[str, Any]):
    """The model's KV pairs, decoded on first access (the tokenizer arrays are large)."""

    def __init__(self, entries: Mapping[str, KVEntry], owner: Any = None):
        # Values are read lazily from the owner's open file, so the owner must outlive this mapping.
        self._owner = owner
        # Keys lemonslice adds to split files describe the file, not the model.
        self._entries = {k: e for k, e in entries.items() if not k.startswith(Keys.LS_PREFIX)}
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            self._cache[key] = self._entries[key].value
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def count(self, key: str) -> int | None:
        """The length of an array value without decoding it (None: absent or not an array)."""
        e = self._entries.get(key)
        return e.count if e is not None else None

    @property
    def entries(self) -> list[KVEntry]:
        """The raw KV records, in file order (lemonslice's own keys left out)."""
        return list(self._entries.values())


class ModelFiles:
    """The files of one model. Readers open on first use: each split file's header repeats
    the whole tokenizer, so a run that touches two layers parses two headers, not forty."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.manifest: Manifest | None = None
        self._readers: dict[Path, GGUFReader] = {}
        # File of each block (None: shared.gguf, or the single file); _tensor_files: name -> that key.
        self._files: dict[int | None, Path] = {}
        if self.path.is_dir():
            self.manifest = load_manifest(self.path)
            for f in self.manifest.files:
                self._files[f.layer] = self.path / f.name
            self._files[None] = self.path / SHARED_FILE
            # Every split file repeats the source's KVs; shared.gguf's are the model's.
            self.metadata = Metadata(self.reader(None).kv, owner=self)
            self._tensor_files = {t.name: f.layer for f in self.manifest.files for t in f.tensors}
        else:
            self._files[None] = self.path
            reader = self.reader(None)
            self.metadata = Metadata(reader.kv, owner=self)
            self._tensor_files = {t.name: None for t in reader.tensors}
        self._by_layer: dict[int | None, list[str]] = {}
        for name in self._tensor_files:
            self._by_layer.setdefault(block_index(name), []).append(name)

    # ---- files ----------------------------------------------------------------------

    def reader(self, layer: int | None) -> GGUFReader:
        """The reader of block `layer`'s file (None: shared.gguf or the single file)."""
        path = self._files[layer]
        if path not in self._readers:
            self._readers[path] = open_gguf(path)
        return self._readers[path]

    def open_files(self) -> list[Path]:
        """The files opened so far (an engine limited to some positions opens only theirs)."""
        return list(self._readers)

    def files_by_layer(self) -> dict[int | None, Path]:
        """Each block's file (None: shared.gguf, or the single file)."""
        return dict(self._files)

    def file_of(self, name: str) -> Path:
        if name not in self._tensor_files:
            raise LemonsliceError(f"{self.path}: no tensor {name}")
        return self._files[self._tensor_files[name]]

    def fd_of(self, name: str) -> int:
        """An open descriptor of the file holding tensor `name` (for pread)."""
        self.file_of(name)  # a one-line error for an unknown name
        return self.reader(self._tensor_files[name]).fileno()

    def info(self, name: str) -> TensorInfo:
        path = self.file_of(name)
        info = self.reader(self._tensor_files[name]).tensor_map.get(name)
        if info is None:
            raise LemonsliceError(f"{path}: lacks {name}, which manifest.json places there")
        return info

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __enter__(self) -> "ModelFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- what is there --------------------------------------------------------------

    @property
    def arch(self) -> str | None:
        return self.metadata.get(Keys.ARCHITECTURE)

    @property
    def alignment(self) -> int:
        return self.reader(None).alignment

    @property
    def layers(self) -> list[int]:
        """Block indices that have tensors."""
        return sorted(k for k in self._by_layer if k is not None)

    def tensor_names(self, layer: int | None) -> list[str]:
        """Tensor names of block `layer`, or the shared tensors for None."""
        return list(self._by_layer.get(layer, []))

    def nbytes(self, layer: int | None) -> int:
        return sum(self.info(n).n_bytes for n in self.tensor_names(layer))

    def tensors(self) -> list[tuple[TensorInfo, Path]]:
        """Every tensor with the file that holds it, in the source model's tensor order."""
        out = [(self.info(n), self.file_of(n)) for n in self._tensor_files]
        if self.manifest is not None:
            order = {n: i for i, n in enumerate(self.manifest.source.tensor_order)}
            out.sort(key=lambda tp: order.get(tp[0].name, len(order)))
        return out

    def tensor_types(self) -> list[tuple[str, GGMLType]]:
        """(name, ggml type) of every tensor; a split answers from its manifest, opening no file."""
        if self.manifest is None:
            return [(t.name, t.ggml_type) for t in self.reader(None).tensors]
        try:
            return [(t.name, GGMLType[t.type]) for f in self.manifest.files for t in f.tensors]
        except KeyError as e:
            raise LemonsliceError(f"{self.path}: manifest.json names an unknown tensor type {e}") from None

    def roles(self) -> dict[int, Role]:
        """Each block's role, from its tensor names (as `split` decides it)."""
        hybrid = any(classify_block(self.tensor_names(b), False) == Role.RECURRENT for b in self.layers)
        return {b: classify_block(self.tensor_names(b), hybrid) for b in self.layers}
