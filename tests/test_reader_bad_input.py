"""Hostile and malformed input for the lean GGUF reader.

Every malformed file must raise a typed `GGUFError` (one-line message naming the file),
quickly and without large allocations; the valid fixture must match gguf-py's reader.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import gguf as gguf_py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lemonslice.gguf import reader as reader_mod
from lemonslice.gguf.constants import BLOCK_SIZES, GGUF_MAGIC, NUMPY_DTYPES, GGMLType, ValueType
from lemonslice.gguf.errors import (
    AlignmentError,
    BadMagicError,
    BadStringError,
    BadValueTypeError,
    CountError,
    DimensionError,
    DuplicateKeyError,
    DuplicateTensorError,
    GGUFError,
    NestedArrayError,
    TensorRangeError,
    TruncatedError,
    UnknownTensorTypeError,
    UnsupportedVersionError,
)
from lemonslice.gguf.reader import GGUFReader, align_up, open_gguf, tensor_nbytes
from lemonslice.gguf.writer import encode_kv, encode_string, encode_tensor_info, write_gguf

V = ValueType
T = GGMLType
HUGE = [1 << 63, (1 << 64) - 1]

# ---- crafting helpers ---------------------------------------------------------------


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def craft(kvs=(), infos=(), *, tc=None, kc=None, version=3, data=b"", alignment=32) -> bytes:
    """A GGUF image; `tc`/`kc` override the counts, `data` follows the aligned header."""
    head = GGUF_MAGIC + u32(version) + u64(len(infos) if tc is None else tc) + u64(len(kvs) if kc is None else kc)
    head += b"".join(kvs) + b"".join(infos)
    if data:
        head += b"\0" * (align_up(len(head), alignment) - len(head))
    return head + data


def raw_kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return u64(len(key)) + key + u32(vtype) + payload


def tensor_file(specs, *, data_size=None, kvs=(), alignment=32) -> bytes:
    """Tensor infos (name, shape, type, offset) plus a zero data section of `data_size` bytes."""
    infos = [encode_tensor_info(n, s, t, o) for n, s, t, o in specs]
    if data_size is None:
        data_size = max((o + tensor_nbytes(tuple(s), t) for _, s, t, o in specs), default=0)
    return craft(kvs, infos, data=b"\0" * data_size, alignment=alignment)


def expect(tmp_path: Path, blob: bytes, exc=GGUFError, match: str | None = None) -> GGUFError:
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(exc, match=match) as ei:
        open_gguf(p)
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg, msg
    return ei.value


# ---- the valid fixture --------------------------------------------------------------

VALID_KVS = [
    ("general.architecture", V.STRING, "llama", None),
    ("general.name", V.STRING, "tïny ✓", None),
    ("general.alignment", V.UINT32, 32, None),
    ("llama.block_count", V.UINT32, 2, None),
    ("llama.rope.freq_base", V.FLOAT32, 10000.0, None),
    ("test.f64", V.FLOAT64, -1.5e300, None),
    ("test.u8", V.UINT8, 255, None),
    ("test.i8", V.INT8, -128, None),
    ("test.u16", V.UINT16, 65535, None),
    ("test.i16", V.INT16, -32768, None),
    ("test.i32", V.INT32, -(1 << 31), None),
    ("test.u64", V.UINT64, (1 << 64) - 1, None),
    ("test.i64", V.INT64, -(1 << 63), None),
    ("test.true", V.BOOL, True, None),
    ("test.false", V.BOOL, False, None),
    ("tokenizer.ggml.tokens", V.ARRAY, ["<s>", "</s>", "hello", "", "wörld"], V.STRING),
    ("tokenizer.ggml.scores", V.ARRAY, [0.0, -1.25, 3.5, 7.0, -0.5], V.FLOAT32),
    ("tokenizer.ggml.token_type", V.ARRAY, [1, 3, 1, 1, 6], V.INT32),
    ("test.arr_u64", V.ARRAY, [0, 1, (1 << 64) - 1], V.UINT64),
    ("test.arr_f64", V.ARRAY, [1e-300, 2.5], V.FLOAT64),
    ("test.arr_bool", V.ARRAY, [True, False, True], V.BOOL),
    ("test.arr_empty", V.ARRAY, [], V.UINT8),
]
# The last tensor ends on an alignment boundary, so the file has no optional trailing
# padding and every proper prefix loses data the header describes.
VALID_TENSORS = [
    ("token_embd.weight", (256, 4), T.Q4_K),  # 576 bytes
    ("blk.0.attn_q.weight", (64, 3), T.Q8_0),  # 204 bytes, then padding
    ("blk.0.attn_norm.weight", (48,), T.F16),  # 96 bytes
    ("output_norm.weight", (8, 2), T.F32),  # 64 bytes, ends aligned
]


def build_valid(path: Path):
    rng = np.random.default_rng(0)
    # Typed arrays: encode_kv's np.asarray(list) would turn [0, 2**64-1] into float64.
    kvs = [
        encode_kv(k, t, np.array(v, dtype=NUMPY_DTYPES[it]) if it not in (None, V.STRING) else v, it)
        for k, t, v, it in VALID_KVS
    ]
    tensors = [(n, s, t, rng.integers(0, 256, tensor_nbytes(s, t), dtype=np.uint8)) for n, s, t in VALID_TENSORS]
    return write_gguf(path, kvs, tensors)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[Path, bytes]:
    p = tmp_path_factory.mktemp("valid") / "valid.gguf"
    plan = build_valid(p)
    blob = p.read_bytes()
    assert len(blob) == plan.size and plan.size % 32 == 0 and 1500 < plan.size < 8192
    return p, blob


# ---- positive checks ----------------------------------------------------------------


def _as_list(v):
    return v.tolist() if isinstance(v, np.ndarray) else v


def test_valid_matches_written_values(valid):
    path, _ = valid
    with GGUFReader(path) as r:
        assert list(r.kv) == [k for k, *_ in VALID_KVS]
        for key, vtype, value, item_type in VALID_KVS:
            e = r.kv[key]
            assert (e.vtype, e.item_type) == (vtype, item_type)
            got = _as_list(e.value)
            want = [float(np.float32(x)) for x in value] if item_type == V.FLOAT32 else value
            assert got == want, key
        assert [(t.name, t.shape, t.ggml_type) for t in r.tensors] == [(n, tuple(s), t) for n, s, t in VALID_TENSORS]


def test_valid_matches_gguf_py(valid):
    path, _ = valid
    ref = gguf_py.GGUFReader(path)
    with GGUFReader(path) as r:
        ref_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(r.kv) == ref_keys
        for key in ref_keys:
            f = ref.fields[key]
            e = r.kv[key]
            assert int(f.types[0]) == e.vtype
            if e.vtype == V.ARRAY and e.count:  # gguf-py records no item type for empty arrays
                assert int(f.types[-1]) == e.item_type
            assert _as_list(e.value) == f.contents(), key
        assert (r.data_offset, r.alignment) == (ref.data_offset, ref.alignment)
        assert len(r.tensors) == len(ref.tensors)
        for ours, theirs in zip(r.tensors, ref.tensors):
            assert ours.name == theirs.name
            assert int(ours.ggml_type) == int(theirs.tensor_type)
            assert list(ours.shape) == theirs.shape.tolist()
            assert ours.n_bytes == theirs.n_bytes
            assert ours.data_start == theirs.data_offset
            assert ours.offset == theirs.data_offset - ref.data_offset
            assert bytes(r.tensor_bytes(ours.name)) == theirs.data.tobytes()


# ---- empty, short and truncated files -----------------------------------------------


def test_truncation_sweep_every_byte(valid, tmp_path):
    _, blob = valid
    p = tmp_path / "trunc.gguf"
    p.write_bytes(blob)
    GGUFReader(p).close()
    # Shrink one file a byte at a time: every proper prefix must fail with a truncation-like error.
    for n in range(len(blob) - 1, -1, -1):
        os.truncate(p, n)
        try:
            GGUFReader(p).close()
        except (TruncatedError, CountError, TensorRangeError) as e:
            assert "\n" not in str(e) and str(p) in str(e)
        else:
            pytest.fail(f"prefix of {n}/{len(blob)} bytes parsed")


@pytest.mark.parametrize("blob", [b"", b"G", b"GGU", b"GGUF", b"GGUF\x03\0\0", b"GGUF\x03\0\0\0" + bytes(15)])
def test_empty_and_short(tmp_path, blob):
    expect(tmp_path, blob, TruncatedError)


def test_missing_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        open_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="directory"):
        open_gguf(tmp_path)


def test_file_shrinking_while_read_does_not_hang(valid, tmp_path, monkeypatch):
    _, blob = valid
    p = tmp_path / "shrink.gguf"
    p.write_bytes(blob)
    real_fstat = os.fstat

    class ShrinkingOs:
        # The file is cut right after its size is taken, as by a concurrent writer.
        def __getattr__(self, name):
            return getattr(os, name)

        def fstat(self, fd):
            st = real_fstat(fd)
            os.truncate(p, 100)
            return st

    monkeypatch.setattr(reader_mod, "os", ShrinkingOs())
    result: list[BaseException | None] = []

    def run():
        try:
            GGUFReader(p).close()
            result.append(None)
        except BaseException as e:
            result.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(10)
    assert not th.is_alive(), "reader hung on a file that shrank"
    assert isinstance(result[0], TruncatedError), result


def test_failed_open_does_not_close_a_later_fd(valid, tmp_path):
    path, _ = valid
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + u32(9) + bytes(16))
    try:
        GGUFReader(bad)
    except UnsupportedVersionError as e:
        kept = e  # its traceback keeps the half-built reader alive
    r = GGUFReader(path)
    del kept
    gc.collect()
    os.fstat(r._fd)  # EBADF if the dead reader closed a reused descriptor
    assert bytes(r.tensor_bytes("output_norm.weight"))
    r.close()


# ---- magic and version --------------------------------------------------------------


@pytest.mark.parametrize("magic", [b"GGUG", b"gguf", b"\0\0\0\0", b"FUGG", b"GGML"])
def test_bad_magic(tmp_path, magic):
    expect(tmp_path, magic + u32(3) + u64(0) + u64(0), BadMagicError)


@pytest.mark.parametrize("version", [0, 1, 4, (1 << 32) - 1])
def test_unsupported_version(tmp_path, version):
    e = expect(tmp_path, craft(version=version), UnsupportedVersionError, match=str(version))
    assert "big-endian" not in str(e)


def test_big_endian_version(tmp_path):
    blob = GGUF_MAGIC + struct.pack(">IQQ", 3, 0, 0)
    expect(tmp_path, blob, UnsupportedVersionError, match="big-endian")


def test_version_2_accepted(tmp_path):
    p = tmp_path / "v2.gguf"
    p.write_bytes(craft([encode_kv("a", V.UINT8, 1)], version=2))
    with open_gguf(p) as r:
        assert r.version == 2 and r.get("a") == 1


# ---- counts and lengths -------------------------------------------------------------

PAD_KV = encode_kv("pad", V.STRING, "x" * 100)


def _count_cases():
    """(name, builder(value) -> blob); each blob is ~200 bytes and `value` is the bad count."""
    return {
        "tensor_count": lambda v: craft([PAD_KV], tc=v),
        "kv_count": lambda v: craft([PAD_KV], kc=v),
        "key_length": lambda v: craft([u64(v) + b"k" * 100]),
        "string_value_length": lambda v: craft([raw_kv(b"s", V.STRING, u64(v) + b"x" * 100)]),
        "numeric_array_count": lambda v: craft([raw_kv(b"a", V.ARRAY, u32(V.UINT32) + u64(v) + bytes(100))]),
        "u8_array_count": lambda v: craft([raw_kv(b"a", V.ARRAY, u32(V.UINT8) + u64(v) + bytes(100))]),
        "string_array_count": lambda v: craft([raw_kv(b"a", V.ARRAY, u32(V.STRING) + u64(v) + bytes(100))]),
        "string_in_array_length": lambda v: craft(
            [raw_kv(b"a", V.ARRAY, u32(V.STRING) + u64(3) + encode_string("ok") + u64(v) + b"y" * 100)]
        ),
        "tensor_name_length": lambda v: craft(infos=[u64(v) + b"t" * 100]),
    }


COUNT_CASES = _count_cases()


@pytest.mark.parametrize("value", ["file_size", *HUGE], ids=["file_size", "2^63", "2^64-1"])
@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_count_larger_than_file(tmp_path, case, value):
    build = COUNT_CASES[case]
    if value == "file_size":
        value = len(build(0))
    expect(tmp_path, build(value), CountError)


def test_counts_that_fit_minimums_but_not_the_file(tmp_path):
    # Plausible counts still have to be backed by bytes.
    expect(tmp_path, craft([PAD_KV], kc=2), (TruncatedError, CountError))
    expect(tmp_path, craft([PAD_KV], tc=1), (TruncatedError, CountError))


# ---- value types --------------------------------------------------------------------


def test_nested_array(tmp_path):
    inner = u32(V.UINT8) + u64(2) + b"\1\2"
    expect(tmp_path, craft([raw_kv(b"n", V.ARRAY, u32(V.ARRAY) + u64(1) + inner)]), NestedArrayError)


@pytest.mark.parametrize("vtype", [13, 14, 255, 1 << 16, (1 << 32) - 1])
def test_unknown_value_type(tmp_path, vtype):
    expect(tmp_path, craft([raw_kv(b"k", vtype, bytes(16))]), BadValueTypeError, match=str(vtype))


@pytest.mark.parametrize("vtype", [13, (1 << 32) - 1])
def test_unknown_array_item_type(tmp_path, vtype):
    expect(tmp_path, craft([raw_kv(b"k", V.ARRAY, u32(vtype) + u64(1) + bytes(16))]), BadValueTypeError)


@pytest.mark.parametrize("value", [2, 127, 255])
def test_bool_not_0_or_1(tmp_path, value):
    expect(tmp_path, craft([raw_kv(b"b", V.BOOL, bytes([value]))]), BadValueTypeError)


def test_bool_array_item_not_0_or_1(tmp_path):
    expect(tmp_path, craft([raw_kv(b"b", V.ARRAY, u32(V.BOOL) + u64(4) + b"\0\1\2\1")]), BadValueTypeError)


# ---- strings ------------------------------------------------------------------------

BAD_UTF8 = [b"\xff", b"general.\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"ok\x80ok"]


@pytest.mark.parametrize("key", BAD_UTF8)
def test_invalid_utf8_key(tmp_path, key):
    expect(tmp_path, craft([raw_kv(key, V.UINT8, b"\0")]), BadStringError)


@pytest.mark.parametrize("name", BAD_UTF8)
def test_invalid_utf8_tensor_name(tmp_path, name):
    info = u64(len(name)) + name + u32(1) + u64(8) + u32(T.F32) + u64(0)
    expect(tmp_path, craft(infos=[info], data=bytes(32)), BadStringError)


def test_invalid_utf8_values_raise_on_decode(tmp_path):
    p = tmp_path / "v.gguf"
    p.write_bytes(
        craft([
            raw_kv(b"s", V.STRING, u64(2) + b"\xc3\x28"),
            raw_kv(b"a", V.ARRAY, u32(V.STRING) + u64(2) + encode_string("ok") + u64(1) + b"\xff"),
        ])
    )
    with open_gguf(p) as r:
        for key in ("s", "a"):
            with pytest.raises(BadStringError, match=str(p)):
                r.get(key)


# ---- duplicates ---------------------------------------------------------------------


def test_duplicate_key(tmp_path):
    kvs = [encode_kv("a", V.UINT8, 1), encode_kv("b", V.UINT8, 2), encode_kv("a", V.STRING, "x")]
    expect(tmp_path, craft(kvs), DuplicateKeyError, match="'a'")


def test_duplicate_tensor(tmp_path):
    specs = [("w", (8,), T.F32, 0), ("w", (8,), T.F32, 32)]
    expect(tmp_path, tensor_file(specs), DuplicateTensorError, match="'w'")


# ---- alignment ----------------------------------------------------------------------


@pytest.mark.parametrize("alignment", [0, 3, 48, 100, 1 << 25, 1 << 31, (1 << 32) - 1])
def test_bad_alignment_value(tmp_path, alignment):
    kv = encode_kv("general.alignment", V.UINT32, alignment)
    expect(tmp_path, tensor_file([("w", (8,), T.F32, 0)], kvs=[kv]), AlignmentError)


@pytest.mark.parametrize(
    "kv",
    [
        encode_kv("general.alignment", V.UINT64, 32),
        encode_kv("general.alignment", V.INT32, 32),
        encode_kv("general.alignment", V.UINT16, 32),
        encode_kv("general.alignment", V.FLOAT32, 32.0),
        encode_kv("general.alignment", V.STRING, "32"),
        encode_kv("general.alignment", V.ARRAY, [32], V.UINT32),
    ],
    ids=["u64", "i32", "u16", "f32", "string", "array"],
)
def test_alignment_wrong_type(tmp_path, kv):
    expect(tmp_path, craft([kv]), AlignmentError)


def test_custom_alignment_accepted(tmp_path):
    kv = encode_kv("general.alignment", V.UINT32, 64)
    p = tmp_path / "a.gguf"
    p.write_bytes(tensor_file([("a", (8,), T.F32, 0), ("b", (8,), T.F32, 64)], kvs=[kv], alignment=64))
    with open_gguf(p) as r:
        assert r.alignment == 64 and r.data_offset % 64 == 0 and r.tensor_map["b"].offset == 64


# ---- tensor ranges ------------------------------------------------------------------


@pytest.mark.parametrize(
    "specs, data_size",
    [
        ([("w", (8,), T.F32, 32)], 32),  # starts at the end of the data
        ([("w", (16,), T.F32, 0)], 63),  # one byte short
        ([("w", (8,), T.F32, 1 << 40)], 64),
        ([("w", (8,), T.F32, (1 << 64) - 32)], 64),  # offset + size wraps in 64 bits
        ([("a", (8,), T.F32, 0), ("w", (1 << 20,), T.F32, 32)], 64),
    ],
)
def test_tensor_out_of_range(tmp_path, specs, data_size):
    expect(tmp_path, tensor_file(specs, data_size=data_size), TensorRangeError)


@pytest.mark.parametrize(
    "specs",
    [
        [("a", (8,), T.F32, 0), ("b", (8,), T.F32, 0)],  # same offset
        [("a", (16,), T.F32, 0), ("b", (8,), T.F32, 32)],  # b inside a's tail
        [("a", (64,), T.F32, 0), ("b", (8,), T.F32, 64), ("c", (8,), T.F32, 128)],  # a covers b
        [("b", (8,), T.F32, 96), ("c", (8,), T.F32, 192), ("a", (64,), T.F32, 64)],  # out of order
    ],
)
def test_tensor_overlap(tmp_path, specs):
    expect(tmp_path, tensor_file(specs), TensorRangeError, match="overlap")


@pytest.mark.parametrize("offset", [1, 4, 16, 31, 33])
def test_tensor_misaligned(tmp_path, offset):
    specs = [("w", (8,), T.F32, offset)]
    expect(tmp_path, tensor_file(specs, data_size=128), TensorRangeError, match="aligned")


def test_tensor_misaligned_custom_alignment(tmp_path):
    kv = encode_kv("general.alignment", V.UINT32, 64)
    blob = tensor_file([("w", (8,), T.F32, 32)], kvs=[kv], data_size=128, alignment=64)
    expect(tmp_path, blob, TensorRangeError, match="aligned")


def test_header_padding_past_end(tmp_path):
    # Header ends unaligned and the file stops before the data section would start.
    blob = craft(infos=[encode_tensor_info("w", (0,), T.F32, 0)])
    assert len(blob) % 32
    expect(tmp_path, blob, TruncatedError)


# ---- tensor types and dimensions ----------------------------------------------------


@pytest.mark.parametrize("raw_type", [4, 5, 31, 36, 42, 1000, (1 << 32) - 1])
def test_unknown_tensor_type(tmp_path, raw_type):
    info = encode_string("w") + u32(1) + u64(32) + u32(raw_type) + u64(0)
    expect(tmp_path, craft(infos=[info], data=bytes(256)), UnknownTensorTypeError, match=str(raw_type))


@pytest.mark.parametrize("n_dims", [0, 5, 8, (1 << 32) - 1])
def test_bad_n_dims(tmp_path, n_dims):
    info = encode_string("w") + u32(n_dims) + bytes(8 * 5) + u32(T.F32) + u64(0)
    expect(tmp_path, craft(infos=[info], data=bytes(64)), DimensionError)


@pytest.mark.parametrize(
    "shape",
    [
        (1 << 32, 1 << 32),
        (1 << 62, 4),
        ((1 << 63) - 1, 2),
        (1 << 21, 1 << 21, 1 << 21),
        (1 << 16, 1 << 16, 1 << 16, 1 << 16),
        ((1 << 63) - 1, (1 << 63) - 1, (1 << 63) - 1, (1 << 63) - 1),
    ],
)
def test_shape_product_overflows(tmp_path, shape):
    blob = craft(infos=[encode_tensor_info("w", shape, T.F32, 0)], data=bytes(64))
    expect(tmp_path, blob, DimensionError)


@pytest.mark.parametrize("shape", [(1 << 63,), ((1 << 64) - 1,), (1, 1 << 63), (0, (1 << 64) - 1)])
def test_dimension_too_large(tmp_path, shape):
    blob = craft(infos=[encode_tensor_info("w", shape, T.F32, 0)], data=bytes(64))
    expect(tmp_path, blob, DimensionError)


@pytest.mark.parametrize(
    "shape, ggml_type",
    [((100,), T.Q4_K), ((100, 4), T.Q4_K), ((33,), T.Q8_0), ((128,), T.Q4_K), ((16,), T.Q4_0), ((65,), T.NVFP4)],
)
def test_row_not_whole_blocks(tmp_path, shape, ggml_type):
    blob = craft(infos=[encode_tensor_info("w", shape, ggml_type, 0)], data=bytes(4096))
    expect(tmp_path, blob, DimensionError, match="block")


# ---- fuzzing ------------------------------------------------------------------------

SPLICE_VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 5, 9, 13, 32, 48, 255, 1 << 31, 1 << 32, 1 << 63, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)


def _mutation(size: int):
    # Bias positions towards the header, where the parsing happens.
    pos = st.one_of(st.integers(8, 900), st.integers(0, size))
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("u64"), pos, SPLICE_VALUES),
        st.tuples(st.just("u32"), pos, st.integers(0, (1 << 32) - 1)),
    )


def mutate(blob: bytes, ops) -> bytes:
    b = bytearray(blob)
    for op, pos, arg in ops:
        pos = min(pos, len(b))
        if op == "flip" and pos < len(b):
            b[pos] ^= 1 << arg
        elif op == "set" and pos < len(b):
            b[pos] = arg
        elif op == "insert":
            b[pos:pos] = arg
        elif op == "delete":
            del b[pos : pos + arg]
        elif op == "u64":
            b[pos : pos + 8] = u64(arg)
        elif op == "u32":
            b[pos : pos + 4] = u32(arg)
    return bytes(b)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


_FUZZ_BLOB = None


def _fuzz_blob(tmp_dir: Path) -> bytes:
    global _FUZZ_BLOB
    if _FUZZ_BLOB is None:
        build_valid(tmp_dir / "base.gguf")
        _FUZZ_BLOB = (tmp_dir / "base.gguf").read_bytes()
    return _FUZZ_BLOB


@settings(
    max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_mutations(fuzz_dir, data):
    base = _fuzz_blob(fuzz_dir)
    ops = data.draw(st.lists(_mutation(len(base)), min_size=1, max_size=4))
    p = fuzz_dir / "m.gguf"
    p.write_bytes(mutate(base, ops))
    try:
        r = GGUFReader(p)
    except GGUFError as e:
        assert "\n" not in str(e) and str(p) in str(e)
        return
    # A file that parses must also decode: values fail only with GGUFError, tensors lie in the file.
    with r:
        for e in r.kv.values():
            try:
                e.value
            except GGUFError:
                pass
        for t in r.tensors:
            assert t.data_start + t.n_bytes <= r.file_size
            assert len(r.tensor_bytes(t.name)) == t.n_bytes


# ---- resource bounds ----------------------------------------------------------------

_PROBE = textwrap.dedent(
    """
    import json, sys, time
    from lemonslice.gguf.errors import GGUFError
    from lemonslice.gguf.reader import GGUFReader
    out = []
    for p in sys.argv[1:]:
        t0 = time.perf_counter()
        try:
            GGUFReader(p).close()
            res = "ok"
        except GGUFError as e:
            res = type(e).__name__
        out.append([p, res, time.perf_counter() - t0])
    # VmHWM belongs to this process's own memory map; ru_maxrss would carry the parent's.
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"maxrss_kb": hwm, "files": out}))
    """
)


def _probe(paths: list[Path]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *map(str, paths)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _hostile_files() -> dict[str, bytes]:
    files = {}
    for case, build in COUNT_CASES.items():
        for v in HUGE:
            files[f"{case}-{v}"] = build(v)
        files[f"{case}-fsize"] = build(1000)  # past the 200-byte padded file
    files["many-dims"] = craft(infos=[encode_string("w") + u32((1 << 32) - 1) + bytes(150)])
    files["huge-shape"] = craft(infos=[encode_tensor_info("w", ((1 << 63) - 1,) * 4, T.F32, 0)], data=bytes(32))
    files["huge-offset"] = craft(infos=[encode_tensor_info("w", (8,), T.F32, (1 << 64) - 32)], data=bytes(32))
    files["tiny-strings"] = craft([raw_kv(b"a", V.ARRAY, u32(V.STRING) + u64(21) + bytes(160))])
    files["big-alignment"] = craft([encode_kv("general.alignment", V.UINT32, 1 << 31)], [encode_tensor_info("w", (8,), T.F32, 0)])
    return {k: v.ljust(200, b"\0") if len(v) < 200 else v for k, v in files.items()}


def test_hostile_files_bounded_time_and_memory(valid, tmp_path):
    path, _ = valid
    hostile = _hostile_files()
    paths = []
    for name, blob in hostile.items():
        assert len(blob) <= 320, name
        paths.append(tmp_path / f"{name}.gguf")
        paths[-1].write_bytes(blob)
    baseline = _probe([path])
    assert baseline["files"][0][1] == "ok"
    got = _probe(paths)
    for p, res, secs in got["files"]:
        assert res != "ok", f"{p} parsed"
        assert secs < 1.0, f"{p} took {secs:.2f}s"
    growth_mb = (got["maxrss_kb"] - baseline["maxrss_kb"]) / 1024
    assert growth_mb < 256, f"peak RSS grew by {growth_mb:.0f} MB"


def test_block_table_covers_all_types():
    # The range checks rely on a block size for every type the reader accepts.
    assert set(BLOCK_SIZES) == set(GGMLType)
