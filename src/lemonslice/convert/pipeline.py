"""`convert_hf`: a Hugging Face Qwen3.5 checkpoint directory -> one GGUF file, streamed.

The file is planned from the shard headers and config.json alone, then each tensor is
loaded, transformed, converted to its output type and written at its offset, so at most
one output tensor (and its sources) is in memory. Output goes to a temporary file beside
the target, renamed into place only when complete.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import LemonsliceError
from ..gguf.constants import FILE_TYPE_OF, GGML_QUANTIZATION_VERSION, GGMLType, Keys, ValueType
from ..gguf.writer import FilePlan, encode_kv, plan_file
from ..slicing.atomic import check_target_file, staged_file
from .hf import HFCheckpoint
from .qwen35 import KEEP_F32, OutTensor, architecture_of, canonical_names, kv_records, plan_tensors, read_hparams
from .tokenizer import read_tokenizer

log = logging.getLogger(__name__)

OUT_TYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0}
TOKENIZER_PRE = "qwen35"
Progress = Callable[[int, int], None]  # (tensors written, tensors in all)


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    arch: str
    n_tensors: int
    n_bytes: int
    block_count: int
    nextn_predict_layers: int


def tensor_type(t: OutTensor, out_type: GGMLType) -> GGMLType:
    """llama.cpp's converter's rule: 1-D tensors, norms, routers, conv kernels and non-`.weight`
    tensors stay F32; Q8_0 falls back to F16 for rows that are not whole blocks."""
    if len(t.shape) <= 1 or t.kind in KEEP_F32 or t.name.endswith("_norm.weight") or not t.name.endswith(".weight"):
        return GGMLType.F32
    if out_type == GGMLType.Q8_0 and t.shape[-1] % 32:
        log.warning("%s: row of %d is not a multiple of 32; writing F16", t.name, t.shape[-1])
        return GGMLType.F16
    return out_type


def encode_tensor(data: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    import gguf

    if ggml_type == GGMLType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType(ggml_type))


def convert_hf(
    hf_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    out_type: str = "bf16",
    force: bool = False,
    mtp: bool = True,
    name: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> ConvertResult:
    """Convert `hf_dir` to the GGUF file `out`. `progress(done, total)` counts tensors written."""
    if out_type not in OUT_TYPES:
        raise LemonsliceError(f"unknown output type {out_type!r} (choose from {', '.join(OUT_TYPES)})")
    gtype = OUT_TYPES[out_type]
    out = Path(out)
    check_target_file(out, force)  # before the checkpoint is read; staged_file checks again
    with HFCheckpoint.open(hf_dir) as ckpt:
        architecture_of(ckpt)  # before any shard is opened
        canon = canonical_names(ckpt.names())
        h = read_hparams(ckpt, canon, want_mtp=mtp)
        tensors = plan_tensors(ckpt, canon, h)
        vocab = read_tokenizer(ckpt.path, ckpt.config, ckpt.hparams)
        if len(vocab.tokens) != h.n_vocab:
            raise LemonsliceError(f"tokenizer has {len(vocab.tokens)} tokens, config.json vocab_size is {h.n_vocab}")
        types = [tensor_type(t, gtype) for t in tensors]
        kvs = [
            encode_kv(Keys.ARCHITECTURE, ValueType.STRING, h.arch),
            encode_kv(Keys.TYPE, ValueType.STRING, "model"),
            encode_kv(Keys.NAME, ValueType.STRING, name or ckpt.path.resolve().name),
            *kv_records(ckpt, h),
            encode_kv(Keys.FILE_TYPE, ValueType.UINT32, int(FILE_TYPE_OF[gtype])),
            encode_kv(Keys.QUANTIZATION_VERSION, ValueType.UINT32, GGML_QUANTIZATION_VERSION),
            *vocab.kv_records(TOKENIZER_PRE),
        ]
        # ggml order: the row (numpy's last axis) first.
        plan = plan_file(kvs, [(t.name, tuple(reversed(t.shape)), g) for t, g in zip(tensors, types)])
        log.info("%s: %s, %d tensors, %d bytes", ckpt.path, h.arch, len(tensors), plan.size)
        with staged_file(out, force=force) as tmp:
            _write(tmp, plan, tensors, types, progress)
    return ConvertResult(out, h.arch, len(tensors), plan.size, h.block_count, h.n_mtp)


def _write(
    path: Path, plan: FilePlan, tensors: list[OutTensor], types: list[GGMLType], progress: Optional[Progress],
) -> None:
    with open(path, "wb") as f:
        f.write(plan.padded_header())
        for i, (t, g, pt) in enumerate(zip(tensors, types, plan.tensors)):
            data = t.make()
            if tuple(data.shape) != t.shape:
                raise LemonsliceError(f"{t.name}: made shape {'x'.join(map(str, data.shape))}, "
                                      f"planned {'x'.join(map(str, t.shape))}")
            buf = memoryview(encode_tensor(data.numpy(), g)).cast("B")
            del data
            if len(buf) != pt.n_bytes:
                raise LemonsliceError(f"{t.name}: {len(buf)} bytes encoded, {pt.n_bytes} planned")
            f.seek(plan.data_offset + pt.offset)
            f.write(buf)
            if progress is not None:
                progress(i + 1, len(tensors))
        f.truncate(plan.size)
        f.flush()
        os.fsync(f.fileno())

