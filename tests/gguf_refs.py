"""Independent references shared by the tests: gguf-py's reader and the real Gemma file's facts."""

from __future__ import annotations

import gguf
import numpy as np

GEMMA_SIZE = 253_113_024
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


class GGUFPy(gguf.GGUFReader):
    """gguf-py's GGUFReader, parsing code untouched; only its file map is handed to it as a
    plain ndarray view of the np.memmap. Slicing a memmap runs a Python __array_finalize__
    per slice, which makes gguf-py take ~10 s on Gemma's 262k-token vocabulary (~2.5 s so)."""

    @property
    def data(self):  # noqa: D102
        return self._plain

    @data.setter
    def data(self, mm) -> None:
        self._mmap = mm
        self._plain = mm.view(np.ndarray)
