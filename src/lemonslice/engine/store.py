"""WeightStore: one model's weights from a split directory or a monolithic GGUF.

Tensor bytes are read (pread, not mmap) into fresh buffers on every load, so a layer's
memory belongs to the caller's objects and goes back when they are dropped: streaming
really frees it. The store counts the bytes of every buffer it handed out that is still
alive (`resident_bytes`, `peak_resident_bytes`).
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..errors import LemonsliceError
from ..gguf.constants import SHARED_FILE, GGMLType, Keys, block_index
from ..gguf.reader import GGUFReader, KVEntry, TensorInfo, open_gguf
from ..ops import QuantWeight, dequantize
from ..slicing.manifest import load_manifest

Weight = Union[QuantWeight, torch.Tensor]


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


class WeightStore:
    """Weights of one model. `path` is a split directory (manifest.json + shared.gguf +
    layer_NNNN.gguf) or a single .gguf file.

    Matrices (2-D/3-D) come back as `QuantWeight`s holding their raw blocks; 1-D tensors
    as float32 torch tensors.
    """

    def __init__(self, path: str | os.PathLike[str], map_experts: bool = False):
        self.path = Path(path)
        # Streaming MoE: map ffn_*_exps instead of reading them, so only the pages of the
        # experts the router picks become resident, and dropping the layer unmaps them.
        self.map_experts = map_experts
        self._readers: dict[Path, GGUFReader] = {}
        self._fds: dict[Path, int] = {}
        self._resident = 0
        self._peak = 0
        # File of each block (None: shared.gguf, or the single file); _tensor_files: name -> that key.
        self._files: dict[int | None, Path] = {}
        if self.path.is_dir():
            manifest = load_manifest(self.path)
            for f in manifest.files:
                self._files[f.layer] = self.path / f.name
            self._files[None] = self.path / SHARED_FILE
            # Every split file repeats the source's KVs; shared.gguf's are the model's.
            self.metadata = Metadata(self._reader(None).kv, owner=self)
            self._tensor_files = {t.name: f.layer for f in manifest.files for t in f.tensors}
        else:
            self._files[None] = self.path
            reader = self._reader(None)
            self.metadata = Metadata(reader.kv, owner=self)
            self._tensor_files = {t.name: None for t in reader.tensors}
        self._by_layer: dict[int | None, list[str]] = {}
        for name in self._tensor_files:
            self._by_layer.setdefault(block_index(name), []).append(name)

    # ---- files ----------------------------------------------------------------------

    def _file_of(self, name: str) -> Path:
        if name not in self._tensor_files:
            raise LemonsliceError(f"{self.path}: no tensor {name}")
        return self._files[self._tensor_files[name]]

    def _reader(self, layer: int | None) -> GGUFReader:
        # Opened on first use: each split file's header repeats the whole tokenizer.
        path = self._files[layer]
        if path not in self._readers:
            self._readers[path] = open_gguf(path)
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._readers[path]

    def info(self, name: str) -> TensorInfo:
        path = self._file_of(name)
        info = self._reader(self._tensor_files[name]).tensor_map.get(name)
        if info is None:
            raise LemonsliceError(f"{path}: lacks {name}, which manifest.json places there")
        return info

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        for fd in self._fds.values():
            os.close(fd)
        self._readers.clear()
        self._fds.clear()

    def __enter__(self) -> "WeightStore":
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
    def layers(self) -> list[int]:
        """Block indices that have tensors."""
        return sorted(k for k in self._by_layer if k is not None)

    def tensor_names(self, layer: int | None) -> list[str]:
        """Tensor names of block `layer`, or the shared tensors for None."""
        return list(self._by_layer.get(layer, []))

    def nbytes(self, layer: int | None) -> int:
        return sum(self.info(n).n_bytes for n in self.tensor_names(layer))

    # ---- accounting -----------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        """Bytes of tensor data read by this store that some object still holds."""
        return self._resident

    @property
    def peak_resident_bytes(self) -> int:
        return self._peak

    def reset_peak(self) -> None:
        self._peak = self._resident

    def _released(self, n: int) -> None:
        self._resident -= n

    # ---- reading --------------------------------------------------------------------

    def _read(self, path: Path, start: int, n: int) -> np.ndarray:
        """n bytes at absolute offset `start`, into a fresh buffer the store keeps count of."""
        buf = np.empty(n, dtype=np.uint8)
        view = memoryview(buf)
        done = 0
        while done < n:
            got = os.preadv(self._fds[path], [view[done:]], start + done)
            if got <= 0:
                raise LemonsliceError(f"{path}: file ended while reading {n} bytes at {start}")
            done += got
        self._resident += n
        self._peak = max(self._peak, self._resident)
        weakref.finalize(buf, self._released, n)
        return buf

    def _map(self, path: Path, start: int, n: int) -> torch.Tensor:
        """n bytes at `start`, mapped read-only: pages are read when touched."""
        arr = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(n,))
        with warnings.catch_warnings():
            # Nothing writes to weights; torch only warns that it could.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)

    def load(self, name: str) -> Weight:
        """One tensor: a QuantWeight for matrices, float32 for 1-D tensors."""
        info = self.info(name)
        path = self._file_of(name)
        if self.map_experts and len(info.shape) == 3:
            return QuantWeight(self._map(path, info.data_start, info.n_bytes), info.ggml_type, info.shape)
        raw = torch.from_numpy(self._read(path, info.data_start, info.n_bytes))
        if len(info.shape) == 1:
            if info.ggml_type == GGMLType.F32:
                return raw.view(torch.float32)  # shares the counted buffer
            return dequantize(raw, info.ggml_type, info.shape)
        if len(info.shape) > 3:
            raise LemonsliceError(f"{name}: {len(info.shape)}-D tensors are not supported")
        return QuantWeight(raw, info.ggml_type, info.shape)

    def load_shared(self) -> dict[str, Weight]:
        return {n: self.load(n) for n in self.tensor_names(None)}

    def load_layer(self, layer: int) -> dict[str, Weight]:
        names = self.tensor_names(layer)
        if not names:
            raise LemonsliceError(f"{self.path}: no block {layer}")
        return {n: self.load(n) for n in names}

    def expert_range(self, name: str, expert: int) -> tuple[int, int]:
        """(absolute file offset, length) of expert `expert`'s bytes in a 3-D expert tensor."""
        info = self.info(name)
        if len(info.shape) != 3:
            raise LemonsliceError(f"{name} is not a 3-D expert tensor")
        n_expert = info.shape[2]
        if not 0 <= expert < n_expert:
            raise LemonsliceError(f"{name}: expert {expert} not in [0, {n_expert})")
        # ggml's outermost dim is the expert, so each expert is one contiguous run of bytes.
        size = info.n_bytes // n_expert
        return info.data_start + expert * size, size

    def load_expert(self, name: str, expert: int) -> QuantWeight:
        """One expert of an `ffn_*_exps` tensor as a 2-D weight, reading only its bytes."""
        start, size = self.expert_range(name, expert)
        info = self.info(name)
        raw = torch.from_numpy(self._read(self._file_of(name), start, size))
        return QuantWeight(raw, info.ggml_type, info.shape[:2])
