"""Write a plan's playlist as a model: one GGUF file, or a lemonslice-gguf-v1 split directory.

Block tensors are renamed to their new position (`blk.L.*` -> `blk.P.*`), MTP (nextn)
blocks follow the new trunk, `block_count` is updated, and the architecture's per-layer
layout key is written when the layout no longer follows the period a reader would derive it
from (or the source has the array already): `{arch}.attention.recurrent_layers` against
`full_attention_interval` (Qwen3.5), `{arch}.attention.sliding_window_pattern` as one flag
per block, true for sliding window, against its period (Gemma 3). An architecture whose
layout surgery cannot write that way is refused. Every output is staged and renamed into
place only when complete.

Provenance (source hash and source layer of every block) goes into the split's manifest.json
under "surgery", or beside a single file as `OUT.gguf.surgery.json`.

Sharing in split outputs: each layer file repeats the model's KV pairs (block_count among
them) and names its own block, so an output file can equal a source file byte for byte only
when the header is unchanged (same block count and layout keys) and the block keeps its
position. Such files (e.g. every layer but the replaced one after a `replace`) are hard-linked
to the source split's file, or reflinked where links are refused; any plan that changes the
block count shares nothing. lemonslice never writes a file in place, so sharing inodes is safe.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import LemonsliceError
from ..gguf.constants import (
    BLOCK_PREFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYER_FILE,
    MANIFEST_NAME,
    SHARED_FILE,
    WRITE_VERSION,
    GGMLType,
    Keys,
    Role,
    ValueType,
    arch_key,
    block_index,
    block_suffix,
)
from ..gguf.writer import FilePlan, copy_range, encode_kv, plan_file
from ..slicing.atomic import staged_dir, staged_file
from ..slicing.manifest import FileEntry, Manifest, SourceInfo, TensorEntry
from .plan import (
    LAYOUT_KEYS,
    SURGERY_FORMAT,
    Entry,
    PatternReport,
    Plan,
    PlanError,
    SourceModel,
    SwaReport,
    load_plan,
    per_layer_keys_check,
    resolve_for,
)
from .prune import ROUTER, LayerPrune, expert_count_kv, expert_slice, plan_prunes, prune_summary

Progress = Callable[[int, int], None]
SIDECAR = "{name}.surgery.json"
_CHUNK = 8 << 20
_FICLONE = 0x40049409  # ioctl: share all of a file's extents (btrfs, xfs)
# A new layout key goes after the key holding the period it replaces (else after block_count).
_LAYOUT_ANCHORS = {Keys.RECURRENT_LAYERS: Keys.FULL_ATTENTION_INTERVAL,
                   Keys.SLIDING_WINDOW_PATTERN: Keys.SLIDING_WINDOW}


@dataclass(frozen=True)
class _Tensor:
    name: str  # in the output
    shape: tuple[int, ...]
    ggml_type: GGMLType
    src: Path  # the file holding its bytes
    ranges: tuple[tuple[int, int], ...]  # (absolute offset there, bytes), laid end to end in the output

    @property
    def start(self) -> int:
        return self.ranges[0][0]

    @property
    def n_bytes(self) -> int:
        return sum(n for _, n in self.ranges)


@dataclass
class _Block:
    """One block of the output: where it comes from and what it holds."""

    index: int
    role: Role
    model: SourceModel
    layer: int
    tensors: list[_Tensor] = field(default_factory=list)


@dataclass
class SurgeryResult:
    path: Path
    split: bool
    n_trunk: int  # trunk blocks of the output
    block_count: int  # trunk + MTP
    report: PatternReport | SwaReport | None  # None for a model with one kind of layer
    recurrent_layers: bool  # whether the output carries {arch}.attention.recurrent_layers
    record: dict[str, Any]  # the provenance written beside / into the output
    linked: list[str]  # split files shared with a source file instead of written
    written_bytes: int
    layout_key: str | None = None  # the per-layer layout key written, if any


@dataclass
class _Layout:
    base: SourceModel
    donors: dict[str, SourceModel]
    entries: list[Entry]
    report: PatternReport | SwaReport | None
    blocks: list[_Block]  # trunk then MTP, in output order
    before: list[_Tensor]  # shared tensors ahead of the blocks, and after them
    after: list[_Tensor]
    kv_records: list[bytes]
    kv_keys: list[str]
    layout_key: str | None  # the per-layer layout key written, if any
    prunes: dict[int, LayerPrune] = field(default_factory=dict)  # base layer -> the experts it keeps

    @property
    def recurrent_layers(self) -> bool:
        return self.layout_key == arch_key(Keys.RECURRENT_LAYERS, self.base.arch or "")

    @property
    def tensors(self) -> list[_Tensor]:
        return self.before + [t for b in self.blocks for t in b.tensors] + self.after

    def close(self) -> None:
        for d in self.donors.values():
            d.close()


def _layout(plan: Plan, base: SourceModel) -> _Layout:
    per_layer_keys_check(base)
    entries, donors, report = resolve_for(plan, base)
    arch = base.arch or ""
    block_count = getattr(base.args, "block_count", base.n_layer)
    mtp = [b for b in sorted(base.blocks) if base.n_layer <= b < block_count]
    n_trunk = len(entries)
    blocks = [_Block(p, (donors[e.source] if e.source else base).roles[e.layer],
                     donors[e.source] if e.source else base, e.layer) for p, e in enumerate(entries)]
    blocks += [_Block(n_trunk + k, base.roles[b], base, b) for k, b in enumerate(mtp)]
    prunes = _prunes(plan, base, entries, donors)
    for b in blocks:
        keep = prunes.get(b.layer) if b.model is base else None
        for t, path in b.model.blocks[b.layer]:
            name = BLOCK_PREFIX.format(bid=b.index) + block_suffix(t.name)
            shape, ranges = expert_slice(t, keep)
            b.tensors.append(_Tensor(name, shape, t.ggml_type, path, ranges))

    # Shared tensors keep their place around the blocks (token_embd ahead, output after).
    before: list[_Tensor] = []
    after: list[_Tensor] = []
    seen_block = False
    for t, path in base.tensors:
        if block_index(t.name) is not None:
            seen_block = True
            continue
        whole = ((t.data_start, t.n_bytes),)
        (after if seen_block else before).append(_Tensor(t.name, t.shape, t.ggml_type, path, whole))

    try:
        layout = _layout_flags(base, blocks, report)
    except PlanError:
        for d in donors.values():
            d.close()
        raise
    records, keys = _kv_records(base, n_trunk + len(mtp), layout)
    if prunes:
        records = expert_count_kv(base, records, keys, _expert_counts(blocks))
    key = arch_key(layout[0], arch) if layout is not None else None
    return _Layout(base, donors, entries, report, blocks, before, after, records, keys, key, prunes)


def _prunes(plan: Plan, base: SourceModel, entries: list[Entry], donors: dict[str, SourceModel]
            ) -> dict[int, LayerPrune]:
    """The plan's expert pruning, checked; the donors are closed on a refusal."""
    try:
        return plan_prunes(plan, base, entries)
    except PlanError:
        for d in donors.values():
            d.close()
        raise


def _expert_counts(blocks: list[_Block]) -> list[int]:
    """The routed-expert count of every output block that has a router (its rows)."""
    router = "." + ROUTER
    return [t.shape[-1] for b in blocks for t in b.tensors if t.name.endswith(router)]


def _layout_flags(base: SourceModel, blocks: list[_Block], report: PatternReport | SwaReport | None
                  ) -> tuple[str, list[bool]] | None:
    """(layout key template, one flag per output block) when the output needs the per-layer
    key: the plan moves layers off the period's pattern, or the source has the array already."""
    if report is None:
        return None
    arch = base.arch or ""
    src = next((e for e in base.kvs if e.key == report.key), None)
    if report.ok and (src is None or src.count is None):
        return None
    template = LAYOUT_KEYS.get(arch)
    if template is None or arch_key(template, arch) != report.key:
        raise PlanError(f"{arch}: the plan moves layers off the positional layer pattern and llama.cpp reads no "
                        "per-layer layout key for this architecture, so no file can keep them; "
                        "run the plan with --layers instead")
    if isinstance(report, PatternReport):
        return template, [b.role == Role.RECURRENT for b in blocks]
    # Sliding window: each block keeps its source's kind; MTP blocks (none in Gemma 3) are global.
    return template, [b.role != Role.MTP and bool(b.model.args.swa[b.layer]) for b in blocks]


def _kv_records(base: SourceModel, block_count: int, layout: tuple[str, list[bool]] | None
                ) -> tuple[list[bytes], list[str]]:
    """The base's KV records with block_count (and the per-layer layout key) set for the new
    layout. The source's layout array is replaced, or dropped when the output needs none."""
    arch = base.arch or ""
    bc_key = arch_key(Keys.BLOCK_COUNT, arch)
    keys = [e.key for e in base.kvs]
    if bc_key not in keys:
        raise LemonsliceError(f"{base.path}: metadata lacks {bc_key}")
    template = layout[0] if layout is not None else LAYOUT_KEYS.get(arch)
    lk = arch_key(template, arch) if template else None
    anchor = arch_key(_LAYOUT_ANCHORS[template], arch) if template else bc_key
    anchor = anchor if anchor in keys else bc_key
    new = encode_kv(lk, ValueType.ARRAY, layout[1], ValueType.BOOL) if layout is not None and lk else None
    records: list[bytes] = []
    out_keys: list[str] = []
    for e in base.kvs:
        if e.key == bc_key:
            records.append(encode_kv(bc_key, e.vtype, block_count))
        elif e.key == lk and new is not None:
            records.append(new)
            new = None
        elif e.key == lk and e.count is not None:
            continue  # a per-block array of the old layout
        else:
            records.append(e.raw)
        out_keys.append(e.key)
        if e.key == anchor and new is not None and lk not in keys:
            records.append(new)
            out_keys.append(lk)
            new = None
    return records, out_keys


def _record(plan: Plan, lay: _Layout, files: dict[int, tuple[str, bool]] | None) -> dict[str, Any]:
    """Provenance: the plan, the source and, per output block, the model and layer it came from."""
    layers = []
    for b in lay.blocks:
        row: dict[str, Any] = {"position": b.index, "role": b.role.value, "model": str(b.model.path),
                               "model_sha256": b.model.sha256(), "layer": b.layer}
        if b.model.manifest is not None:
            src_file = b.model.layer_file(b.layer)
            row["source_file_sha256"] = b.model.file_sha256(src_file) if src_file else None
        if files is not None:
            row["file"], row["linked"] = files[b.index]
        if b.model is lay.base and b.layer in lay.prunes:
            row["pruned_experts"] = lay.prunes[b.layer].to_dict()
        layers.append(row)
    n_mtp = sum(b.role == Role.MTP for b in lay.blocks)
    return {
        "format": SURGERY_FORMAT,
        "plan": plan.to_dict(resolve_paths=True),
        "source": {"path": str(lay.base.path), "sha256": lay.base.sha256(), "trunk_layers": lay.base.n_layer},
        "trunk_layers": len(lay.blocks) - n_mtp,
        "block_count": len(lay.blocks),
        "nextn_predict_layers": n_mtp,
        "recurrent_layers_written": lay.recurrent_layers,
        "layout_key_written": lay.layout_key,
        "layout": lay.report.to_dict() if lay.report is not None else None,
        **({"routed_experts": prune_summary(lay.base, _expert_counts(lay.blocks))} if lay.prunes else {}),
        "layers": layers,
    }


def surgery(
    plan: "str | os.PathLike[str] | Plan",
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    split: bool | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> SurgeryResult:
    """Write `plan` applied to `src` (a .gguf or split directory) to `out`: one GGUF file when
    `split` is False (default: when `out` ends in .gguf), else a split directory.

    Every check (plan, donors, output path) runs before anything is written; a failure leaves
    no output behind."""
    p = load_plan(plan)
    out = Path(out)
    split = out.suffix.lower() != ".gguf" if split is None else split
    with SourceModel(src) as base:
        lay = _layout(p, base)
        try:
            inputs = (base.path, *(Path(d) for d in lay.donors))
            if split:
                return _write_split(p, lay, out, force, inputs, progress)
            return _write_single(p, lay, out, force, inputs, progress)
        finally:
            lay.close()


class _Tick:
    def __init__(self, total: int, progress: Progress | None):
        self.done, self.total, self.progress = 0, total, progress

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, self.total)


def _hash_sources(lay: _Layout, tensor_bytes: int, progress: Progress | None) -> _Tick:
    """Hash the single-file models the output reads (their hashes are its provenance)."""
    models = [lay.base, *lay.donors.values()]
    to_hash = sum(m.path.stat().st_size for m in models if m.manifest is None)
    tick = _Tick(to_hash + tensor_bytes, progress)
    for m in models:
        m.sha256(tick)
    return tick


def _write_single(plan: Plan, lay: _Layout, out: Path, force: bool, inputs: tuple[Path, ...],
                  progress: Progress | None) -> SurgeryResult:
    tensors = lay.tensors
    fp = plan_file(lay.kv_records, [(t.name, t.shape, t.ggml_type) for t in tensors], lay.base.alignment)
    sidecar = out.with_name(SIDECAR.format(name=out.name))
    with staged_file(out, force, inputs) as tmp, staged_file(sidecar, force, inputs) as tmp_json:
        tick = _hash_sources(lay, fp.size, progress)
        fds: dict[Path, int] = {}
        dst = os.open(tmp, os.O_RDWR | os.O_TRUNC)
        try:
            os.pwrite(dst, fp.padded_header(), 0)
            os.ftruncate(dst, fp.size)
            for t, pt in zip(tensors, fp.tensors):
                if t.src not in fds:
                    fds[t.src] = os.open(t.src, os.O_RDONLY)
                at = fp.data_offset + pt.offset
                for start, n in t.ranges:
                    copy_range(fds[t.src], start, dst, at, n)
                    at += n
                tick(t.n_bytes)
            os.fsync(dst)
        except EOFError:
            raise LemonsliceError(f"{t.src} ended early (changed during the surgery?); nothing was written") from None
        finally:
            os.close(dst)
            for fd in fds.values():
                os.close(fd)
        record = _record(plan, lay, None)
        write_json(tmp_json, record)
    return SurgeryResult(out, False, len(lay.entries), len(lay.blocks), lay.report, lay.recurrent_layers, record,
                         [], fp.size, lay.layout_key)


def write_json(path: Path, d: Any) -> None:
    """`d` as indented JSON at `path`, fsynced (a manifest or a provenance record)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(d, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _ls_kvs(layer: int, role: Role) -> list[bytes]:
    return [
        encode_kv(Keys.LS_FORMAT, ValueType.STRING, FORMAT_NAME),
        encode_kv(Keys.LS_LAYER_INDEX, ValueType.INT32, layer),
        encode_kv(Keys.LS_ROLE, ValueType.STRING, role.value),
    ]


@dataclass
class _OutFile:
    name: str
    layer: int | None
    role: Role
    tensors: list[_Tensor]
    plan: FilePlan
    linked: bool = False
    fd: int = -1
    hasher: Any = None
    hashed_to: int = 0
    sha256: str = ""

    def feed(self, upto: int, data: memoryview | bytes) -> None:
        """Hash zero padding up to `upto`, then `data`, keeping file order."""
        if upto > self.hashed_to:
            self.hasher.update(bytes(upto - self.hashed_to))
        self.hasher.update(data)
        self.hashed_to = upto + len(data)


def _same_bytes(f: _OutFile, model: SourceModel) -> Path | None:
    """The source split file `f` would equal byte for byte, if any: the same header, size and
    tensor offsets, every tensor read from that file."""
    srcs = {t.src for t in f.tensors}
    if model.manifest is None or len(srcs) != 1:
        return None
    (src,) = srcs
    r = model.reader(src)
    if r.file_size != f.plan.size or r.data_offset != f.plan.data_offset:
        return None
    if any(len(t.ranges) != 1 or t.start != f.plan.data_offset + pt.offset
           for t, pt in zip(f.tensors, f.plan.tensors)):
        return None
    with open(src, "rb") as fh:
        head = fh.read(f.plan.data_offset)
    return src if head == f.plan.padded_header() else None


def share_file(src: Path, dst: Path) -> bool:
    """Share `src` as `dst`: a hard link, else a reflink (copy-on-write clone); False if neither works."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        pass
    try:
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
        return True
    except OSError as e:
        dst.unlink(missing_ok=True)
        if e.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EPERM, errno.ENOSYS):
            raise
        return False


def _chunks(t: _Tensor) -> Iterator[tuple[int, int, int]]:
    """(source offset, offset within the output tensor, length) of pieces of at most _CHUNK bytes."""
    done = 0
    for start, size in t.ranges:
        for k in range(0, size, _CHUNK):
            n = min(_CHUNK, size - k)
            yield start + k, done, n
            done += n


def _write_split(plan: Plan, lay: _Layout, out: Path, force: bool, inputs: tuple[Path, ...],
                 progress: Progress | None) -> SurgeryResult:
    tensors = lay.tensors
    mono = plan_file(lay.kv_records, [(t.name, t.shape, t.ggml_type) for t in tensors], lay.base.alignment)
    mono_off = {pt.name: mono.data_offset + pt.offset for pt in mono.tensors}
    groups: list[tuple[str, int | None, Role, list[_Tensor], SourceModel]] = [
        (SHARED_FILE, None, Role.SHARED, lay.before + lay.after, lay.base)]
    groups += [(LAYER_FILE.format(index=b.index), b.index, b.role, b.tensors, b.model) for b in lay.blocks]
    # Each file's data follows the single file's order, so one pass writes every file sequentially.
    order = {t.name: i for i, t in enumerate(tensors)}
    files: list[_OutFile] = []
    for name, layer, role, ts, _ in groups:
        ts = sorted(ts, key=lambda t: order[t.name])
        fp = plan_file(lay.kv_records + _ls_kvs(-1 if layer is None else layer, role),
                       [(t.name, t.shape, t.ggml_type) for t in ts], lay.base.alignment)
        files.append(_OutFile(name, layer, role, ts, fp))
    dest = {t.name: (f, f.plan.data_offset + pt.offset) for f in files for t, pt in zip(f.tensors, f.plan.tensors)}

    with staged_dir(out, force, inputs) as tmp:
        tick = _hash_sources(lay, sum(t.n_bytes for t in tensors), progress)
        src_fds: dict[Path, int] = {}
        linked: list[str] = []
        try:
            for f, (_, _, _, _, model) in zip(files, groups):
                same = _same_bytes(f, model)
                if same is not None and share_file(same, tmp / f.name):
                    f.linked = True
                    f.sha256 = model.file_sha256(same) or ""
                    linked.append(f.name)
                    continue
                f.fd = os.open(tmp / f.name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                header = f.plan.padded_header()
                os.pwrite(f.fd, header, 0)
                os.ftruncate(f.fd, f.plan.size)
                f.hasher, f.hashed_to = hashlib.sha256(header), len(header)
            mono_hash = hashlib.sha256(mono.padded_header())
            mono_pos = mono.data_offset
            buf = bytearray(_CHUNK)
            for t in tensors:
                if t.src not in src_fds:
                    src_fds[t.src] = os.open(t.src, os.O_RDONLY)
                f, off = dest[t.name]
                start = mono_off[t.name]
                if start > mono_pos:
                    mono_hash.update(bytes(start - mono_pos))
                for src_at, done, n in _chunks(t):
                    view = memoryview(buf)[:n]
                    if os.preadv(src_fds[t.src], [view], src_at) != n:
                        raise LemonsliceError(f"{t.src} ended early: did it change during the surgery? "
                                              "nothing was written")
                    mono_hash.update(view)
                    if not f.linked:
                        os.pwrite(f.fd, view, off + done)
                        f.feed(off + done, view)
                    tick(n)
                mono_pos = start + t.n_bytes
            if mono.size > mono_pos:
                mono_hash.update(bytes(mono.size - mono_pos))
            for f in files:
                if not f.linked:
                    if f.plan.size > f.hashed_to:
                        f.hasher.update(bytes(f.plan.size - f.hashed_to))
                    f.sha256 = f.hasher.hexdigest()
                    os.fsync(f.fd)
        finally:
            for f in files:
                if f.fd >= 0:
                    os.close(f.fd)
                    f.fd = -1
            for fd in src_fds.values():
                os.close(fd)

        manifest = Manifest(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            architecture=lay.base.arch,
            block_count=len(lay.blocks),
            alignment=lay.base.alignment,
            # The split describes the single file surgery would write: `merge` rebuilds it.
            source=SourceInfo(
                name=f"{out.name}.gguf", size=mono.size, sha256=mono_hash.hexdigest(), gguf_version=WRITE_VERSION,
                data_offset=mono.data_offset, kv_order=lay.kv_keys, tensor_order=[t.name for t in tensors],
            ),
            files=[
                FileEntry(f.name, f.role.value, f.layer, len(f.tensors), f.plan.size, f.sha256,
                          [TensorEntry(t.name, t.ggml_type.name, list(t.shape), t.n_bytes,
                                       mono_off[t.name] - mono.data_offset) for t in f.tensors])
                for f in files
            ],
        )
        file_of = {f.layer: (f.name, f.linked) for f in files if f.layer is not None}
        record = _record(plan, lay, file_of)
        d = dataclasses.asdict(manifest)
        d["surgery"] = record
        write_json(tmp / MANIFEST_NAME, d)
    written = sum(f.plan.size for f in files if not f.linked)
    return SurgeryResult(out, True, len(lay.entries), len(lay.blocks), lay.report, lay.recurrent_layers, record,
                         linked, written, lay.layout_key)
