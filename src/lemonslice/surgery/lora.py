"""Merge a PEFT LoRA adapter into chosen layers of a Qwen3.5 model: W + scale · B @ A.

The adapter's Hugging Face module names are mapped to GGUF tensors with the converter's own table
(`convert.qwen35.block_tensor_kind`), and ΔW = B @ A goes through the converter's value transform
(`convert.qwen35.transform`: V heads tiled in the DeltaNet projections) or its expert layout (a
fused `gate_up_proj` split into gate and up rows). Those are row permutations and slices, linear in
W, so convert(W + ΔW) = convert(W) + convert(ΔW). Each merged tensor is dequantized by
`ops.dequant` and written back in its own ggml type: F32/F16/BF16 as the converter encodes them,
quantized types through llama.cpp's quantizer (`quantizer.quantize_rows`); rows that ΔW leaves at
zero keep their bytes.

Every check (adapter features, module names, layer kinds, shapes) runs before anything is written;
output is staged and renamed into place. A split output shares every file but the merged layers'
with the source by hard link, and its manifest records the merge under "lora"; a single file gets
the record beside it as `OUT.gguf.lora.json`.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..convert.pipeline import encode_tensor
from ..convert.qwen35 import ARCHITECTURES, HParams, block_tensor_kind, transform
from ..errors import LemonsliceError
from ..gguf.constants import MANIFEST_NAME, GGMLType, Tensors, block_index
from ..gguf.manifest import load_manifest
from ..gguf.model import ModelFiles
from ..gguf.reader import open_gguf
from ..gguf.writer import copy_range
from ..models.qwen35_args import ARCHES, ModelArgs
from ..ops.dequant import dequantize
from ..slicing.atomic import check_target_dir, check_target_file, staged_dir, staged_file
from ..slicing.integrity import check_split
from ..slicing.merge import merge_split, split_source_sha256
from ..slicing.split import split_gguf
from ..slicing.verify import sha256_file, stamp_written
from .plan import format_layers
from .quantizer import quantize_rows, requires_imatrix
from .write import share_file, write_json

Progress = Callable[[int, int], None]
LORA_FORMAT = "lemonslice-lora-merge-v1"
SIDECAR = "{name}.lora.json"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_FLOAT = {GGMLType.F32, GGMLType.F16, GGMLType.BF16}
# Tensors a LoRA may change: every 2-D projection of a block (not conv kernels, norms, ssm_a/dt).
_LINEAR_KINDS = {
    Tensors.ATTN_Q, Tensors.ATTN_K, Tensors.ATTN_V, Tensors.ATTN_OUT, Tensors.ATTN_QKV, Tensors.ATTN_GATE,
    Tensors.SSM_BETA, Tensors.SSM_ALPHA, Tensors.SSM_OUT, Tensors.FFN_GATE_INP, Tensors.FFN_GATE_INP_SHEXP,
    Tensors.FFN_GATE_SHEXP, Tensors.FFN_UP_SHEXP, Tensors.FFN_DOWN_SHEXP, Tensors.FFN_GATE, Tensors.FFN_UP,
    Tensors.FFN_DOWN,
}
# adapter_config.json settings that change what a merge means, which lora merge does not do.
_REFUSED = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)", "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "modules_to_save (whole modules trained)", "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer_replication", "use_qalora": "QA-LoRA", "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow routing", "velora_config": "VeLoRA", "kasa_config": "KaSA", "use_bdlora": "BD-LoRA",
    "monteclora_config": "MonteCLoRA",
}
# Qwen3_5MoeExperts registers its parameters in this order; peft nests ParamWrappers in it.
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_EXPERT_KINDS = {"gate_proj": Tensors.FFN_GATE_EXPS, "up_proj": Tensors.FFN_UP_EXPS,
                 "down_proj": Tensors.FFN_DOWN_EXPS}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_PER_EXPERT_RE = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)")


@dataclass(frozen=True)
class AdapterConfig:
    r: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_parameters: tuple[str, ...]
    base_class: str | None  # auto_mapping.base_model_class, when peft wrote it

    def scaling(self, module: str) -> tuple[int, float]:
        """(rank, alpha / rank or alpha / sqrt(rank)) of one module, as peft sets them."""
        r = int(_pattern(self.rank_pattern, module, self.r))
        alpha = float(_pattern(self.alpha_pattern, module, self.alpha))
        return r, alpha / (math.sqrt(r) if self.rslora else r)


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # peft's rule: a pattern matches the module name's end, at a dot.
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)


def read_adapter_config(adapter: Path) -> AdapterConfig:
    path = adapter / ADAPTER_CONFIG
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LemonsliceError(f"{adapter}: no {ADAPTER_CONFIG} (a PEFT adapter directory holds it)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise LemonsliceError(f"{path}: not JSON ({e})") from None
    if not isinstance(d, dict) or d.get("peft_type") != "LORA":
        raise LemonsliceError(f"{path}: peft_type is {d.get('peft_type') if isinstance(d, dict) else None!r}; "
                              "lora merge takes LoRA adapters")
    for key, what in _REFUSED.items():
        if d.get(key):
            raise LemonsliceError(f"{path}: {what} is not supported by lora merge")
    if d.get("bias", "none") != "none":
        raise LemonsliceError(f"{path}: bias={d['bias']!r} (trained biases) is not supported by lora merge")
    try:
        return AdapterConfig(
            r=int(d["r"]), alpha=float(d["lora_alpha"]), rslora=bool(d.get("use_rslora")),
            rank_pattern=dict(d.get("rank_pattern") or {}), alpha_pattern=dict(d.get("alpha_pattern") or {}),
            target_parameters=tuple(d.get("target_parameters") or ()),
            base_class=(d.get("auto_mapping") or {}).get("base_model_class"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise LemonsliceError(f"{path}: bad or missing r / lora_alpha ({e})") from None


@dataclass
class _Module:
    """One adapted weight: its module path in the model (without peft's wrappers) and its factors."""

    key: str
    depth: int  # ParamWrappers around it (peft nests one per targeted parameter of a module)
    a: torch.Tensor | None = None  # [r, in], or [r * X, in] for stacked experts
    b: torch.Tensor | None = None  # [out, r], or [out, r * X]


def _unexpected(name: str, adapter: Path) -> LemonsliceError:
    if "lora_magnitude_vector" in name:
        what = "DoRA (lora_magnitude_vector) is"
    elif "lora_embedding" in name:
        what = "LoRA on embeddings is"
    elif name.endswith(".bias"):
        what = "a LoRA bias is"
    else:
        what = "this tensor is"
    return LemonsliceError(f"{adapter / ADAPTER_WEIGHTS}: {name}: {what} not supported by lora merge")


def read_modules(adapter: Path) -> list[_Module]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = adapter / ADAPTER_WEIGHTS
    if not path.is_file():
        raise LemonsliceError(f"{adapter}: no {ADAPTER_WEIGHTS} (save the adapter with safe_serialization)")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise LemonsliceError(f"{path}: cannot read ({e})") from None
    mods: dict[tuple[str, int], _Module] = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", name)
        if m is None:
            raise _unexpected(name, adapter)
        parts = m.group(1).split(".")
        key = ".".join(p for p in parts if p != "base_layer")
        mod = mods.setdefault((key, parts.count("base_layer")), _Module(key, parts.count("base_layer")))
        setattr(mod, m.group(2).lower(), t.to(torch.float32))
    for mod in mods.values():
        if mod.a is None or mod.b is None:
            raise LemonsliceError(f"{path}: {mod.key} has lora_{'A' if mod.a is None else 'B'} but not both")
    if not mods:
        raise LemonsliceError(f"{path}: no LoRA weights")
    return sorted(mods.values(), key=lambda m: (m.key, m.depth))


@dataclass(frozen=True)
class _Part:
    """ΔW of one module landing in (a region of) one GGUF tensor, in the tensor's numpy order."""

    tensor: str
    index: Any  # `...` for the whole tensor, else an expert and/or a row range
    shape: tuple[int, ...]  # ΔW's shape for that region
    module: str
    make: Callable[[], torch.Tensor]


@dataclass
class MergePlan:
    layers: tuple[int, ...]  # the chosen layers
    parts: dict[str, list[_Part]] = field(default_factory=dict)  # by tensor, chosen layers only
    merged_modules: list[str] = field(default_factory=list)
    skipped_modules: list[str] = field(default_factory=list)  # valid, outside the chosen layers


def _hparams(a: ModelArgs) -> HParams:
    """The converter's hyper-parameters, read back from the GGUF (for its value transform)."""
    return HParams(
        arch=a.arch, n_layer=a.n_layer, n_mtp=a.nextn_predict_layers, n_embd=a.n_embd, n_vocab=a.n_vocab or 0,
        n_head=a.n_head, n_head_kv=a.n_head_kv, head_dim=a.head_dim, recurrent=tuple(a.recurrent[: a.n_layer]),
        lin_k_heads=a.ssm_n_group, lin_v_heads=a.ssm_dt_rank, lin_k_dim=a.ssm_d_state,
        lin_v_dim=a.ssm_head_v_dim, conv_kernel=a.ssm_conv_kernel, n_expert=a.n_expert,
        n_ff=a.n_ff_shexp if a.is_moe else a.n_ff, n_ff_exp=a.n_ff_exp, tied=False,
    )


class _Mapper:
    """Adapter modules -> parts of GGUF tensors, checked against the model's tensors."""

    def __init__(self, files: ModelFiles, args: ModelArgs, cfg: AdapterConfig, scale: float, adapter: Path):
        self.files, self.args, self.cfg, self.scale, self.adapter = files, args, cfg, scale, adapter
        self.h = _hparams(args)

    def _fail(self, mod: _Module, why: str) -> LemonsliceError:
        return LemonsliceError(f"adapter {self.adapter}: {mod.key}: {why}; nothing was written")

    def has(self, name: str) -> bool:
        return name in self.files.tensor_names(block_index(name))

    def shape(self, name: str, mod: _Module) -> tuple[int, ...]:
        if not self.has(name):
            raise self._fail(mod, f"the model has no tensor {name}")
        return tuple(reversed(self.files.info(name).shape))  # numpy order

    def parts(self, mod: _Module) -> tuple[int, list[_Part]]:
        m = _LAYER_RE.fullmatch(mod.key.replace("language_model.", "", 1))
        if m is None:
            raise self._fail(mod, "not a module of a transformer block (lora merge changes layers only)")
        layer, suffix = int(m.group(1)), m.group(2)
        if layer >= self.args.n_layer:
            raise self._fail(mod, f"layer {layer} is out of range (the model has {self.args.n_layer} layers)")
        rank, scaling = self.cfg.scaling(mod.key)
        scaling *= self.scale
        if suffix == "mlp.experts" and self.args.is_moe:
            return layer, self._stacked(mod, layer, rank, scaling)
        if (e := _PER_EXPERT_RE.fullmatch(suffix)) and self.args.is_moe:
            x, proj = int(e.group(1)), e.group(2)
            if x >= self.args.n_expert:
                raise self._fail(mod, f"expert {x} is out of range (the model has {self.args.n_expert})")
            delta = _lowrank(mod, rank, scaling, self, 1)
            return layer, [self._expert_part(mod, layer, proj, (x,), delta, (mod.b.shape[0], mod.a.shape[1]))]
        return layer, [self._plain(mod, layer, suffix + ".weight", rank, scaling)]

    def _plain(self, mod: _Module, layer: int, hf: str, rank: int, scaling: float) -> _Part:
        recurrent = self.args.recurrent[layer]
        kind = block_tensor_kind(hf, recurrent, self.args.is_moe)
        if kind is None:
            what = ("a Gated DeltaNet layer" if recurrent else "a full-attention layer")
            other = block_tensor_kind(hf, not recurrent, self.args.is_moe) is not None
            raise self._fail(mod, f"layer {layer} is {what} with no such module" if other else
                             f"unknown target module for {self.args.arch} (no tensor of the model comes from {hf})")
        if kind not in _LINEAR_KINDS:
            raise self._fail(mod, f"LoRA on {hf} ({kind.format(bid=layer)}) is not supported")
        name = kind.format(bid=layer)
        shape = self.shape(name, mod)
        delta = _lowrank(mod, rank, scaling, self, 1, shape)
        return _Part(name, ..., shape, mod.key, lambda: transform(kind, delta(), self.h))

    def _stacked(self, mod: _Module, layer: int, rank: int, scaling: float) -> list[_Part]:
        """peft's `target_parameters` on the fused experts: [X, 2F, E] gate_up_proj or [X, E, F] down_proj."""
        hit = [p for p in _EXPERT_PARAMS if any(f"{mod.key}.{p}" == t or f"{mod.key}.{p}".endswith("." + t)
                                                  for t in self.cfg.target_parameters)]
        if mod.depth >= len(hit):
            raise self._fail(mod, "cannot tell which expert parameter this is (target_parameters names "
                             f"{len(hit)} of gate_up_proj, down_proj)")
        param = hit[len(hit) - 1 - mod.depth]  # the last parameter peft wrapped is the outermost
        x, out, inp = self.args.n_expert, mod.b.shape[0], mod.a.shape[1]
        delta = _lowrank(mod, rank, scaling, self, x)
        if param == "down_proj":
            return [self._expert_part(mod, layer, "down_proj", (), delta, (x, out, inp))]
        f = self.args.n_ff_exp
        if out != 2 * f:
            raise self._fail(mod, f"gate_up_proj's ΔW has {out} rows per expert; the model's experts have 2x{f}")
        return [self._expert_part(mod, layer, "gate_proj", (), lambda: delta()[:, :f], (x, f, inp)),
                self._expert_part(mod, layer, "up_proj", (), lambda: delta()[:, f:], (x, f, inp))]

    def _expert_part(self, mod: _Module, layer: int, proj: str, where: tuple[int, ...],
                     delta: Callable[[], torch.Tensor], got: tuple[int, ...]) -> _Part:
        """ΔW (of shape `got`) of `proj` for the experts `where` names (all when empty), placed in
        ffn_{proj}_exps, or in its half of a fused ffn_gate_up_exps."""
        fused = Tensors.FFN_GATE_UP_EXPS.format(bid=layer)
        f = self.args.n_ff_exp
        if proj != "down_proj" and self.has(fused):
            name, rows = fused, (slice(0, f) if proj == "gate_proj" else slice(f, 2 * f))
            index: Any = (*where, rows) if where else (slice(None), rows)
        else:
            name, index = _EXPERT_KINDS[proj].format(bid=layer), (where or ...)
        region = tuple(torch.empty(self.shape(name, mod), device="meta")[index].shape)
        if got != region:
            raise self._fail(mod, f"ΔW would be {_x(got)}, but {name} holds {_x(region)} there")
        return _Part(name, index, region, mod.key, delta)


def _x(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _lowrank(mod: _Module, rank: int, scaling: float, mapper: _Mapper, n_expert: int,
             expect: tuple[int, ...] | None = None) -> Callable[[], torch.Tensor]:
    """Check A and B and return ΔW = scaling · B @ A, made on demand ([out, in]; [X, out, in] for
    stacked experts, whose A is [X·r, in] expert-major and B [out, r·X] rank-major, as peft lays them)."""
    a, b = mod.a, mod.b
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] != rank * n_expert:
        raise mapper._fail(mod, f"lora_A {_x(tuple(a.shape))} and lora_B {_x(tuple(b.shape))} do not fit "
                           f"rank {rank}" + (f" x {n_expert} experts" if n_expert > 1 else ""))
    if expect is not None and (b.shape[0], a.shape[1]) != expect:
        raise mapper._fail(mod, f"ΔW would be {b.shape[0]}x{a.shape[1]}, but the model's tensor is {_x(expect)}")
    if n_expert == 1:
        return lambda: (b @ a) * scaling
    return lambda: torch.einsum("orx,xri->xoi", b.reshape(b.shape[0], rank, n_expert),
                                a.reshape(n_expert, rank, a.shape[1])) * scaling


def _open_args(files: ModelFiles) -> ModelArgs:
    if files.arch not in ARCHES:
        raise LemonsliceError(f"{files.path}: architecture {files.arch!r}; lora merge maps Qwen3.5 module names "
                              f"({', '.join(ARCHES)})")
    return ModelArgs.from_gguf(files.metadata)


def plan_merge(files: ModelFiles, adapter: Path, layers: tuple[int, ...] | None, scale: float) -> MergePlan:
    """Map and check every module of the adapter (those outside `layers` too); the parts of the
    chosen layers. Raises a one-line error for anything that does not fit."""
    args = _open_args(files)
    cfg = read_adapter_config(adapter)
    made_for = ARCHITECTURES.get(cfg.base_class or "")
    if cfg.base_class and made_for != args.arch:
        raise LemonsliceError(f"adapter {adapter} was made for {cfg.base_class}; {files.path} is {args.arch}")
    chosen = tuple(range(args.n_layer)) if layers is None else tuple(sorted(set(layers)))
    bad = [i for i in chosen if not 0 <= i < args.n_layer]
    if bad:
        raise LemonsliceError(f"--layers: layer {bad[0]} is out of range (the model has {args.n_layer} layers, "
                              f"0-{args.n_layer - 1})")
    mapper = _Mapper(files, args, cfg, scale, adapter)
    plan = MergePlan(chosen)
    touched: set[int] = set()
    for mod in read_modules(adapter):
        layer, parts = mapper.parts(mod)
        touched.add(layer)
        if layer not in chosen:
            plan.skipped_modules.append(mod.key)
            continue
        plan.merged_modules.append(mod.key)
        for p in parts:
            plan.parts.setdefault(p.tensor, []).append(p)
    if not plan.parts:
        raise LemonsliceError(f"adapter {adapter} changes layers {format_layers(sorted(touched))}, none of them in "
                              f"--layers {format_layers(chosen)}; nothing was written")
    return plan


def merged_bytes(files: ModelFiles, name: str, parts: list[_Part]) -> bytes:
    """Tensor `name` with every part's ΔW added, in its own ggml type; quantized rows ΔW leaves
    unchanged keep their bytes (llama.cpp quantizes each row on its own)."""
    info = files.info(name)
    raw = files.reader(block_index(name) if files.manifest is not None else None).tensor_bytes(name)  # mapped
    w = dequantize(raw, info.ggml_type, info.shape).clone()  # numpy order: [X,] rows, row length
    changed = torch.zeros(w.shape[:-1], dtype=torch.bool)
    for p in parts:
        d = p.make()
        w[p.index] += d
        changed[p.index] |= (d != 0).any(-1)
    if info.ggml_type in _FLOAT:
        return encode_tensor(w.numpy(), info.ggml_type).tobytes()
    rows, mask = w.reshape(-1, w.shape[-1]).numpy(), changed.reshape(-1).numpy()
    out = np.frombuffer(raw, dtype=np.uint8).reshape(len(mask), -1).copy()  # [rows, row bytes]
    out[mask] = quantize_rows(rows[mask], int(info.ggml_type))
    return out.tobytes()


def _check_quantizer(files: ModelFiles, plan: MergePlan) -> None:
    """Reach llama.cpp's quantizer now, before a byte is written, when a merged tensor needs it."""
    for name in plan.parts:
        t = files.info(name).ggml_type
        if t not in _FLOAT and requires_imatrix(int(t)):
            raise LemonsliceError(f"{name} is {t.name}, which llama.cpp requantizes only with an importance "
                                  "matrix; nothing was written")


@dataclass(frozen=True)
class LoraResult:
    path: Path
    split: bool
    layers: tuple[int, ...]  # layers with a merged tensor
    tensors: tuple[str, ...]  # merged tensors
    merged_modules: int
    skipped_modules: tuple[str, ...]  # adapter modules outside the chosen layers
    linked: tuple[str, ...]  # split files shared with the source
    written_bytes: int
    record: dict[str, Any]
    warnings: tuple[str, ...] = ()


@dataclass
class _Tick:
    """Bytes done of `total`, passed on to the caller's progress callback."""

    total: int
    progress: Progress | None
    done: int = 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)


def _record(files: ModelFiles, plan: MergePlan, adapter: Path, scale: float, source_sha: str) -> dict[str, Any]:
    """Provenance: the adapter (path, hashes, settings), the layers, the scale and each merged tensor."""
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return {
        "format": LORA_FORMAT,
        "adapter": {
            "path": str(adapter.resolve()), "sha256": sha256_file(adapter / ADAPTER_WEIGHTS),
            "config_sha256": sha256_file(adapter / ADAPTER_CONFIG), "r": cfg.get("r"),
            "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
        },
        "scale": scale,
        "layers": list(plan.layers),
        "source": {"path": str(files.path.resolve()), "sha256": source_sha},
        "tensors": [{"name": n, "type": files.info(n).ggml_type.name, "modules": sorted({p.module for p in ps})}
                    for n, ps in plan.parts.items()],
        "skipped_modules": plan.skipped_modules,
    }


def _copy_file(src: Path, dst: Path) -> int:
    """A new file at `dst` with `src`'s bytes; returns its descriptor, open for writing."""
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    with open(src, "rb") as s:
        copy_range(s.fileno(), 0, fd, 0, os.fstat(s.fileno()).st_size)
    return fd


def _patch(files: ModelFiles, plan: MergePlan, names: list[str], path: Path, fd: int, tick: _Tick) -> None:
    """Overwrite tensors `names` in the GGUF `path` (open as `fd`) with their merged bytes."""
    with open_gguf(path) as r:
        starts = {n: r.tensor_map[n].data_start for n in names}
    for n in names:
        data = merged_bytes(files, n, plan.parts[n])
        os.pwrite(fd, data, starts[n])
        tick(len(data))
    os.fsync(fd)


def _write_single(files: ModelFiles, plan: MergePlan, src: Path, out: Path, force: bool, record: dict[str, Any],
                  tick: _Tick) -> int:
    """OUT.gguf: the source's bytes (a split merged back first) with the merged tensors rewritten
    in place, and the record beside it."""
    sidecar = out.with_name(SIDECAR.format(name=out.name))
    with staged_file(out, force, (src,)) as tmp, staged_file(sidecar, force, (src,)) as tmp_json:
        if src.is_dir():
            merge_split(src, tmp, force=True)  # checked against the split's sha256
            fd = os.open(tmp, os.O_RDWR)
        else:
            fd = _copy_file(src, tmp)
        try:
            _patch(files, plan, list(plan.parts), tmp, fd, tick)
        finally:
            os.close(fd)
        write_json(tmp_json, record)
        return os.path.getsize(tmp)


def _share(src: Path, dst: Path) -> bool:
    """`dst` shares `src`'s data (a hard link or reflink: True), else is a copy of it (False)."""
    if share_file(src, dst):
        return True
    os.close(_copy_file(src, dst))
    return False


def _write_split(files: ModelFiles, plan: MergePlan, split_dir: Path, out: Path, force: bool,
                 inputs: tuple[Path, ...], record: dict[str, Any], tick: _Tick) -> tuple[int, list[str]]:
    """A split directory: the merged layers' files copied and rewritten, every other file linked
    to `split_dir`'s, the manifest with their new hashes, the new source hash and the record."""
    m = load_manifest(split_dir)
    doc = json.loads((split_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    by_file: dict[str, list[str]] = {}
    for f in m.files:
        names = [t.name for t in f.tensors if t.name in plan.parts]
        if names:
            by_file[f.name] = names
    linked, written = [], 0
    with staged_dir(out, force, inputs) as tmp:
        for i, f in enumerate(m.files):
            if f.name not in by_file:
                if _share(split_dir / f.name, tmp / f.name):
                    linked.append(f.name)
                continue
            fd = _copy_file(split_dir / f.name, tmp / f.name)
            try:
                _patch(files, plan, by_file[f.name], tmp / f.name, fd, tick)
            finally:
                os.close(fd)
            doc["files"][i]["sha256"] = f.sha256 = sha256_file(tmp / f.name)
            written += f.size
        base = tick.done
        tick.total += m.source.size
        doc["source"]["sha256"] = split_source_sha256(tmp, m, lambda done, _total: tick(base + done - tick.done))
        doc["source"]["name"] = f"{out.name}.gguf"  # the file `merge` now rebuilds
        doc["lora"] = [*(doc.get("lora") or []), record]
        write_json(tmp / MANIFEST_NAME, doc)
        stamp_written(tmp, load_manifest(tmp))
        written += (tmp / MANIFEST_NAME).stat().st_size
    return written, linked


def merge_lora(
    src: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    layers: tuple[int, ...] | None = None,
    scale: float = 1.0,
    *,
    split: bool | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> LoraResult:
    """Merge the PEFT LoRA adapter directory `adapter` into `layers` (all when None) of `src` (a
    .gguf or split directory), written to `out`: one GGUF when `split` is False (default: when `out`
    ends in .gguf), else a split directory. Nothing is written unless every check passes."""
    src, adapter, out = Path(src), Path(adapter), Path(out)
    split = out.suffix.lower() != ".gguf" if split is None else split
    if not src.exists():
        raise LemonsliceError(f"{src}: no such file or directory")
    if not math.isfinite(scale):
        raise LemonsliceError(f"--scale {scale} is not a finite number")
    (check_target_dir if split else check_target_file)(Path(os.path.abspath(out)), force, (src,))
    warnings = tuple(check_split(src, hash_changed=True)) if src.is_dir() else ()
    with ModelFiles(src) as files:
        plan = plan_merge(files, adapter, layers, scale)
        _check_quantizer(files, plan)
        sha = files.manifest.source.sha256 if files.manifest is not None else None
        tick = _Tick(sum(files.info(n).n_bytes for n in plan.parts), progress)
        if not split:
            if sha is None:
                sha = sha256_file(src)
            record = _record(files, plan, adapter, scale, sha)
            written = _write_single(files, plan, src, out, force, record, tick)
            linked: list[str] = []
        else:
            written, linked, record = _to_split(files, plan, src, out, force, adapter, scale, sha, tick)
    layers_done = tuple(sorted({block_index(n) for n in plan.parts}))
    return LoraResult(out, split, layers_done, tuple(plan.parts), len(plan.merged_modules),
                      tuple(plan.skipped_modules), tuple(linked), written, record, warnings)


def _to_split(files: ModelFiles, plan: MergePlan, src: Path, out: Path, force: bool, adapter: Path, scale: float,
              sha: str | None, tick: _Tick) -> tuple[int, list[str], dict[str, Any]]:
    """A split output; a .gguf source is split first, beside the output (its files are then linked)."""
    if src.is_dir():
        record = _record(files, plan, adapter, scale, sha or "")
        return (*_write_split(files, plan, src, out, force, (src,), record, tick), record)
    out_abs = Path(os.path.abspath(out))
    out_abs.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_abs.name}.lora-", dir=out_abs.parent) as d:
        m = split_gguf(src, Path(d) / "split")
        record = _record(files, plan, adapter, scale, m.source.sha256)
        written, _ = _write_split(files, plan, Path(d) / "split", out, force, (src,), record, tick)
        return written, [], record  # linked to the temporary split only: nothing is shared with SRC
