"""llama.cpp's own quantizer, reached through the library llama-cpp-python ships.

Two entry points, both llama.cpp code, none of ours:

* `quantize_rows(rows, ggml_type)`: one tensor's float rows into a ggml type, through
  `ggml_quantize_chunk`, the function `llama-quantize` calls for every tensor. The bytes are
  what `llama-quantize` writes for that tensor at that type (no importance matrix).
* `quantize_file(src, dst, ftype, ...)`: `llama_model_quantize` on a whole GGUF, with the
  ftype's own per-tensor type mix and `--tensor-type`-style overrides (`tt_overrides`).

llama-cpp-python is an optional dependency (the `edit` extra): it builds llama.cpp from source.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import LemonsliceError
from ..gguf.constants import GGMLType as Q

__all__ = [
    "FTYPES", "INSTALL_HINT", "QuantizerError", "TensorOverride", "ftype_code", "needs_imatrix", "quantize_file",
    "quantize_rows", "requires_imatrix",
]

INSTALL_HINT = "pip install 'lemonslice[edit]'"


class QuantizerError(LemonsliceError):
    """llama.cpp's quantizer is missing or refused the work."""


# llama.cpp's `enum llama_ftype` (include/llama.h): the names `llama-quantize` takes.
FTYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25,
    "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32,
    "TQ1_0": 36, "TQ2_0": 37, "MXFP4_MOE": 38,
}


def ftype_code(name: str) -> int:
    try:
        return FTYPES[name.upper()]
    except KeyError:
        raise QuantizerError(f"unknown llama.cpp file type {name!r}; known: {', '.join(FTYPES)}") from None


_lock = threading.Lock()
_handles: dict[str, Any] = {}


def _llama() -> Any:
    """The `llama_cpp` module, its backend initialised once."""
    with _lock:
        if "llama" not in _handles:
            try:
                import llama_cpp  # pip install 'lemonslice[edit]'
            except ImportError as e:
                raise QuantizerError(f"llama.cpp's quantizer is needed here: {INSTALL_HINT} ({e})") from None
            llama_cpp.llama_backend_init()
            _handles["llama"] = llama_cpp
        return _handles["llama"]


@contextlib.contextmanager
def _captured_log() -> Iterator[list[str]]:
    """llama.cpp's log lines while the block runs, kept off stderr; the process's own callback
    (a caller may have set one) is put back after. Ctrl-C and SIGTERM take effect when the block
    ends: Python would run their handlers inside the log callback, where ctypes swallows the
    exception and llama.cpp carries on."""
    llama_cpp = _llama()
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))
        del lines[:-200]

    old_cb, old_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(old_cb), ctypes.byref(old_data))
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        with _signals_noted() as noted:
            yield lines
    finally:
        llama_cpp.llama_log_set(old_cb, old_data)
    if noted:
        signal.raise_signal(noted[0])  # now the process's own handler runs, outside llama.cpp


@contextlib.contextmanager
def _signals_noted() -> Iterator[list[int]]:
    """SIGINT and SIGTERM only noted while the block runs (signal handlers can be set in the
    main thread only; elsewhere they are left as they are)."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return
    old = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield noted
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _ggml() -> ctypes.CDLL:
    llama_cpp = _llama()
    with _lock:
        if "ggml" not in _handles:
            lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
            lib.ggml_quantize_chunk.restype = ctypes.c_size_t
            lib.ggml_quantize_chunk.argtypes = [
                ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                ctypes.c_void_p,
            ]
            lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
            lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
            lib.ggml_row_size.restype = ctypes.c_size_t
            lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
            _handles["ggml"] = lib
        return _handles["ggml"]


def requires_imatrix(ggml_type: int) -> bool:
    """llama.cpp refuses these types (IQ2/IQ1) without an importance matrix."""
    return bool(_ggml().ggml_quantize_requires_imatrix(int(ggml_type)))


def quantize_rows(rows: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`rows` ([n_rows, n_per_row] float32) as `ggml_type` blocks: uint8 [n_rows, row_bytes]."""
    lib = _ggml()
    name = Q(int(ggml_type)).name
    a = np.ascontiguousarray(rows, dtype=np.float32)
    if a.ndim != 2:
        raise QuantizerError(f"quantize_rows takes [rows, n_per_row]; got shape {a.shape}")
    n_rows, n_per_row = a.shape
    if imatrix is None and requires_imatrix(ggml_type):
        raise QuantizerError(f"llama.cpp quantizes {name} only with an importance matrix")
    row_bytes = int(lib.ggml_row_size(int(ggml_type), n_per_row))
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)
    imx = None
    if imatrix is not None:
        imx = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imx.shape != (n_per_row,):
            raise QuantizerError(f"importance matrix of shape {imx.shape} for rows of {n_per_row}")
    done = lib.ggml_quantize_chunk(
        int(ggml_type), a.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row,
        None if imx is None else imx.ctypes.data,
    )
    if done != out.nbytes:
        raise QuantizerError(f"ggml_quantize_chunk wrote {done} bytes for {name}, expected {out.nbytes}")
    return out


@dataclass(frozen=True)
class TensorOverride:
    """`llama-quantize --tensor-type PATTERN=TYPE`: tensors whose name matches the regex get the type."""

    pattern: str
    ggml_type: int


def quantize_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str | int, *,
    overrides: Sequence[TensorOverride] = (), pure: bool = False, allow_requantize: bool = False,
    output_type: int | None = None, embedding_type: int | None = None, n_threads: int = 0,
    imatrix: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """`llama_model_quantize(src, dst)` with the ftype's mix (or one type with `pure`) and overrides;
    `imatrix`: per-column importance weights by tensor name ([n_per_row] floats, times n_expert
    for expert tensors), as `llama-quantize --imatrix` hands them over."""
    llama_cpp = _llama()
    params = _params(ftype, n_threads)
    keep: list[Any] = []
    if imatrix:
        params.imatrix = _imatrix_array(imatrix, keep)
    params.allow_requantize = allow_requantize
    params.pure = pure
    if output_type is not None:
        params.output_tensor_type = int(output_type)
    if embedding_type is not None:
        params.token_embedding_type = int(embedding_type)
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, o in enumerate(overrides):
            pat = o.pattern.encode()
            keep.append(pat)
            arr[i].pattern = pat
            arr[i].type = int(o.ggml_type)
        arr[len(overrides)].pattern = None  # the list ends at a NULL pattern
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(arr)
    with _captured_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        said = " ".join(s.strip() for s in log if "error" in s.lower() or "failed" in s.lower())
        raise QuantizerError(f"llama.cpp's quantizer failed on {src} (rc {rc}){': ' + said if said else ''}")
    return Path(dst)


def needs_imatrix(src: str | os.PathLike[str], ftype: str | int, n_threads: int = 0,
                  allow_requantize: bool = False) -> bool:
    """Whether llama.cpp says the ftype's mix, on this model, requires an importance matrix (a dry
    run: nothing is written)."""
    llama_cpp = _llama()
    params = _params(ftype, n_threads)
    params.dry_run = True
    params.allow_requantize = allow_requantize
    with _captured_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), os.devnull.encode(), ctypes.byref(params))
    if rc != 0:
        raise QuantizerError(f"llama.cpp's dry run of {ftype} on {src} failed (rc {rc})")
    return any("will require an imatrix" in line for line in log)


def _params(ftype: str | int, n_threads: int) -> Any:
    llama_cpp = _llama()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = n_threads or (os.cpu_count() or 1)
    params.ftype = ftype_code(ftype) if isinstance(ftype, str) else int(ftype)
    return params


def _imatrix_array(imatrix: Mapping[str, np.ndarray], keep: list[Any]) -> Any:
    """A NULL-name-terminated `llama_model_imatrix_data` array; `keep` holds what it points into."""
    llama_cpp = _llama()
    arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(imatrix.items()):
        v = np.ascontiguousarray(values, dtype=np.float32)
        keep += [name.encode(), v]
        arr[i].name, arr[i].size = keep[-2], v.size
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    arr[len(imatrix)].name = None
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
