"""Requantize a model by the layer: `lemonslice requant SRC OUT --plan PLAN`.

Every quantized byte comes from llama.cpp's own quantizer (`llama_model_quantize`). Its mixes
choose some tensors' types by their position in the whole model, so a layer cannot be
quantized on its own: the whole model goes through llama.cpp once per file type in the plan
(globs passed to every run as `--tensor-type` overrides), and each tensor is taken from the run
the plan names for it. Globs win over ranges, ranges over the source. A tensor whose type does
not change keeps the source's bytes (llama.cpp copies such a tensor as it is).

The output's metadata is the source's, unchanged (`general.file_type` included), so a layer
the plan leaves alone is byte-identical to the source's; in a split output it is a hard link
to the source split's file. The plan and every tensor's type are recorded in the split's
manifest.json under "requant", or beside a single file as `OUT.gguf.requant.json`.

Work files (a monolithic copy of a split source, one quantized model per file type, the
output before it is split) live in a directory beside OUT that is removed on every exit.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import LemonsliceError
from ..gguf.constants import LAYER_FILE, MANIFEST_NAME, GGMLType, block_index
from ..gguf.reader import GGUFReader, open_gguf
from ..gguf.writer import copy_range, plan_file
from ..slicing.atomic import check_target_dir, check_target_file, staged_dir, staged_file
from ..slicing.manifest import load_manifest
from ..slicing.merge import merge_split
from ..slicing.split import split_gguf
from ..slicing.verify import stamp_written
from .plan import SourceModel
from .quantizer import TensorOverride, quantize_file
from .requant_plan import REQUANT_FORMAT, RequantPlan, glob_regex, load_requant_plan
from .write import share_file, write_json

__all__ = ["RequantResult", "requant", "SIDECAR"]

Progress = Callable[..., None]  # (done, total[, label])
SIDECAR = "{name}.requant.json"
# Types that are not block-quantized: a source of these is what requant expects.
_PLAIN = {GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.F64, GGMLType.I8, GGMLType.I16, GGMLType.I32,
          GGMLType.I64}
_FLOAT_FTYPES = ("F32", "F16", "BF16")  # llama.cpp applies --tensor-type overrides only in quantized mixes
_CARRIER = "Q8_0"  # the run that carries glob overrides when the plan names no quantized mix
# atomic.py's staging prefix: a later run removes what a killed one left behind.
_WORK_TAG = ".lemonslice-tmp-"


@dataclass
class RequantResult:
    path: Path
    split: bool
    record: dict[str, Any]  # written beside / into the output
    runs: list[str]  # the file types llama.cpp ran, one whole-model pass each
    changed: list[int | None]  # blocks (None: the shared tensors) whose tensors changed
    linked: list[str]  # split files shared with the source by hard link
    written_bytes: int
    warnings: list[str]


@dataclass(frozen=True)
class _Pick:
    """One output tensor and the file its bytes come from."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    path: Path
    start: int  # absolute offset in `path`
    n_bytes: int
    changed: bool


class _Bar:
    """One progress bar over every stage; each stage is weighed in bytes of the model."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    @contextlib.contextmanager
    def stage(self, label: str, size: int) -> Iterator[Callable[[int, int], None]]:
        start = self.done
        show = (lambda d, _t: self.progress(start + min(d, size), self.total, label)) if self.progress else None
        if show:
            show(0, size)
        yield show or (lambda d, t: None)
        self.done = start + size
        if self.progress:
            self.progress(self.done, self.total, label)


def requant(
    src: str | os.PathLike[str], out: str | os.PathLike[str], plan: "str | os.PathLike[str] | RequantPlan", *,
    split: bool | None = None, allow_requantize: bool = False, force: bool = False, n_threads: int = 0,
    progress: Progress | None = None,
) -> RequantResult:
    """Write `src` (a .gguf or split directory) with `plan` applied to `out`: one GGUF when `split`
    is False (default: when `out` ends in .gguf), else a split directory. The plan, the source and
    the output path are checked before any work; a failure leaves nothing behind."""
    p = load_requant_plan(plan)
    out = Path(os.path.abspath(out))
    split = out.suffix.lower() != ".gguf" if split is None else split
    with SourceModel(src) as base:
        warnings = _check(p, base, allow_requantize)
        inputs = (base.path,)
        (check_target_dir if split else check_target_file)(out, force, inputs)
        runs = _run_list(p)
        size = sum(t.n_bytes for t, _ in base.tensors)
        bar = _Bar(progress, size * (len(runs) + (base.manifest is not None) + 1 + split))
        with _workdir(out) as work, contextlib.ExitStack() as readers:
            mono = _monolithic(base, work, bar)
            done = _quantize(p, base, mono, work, runs, allow_requantize, n_threads, bar)
            quantized = {ft: readers.enter_context(open_gguf(path)) for ft, path in done.items()}
            picks = _picks(p, base, quantized, _glob_run(p, runs))
            record = _record(p, base, picks, runs, allow_requantize)
            write = _write_split if split else _write_single
            linked, written = write(base, picks, out, force, work, record, bar)
    changed = sorted({block_index(k.name) for k in picks if k.changed}, key=lambda b: -1 if b is None else b)
    return RequantResult(out, split, record, runs, changed, linked, written, warnings)


def _check(p: RequantPlan, base: SourceModel, allow_requantize: bool) -> list[str]:
    """The plan against the model; a quantized source is refused, or with the flag a warning."""
    p.check(base.block_count, [t.name for t, _ in base.tensors])
    quantized = sorted({t.ggml_type.name for t, _ in base.tensors if t.ggml_type not in _PLAIN})
    if not quantized:
        return []
    what = f"{base.path} holds quantized tensors ({', '.join(quantized)})"
    if not allow_requantize:
        raise LemonsliceError(f"{what}; requantizing them loses quality: start from F32/F16/BF16 weights, "
                              "or pass --allow-requantize")
    return [f"{what}: llama.cpp dequantizes and quantizes them again, which loses more than quantizing "
            "the original weights"]


def _run_list(p: RequantPlan) -> list[str]:
    runs = p.ftypes
    if p.globs and all(ft in _FLOAT_FTYPES for ft in runs):
        runs.append(_CARRIER)
    return runs


def _glob_run(p: RequantPlan, runs: list[str]) -> str | None:
    """The run whose glob-matched tensors are taken: the first with a quantized mix."""
    return next((ft for ft in runs if ft not in _FLOAT_FTYPES), None) if p.globs else None


@contextlib.contextmanager
def _workdir(out: Path) -> Iterator[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}{_WORK_TAG}{os.getpid()}-", dir=out.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _monolithic(base: SourceModel, work: Path, bar: _Bar) -> Path:
    """The source as one GGUF for llama.cpp: the file itself, or a split merged (and checked)."""
    if base.manifest is None:
        return base.path
    mono = work / "source.gguf"
    with bar.stage("merge the split source", base.manifest.source.size) as cb:
        merge_split(base.path, mono, progress=cb)
    return mono


def _quantize(p: RequantPlan, base: SourceModel, mono: Path, work: Path, runs: list[str], allow_requantize: bool,
              n_threads: int, bar: _Bar) -> dict[str, Path]:
    """One llama.cpp pass over the whole model per file type; path of each result."""
    overrides = [TensorOverride(glob_regex(g), GGMLType[t]) for g, t in p.globs]
    types = {t.name: t.ggml_type for t, _ in base.shared}
    size = sum(t.n_bytes for t, _ in base.tensors)
    out: dict[str, Path] = {}
    for k, ft in enumerate(runs):
        keep_shared = ft != p.shared and ft != _glob_run(p, runs)
        # A run taken for blocks only copies token_embd/output instead of quantizing them.
        emb = types.get("token_embd.weight") if keep_shared else None
        outp = types.get("output.weight") if keep_shared else None
        with bar.stage(f"llama.cpp {ft} ({k + 1}/{len(runs)})", size):
            out[ft] = quantize_file(mono, work / f"{ft}.gguf", ft, overrides=overrides,
                                    allow_requantize=allow_requantize, output_type=outp, embedding_type=emb,
                                    n_threads=n_threads)
    return out


def _picks(p: RequantPlan, base: SourceModel, runs: dict[str, GGUFReader], glob_run: str | None) -> list[_Pick]:
    """Each tensor, in the source's order, from the run the plan names for it or from the source."""
    picks: list[_Pick] = []
    for t, path in base.tensors:
        layer = block_index(t.name)
        ft = glob_run if p.glob_type(t.name) else p.shared if layer is None else p.ftype_of(layer)
        q = runs[ft].tensor_map.get(t.name) if ft else None
        if ft and q is None:
            raise LemonsliceError(f"llama.cpp's {ft} output lacks the tensor {t.name}")
        if q is None or q.ggml_type == t.ggml_type:
            picks.append(_Pick(t.name, t.shape, t.ggml_type, path, t.data_start, t.n_bytes, False))
        else:
            picks.append(_Pick(t.name, q.shape, q.ggml_type, Path(runs[ft].path), q.data_start, q.n_bytes, True))
    return picks


def _record(p: RequantPlan, base: SourceModel, picks: list[_Pick], runs: list[str], allow_requantize: bool
            ) -> dict[str, Any]:
    """Provenance: the plan, the source, the quantizer and each part's tensor types."""
    parts: dict[int | None, list[_Pick]] = {}
    for k in picks:
        parts.setdefault(block_index(k.name), []).append(k)

    def part(layer: int | None) -> dict[str, Any]:
        ks = parts[layer]
        ft = p.shared if layer is None else p.ftype_of(layer)
        return {"ftype": ft, "changed": any(k.changed for k in ks), "tensors": {k.name: k.ggml_type.name for k in ks}}

    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "format": REQUANT_FORMAT,
        "plan": p.to_dict(),
        "source": {"path": str(base.path), "sha256": base.sha256(), "block_count": base.block_count},
        "quantizer": {"llama_cpp_python": version, "runs": runs, "allow_requantize": allow_requantize},
        "shared": part(None) if None in parts else None,
        "layers": [{"layer": b, **part(b)} for b in sorted(k for k in parts if k is not None)],
    }


def _write_gguf(base: SourceModel, picks: list[_Pick], dst: Path, tick: Callable[[int, int], None]) -> int:
    """The output as one GGUF at `dst`: the source's metadata, the picked tensors' bytes."""
    fp = plan_file([e.raw for e in base.kvs], [(k.name, k.shape, k.ggml_type) for k in picks], base.alignment)
    with contextlib.ExitStack() as files:
        fds = {path: files.enter_context(open(path, "rb")).fileno() for path in dict.fromkeys(k.path for k in picks)}
        out = files.enter_context(open(dst, "r+b")).fileno()
        os.pwrite(out, fp.padded_header(), 0)
        os.ftruncate(out, fp.size)
        done = 0
        for k, pt in zip(picks, fp.tensors):
            try:
                copy_range(fds[k.path], k.start, out, fp.data_offset + pt.offset, k.n_bytes)
            except EOFError:
                raise LemonsliceError(f"{k.path} ended early (changed during the requant?); nothing was written") from None
            done += k.n_bytes
            tick(done, fp.size)
        os.fsync(out)
    return fp.size


def _write_single(base: SourceModel, picks: list[_Pick], out: Path, force: bool, work: Path,
                  record: dict[str, Any], bar: _Bar) -> tuple[list[str], int]:
    sidecar = out.with_name(SIDECAR.format(name=out.name))
    with staged_file(out, force, (base.path,)) as tmp, staged_file(sidecar, force, (base.path,)) as tmp_json:
        with bar.stage(f"write {out.name}", sum(k.n_bytes for k in picks)) as cb:
            size = _write_gguf(base, picks, tmp, cb)
        write_json(tmp_json, record)
    return [], size


def _write_split(base: SourceModel, picks: list[_Pick], out: Path, force: bool, work: Path,
                 record: dict[str, Any], bar: _Bar) -> tuple[list[str], int]:
    """The output written once as a GGUF and split; a file equal to the source split's (by the
    manifests' sha256) becomes a hard link to it, the rest are moved into place."""
    mono, parts = work / "out.gguf", work / "split"
    mono.touch()
    size = sum(k.n_bytes for k in picks)
    with bar.stage("write", size) as cb:
        _write_gguf(base, picks, mono, cb)
    with bar.stage("split", size) as cb:
        m = split_gguf(mono, parts, progress=cb)
    mono.unlink()
    src_hash = {f.name: f.sha256 for f in base.manifest.files} if base.manifest is not None else {}
    linked: list[str] = []
    written = 0
    with staged_dir(out, force, (base.path,)) as tmp:
        for f in m.files:
            if src_hash.get(f.name) == f.sha256 and share_file(base.path / f.name, tmp / f.name):
                linked.append(f.name)
                continue
            os.rename(parts / f.name, tmp / f.name)
            written += f.size
        d = json.loads(m.to_json())
        d["source"]["name"] = f"{out.name}.gguf"  # the single file `merge` rebuilds
        d["requant"] = record
        for row in record["layers"]:
            row["linked"] = LAYER_FILE.format(index=row["layer"]) in linked
        write_json(tmp / MANIFEST_NAME, d)
        stamp_written(tmp, load_manifest(tmp))
    return linked, written

