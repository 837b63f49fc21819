"""The C kernels in kernels.c, compiled on first use and called through ctypes.

The library (kernels.c, kernels_types.c, kernels_pack8.c and kernels_amx.c, sharing kernels_common.h) is built once per
source/compiler/CPU into the cache directory
($LEMONSLICE_CACHE, default ~/.cache/lemonslice) with -march=native, like llama.cpp's own
CPU build. If no C compiler is found, or LEMONSLICE_KERNELS=ref, `library()` is None and
the ops use their torch reference twins.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..gguf.constants import BLOCK_SIZES, GGMLType
from ..paths import cache_dir

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(n) for n in ("kernels.c", "kernels_types.c", "kernels_pack8.c",
                                                      "kernels_amx.c"))
# Every file the build reads: the cache key covers them all.
KEYED = (*SOURCES, Path(__file__).with_name("kernels_common.h"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
# Most activation rows the fused kernel takes; more rows go through dequantize + BLAS.
MAX_ROWS = 16
# Weights smaller than this are multiplied on one thread: waking a second one costs more.
ONE_THREAD_BYTES = 64 << 10


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str) -> Path:
    src = b"\0".join(p.read_bytes() for p in KEYED)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), version.encode(), _cpu_id().encode()]))
    out = cache_dir() / "kernels" / f"libls_kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename, so a concurrent or killed build never leaves a torn library.
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, check=False)
        if r.returncode:
            raise OSError(f"{cc} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be had (the reference ops are used)."""
    if os.environ.get("LEMONSLICE_KERNELS", "").lower() == "ref":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        log.warning("no C compiler found; using the reference (slow) quantized kernels")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except OSError as e:
        log.warning("could not build the C kernels (%s); using the reference kernels", e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ls_supported.argtypes = [ctypes.c_int]
    lib.ls_dequant.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.ls_qmatmul.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.ls_q8_supported.argtypes = [ctypes.c_int]
    lib.ls_qmatmul_q8.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.ls_swiglu_experts_q8.argtypes = [i64, ptr, i64, i64, ctypes.c_int]
    lib.ls_delta_rule.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.ls_rms_norm.argtypes = [i64, i64, ptr, ptr, ctypes.c_float, ptr]
    lib.ls_matmul_f32.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.ls_matmul_half.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.ls_matmul_half_jobs.argtypes = [ctypes.c_int, i64, ptr, i64, i64, ctypes.c_int]
    lib.ls_set_table.argtypes = [ctypes.c_int, ptr, i64]
    for which, table in _grid_tables():
        if lib.ls_set_table(which, table.ctypes.data, table.nbytes):
            raise OSError(f"the kernels refused the table for type {which}")
    lib.ls_deltanet_gates.argtypes = [i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.ls_amx_enable.argtypes = [ctypes.c_int]
    # AMX tiles for prompt chunks where the CPU and kernel have them; LEMONSLICE_AMX=0 turns them off.
    lib.ls_amx_enable(int(os.environ.get("LEMONSLICE_AMX", "1") != "0"))
    lib.ls_attend_rows_kv.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_float, ptr, ctypes.c_int]
    return lib


def _grid_tables() -> list[tuple[int, np.ndarray]]:
    """The IQ2/IQ3/IQ1 grids (int8 [entries, 8 or 4]: IQ2/IQ3 magnitudes, IQ1's -1/0/1, shared
    with IQ1_M) by type id, and the 128 sign patterns (id 0): ggml format data, taken from
    gguf-py's quants module."""
    import gguf.quants as q

    out = []
    for cls in (q.IQ2_XXS, q.IQ2_XS, q.IQ2_S, q.IQ3_XXS, q.IQ3_S, q.IQ1_S):
        cls.init_grid()
        out.append((int(cls.qtype), np.ascontiguousarray(cls.grid.reshape(cls.grid_shape).astype(np.int8))))
    out.append((0, np.frombuffer(q.IQ2_XXS.ksigns, dtype=np.uint8).copy()))
    return out


def set_amx(on: bool) -> bool:
    """Turns the AMX path of prompt chunks on or off (where the CPU has it); whether it is on now.
    Either way a row's result has the same bits."""
    lib = library()
    return lib is not None and bool(lib.ls_amx_enable(int(on)))


@lru_cache(maxsize=None)
def supported(ggml_type: int) -> bool:
    lib = library()
    return lib is not None and bool(lib.ls_supported(int(ggml_type)))


@lru_cache(maxsize=None)
def q8_supported(ggml_type: int) -> bool:
    """Whether the kernels multiply this type with 8-bit activations (`qmatmul_q8`)."""
    lib = library()
    return lib is not None and bool(lib.ls_q8_supported(int(ggml_type)))


def _check(raw: torch.Tensor, ggml_type: int, n_in: int) -> None:
    # The C side trusts these sizes, so they are checked here.
    if raw.device.type != "cpu" or raw.dtype != torch.uint8 or raw.dim() != 2 or raw.stride(1) != 1:
        raise ValueError("kernels take CPU uint8 [rows, row_bytes] tensors with contiguous rows")
    block, type_size = BLOCK_SIZES[GGMLType(ggml_type)]
    if n_in % block or raw.shape[1] != n_in // block * type_size:
        raise ValueError(f"{GGMLType(ggml_type).name} rows of {n_in} values take {n_in // block * type_size} bytes")


def dequant(raw: torch.Tensor, ggml_type: int, n_in: int) -> torch.Tensor:
    """raw [rows, row_bytes] ggml blocks -> float32 [rows, n_in]."""
    _check(raw, ggml_type, n_in)
    out = torch.empty((raw.shape[0], n_in), dtype=torch.float32)
    rc = library().ls_dequant(
        int(ggml_type), raw.data_ptr(), raw.stride(0), raw.shape[0], n_in, out.data_ptr(), torch.get_num_threads()
    )
    if rc:
        raise ValueError(f"ls_dequant rejected type {ggml_type} with {n_in} columns")
    return out


def qmatmul(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, n_in: int) -> torch.Tensor:
    """x [N, in] float32 (N <= MAX_ROWS) @ W.T, W = raw [rows, row_bytes] -> [N, rows] float32."""
    _check(raw, ggml_type, n_in)
    x = x.contiguous()
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != n_in or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x must be float32 [N, {n_in}] with 1 <= N <= {MAX_ROWS}")
    out = torch.empty((x.shape[0], raw.shape[0]), dtype=torch.float32)
    rc = library().ls_qmatmul(
        int(ggml_type), raw.data_ptr(), raw.stride(0), raw.shape[0], n_in, x.data_ptr(), x.shape[0],
        out.data_ptr(), torch.get_num_threads(),
    )
    if rc:
        raise ValueError(f"ls_qmatmul rejected type {ggml_type}, {x.shape[0]} rows, {n_in} columns")
    return out


def qmatmul_q8(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, n_in: int) -> torch.Tensor:
    """round8(x) [N, in] @ W.T -> [N, rows] float32, for any N: the activations are rounded to
    int8 per block (32 values, or 256 for K-quants) and multiplied in integers, as llama.cpp does."""
    return bind_q8(raw, ggml_type, n_in)(x)


def bind_q8(raw: torch.Tensor, ggml_type: int, n_in: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`qmatmul_q8` for one weight, checked once: x [N, in] float32 -> [N, rows]. The weight's
    pointer and sizes are resolved here, so a call costs one allocation and one C call."""
    _check(raw, ggml_type, n_in)
    if not q8_supported(ggml_type):
        raise ValueError(f"{GGMLType(ggml_type).name} has no 8-bit kernel")
    fn = library().ls_qmatmul_q8
    rows = raw.shape[0]
    head = (int(ggml_type), raw.data_ptr(), raw.stride(0), rows, n_in)
    one_thread = rows * raw.stride(0) < ONE_THREAD_BYTES

    def run(x: torch.Tensor, _keep: torch.Tensor = raw) -> torch.Tensor:
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != n_in or x.shape[0] < 1:
            raise ValueError(f"x must be float32 [N, {n_in}] with N >= 1")
        x = x.contiguous()
        out = torch.empty((x.shape[0], rows), dtype=torch.float32)
        threads = 1 if one_thread and x.shape[0] <= MAX_ROWS else torch.get_num_threads()
        if fn(*head, x.data_ptr(), x.shape[0], out.data_ptr(), threads):
            raise ValueError(f"ls_qmatmul_q8 rejected {x.shape[0]} rows of {n_in} columns")
        return out

    return run


def swiglu_experts_q8(jobs: torch.Tensor, n_embd: int, n_ff: int) -> None:
    """Run the SwiGLU experts in `jobs` (int64 [n, 11], see ls_swiglu_experts_q8 in kernels.c)
    in one call. The caller checked every pointer and shape in the table."""
    if jobs.dtype != torch.int64 or jobs.dim() != 2 or jobs.shape[1] != 11 or not jobs.is_contiguous():
        raise ValueError("jobs must be a contiguous int64 [n, 11] table")
    rc = library().ls_swiglu_experts_q8(jobs.shape[0], jobs.data_ptr(), n_embd, n_ff, torch.get_num_threads())
    if rc:
        raise ValueError(f"ls_swiglu_experts_q8 rejected the experts (rc {rc})")


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token in one C call: q, k [T, H, Dk], v [T, H, Dv],
    g, beta [T, H], state [H, Dk, Dv] (all float32) -> (o [T, H, Dv], new state). `state` is
    not written."""
    T, H, Dk = k.shape
    Dv = v.shape[-1]
    if (q.shape != k.shape or v.shape[:2] != (T, H) or g.shape != (T, H) or beta.shape != (T, H)
            or state.shape != (H, Dk, Dv) or Dv > 1024):
        raise ValueError("delta_rule: shapes do not match")
    args = [t.to(torch.float32).contiguous() for t in (q, k, v, g, beta, state)]
    if any(t.device.type != "cpu" for t in args):
        raise ValueError("delta_rule runs on CPU tensors")
    new = torch.empty((H, Dk, Dv), dtype=torch.float32)
    out = torch.empty((T, H, Dv), dtype=torch.float32)
    rc = library().ls_delta_rule(T, H, Dk, Dv, *(t.data_ptr() for t in args), new.data_ptr(), out.data_ptr(),
                                 torch.get_num_threads())
    if rc:
        raise ValueError(f"ls_delta_rule rejected T={T}, H={H}, Dk={Dk}, Dv={Dv}")
    return out, new


def _f32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x [..., n] / sqrt(mean(x^2) + eps) * weight [n] in C; None when the tensors do not fit
    the kernel (the caller uses torch)."""
    lib = library()
    n = x.shape[-1]
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or not _f32(weight) or weight.shape != (n,):
        return None
    x = x.contiguous()  # strided rows (a slice of heads) copied, so every row takes this kernel
    out = torch.empty_like(x)
    lib.ls_rms_norm(x.numel() // n, n, x.data_ptr(), weight.data_ptr(), eps, out.data_ptr())
    return out


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, n_head_kv: int,
               types: tuple[int, int] = (0, 0)) -> torch.Tensor | None:
    """One query position q [1, H, D] over S cached positions (every one attended) in C ->
    [1, H, D]. k, v hold one position per row, stored as ggml types (F32, F16, BF16 or Q8_0,
    see ops.kv); None when the tensors do not fit the kernel."""
    if q.dim() != 3 or q.shape[0] != 1:
        return None
    return attend_rows(q, k, v, [(0, k.shape[0])], scale, n_head_kv, types)


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: Sequence[tuple[int, int]], scale: float,
                n_head_kv: int, types: tuple[int, int] = (0, 0)) -> torch.Tensor | None:
    """`attend_one` for T query positions q [T, H, D], row i over stored rows spans[i] = (lo, hi)
    of k, v, in one call -> [T, H, D] (each row the bits `attend_one` gives it); None when the
    tensors do not fit the kernel."""
    lib = library()
    if q.dim() != 3 or k.dim() < 2:
        return None
    T, H, D = q.shape
    S = k.shape[0]
    if (lib is None or len(spans) != T or not _f32(q) or H % n_head_kv or S != v.shape[0]
            or any(not 0 <= a < b <= S for a, b in spans) or k.device.type != "cpu" or v.device.type != "cpu"
            or not _rows_packed(k) or not _rows_packed(v)):
        return None
    q = q.contiguous()
    out = torch.empty((T, H, D), dtype=torch.float32)
    lo, hi = (ctypes.c_int64 * T)(*(a for a, _ in spans)), (ctypes.c_int64 * T)(*(b for _, b in spans))
    rc = lib.ls_attend_rows_kv(T, H, n_head_kv, D, lo, hi, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                               k.stride(0) * k.element_size(), v.stride(0) * v.element_size(), types[0], types[1],
                               scale, out.data_ptr(), torch.get_num_threads())
    if rc == -2:
        raise MemoryError("ls_attend_rows_kv could not allocate its scores")
    return None if rc else out


def _rows_packed(t: torch.Tensor) -> bool:
    """Each row (dim 0) contiguous, rows any distance apart."""
    return t.dim() >= 2 and t[0].is_contiguous()


def matmul_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ w.T for float32 w [rows, in] (rows contiguous): each output one C dot product
    in a fixed order, so a row's result does not depend on N (BLAS picks kernels by shape)."""
    if not (_f32(x) and w.dtype == torch.float32 and w.dim() == 2 and w.stride(1) == 1 and x.dim() == 2
            and x.shape[1] == w.shape[1] and w.device.type == "cpu"):
        raise ValueError("matmul_f32 takes float32 x [N, in] and w [rows, in] on the CPU")
    out = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32)
    library().ls_matmul_f32(w.data_ptr(), w.stride(0), w.shape[0], w.shape[1], x.data_ptr(), x.shape[0],
                            out.data_ptr(), torch.get_num_threads())
    return out


def matmul_half(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, n_in: int) -> torch.Tensor:
    """x [N, in] float32 @ W.T for F16 or BF16 rows raw [rows, 2 * in] (uint8) -> [N, rows]: the
    weights converted to float32 in the dot product; a row's result does not depend on N."""
    _check(raw, ggml_type, n_in)
    x = x.contiguous()
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != n_in or x.shape[0] < 1:
        raise ValueError(f"x must be float32 [N, {n_in}] with N >= 1")
    out = torch.empty((x.shape[0], raw.shape[0]), dtype=torch.float32)
    rc = library().ls_matmul_half(int(ggml_type), raw.data_ptr(), raw.stride(0), raw.shape[0], n_in, x.data_ptr(),
                                  x.shape[0], out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"ls_matmul_half rejected type {GGMLType(ggml_type).name}")
    return out


def matmul_half_jobs(ggml_type: int, jobs: torch.Tensor, n_out: int, n_in: int) -> None:
    """Products of one shape in one call: row j of `jobs` (int64 [n, 5]: weight rows pointer, row
    bytes, x [T_j, n_in] pointer, T_j, y [T_j, n_out] pointer, all float32 and contiguous) gets
    y = x @ W.T, each row as `matmul_half` computes it. The caller checked the pointers."""
    if jobs.dtype != torch.int64 or jobs.dim() != 2 or jobs.shape[1] != 5 or not jobs.is_contiguous():
        raise ValueError("jobs must be a contiguous int64 [n, 5] table")
    rc = library().ls_matmul_half_jobs(int(ggml_type), jobs.shape[0], jobs.data_ptr(), n_out, n_in,
                                       torch.get_num_threads())
    if rc:
        raise ValueError(f"ls_matmul_half_jobs rejected the products (rc {rc})")


def deltanet_gates(alpha: torch.Tensor, b: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a * softplus(alpha + dt_bias), sigmoid(b)) for alpha, b [T, H] in C, element by element;
    None when the tensors do not fit (the caller uses torch). torch's vector and scalar paths
    round differently, and which one a small tensor takes depends on T."""
    lib = library()
    if lib is None or not all(_f32(t) for t in (alpha, b, a, dt_bias)) or alpha.shape != b.shape or alpha.dim() != 2:
        return None
    T, H = alpha.shape
    if a.shape != (H,) or dt_bias.shape != (H,):
        return None
    g, beta = torch.empty_like(alpha), torch.empty_like(b)
    lib.ls_deltanet_gates(T, H, alpha.data_ptr(), b.data_ptr(), a.data_ptr(), dt_bias.data_ptr(), g.data_ptr(),
                          beta.data_ptr())
    return g, beta
