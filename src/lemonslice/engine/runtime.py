"""Process-wide settings, made once by the program that runs models (the CLI, a benchmark),
never by a library constructor: torch's thread count and the allocator's behaviour."""

from __future__ import annotations

import ctypes
import logging

import torch

from ..errors import LemonsliceError
from ..models.caches import set_kv_types
from ..ops import is_exact, set_exact

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3


def setup(threads: int | None = None, compact_heap: bool = False, exact: bool | None = None,
          kv_types: tuple[str, str] | None = None) -> None:
    """Set torch's intra-op threads (None: leave torch's choice), the activations' precision
    (exact: float activations in every product; False: 8-bit ones where the kernels have
    them, as llama.cpp does; None: leave it, or read LEMONSLICE_EXACT), the storage types of
    the keys and values of attention caches made from then on (ops.kv; None: leave them), and,
    for streaming runs, have glibc serve allocations over 1 MiB by mmap so that freed layer
    scratch leaves the process.

    glibc otherwise raises its mmap threshold after each large free and keeps later scratch
    on the heap, which adds tens of MB to a streaming run's peak; a fully loaded run keeps
    the default, whose heap reuse is faster for prefill's large temporaries.
    """
    if threads is not None:
        if threads < 1:
            raise LemonsliceError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if exact is not None:
        set_exact(exact)
    else:
        is_exact()  # a bad LEMONSLICE_EXACT fails here, with its one-line error
    if kv_types is not None:
        set_kv_types(*kv_types)
    if compact_heap:
        try:
            ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        except (OSError, AttributeError):
            log.info("mallopt is not available: freed scratch may stay in the heap")
