"""WeightStore: one model's weights from a split directory or a monolithic GGUF.

The store is the opened model (`gguf.model.ModelFiles`: manifest, open readers, metadata)
plus reading. Tensor bytes are read (pread, not mmap) into fresh buffers on every load, so a
layer's memory belongs to the caller's objects and goes back when they are dropped:
streaming really frees it. The store counts the bytes of every buffer it handed out that is
still alive (`resident_bytes`, `peak_resident_bytes`) and every byte it read (`bytes_read`).
"""

from __future__ import annotations

import functools
import mmap
import os
import warnings
import weakref
from pathlib import Path
from typing import Iterable, Union

import numpy as np
import torch

from ..errors import LemonsliceError
from ..gguf.constants import GGMLType
from ..gguf.model import Metadata, ModelFiles
from ..models import Family, family
from ..models.protocol import Args
from ..ops import QuantWeight, check_runnable, dequantize
from .experts import DirectFiles

Weight = Union[QuantWeight, torch.Tensor]
# Bytes per read call when a read's copy is to stay resident; O_DIRECT needs this alignment.
_DROP_STEP = 32 << 20
_ALIGN = 4096

__all__ = ["Metadata", "Weight", "WeightStore"]


class WeightStore(ModelFiles):
    """Weights of one model. `path` is a split directory (manifest.json + shared.gguf +
    layer_NNNN.gguf) or a single .gguf file.

    Matrices (2-D/3-D) come back as `QuantWeight`s holding their raw blocks; 1-D tensors
    as float32 torch tensors.
    """

    def __init__(self, path: str | os.PathLike[str], map_experts: bool = False):
        super().__init__(path)
        check_runnable(self.tensor_types())  # before any weight is read (and any layer file opened)
        # The default for `load`: map ffn_*_exps instead of reading them, so only the pages of
        # the experts the router picks become resident. Residency passes its own choice per load.
        self.map_experts = map_experts
        self._resident = 0
        self._peak = 0
        self._read_total = 0
        self._direct = DirectFiles()  # O_DIRECT descriptors for reads whose copy stays resident

    def close(self) -> None:
        self._direct.close()
        super().close()

    @functools.cached_property
    def family(self) -> Family:
        """The model family that runs this model (by general.architecture)."""
        return family(self.metadata)

    @functools.cached_property
    def args(self) -> Args:
        """The family's hyper-parameters, read from the metadata."""
        return self.family.ModelArgs.from_gguf(self.metadata)

    # ---- accounting -----------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        """Bytes of tensor data read by this store that some object still holds."""
        return self._resident

    @property
    def peak_resident_bytes(self) -> int:
        return self._peak

    @property
    def bytes_read(self) -> int:
        """Bytes this store has read from its files so far (mapped expert pages not included)."""
        return self._read_total

    def reset_peak(self) -> None:
        self._peak = self._resident

    def _released(self, n: int) -> None:
        self._resident -= n

    # ---- reading --------------------------------------------------------------------

    def _read(self, name: str, start: int, n: int, drop: bool = False) -> np.ndarray:
        """n bytes at absolute offset `start` of tensor `name`'s file, into a fresh buffer the
        store keeps count of."""
        path, fd = self.file_of(name), self.fd_of(name)
        buf = self._read_direct(str(path), start, n) if drop else None
        if buf is None:
            buf = self._read_buffered(path, fd, start, n, drop)
        self._resident += n
        self._read_total += n
        self._peak = max(self._peak, self._resident)
        weakref.finalize(buf, self._released, n)
        return buf

    def _read_direct(self, path: str, start: int, n: int) -> np.ndarray | None:
        """n bytes at `start` read with O_DIRECT (no page cache at all: under a memory cgroup a
        resident copy is then charged once); None where the file system refuses it."""
        fd, direct = self._direct.get(path)
        if not direct:
            return None
        a = start - start % _ALIGN
        size = -(-(start + n - a) // _ALIGN) * _ALIGN
        raw = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned
        view = memoryview(raw)
        done = 0
        try:
            while done < start + n - a:
                got = os.preadv(fd, [view[done : done + min(size - done, _DROP_STEP)]], a + done)
                if got <= 0:
                    raise LemonsliceError(f"{path}: file ended while reading {n} bytes at {start}")
                done += got
        except OSError:
            self._direct.buffered(path)
            return None
        finally:
            view.release()
        return np.frombuffer(raw, dtype=np.uint8, count=n, offset=start - a)

    @staticmethod
    def _read_buffered(path: Path, fd: int, start: int, n: int, drop: bool) -> np.ndarray:
        buf = np.empty(n, dtype=np.uint8)
        view = memoryview(buf)
        done = 0
        while done < n:
            # With `drop`, a piece at a time: the copy is what stays resident, and under a memory
            # cgroup the page cache of a whole 400 MB head would be charged on top of it.
            step = min(n - done, _DROP_STEP) if drop else n - done
            got = os.preadv(fd, [view[done : done + step]], start + done)
            if got <= 0:
                raise LemonsliceError(f"{path}: file ended while reading {n} bytes at {start}")
            if drop:
                os.posix_fadvise(fd, start + done, got, os.POSIX_FADV_DONTNEED)
            done += got
        return buf

    def _map(self, path: Path, start: int, n: int) -> torch.Tensor:
        """n bytes at `start`, mapped read-only: pages are read when touched."""
        arr = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(n,))
        with warnings.catch_warnings():
            # Nothing writes to weights; torch only warns that it could.
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)

    def load(self, name: str, map_experts: bool | None = None, drop_page_cache: bool = False) -> Weight:
        """One tensor: a QuantWeight for matrices, float32 for 1-D tensors. A 3-D (expert)
        tensor is memory-mapped rather than read when `map_experts` (default: the store's)."""
        info = self.info(name)
        if (self.map_experts if map_experts is None else map_experts) and len(info.shape) == 3:
            return QuantWeight(self._map(self.file_of(name), info.data_start, info.n_bytes), info.ggml_type, info.shape)
        raw = torch.from_numpy(self._read(name, info.data_start, info.n_bytes, drop_page_cache))
        if len(info.shape) == 1:
            if info.ggml_type == GGMLType.F32:
                return raw.view(torch.float32)  # shares the counted buffer
            return dequantize(raw, info.ggml_type, info.shape)
        if len(info.shape) > 3:
            raise LemonsliceError(f"{name}: {len(info.shape)}-D tensors are not supported")
        return QuantWeight(raw, info.ggml_type, info.shape)

    def load_shared(self, mapped: Iterable[str] = (), drop_page_cache: bool = False) -> dict[str, Weight]:
        """The shared tensors; those in `mapped` memory-mapped (read a page at a time when used)."""
        mapped = set(mapped)
        return {n: self.map_tensor(n) if n in mapped else self.load(n, drop_page_cache=drop_page_cache)
                for n in self.tensor_names(None)}

    def map_tensor(self, name: str) -> QuantWeight:
        """A matrix memory-mapped read-only instead of read: its pages come in when touched."""
        info = self.info(name)
        return QuantWeight(self._map(self.file_of(name), info.data_start, info.n_bytes), info.ggml_type, info.shape)

    def load_layer(self, layer: int, map_experts: bool | None = None,
                   drop_page_cache: bool = False) -> dict[str, Weight]:
        names = self.tensor_names(layer)
        if not names:
            raise LemonsliceError(f"{self.path}: no block {layer}")
        return {n: self.load(n, map_experts, drop_page_cache) for n in names}

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
        raw = torch.from_numpy(self._read(name, start, size))
        return QuantWeight(raw, info.ggml_type, info.shape[:2])
