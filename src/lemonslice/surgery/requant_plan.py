"""Requantization plans: which llama.cpp file type each part of a model gets.

A plan is `KEY=VALUE` clauses separated by `;` or newlines, or the same pairs as a YAML/JSON
mapping:

    shared=Q8_0               the tensors outside every block, as `llama-quantize ... Q8_0` writes them
    0-9=Q4_K_M                blocks 0..9 as `llama-quantize ... Q4_K_M` writes them (ranges inclusive)
    *.attn_*=Q6_K             tensors whose name matches the glob (`*`, `?`) get this ggml type,
                              as `llama-quantize --tensor-type` gives it (first matching glob wins)

Values of `shared` and ranges are llama.cpp file types (llama-quantize's mixes); glob values
are ggml types. Types that llama.cpp quantizes only with an importance matrix are refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import PlanError, format_layers, parse_layers

__all__ = ["REQUANT_FORMAT", "REQUANT_PLAN_FORMAT", "RequantPlan", "load_requant_plan"]

REQUANT_PLAN_FORMAT = "lemonslice-requant-plan-v1"
REQUANT_FORMAT = "lemonslice-requant-v1"  # the record beside / inside a result; its "plan" re-runs
SHARED = "shared"

# llama.cpp's file types (`enum llama_ftype`), as llama-quantize names them.
FTYPE_NAMES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
    "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ2_XXS", "IQ2_XS", "Q2_K_S", "IQ3_XS", "IQ3_XXS",
    "IQ1_S", "IQ4_NL", "IQ3_S", "IQ3_M", "IQ2_S", "IQ2_M", "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4_MOE",
)
# Mixes whose tensors llama.cpp quantizes only with an importance matrix (llama-quant.cpp,
# tensor_requires_imatrix); requant takes none.
IMATRIX_FTYPES = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ1_S", "IQ1_M", "Q2_K_S"})
# ggml types a glob may ask for: those ggml quantizes from floats without an importance matrix.
GLOB_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "TQ1_0", "TQ2_0", "MXFP4")
IMATRIX_TYPES = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ1_S", "IQ1_M"})
_GLOB_RE = re.compile(r"^[A-Za-z0-9_.*?-]+$")
_HINT = "clauses are shared=FTYPE, A-B=FTYPE or GLOB=GGML_TYPE, e.g. 'shared=Q8_0; 0-9=Q4_K_M; *.attn_*=Q6_K'"


def _type(value: Any, where: str, known: tuple[str, ...], imatrix: frozenset[str], what: str) -> str:
    """`value` as one of `known`; refused when llama.cpp needs an importance matrix for it."""
    name = str(value).strip().upper()
    if name in imatrix:
        raise PlanError(f"{where}: llama.cpp quantizes {name} only with an importance matrix, which requant "
                        "does not take; choose another type")
    if name not in known:
        raise PlanError(f"{where}: unknown {what} {value!r} (known: {', '.join(known)})")
    return name


def _ftype(value: Any, where: str) -> str:
    return _type(value, where, FTYPE_NAMES, IMATRIX_FTYPES, "llama.cpp file type")


def _ggml_type(value: Any, where: str) -> str:
    return _type(value, where, GLOB_TYPES, IMATRIX_TYPES, "ggml type for a glob")


def glob_regex(glob: str) -> str:
    """The glob as a whole-name regex that Python's `re` and llama.cpp's std::regex read alike."""
    out = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
    return f"^{out}$"


@dataclass(frozen=True)
class RequantPlan:
    shared: str | None = None  # file type of the shared tensors; None: kept
    ranges: tuple[tuple[tuple[int, ...], str], ...] = ()  # (blocks, file type), in plan order
    globs: tuple[tuple[str, str], ...] = ()  # (glob on tensor names, ggml type), first match wins

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> "RequantPlan":
        if not pairs:
            raise PlanError(f"empty requant plan; {_HINT}")
        shared: str | None = None
        ranges: list[tuple[tuple[int, ...], str]] = []
        globs: list[tuple[str, str]] = []
        for key, value in pairs:
            where = f"{key}={value}"
            if key.lower() == SHARED:
                if shared is not None:
                    raise PlanError(f"{where}: 'shared' is given twice")
                shared = _ftype(value, where)
            elif key[:1].isdigit():
                ranges.append((parse_layers(key, f"{where}: layer range"), _ftype(value, where)))
            elif _GLOB_RE.match(key):
                if any(g == key for g, _ in globs):
                    raise PlanError(f"{where}: the glob {key!r} is given twice")
                globs.append((key, _ggml_type(value, where)))
            else:
                raise PlanError(f"{where}: {key!r} is neither 'shared', a layer range nor a tensor-name glob; {_HINT}")
        plan = cls(shared, tuple(ranges), tuple(globs))
        plan._check_overlaps()
        return plan

    @classmethod
    def from_spec(cls, spec: str) -> "RequantPlan":
        pairs: list[tuple[str, Any]] = []
        for clause in (c.strip() for c in re.split(r"[;\n]", spec)):
            if not clause:
                continue
            key, eq, value = clause.partition("=")
            if not eq or not key.strip() or not value.strip():
                raise PlanError(f"requant plan clause {clause!r}: expected KEY=TYPE; {_HINT}")
            pairs.append((key.strip(), value.strip()))
        return cls.from_pairs(pairs)

    @classmethod
    def from_dict(cls, d: Any) -> "RequantPlan":
        if isinstance(d, dict) and d.get("format") == REQUANT_FORMAT:
            d = d.get("plan")  # a requant record: re-run the plan it holds
        elif isinstance(d, dict) and isinstance(d.get("requant"), dict):
            d = d["requant"].get("plan")  # a split's manifest.json
        if not isinstance(d, dict):
            raise PlanError("a requant plan file holds a mapping such as {shared: Q8_0, '0-9': Q4_K_M}")
        if d.get("format", REQUANT_PLAN_FORMAT) != REQUANT_PLAN_FORMAT:
            raise PlanError(f"requant plan: format {d['format']!r} is not {REQUANT_PLAN_FORMAT}")
        return cls.from_pairs([(str(k), v) for k, v in d.items() if k != "format"])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RequantPlan":
        """A YAML or JSON file (JSON is YAML, so one parser reads both)."""
        import yaml

        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise PlanError(f"{path}: cannot read the plan ({e.strerror or e})") from None
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise PlanError(f"{path}: not a YAML/JSON plan ({str(e).splitlines()[0]})") from None
        try:
            return cls.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None

    def _check_overlaps(self) -> None:
        owner: dict[int, str] = {}
        for layers, _ in self.ranges:
            text = format_layers(layers)
            for i in layers:
                if i in owner:
                    raise PlanError(f"layer ranges {owner[i]} and {text} overlap (layer {i})")
                owner[i] = text

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": REQUANT_PLAN_FORMAT}
        if self.shared is not None:
            d[SHARED] = self.shared
        d.update({format_layers(layers): ft for layers, ft in self.ranges})
        d.update(dict(self.globs))
        return d

    @property
    def spec(self) -> str:
        return "; ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "format")

    def ftype_of(self, layer: int) -> str | None:
        return next((ft for layers, ft in self.ranges if layer in layers), None)

    def glob_type(self, name: str) -> str | None:
        """The ggml type the first matching glob gives tensor `name`, if any."""
        return next((t for g, t in self.globs if re.match(glob_regex(g), name)), None)

    @property
    def ftypes(self) -> list[str]:
        """Distinct file types, shared first: one llama.cpp run each."""
        seen = ([self.shared] if self.shared else []) + [ft for _, ft in self.ranges]
        return list(dict.fromkeys(seen))

    def check(self, block_count: int, names: list[str]) -> None:
        """Refuse ranges past the model's blocks and globs that match none of its tensors."""
        for layers, ft in self.ranges:
            bad = [i for i in layers if i >= block_count]
            if bad:
                raise PlanError(f"{format_layers(layers)}={ft}: layer(s) {format_layers(bad)} out of range; "
                                f"the model has blocks 0-{block_count - 1}")
        for g, t in self.globs:
            if not any(re.match(glob_regex(g), n) for n in names):
                raise PlanError(f"{g}={t}: the glob matches no tensor of the model (names look like "
                                f"'blk.0.attn_q.weight')")


def load_requant_plan(plan: "str | os.PathLike[str] | RequantPlan") -> RequantPlan:
    """A plan from a plan, a file (.yaml/.yml/.json, or any existing file) or a spec string."""
    if isinstance(plan, RequantPlan):
        return plan
    text = os.fspath(plan)
    p = Path(text)
    # A spec may be too long for a file name: only a short one can be a file.
    if isinstance(plan, os.PathLike) or p.suffix.lower() in (".yaml", ".yml", ".json") or (
            len(text) < 256 and p.is_file()):
        return RequantPlan.load(p)
    return RequantPlan.from_spec(text)
