"""Layer plans: which blocks run, in which order, from which model.

A plan is a base layer list plus named operations, written as a spec string or a YAML/JSON
file. Clauses are separated by `;` or newlines; a layer list may only come first:

    0-30,27-30,31-39          explicit order (ranges are inclusive); default: every trunk block once
    repeat A-B[xN]            layers A..B (a contiguous run of the playlist) run N times in all (default 2)
    drop LIST                 remove every position that holds one of these layers
    exit-after K              keep playlist positions 0..K (on the plain order: stop after layer K)
    replace I=MODEL:J         positions holding layer I run block J of MODEL (a path or a `models` alias)
    prune-experts LIST N stats=FILE | prune-experts LIST keep=IDS
                              those layers keep fewer routed experts (surgery/prune.py; surgery only)

`repeat`, `drop` and `replace` name layers of the base model (a replaced position keeps
the number of the layer it stands for); `exit-after` counts positions. The file form:

    layers: "0-30,27-30,31-39"     # optional
    ops: ["repeat 27-30", "replace 5=donor:5"]
    models: {donor: ../other.gguf} # optional; relative paths are relative to the plan file
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from ..engine.engine import block_args
from ..errors import LemonsliceError
from ..gguf.constants import (
    LAYER_FILE,
    Keys,
    Role,
    arch_key,
    block_index,
    block_suffix,
)
from ..gguf.model import ModelFiles
from ..gguf.reader import GGUFReader, KVEntry, TensorInfo
from ..models import family
from ..slicing.atomic import staged_output
from ..slicing.manifest import Manifest
from ..slicing.verify import sha256_file

PLAN_FORMAT = "lemonslice-plan-v1"
SURGERY_FORMAT = "lemonslice-surgery-v1"
# llama.cpp's default when a qwen35 file has no full_attention_interval.
DEFAULT_INTERVAL = 4
_PLAN_KEYS = {"format", "layers", "ops", "models"}
# Keys whose array form holds one value per block; surgery does not remap them.
_PER_LAYER_KEYS = (Keys.HEAD_COUNT, Keys.HEAD_COUNT_KV, Keys.FEED_FORWARD_LENGTH, Keys.SLIDING_WINDOW_PATTERN)
# The per-layer layout key llama.cpp 0.3.36 reads for each architecture (one flag per block,
# overriding the kinds it would derive from a period): surgery remaps and writes these.
LAYOUT_KEYS = {"qwen35": Keys.RECURRENT_LAYERS, "qwen35moe": Keys.RECURRENT_LAYERS,
               "gemma3": Keys.SLIDING_WINDOW_PATTERN}

_N = r"(\d+)"
_RANGE = rf"{_N}(?:\s*-\s*{_N})?"
_LIST_RE = re.compile(rf"^\s*{_RANGE}(\s*,\s*{_RANGE})*\s*$")
_REPEAT_RE = re.compile(rf"^repeat\s+{_RANGE}(?:\s*[xX×]\s*{_N})?$")
_DROP_RE = re.compile(r"^drop\s+(.+)$")
_EXIT_RE = re.compile(rf"^exit-after\s+{_N}$")
_REPLACE_RE = re.compile(rf"^replace\s+{_N}\s*=\s*(.+?)\s*:\s*{_N}$")
# A spec (not a file name), even when it ends in .json: `prune-experts 2 8 stats=s.json`.
_SPEC_START_RE = re.compile(r"^\s*(\d|(repeat|drop|exit-after|replace|prune-experts)\s)")


class PlanError(LemonsliceError):
    """A plan that cannot be parsed, or does not fit the model it is applied to."""


def parse_layers(text: str, what: str = "layer list") -> tuple[int, ...]:
    """'0-3,7,5-6' -> (0, 1, 2, 3, 7, 5, 6)."""
    if not _LIST_RE.match(text):
        raise PlanError(f"{what} {text!r}: expected numbers and ranges such as 0-30,27-30,31-39")
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        lo, hi = int(a), int(b) if b else int(a)
        if hi < lo:
            raise PlanError(f"{what} {text!r}: range {lo}-{hi} runs backwards")
        out += range(lo, hi + 1)
    return tuple(out)


def format_layers(layers: Sequence[int]) -> str:
    """(0, 1, 2, 3, 7) -> '0-3,7': ascending runs become ranges."""
    parts: list[str] = []
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class Op:
    """One named operation; `text` is its canonical clause."""

    kind: str  # repeat, drop, exit-after, replace, prune-experts
    layers: tuple[int, ...] = ()  # repeat: the run; drop, prune-experts: the layers; replace: (I, J); exit-after: (K,)
    times: int = 2  # repeat: passes in all; prune-experts: experts kept
    model: str = ""  # replace: path or alias; prune-experts: the stats file
    keep: tuple[int, ...] = ()  # prune-experts only: the expert ids named by keep=

    @property
    def text(self) -> str:
        if self.kind == "repeat":
            a, b = self.layers[0], self.layers[-1]
            run = str(a) if a == b else f"{a}-{b}"
            return f"repeat {run}" + (f"x{self.times}" if self.times != 2 else "")
        if self.kind == "drop":
            return f"drop {format_layers(self.layers)}"
        if self.kind == "exit-after":
            return f"exit-after {self.layers[0]}"
        if self.kind == "prune-experts":
            from .prune import prune_text

            return prune_text(self)
        return f"replace {self.layers[0]}={self.model}:{self.layers[1]}"


def parse_op(clause: str) -> Op:
    c = " ".join(clause.split())
    if m := _REPEAT_RE.match(c):
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise PlanError(f"{clause!r}: range {lo}-{hi} runs backwards")
        times = int(m.group(3)) if m.group(3) else 2
        if times < 1:
            raise PlanError(f"{clause!r}: a run repeats at least once (x1 or more)")
        return Op("repeat", tuple(range(lo, hi + 1)), times=times)
    if m := _DROP_RE.match(c):
        return Op("drop", tuple(dict.fromkeys(parse_layers(m.group(1), f"{clause!r}:"))))
    if m := _EXIT_RE.match(c):
        return Op("exit-after", (int(m.group(1)),))
    if m := _REPLACE_RE.match(c):
        return Op("replace", (int(m.group(1)), int(m.group(3))), model=m.group(2))
    if c.startswith("prune-experts"):
        from .prune import parse_prune

        return parse_prune(c)
    raise PlanError(
        f"cannot read plan clause {clause!r}: expected a layer list or one of "
        "'repeat A-B[xN]', 'drop LIST', 'exit-after K', 'replace I=MODEL:J', 'prune-experts LIST N stats=FILE'"
    )


class Entry(NamedTuple):
    """One playlist position: block `layer` of the base model (source None) or of a donor (its path)."""

    source: str | None
    layer: int
    slot: int  # the base layer this position stands for (== layer unless replaced)


@dataclass(frozen=True)
class Plan:
    layers: tuple[int, ...] | None = None  # the base order; None: every trunk block once
    ops: tuple[Op, ...] = ()
    models: tuple[tuple[str, str], ...] = ()  # alias -> path, sorted
    root: str | None = field(default=None, compare=False)  # directory relative donor paths start from

    # ---- reading and writing --------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: str, root: str | os.PathLike[str] | None = None) -> "Plan":
        clauses = [c.strip() for c in re.split(r"[;\n]", spec) if c.strip()]
        if not clauses:
            raise PlanError("empty plan")
        layers = None
        if _LIST_RE.match(clauses[0]):
            layers = parse_layers(clauses[0])
            clauses = clauses[1:]
        for c in clauses:
            if _LIST_RE.match(c):
                raise PlanError(f"plan clause {c!r}: a layer list may only come first")
        return cls(layers, tuple(parse_op(c) for c in clauses), (), _root(root))

    @classmethod
    def from_dict(cls, d: Any, root: str | os.PathLike[str] | None = None) -> "Plan":
        if isinstance(d, dict) and d.get("format") == SURGERY_FORMAT:
            d = d.get("plan")  # a surgery record: re-run the plan it holds
        if not isinstance(d, dict):
            raise PlanError("a plan file holds a mapping with 'layers', 'ops' and 'models'")
        unknown = sorted(set(d) - _PLAN_KEYS)
        if unknown:
            raise PlanError(f"plan: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(_PLAN_KEYS))})")
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"plan: format {d['format']!r} is not {PLAN_FORMAT}")
        layers = d.get("layers")
        if isinstance(layers, str):
            layers = parse_layers(layers)
        elif isinstance(layers, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                              for x in layers):
            layers = tuple(layers)
        elif layers is not None:
            raise PlanError("plan: 'layers' must be a string such as '0-30,27-30' or a list of layer numbers")
        if layers is not None and not layers:
            raise PlanError("plan: 'layers' is empty")
        ops = d.get("ops", [])
        if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
            raise PlanError("plan: 'ops' must be a list of clauses such as 'repeat 27-30'")
        models = d.get("models", {})
        if not isinstance(models, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in models.items()):
            raise PlanError("plan: 'models' must map alias names to model paths")
        return cls(layers, tuple(parse_op(o) for o in ops), tuple(sorted(models.items())), _root(root))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Plan":
        """A YAML or JSON plan file (JSON is YAML, so one parser reads both)."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise PlanError(f"{path}: cannot read the plan ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise PlanError(f"{path}: not UTF-8 text") from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PlanError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        try:
            return cls.from_dict(d, path.resolve().parent)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None

    def to_dict(self, resolve_paths: bool = False) -> dict[str, Any]:
        """The plan as its file form; `resolve_paths` writes donor paths as absolute paths."""
        d: dict[str, Any] = {"format": PLAN_FORMAT}
        if self.layers is not None:
            d["layers"] = format_layers(self.layers)
        d["ops"] = [op.text for op in self.ops]
        models = {k: (self._path(v) if resolve_paths else v) for k, v in self.models}
        if resolve_paths:
            ops = []
            for op in self.ops:
                if (op.kind == "replace" and op.model not in models) or (op.kind == "prune-experts" and op.model):
                    op = Op(op.kind, op.layers, op.times, self._path(op.model), op.keep)
                ops.append(op.text)
            d["ops"] = ops
        if models:
            d["models"] = models
        return d

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan (.json as JSON, anything else as YAML) with absolute donor paths."""
        path = Path(path)
        d = self.to_dict(resolve_paths=True)
        if path.suffix.lower() == ".json":
            text = json.dumps(d, indent=1) + "\n"
        else:
            import yaml

            text = yaml.safe_dump(d, sort_keys=False)
        with staged_output(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    @property
    def spec(self) -> str:
        """The plan as one spec string (aliases stay aliases)."""
        parts = ([format_layers(self.layers)] if self.layers is not None else []) + [op.text for op in self.ops]
        return "; ".join(parts)

    # ---- applying -------------------------------------------------------------------

    def _path(self, model: str) -> str:
        """A donor's path: an alias's target, relative paths taken from the plan's directory."""
        p = Path(dict(self.models).get(model, model)).expanduser()
        if not p.is_absolute() and self.root is not None:
            p = Path(self.root) / p
        return str(p.resolve())

    def resolve(self, n_layer: int) -> list[Entry]:
        """The playlist for a base model of `n_layer` trunk blocks."""
        if n_layer < 1:
            raise PlanError("the model has no trunk blocks")
        base = self.layers if self.layers is not None else tuple(range(n_layer))
        bad = sorted({i for i in base if i >= n_layer})
        if bad:
            raise PlanError(f"layer list names layer(s) {format_layers(bad)}, the model has 0-{n_layer - 1}")
        out = [Entry(None, i, i) for i in base]
        for op in self.ops:
            out = self._apply(op, out)
            if not out:
                raise PlanError(f"'{op.text}' leaves no layer to run")
        return out

    def _apply(self, op: Op, cur: list[Entry]) -> list[Entry]:
        slots = [e.slot for e in cur]
        present = set(slots)
        if op.kind == "repeat":
            run = list(op.layers)
            missing = [i for i in run if i not in present]
            if missing:
                raise PlanError(f"'{op.text}': layer(s) {format_layers(missing)} are not in the playlist")
            starts = [k for k in range(len(cur) - len(run) + 1) if slots[k : k + len(run)] == run]
            if not starts:
                raise PlanError(f"'{op.text}': layers {format_layers(run)} do not run in that order in the playlist")
            if len(starts) > 1:
                raise PlanError(f"'{op.text}': layers {format_layers(run)} run {len(starts)} times; "
                                "write the order out as a layer list instead")
            k, n = starts[0], len(run)
            return cur[: k + n] + cur[k : k + n] * (op.times - 1) + cur[k + n :]
        if op.kind in ("drop", "prune-experts"):
            missing = [i for i in op.layers if i not in present]
            if missing:
                raise PlanError(f"'{op.text}': layer(s) {format_layers(missing)} are not in the playlist")
            # Pruning keeps the playlist; the writer slices the layers' experts.
            return cur if op.kind == "prune-experts" else [e for e in cur if e.slot not in op.layers]
        if op.kind == "exit-after":
            (k,) = op.layers
            if k >= len(cur):
                raise PlanError(f"'{op.text}': the playlist has positions 0-{len(cur) - 1}")
            return cur[: k + 1]
        i, j = op.layers
        if i not in present:
            raise PlanError(f"'{op.text}': layer {i} is not in the playlist")
        path = self._path(op.model)
        return [Entry(path, j, e.slot) if e.slot == i else e for e in cur]


def _root(root: str | os.PathLike[str] | None) -> str | None:
    return None if root is None else str(Path(root).resolve())


def load_plan(plan: "str | os.PathLike[str] | Plan") -> Plan:
    """A Plan from a Plan, a plan file (.yaml/.yml/.json, or any existing file) or a spec string."""
    if isinstance(plan, Plan):
        return plan
    text = os.fspath(plan)
    p = Path(text)
    try:
        is_file = p.is_file()
    except OSError:  # a spec string too long for a file name (long keep= lists)
        is_file = False
    named = p.suffix.lower() in (".yaml", ".yml", ".json") and not _SPEC_START_RE.match(text)
    if isinstance(plan, os.PathLike) or named or is_file:
        if not p.is_file():
            raise PlanError(f"{p}: no such plan file")
        return Plan.load(p)
    return Plan.from_spec(text)


# ---- the models a plan reads --------------------------------------------------------------


class SourceModel:
    """A model's KV records and tensors, from a .gguf file or a lemonslice split directory,
    or from a model the caller has already opened (its files are then the caller's to close)."""

    def __init__(self, source: "str | os.PathLike[str] | ModelFiles"):
        self._owns = not isinstance(source, ModelFiles)
        self.files = ModelFiles(source) if self._owns else source
        try:
            self._describe()
        except BaseException:
            self.close()
            raise

    def _describe(self) -> None:
        f = self.files
        self.path = f.path.resolve()
        self.manifest: Manifest | None = f.manifest
        self._sha256: str | None = None
        self._layer_of = {}  # file path (as given and resolved) -> its key in `files`
        for layer, path in f.files_by_layer().items():
            self._layer_of[path] = self._layer_of[path.resolve()] = layer
        # (tensor, the file that holds it), in the model's tensor order.
        self.tensors: list[tuple[TensorInfo, Path]] = f.tensors()
        main = f.reader(None)
        self.alignment = main.alignment
        # The model's KV pairs; keys lemonslice adds to split files describe a file, not the model.
        self.kvs: list[KVEntry] = [e for e in main.kv.values() if not e.key.startswith(Keys.LS_PREFIX)]
        self.metadata = f.metadata
        self.arch: str | None = self.metadata.get(Keys.ARCHITECTURE)
        self.family = family(self.metadata)
        self.args = self.family.ModelArgs.from_gguf(self.metadata)
        self.n_layer: int = self.args.n_layer
        self.blocks: dict[int, list[tuple[TensorInfo, Path]]] = defaultdict(list)
        self.shared: list[tuple[TensorInfo, Path]] = []
        for t, p in self.tensors:
            b = block_index(t.name)
            (self.shared if b is None else self.blocks[b]).append((t, p))
        self.block_count = max(self.blocks) + 1 if self.blocks else 0
        self.roles = f.roles()
        missing = [b for b in range(self.n_layer) if b not in self.blocks]
        if missing:
            raise PlanError(f"{self.path}: trunk block(s) {format_layers(missing)} have no tensors")

    def reader(self, path: Path) -> GGUFReader:
        return self.files.reader(self._layer_of[path])

    def close(self) -> None:
        if self._owns:
            self.files.close()

    def __enter__(self) -> "SourceModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self, layer: int) -> list[str]:
        return [t.name for t, _ in self.blocks.get(layer, [])]

    def kv(self, template: str, default: Any = None) -> Any:
        return self.metadata.get(arch_key(template, self.arch or ""), default)

    @property
    def interval(self) -> int:
        return int(self.kv(Keys.FULL_ATTENTION_INTERVAL, DEFAULT_INTERVAL))

    @property
    def hybrid(self) -> bool:
        return any(r == Role.RECURRENT for r in self.roles.values())

    @property
    def windowed(self) -> bool:
        """Whether some layers attend through a sliding window and others globally (Gemma 3)."""
        return getattr(self.args, "sliding_window", 0) > 0

    @property
    def swa_period(self) -> int:
        """The period a reader derives the local/global layout from when the file has no
        per-layer array: the file's integer sliding_window_pattern, else the family's default."""
        v = self.kv(Keys.SLIDING_WINDOW_PATTERN)
        return int(v) if isinstance(v, (int, np.integer)) else int(self.family.DEFAULT_SWA_PATTERN)

    def layer_file(self, layer: int) -> Path | None:
        """The split file of block `layer`, for a split directory."""
        if self.manifest is None:
            return None
        return self.path / LAYER_FILE.format(index=layer)

    def file_sha256(self, path: Path) -> str | None:
        """The manifest's sha256 of one file of a split directory."""
        if self.manifest is None:
            return None
        return self.manifest.file(path.name).sha256

    def sha256(self, on_bytes: Callable[[int], None] | None = None) -> str:
        """The model's hash: the file's (read once), or for a split directory the hash of the file it came from."""
        if self.manifest is not None:
            return self.manifest.source.sha256
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path, on_bytes)
        return self._sha256

    def block_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """suffix (`attn_q.weight`) -> shape of block `layer`'s tensors."""
        return {block_suffix(t.name): t.shape for t, _ in self.blocks.get(layer, [])}


def _plain(v: Any, sep: str = ", ") -> str:
    """A value for a message: sequences joined (a shape with "x"), never a Python repr."""
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return sep.join(map(str, v))
    return str(v)


def check_donor(base: SourceModel, donor: SourceModel, layer: int) -> None:
    """Refuse a donor block that would not compute in the base model: another architecture,
    other hyper-parameters (sizes, norms, RoPE) or other tensor names and shapes."""
    where = f"replace with {donor.path}:{layer}"
    if donor.arch != base.arch:
        raise PlanError(f"{where}: donor architecture {donor.arch!r} differs from the model's {base.arch!r}")
    if not 0 <= layer < donor.n_layer:
        raise PlanError(f"{where}: the donor has trunk blocks 0-{donor.n_layer - 1}")
    a, b = block_args(base.args), block_args(donor.args)
    diff = [k for k in a if a[k] != b.get(k)]
    if diff:
        k = diff[0]
        raise PlanError(f"{where}: donor {k} = {_plain(b.get(k))}, the model has {_plain(a[k])}"
                        + (f" (and {len(diff) - 1} more difference(s))" if len(diff) > 1 else ""))
    role = donor.roles[layer]
    ref = next((i for i in range(base.n_layer) if base.roles[i] == role), None)
    if ref is None:
        raise PlanError(f"{where}: the model has no {role.value} block to compare the donor's with")
    want, got = base.block_shapes(ref), donor.block_shapes(layer)
    if want != got:
        names = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        k = names[0]
        raise PlanError(f"{where}: donor tensor {k} has shape {_plain(got.get(k), 'x')}, the model's {role.value} "
                        f"blocks have {_plain(want.get(k), 'x')}")


def per_layer_keys_check(model: SourceModel) -> None:
    """Surgery re-lays the blocks; per-layer metadata it cannot carry along is refused (the
    architecture's layout key is carried along: surgery rewrites it)."""
    for template in _PER_LAYER_KEYS:
        if template == LAYOUT_KEYS.get(model.arch or ""):
            continue
        key = arch_key(template, model.arch or "")
        e = next((e for e in model.kvs if e.key == key), None)
        if e is not None and (e.count is not None or template == Keys.SLIDING_WINDOW_PATTERN):
            raise PlanError(f"{model.path}: per-layer metadata {key} is not supported by layer surgery")


# ---- the layer layout: hybrid recurrent/attention, sliding-window/global ---------------------


@dataclass(frozen=True)
class PatternReport:
    """How a playlist's recurrent/attention layout compares with `full_attention_interval`."""

    arch: str
    interval: int
    recurrent: tuple[bool, ...]  # per trunk position
    breaks: tuple[int, ...]  # positions whose kind differs from the interval rule

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def key(self) -> str:
        return arch_key(Keys.RECURRENT_LAYERS, self.arch)

    @property
    def message(self) -> str:
        n = len(self.recurrent)
        if self.ok:
            return f"{n} layers follow full_attention_interval={self.interval}: the layout needs no extra metadata"
        p = self.breaks[0]
        found = "recurrent" if self.recurrent[p] else "attention"
        want = "attention" if self.recurrent[p] else "recurrent"
        more = f" and {len(self.breaks) - 1} more position(s)" if len(self.breaks) > 1 else ""
        return (
            f"{n} layers break the full_attention_interval={self.interval} pattern: position {p} is {found} "
            f"where the interval says {want}{more}. A loader that derives the layout from the interval would "
            f"build the wrong blocks; {self.arch}.attention.recurrent_layers (one flag per block) keeps the "
            "output loadable, and surgery writes it"
        )

    @property
    def warnings(self) -> tuple[str, ...]:
        """Layouts that load in lemonslice but not in llama.cpp 0.3.36, which aborts
        (GGML_ASSERT(buffer)) when one of its two caches, attention or recurrent, has no layer."""
        for kind, missing in (("attention", all(self.recurrent)), ("recurrent", not any(self.recurrent))):
            if missing:
                return (f"no {kind} layer is left: lemonslice runs this, but llama.cpp (0.3.36) aborts on it "
                        f"because its {kind} cache would be empty",)
        return ()

    def to_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "ok": self.ok, "breaks": list(self.breaks),
                "recurrent": [int(r) for r in self.recurrent], "message": self.message,
                "warnings": list(self.warnings)}


@dataclass(frozen=True)
class SwaReport:
    """How a playlist's sliding-window/global layout compares with the period a reader
    derives it from when the file has no per-layer `sliding_window_pattern` array."""

    arch: str
    period: int
    swa: tuple[bool, ...]  # per trunk position: sliding window (True) or global
    breaks: tuple[int, ...]  # positions whose kind differs from the period rule

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def warnings(self) -> tuple[str, ...]:
        return ()

    @property
    def key(self) -> str:
        return arch_key(Keys.SLIDING_WINDOW_PATTERN, self.arch)

    @property
    def message(self) -> str:
        n = len(self.swa)
        if self.ok:
            return f"{n} layers follow sliding_window_pattern={self.period}: the layout needs no extra metadata"
        p = self.breaks[0]
        found, want = ("sliding-window", "global") if self.swa[p] else ("global", "sliding-window")
        more = f" and {len(self.breaks) - 1} more position(s)" if len(self.breaks) > 1 else ""
        return (
            f"{n} layers break the sliding_window_pattern={self.period} pattern: position {p} is {found} where "
            f"the period says {want}{more}. A loader that derives the layout from the period would give those "
            f"layers the wrong window and RoPE base; {self.key} as one flag per block (true: sliding window) "
            "keeps each block's own kind, and surgery writes it"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "period": self.period, "ok": self.ok, "breaks": list(self.breaks),
                "sliding_window": [int(f) for f in self.swa], "message": self.message, "warnings": []}


def swa_report(swa: Sequence[bool], period: int, arch: str, positional: Callable[[int, int], Sequence[bool]]
               ) -> SwaReport:
    """Compare per-position kinds with `positional(period, n)`, the family's rule without the array."""
    flags = tuple(bool(f) for f in swa)
    want = positional(period, len(flags))
    return SwaReport(arch, period, flags, tuple(i for i, f in enumerate(flags) if f != bool(want[i])))


def pattern_report(recurrent: Sequence[bool], interval: int, arch: str) -> PatternReport:
    """Compare per-position kinds with llama.cpp's rule: layer i is attention when (i + 1) % interval == 0."""
    rec = tuple(bool(r) for r in recurrent)
    breaks = tuple(i for i, r in enumerate(rec) if r != ((i + 1) % interval != 0))
    return PatternReport(arch, interval, rec, breaks)


def resolve_for(plan: Plan, base: SourceModel
                ) -> tuple[list[Entry], dict[str, SourceModel], PatternReport | SwaReport | None]:
    """Resolve `plan` on `base`, open and check its donors, and report the layout (models
    with two kinds of layers: hybrid recurrent/attention, or sliding-window/global)."""
    entries = plan.resolve(base.n_layer)
    donors: dict[str, SourceModel] = {}
    try:
        for e in entries:
            if e.source is not None and e.source not in donors:
                if not Path(e.source).exists():
                    raise PlanError(f"replace: donor model {e.source} does not exist")
                donors[e.source] = SourceModel(e.source)
        for e in dict.fromkeys(entries):
            if e.source is not None:
                check_donor(base, donors[e.source], e.layer)
    except BaseException:
        for d in donors.values():
            d.close()
        raise
    report: PatternReport | SwaReport | None = None
    model_of = [donors[e.source] if e.source else base for e in entries]
    if base.hybrid:
        kinds = [m.roles[e.layer] == Role.RECURRENT for m, e in zip(model_of, entries)]
        report = pattern_report(kinds, base.interval, base.arch or "")
    elif base.windowed:
        # Each position keeps the kind of the block it runs, as the engine's playlist does.
        swa = [m.args.swa[e.layer] for m, e in zip(model_of, entries)]
        report = swa_report(swa, base.swa_period, base.arch or "", base.family.positional_swa)
    return entries, donors, report


def playlist_and_report(plan: "str | os.PathLike[str] | Plan", model: "str | os.PathLike[str] | ModelFiles"
                        ) -> tuple[list[Any], "PatternReport | SwaReport | None"]:
    """The Engine playlist of `plan` on `model` (a .gguf or split directory, or one already
    opened, e.g. the engine's weight store): ints for the
    model's blocks, (donor path, block) pairs for replaced positions; donors are checked. Also
    the layout report (None for models with one kind of layer)."""
    p = load_plan(plan)
    if any(op.kind == "prune-experts" for op in p.ops):
        raise PlanError("prune-experts rewrites tensors: write the model with `lemonslice surgery` and run that")
    with SourceModel(model) as base:
        entries, donors, report = resolve_for(p, base)
        for d in donors.values():
            d.close()
    return [e.layer if e.source is None else (e.source, e.layer) for e in entries], report


def playlist_for(plan: "str | os.PathLike[str] | Plan", model: str | os.PathLike[str]) -> list[Any]:
    """`playlist_and_report` without the report."""
    return playlist_and_report(plan, model)[0]
