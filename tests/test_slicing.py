"""The lemonslice-gguf-v1 layer split (library API): round trips, standalone layer files,
the manifest, verify, merge's hash check, and a source that changes during the split.

Every expected value comes from an independent reference: gguf-py's GGUFReader on the
source, hashlib, byte comparison, or values written out by hand here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import pytest
from gguf_refs import GEMMA_SHA256, GEMMA_SIZE, GGUFPy
from gguf import GGUFValueType

from lemonslice.errors import LemonsliceError
from lemonslice.slicing import merge_split, split_gguf, verify_split
from lemonslice.slicing import split as split_mod

GEMMA_LAYERS = 18
GEMMA_VOCAB = 262_144
FORMAT = "lemonslice-gguf-v1"
LS_KEYS = {"lemonslice.format", "lemonslice.layer_index", "lemonslice.role"}
BLK = re.compile(r"^blk\.(\d+)\.")

# The synthetic hybrid model: 8 trunk blocks, full attention every 4th (blocks 3 and 7),
# the rest recurrent (ssm), then one MTP (nextn) block 8. Written out by hand.
SYN_ROLES = {0: "recurrent", 1: "recurrent", 2: "recurrent", 3: "attention",
             4: "recurrent", 5: "recurrent", 6: "recurrent", 7: "attention", 8: "mtp"}
SYN_TYPES = {
    "experts": "Q4_0", "attention": "F16", "output": "Q5_1", "embeddings": "BF16",
    "linear_attention": "Q4_1", "nextn": "Q5_0", "shared_expert": "Q8_0",
}



def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(8 << 20):
            h.update(b)
    return h.hexdigest()


def layer_file(n: int) -> str:
    return f"layer_{n:04d}.gguf"


def expected_groups(src: gguf.GGUFReader) -> dict[str, list]:
    """Output file name -> the source tensors it must hold (gguf-py's read of the source)."""
    groups: dict[str, list] = {"shared.gguf": []}
    for t in src.tensors:
        m = BLK.match(t.name)
        groups.setdefault("shared.gguf" if m is None else layer_file(int(m.group(1))), []).append(t)
    return groups


def kv_keys(r: gguf.GGUFReader) -> list[str]:
    return [k for k in r.fields if not k.startswith("GGUF.")]


def assert_kv_equal(key: str, a, b) -> None:
    assert a.types == b.types, key
    if a.types[0] == GGUFValueType.ARRAY and len(a.data) > 256:
        # Long arrays (vocabularies): length, both ends and a strided sample.
        assert len(a.data) == len(b.data), key
        for sl in (slice(0, 64), slice(-64, None), slice(None, None, 499)):
            assert a.contents(sl) == b.contents(sl), (key, sl)
    else:
        assert a.contents() == b.contents(), key


def tensor_bytes(t) -> bytes:
    return np.ascontiguousarray(t.data).tobytes()


# ---- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gemma_src(gemma_path):
    return GGUFPy(gemma_path)


@pytest.fixture(scope="session")
def gemma_split(gemma_path, tmp_path_factory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("gemma") / "split"
    split_gguf(gemma_path, out)
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def syn_path(tmp_path_factory) -> Path:
    from lemonslice.testing import tiny_qwen35moe, write_synthetic

    path = tmp_path_factory.mktemp("syn") / "tiny-qwen35moe-mtp.gguf"
    write_synthetic(path, tiny_qwen35moe(mtp=True, type_overrides=SYN_TYPES))
    return path


@pytest.fixture(scope="session")
def syn_src(syn_path):
    return GGUFPy(syn_path)


# ---- 1. round trip --------------------------------------------------------------------


def test_gemma_round_trip_is_byte_exact(gemma_path, gemma_split, tmp_path):
    assert gemma_path.stat().st_size == GEMMA_SIZE
    merged = tmp_path / "merged.gguf"
    merge_split(gemma_split, merged)
    assert merged.stat().st_size == GEMMA_SIZE
    assert sha256(merged) == GEMMA_SHA256
    assert [p.name for p in tmp_path.iterdir()] == ["merged.gguf"]
    merged.unlink()


def test_synthetic_round_trip_is_byte_exact(syn_path, syn_src, syn_split, tmp_path):
    # The source really is the hybrid MTP model with mixed quant types.
    types = {t.tensor_type.name for t in syn_src.tensors}
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"} <= types
    assert any(t.name.startswith("blk.8.nextn.") for t in syn_src.tensors)
    merged = tmp_path / "merged.gguf"
    merge_split(syn_split, merged)
    assert merged.read_bytes() == syn_path.read_bytes()


def _odd_gguf(path: Path) -> bytes:
    """A hand-built GGUF v3 with an unusual but valid layout: alignment 64, tensor data in
    the reverse of the header's order, non-zero bytes in the header padding, between
    tensors and after the last one, and a source key in the reserved lemonslice.* space."""

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kvs = [
        s("general.architecture") + struct.pack("<I", 8) + s("llama"),
        s("general.alignment") + struct.pack("<II", 4, 64),
        s("llama.block_count") + struct.pack("<II", 4, 2),
        s("lemonslice.role") + struct.pack("<I", 8) + s("bogus"),
        s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + s("a") + s("b") + s("<s>"),
        s("llama.rope.freq_base") + struct.pack("<If", 6, 10000.0),
    ]
    # (name, ggml shape, type, n_bytes); types: F32=0, F16=1, Q8_0=8.
    tensors = [
        ("token_embd.weight", (16, 3), 0, 192),
        ("blk.0.attn_q.weight", (8, 2), 0, 64),
        ("blk.1.ffn_up.weight", (32,), 1, 64),
        ("blk.0.ffn_norm.weight", (4,), 0, 16),
        ("output.weight", (32, 2), 8, 68),
    ]
    offsets, pos = {}, 0
    for name, _, _, n in reversed(tensors):
        offsets[name] = pos
        pos = (pos + n + 64 + 63) // 64 * 64  # a whole extra 64-byte slot of garbage after each
    infos = b"".join(
        s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        + struct.pack("<IQ", typ, offsets[name])
        for name, shape, typ, _ in tensors
    )
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + infos
    data_offset = (len(header) + 63) // 64 * 64
    rng = np.random.default_rng(7)
    body = bytearray(rng.integers(1, 256, pos + 37, dtype=np.uint8).tobytes())  # no zero byte
    blob = header + b"\xee" * (data_offset - len(header)) + bytes(body)
    path.write_bytes(blob)
    return blob


def test_unusual_layout_round_trip_is_byte_exact(tmp_path):
    src = tmp_path / "odd.gguf"
    blob = _odd_gguf(src)
    ref = GGUFPy(src)
    assert [t.name for t in ref.tensors][0] == "token_embd.weight"  # gguf-py accepts the file
    split_gguf(src, tmp_path / "split")
    assert verify_split(tmp_path / "split") == []
    merge_split(tmp_path / "split", tmp_path / "merged.gguf")
    assert (tmp_path / "merged.gguf").read_bytes() == blob
    for name, want in expected_groups(ref).items():
        out = GGUFPy(tmp_path / "split" / name)
        assert sorted(t.name for t in out.tensors) == sorted(t.name for t in want)
        src_map = {t.name: t for t in ref.tensors}
        for t in out.tensors:
            assert tensor_bytes(t) == tensor_bytes(src_map[t.name]), t.name
        assert out.fields["lemonslice.format"].contents() == FORMAT
        assert out.fields["lemonslice.role"].contents() == ("shared" if name == "shared.gguf" else "dense")


# ---- 2. standalone layer files ----------------------------------------------------------


def check_standalone(src: gguf.GGUFReader, path: Path, role: str, layer: int | None) -> None:
    """`path` opens in gguf-py and holds exactly its block's tensors (bytes equal to the
    source's) and every source KV with an equal value, plus the lemonslice.* keys."""
    out = GGUFPy(path)
    want = expected_groups(src)[path.name]
    assert want, "an output file for a block the source does not have"
    assert sorted(t.name for t in out.tensors) == sorted(t.name for t in want)
    assert len(out.tensors) == len(want)
    src_map = {t.name: t for t in src.tensors}
    for t in out.tensors:
        s = src_map[t.name]
        assert t.tensor_type == s.tensor_type, t.name
        assert list(t.shape) == list(s.shape), t.name
        assert t.n_bytes == s.n_bytes, t.name
        assert tensor_bytes(t) == tensor_bytes(s), t.name

    src_keys, out_keys = kv_keys(src), kv_keys(out)
    assert set(out_keys) - set(src_keys) == LS_KEYS
    assert set(src_keys) <= set(out_keys)
    for key in src_keys:
        assert_kv_equal(key, out.fields[key], src.fields[key])
    assert len(out.fields["tokenizer.ggml.tokens"].data) == len(src.fields["tokenizer.ggml.tokens"].data)
    assert out.fields["general.architecture"].contents() == src.fields["general.architecture"].contents()

    assert out.fields["lemonslice.format"].contents() == FORMAT
    assert out.fields["lemonslice.role"].contents() == role
    index = out.fields["lemonslice.layer_index"].contents()
    if layer is None:
        assert index < 0  # shared.gguf belongs to no layer
    else:
        assert index == layer


@pytest.mark.parametrize("layer", [None, *range(GEMMA_LAYERS)], ids=lambda v: "shared" if v is None else f"L{v}")
def test_gemma_files_stand_alone(gemma_src, gemma_split, layer):
    assert len(gemma_src.fields["tokenizer.ggml.tokens"].data) == GEMMA_VOCAB
    name = "shared.gguf" if layer is None else layer_file(layer)
    check_standalone(gemma_src, gemma_split / name, "shared" if layer is None else "dense", layer)


def test_synthetic_files_stand_alone(syn_src, syn_split):
    # Hand-built: 8 trunk blocks + 1 MTP block.
    assert sorted(p.name for p in syn_split.iterdir()) == sorted(
        [".lemonslice-verified.json", "manifest.json", "shared.gguf", *(layer_file(i) for i in range(9))]
    )
    check_standalone(syn_src, syn_split / "shared.gguf", "shared", None)
    for i, role in SYN_ROLES.items():
        check_standalone(syn_src, syn_split / layer_file(i), role, i)


@pytest.mark.parametrize("model", ["gemma", "synthetic"])
def test_manifest_content(model, request):
    src_path: Path = request.getfixturevalue("gemma_path" if model == "gemma" else "syn_path")
    src: gguf.GGUFReader = request.getfixturevalue("gemma_src" if model == "gemma" else "syn_src")
    split_dir: Path = request.getfixturevalue("gemma_split" if model == "gemma" else "syn_split")
    roles = {i: "dense" for i in range(GEMMA_LAYERS)} if model == "gemma" else SYN_ROLES

    m = json.loads((split_dir / "manifest.json").read_text())
    assert m["format"] == FORMAT
    assert m["format_version"] == 1
    assert m["architecture"] == src.fields["general.architecture"].contents()
    arch = m["architecture"]
    assert m["block_count"] == src.fields[f"{arch}.block_count"].contents() == len(roles)

    s = m["source"]
    assert s["name"] == src_path.name
    assert s["size"] == src_path.stat().st_size
    assert s["sha256"] == sha256(src_path)
    if model == "gemma":
        assert (s["size"], s["sha256"]) == (GEMMA_SIZE, GEMMA_SHA256)
    assert s["tensor_order"] == [t.name for t in src.tensors]
    assert s["kv_order"] == kv_keys(src)

    groups = expected_groups(src)
    assert set(groups) == {"shared.gguf", *(layer_file(i) for i in roles)}
    files = {f["name"]: f for f in m["files"]}
    assert len(files) == len(m["files"])
    assert set(files) == set(groups)
    assert {p.name for p in split_dir.iterdir()} == set(groups) | {"manifest.json", ".lemonslice-verified.json"}
    for name, f in files.items():
        path = split_dir / name
        assert f["sha256"] == sha256(path), name
        assert f["size"] == path.stat().st_size, name
        assert f["tensor_count"] == len(groups[name]) == len(f["tensors"]), name
        if name == "shared.gguf":
            assert (f["role"], f["layer"]) == ("shared", None)
        else:
            layer = int(name[len("layer_"):-len(".gguf")])
            assert (f["role"], f["layer"]) == (roles[layer], layer)
        want = {t.name: t for t in groups[name]}
        assert sorted(t["name"] for t in f["tensors"]) == sorted(want)
        for t in f["tensors"]:
            ref = want[t["name"]]
            assert t["bytes"] == int(ref.n_bytes), t["name"]
            assert t["type"] == ref.tensor_type.name, t["name"]
            assert t["shape"] == [int(d) for d in ref.shape], t["name"]
            # Offsets are relative to the source's data section.
            assert t["offset"] == int(ref.data_offset) - src.data_offset, t["name"]
    assert sum(f["size"] for f in files.values()) == sum(p.stat().st_size for p in split_dir.glob("*.gguf"))


# ---- 3. verify (library) ----------------------------------------------------------------


def test_verify_intact(gemma_split, syn_split):
    assert verify_split(gemma_split) == []
    assert verify_split(syn_split) == []


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _tensor_offset(path: Path) -> int:
    """Absolute offset of a byte inside the first tensor's data, found by gguf-py."""
    t = GGUFPy(path).tensors[0]
    return int(t.data_offset) + int(t.n_bytes) // 2


def _problems(directory: Path) -> set[tuple[str, str]]:
    return {(p.file, p.kind) for p in verify_split(directory)}


@pytest.mark.parametrize("damage", ["missing", "extra", "truncated", "flipped", "symlink_out"])
def test_verify_reports_damage(syn_copy, tmp_path, damage):
    d, victim = syn_copy, syn_copy / "layer_0004.gguf"
    if damage == "missing":
        victim.unlink()
        want = {("layer_0004.gguf", "missing")}
    elif damage == "extra":
        (d / "notes.txt").write_text("hello")
        want = {("notes.txt", "extra")}
    elif damage == "truncated":
        os.truncate(victim, victim.stat().st_size - 7)
        want = {("layer_0004.gguf", "truncated")}
    elif damage == "flipped":
        size = victim.stat().st_size
        _flip(victim, _tensor_offset(victim))
        assert victim.stat().st_size == size
        want = {("layer_0004.gguf", "altered")}
    else:
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        shutil.move(victim, outside / victim.name)  # an identical copy, but outside
        victim.symlink_to(outside / victim.name)
        want = {("layer_0004.gguf", "unsafe")}
    assert _problems(d) == want


def _edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("bad_name", ["../x.gguf", "ABSOLUTE", "sub/layer_0001.gguf"])
def test_verify_refuses_unsafe_manifest_names(syn_copy, bad_name):
    d = syn_copy
    # Each name points at a real copy of the right file, so only the name is wrong.
    if bad_name == "ABSOLUTE":
        bad_name = str(d.parent / "layer_0001.gguf")
    (d / bad_name).parent.mkdir(exist_ok=True)
    shutil.copy(d / "layer_0001.gguf", d / bad_name)

    def edit(m):
        m["files"][2]["name"] = bad_name  # files[0] is shared.gguf, files[2] layer_0001.gguf

    _edit_manifest(d, edit)
    with pytest.raises(LemonsliceError, match=re.escape(repr(bad_name))):
        verify_split(d)
    with pytest.raises(LemonsliceError):
        merge_split(d, d.parent / "merged.gguf")
    assert not (d.parent / "merged.gguf").exists()


@pytest.mark.parametrize("bad", ["not_json", "wrong_format"])
def test_verify_refuses_bad_manifests(syn_copy, bad):
    d = syn_copy
    if bad == "not_json":
        (d / "manifest.json").write_text('{"format": "lemonslice-gguf-v1", ')
        match = r"manifest\.json.*JSON"
    else:
        _edit_manifest(d, lambda m: m.update(format="lemonslice-gguf-v0"))
        match = "lemonslice-gguf-v0"
    with pytest.raises(LemonsliceError, match=match) as e:
        verify_split(d)
    assert "\n" not in str(e.value)


# ---- 4. merge refuses a modified split ----------------------------------------------------


def test_merge_detects_modified_tensor(syn_copy, tmp_path):
    victim = syn_copy / "layer_0005.gguf"
    _flip(victim, _tensor_offset(victim))
    target_dir = tmp_path / "merged"
    target_dir.mkdir()
    with pytest.raises(LemonsliceError, match="sha256") as e:
        merge_split(syn_copy, target_dir / "model.gguf")
    assert "\n" not in str(e.value)
    assert list(target_dir.iterdir()) == []  # no output, no temporary file


# ---- 7. the source changes during the split ----------------------------------------------


def _change(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "append":
        with open(path, "ab") as f:
            f.write(b"\1" * 4096)
    elif how == "rewrite_read_part":  # same size, bytes already hashed
        with open(path, "r+b") as f:
            f.seek(size // 4)
            f.write(b"\x42" * 4096)
    elif how == "rewrite_unread_part":  # same size, bytes not yet read
        with open(path, "r+b") as f:
            f.seek(size - 8192)
            f.write(b"\x42" * 4096)
    elif how == "truncate_unread":
        os.truncate(path, size * 3 // 4)
    elif how == "truncate_read":
        os.truncate(path, size // 4)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["append", "rewrite_read_part", "rewrite_unread_part", "truncate_unread", "truncate_read"]
)
def test_source_changing_during_split_is_refused(syn_path, tmp_path, monkeypatch, how):
    src = tmp_path / "model.gguf"
    shutil.copyfile(syn_path, src)
    # An mtime well in the past, so a rewrite is visible whatever the timestamp granularity.
    old = src.stat().st_mtime_ns - 10**10
    os.utime(src, ns=(old, old))
    monkeypatch.setattr(split_mod, "CHUNK", 4096)
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done >= total // 2 and not getattr(progress, "fired", False):
            progress.fired = True
            _change(src, how)

    out = tmp_path / "out"
    with pytest.raises(LemonsliceError, match="changed"):
        split_gguf(src, out, progress=progress)
    assert getattr(progress, "fired", False) and len(seen) > 10
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no staging left
