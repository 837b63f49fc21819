"""llama.cpp as a reference implementation for tests (helpers, not tests).

Wraps `llama_cpp` (llama-cpp-python, which builds and bundles llama.cpp) through its
low-level C API, so every setting that matters for a numerical comparison is explicit:

* `llama_logits(path, ids)`: teacher-forced logits at every position, `[T, n_vocab]` float32;
  `llama_logits_each(path, seqs)` for several sequences with one model load.
* `llama_greedy(path, prompt_ids, n)`: `n` greedily decoded token ids.
* `llama_quantize(src, dst, ftype)`: llama.cpp's own quantizer (`llama-quantize`).
* `llama_tokenize(path, text)` / `llama_detokenize(path, ids)`, or `LlamaVocab(path)` for many
  calls: the model's tokenizer (vocab-only load: no tensor is read).
* `llama_model_info(path)`: what llama.cpp made of a file (layer counts, sizes, metadata).
* `gemma_gguf()`: the Gemma 3 270M GGUF of the test extra, assembled once under a file lock.

Settings of the logits/greedy contexts (see `_context_params`):

* KV cache F32 (`type_k = type_v = GGML_TYPE_F32`) unless `f32_kv=False` (then F16, llama.cpp's
  default). With F32 K/V the CPU backend computes Q·K and P·V in F32; with F16 K/V it rounds
  Q and P to F16 first.
* Flash attention off (`flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED`): attention is the
  plain mul_mat → softmax → mul_mat graph. llama.cpp's default, AUTO, may pick the fused
  flash-attention kernel, whose summation order differs.
* One sequence (`n_seq_max = 1`), `swa_full = True` (a sliding-window model keeps every cell;
  results are the same as a window-sized cache), `n_threads = n_threads_batch = n_threads`
  (default `default_threads()`: 2, or 1 in a pytest-xdist worker; the logits are bitwise the
  same for any thread count).
* Weights: llama.cpp multiplies quantized weights with activations that it rounds to the
  weight type's "vec_dot" type (Q8_0 / Q8_K for the quantized types, F16 for F16 weights);
  this is inherent to its CPU backend and no setting turns it off.
* Models are loaded with mmap, on the CPU, without the MTP (nextn) block's tensors
  (`load_mtp = False`, llama.cpp's default): the trunk's logits do not depend on it.
* `use_extra_bufts = False`: no "extra" weight buffers (AMX tiles, repacked Q4_0/IQ4_NL
  layouts). llama-cpp-python builds llama.cpp with `-march=native`; on this project's
  machines (Xeon with AMX, in a VM) the AMX matmul path segfaults, and `llama_cpp.Llama(...)`
  (which keeps llama.cpp's default, extra buffers on) crashes in its first decode of a model
  with Q8_0/Q4_K/... weights. Use these helpers, or set `use_extra_bufts` yourself.

Every handle (model, context, batch) is freed before a function returns. llama.cpp's log goes
to an in-memory ring, and its warnings and errors are put in the message of a `LlamaError`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

import llama_cpp
from gguf_refs import gemma_gguf  # noqa: F401  (re-exported for tests)

__all__ = [
    "LlamaError", "LlamaVocab", "QUANT_FTYPES", "default_threads", "gemma_gguf", "llama_detokenize",
    "llama_greedy", "llama_log", "llama_logits", "llama_logits_each", "llama_model_info", "llama_quantize",
    "llama_tokenize",
]


class LlamaError(RuntimeError):
    """llama.cpp refused a file or failed an operation; the message has its log's complaints."""


# ---- backend and log ----------------------------------------------------------------------

_LEVELS = {0: "NONE", 1: "DEBUG", 2: "INFO", 3: "WARN", 4: "ERROR", 5: "CONT"}  # enum ggml_log_level
_log: collections.deque[tuple[str, str]] = collections.deque(maxlen=20000)
_last_level = "NONE"
_init_done = False
_ECHO = bool(os.environ.get("LLAMA_REF_VERBOSE"))  # also print llama.cpp's log to stderr


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    name = _LEVELS.get(level, str(level))
    if name == "CONT":
        name = _last_level
    _last_level = name
    msg = text.decode("utf-8", "replace")
    _log.append((name, msg))
    if _ECHO:
        sys.stderr.write(msg)


def _init() -> None:
    """Initialise the backend once and route llama.cpp's log to `_log` (replaces
    llama-cpp-python's own callback, which prints to stderr)."""
    global _init_done
    if not _init_done:
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _init_done = True


def _complaints() -> str:
    bad = "".join(t for lvl, t in _log if lvl in ("WARN", "ERROR")).strip()
    return bad or "(llama.cpp logged no warning or error)"


@contextlib.contextmanager
def _watch(what: str) -> Iterator[None]:
    """Run a block; a `LlamaError` raised in it gets the warnings/errors logged meanwhile."""
    _init()
    _log.clear()
    try:
        yield
    except LlamaError as e:
        raise LlamaError(f"{what}: {e}\n--- llama.cpp log ---\n{_complaints()}") from None


def llama_log() -> str:
    """Everything llama.cpp logged during the last call (all levels), for debugging."""
    return "".join(t for _, t in _log)


# ---- handles -------------------------------------------------------------------------------


@contextlib.contextmanager
def _model(path: str | os.PathLike[str], *, vocab_only: bool = False, load_mtp: bool = False
           ) -> Iterator[llama_cpp.llama_model_p]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.vocab_only = vocab_only
    params.load_mtp = load_mtp
    params.use_extra_bufts = False  # no AMX / repacked weight layouts: see the module doc
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise LlamaError(f"llama.cpp could not load {path}")
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


def _vocab(model: llama_cpp.llama_model_p) -> llama_cpp.llama_vocab_p:
    return llama_cpp.llama_model_get_vocab(model)


def default_threads() -> int:
    """Threads for llama.cpp: 2 (the machine's cores), but 1 inside a pytest-xdist worker,
    where two workers share the 2 cores and ggml's spinning thread barriers would slow down
    badly. Results do not depend on the thread count (each dot product is done by one thread)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def _context_params(n_tokens: int, n_batch: int, n_threads: int | None, f32_kv: bool
                    ) -> llama_cpp.llama_context_params:
    n_threads = n_threads or default_threads()
    p = llama_cpp.llama_context_default_params()
    p.n_ctx = max(n_tokens, 1)  # llama.cpp pads it to a multiple of 256
    p.n_batch = p.n_ubatch = max(n_batch, 1)
    p.n_seq_max = 1
    p.n_threads = p.n_threads_batch = n_threads
    p.type_k = p.type_v = llama_cpp.GGML_TYPE_F32 if f32_kv else llama_cpp.GGML_TYPE_F16
    p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    p.swa_full = True
    p.embeddings = False
    p.no_perf = True
    return p


@contextlib.contextmanager
def _context(model: llama_cpp.llama_model_p, params: llama_cpp.llama_context_params
             ) -> Iterator[llama_cpp.llama_context_p]:
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise LlamaError("llama.cpp could not create a context")
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


@contextlib.contextmanager
def _batch(capacity: int) -> Iterator[llama_cpp.llama_batch]:
    batch = llama_cpp.llama_batch_init(capacity, 0, 1)
    try:
        yield batch
    finally:
        llama_cpp.llama_batch_free(batch)


def _decode(ctx: llama_cpp.llama_context_p, batch: llama_cpp.llama_batch, ids: Sequence[int], pos0: int,
            want: Sequence[bool]) -> None:
    """Decode `ids` at positions pos0.. of sequence 0; `want[i]` asks for token i's logits."""
    batch.n_tokens = len(ids)
    for i, t in enumerate(ids):
        batch.token[i] = int(t)
        batch.pos[i] = pos0 + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = bool(want[i])
    rc = llama_cpp.llama_decode(ctx, batch)
    if rc != 0:
        raise LlamaError(f"llama_decode returned {rc} (tokens at positions {pos0}..{pos0 + len(ids) - 1})")


def _logits_row(ctx: llama_cpp.llama_context_p, i: int, n_vocab: int) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
    if not ptr:
        raise LlamaError(f"no logits for batch row {i}")
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()


def _check_ids(ids: Sequence[int], n_vocab: int) -> list[int]:
    out = [int(t) for t in ids]
    bad = [t for t in out if not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"token ids out of range [0, {n_vocab}): {bad[:8]}")
    return out


# ---- public helpers ------------------------------------------------------------------------


def llama_logits(gguf_path: str | os.PathLike[str], token_ids: Sequence[int], n_threads: int | None = None,
                 f32_kv: bool = True, n_batch: int | None = None) -> np.ndarray:
    """Teacher-forced logits of llama.cpp: row t is the distribution after `token_ids[:t+1]`.

    Returns float32 `[T, n_vocab]`. The tokens go through `llama_decode` in chunks of
    `n_batch` (default: all at once, one ubatch; `n_batch=1` decodes token by token as a
    generation loop would), each token asking for its logits. See the module doc for the
    context settings (F32 KV cache, flash attention off).
    """
    T = len(token_ids)
    if T == 0:
        raise ValueError("token_ids is empty")
    step = T if n_batch is None else int(n_batch)
    with _watch(f"llama_logits({gguf_path})"), _model(gguf_path) as model:
        n_vocab = llama_cpp.llama_vocab_n_tokens(_vocab(model))
        ids = _check_ids(token_ids, n_vocab)
        out = np.empty((T, n_vocab), dtype=np.float32)
        with _context(model, _context_params(T, step, n_threads, f32_kv)) as ctx, _batch(step) as batch:
            for start in range(0, T, step):
                chunk = ids[start:start + step]
                _decode(ctx, batch, chunk, start, [True] * len(chunk))
                for i in range(len(chunk)):
                    out[start + i] = _logits_row(ctx, i, n_vocab)
    return out


def llama_logits_each(gguf_path: str | os.PathLike[str], sequences: Sequence[Sequence[int]],
                      n_threads: int | None = None, f32_kv: bool = True) -> list[np.ndarray]:
    """`llama_logits` of each sequence, one model load for all (a fresh context per sequence)."""
    if not sequences or not all(sequences):
        raise ValueError("every sequence needs a token")
    out: list[np.ndarray] = []
    with _watch(f"llama_logits_each({gguf_path})"), _model(gguf_path) as model:
        n_vocab = llama_cpp.llama_vocab_n_tokens(_vocab(model))
        for seq in sequences:
            ids = _check_ids(seq, n_vocab)
            T = len(ids)
            rows = np.empty((T, n_vocab), dtype=np.float32)
            with _context(model, _context_params(T, T, n_threads, f32_kv)) as ctx, _batch(T) as batch:
                _decode(ctx, batch, ids, 0, [True] * T)
                for i in range(T):
                    rows[i] = _logits_row(ctx, i, n_vocab)
            out.append(rows)
    return out


def llama_greedy(gguf_path: str | os.PathLike[str], prompt_ids: Sequence[int], n: int, n_threads: int | None = None,
                 f32_kv: bool = True) -> list[int]:
    """`n` tokens chosen by argmax (lowest id on ties), after decoding the prompt in one batch;
    each new token is decoded alone. Stops at nothing: end-of-generation tokens are kept."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    T = len(prompt_ids)
    with _watch(f"llama_greedy({gguf_path})"), _model(gguf_path) as model:
        n_vocab = llama_cpp.llama_vocab_n_tokens(_vocab(model))
        ids = _check_ids(prompt_ids, n_vocab)
        out: list[int] = []
        with _context(model, _context_params(T + n, T, n_threads, f32_kv)) as ctx, _batch(T) as batch:
            _decode(ctx, batch, ids, 0, [False] * (T - 1) + [True])
            last = T - 1
            for k in range(n):
                tok = int(np.argmax(_logits_row(ctx, last, n_vocab)))
                out.append(tok)
                if k + 1 < n:
                    _decode(ctx, batch, [tok], T + k, [True])
                    last = 0
    return out


# ftype names accepted by `llama_quantize` (llama.cpp's `enum llama_ftype`).
QUANT_FTYPES: dict[str, int] = {
    "F32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "ALL_F32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "BF16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
    "Q2_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "Q3_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q4_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}


def llama_quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: str | int,
                   allow_requantize: bool = False, n_threads: int | None = None, pure: bool = False) -> Path:
    """Run llama.cpp's quantizer (`llama_model_quantize`) from `src` to `dst`.

    `ftype` is a name of `QUANT_FTYPES` ("Q8_0", "Q4_K_M", "F32"/"ALL_F32", ...) or an int.
    Tensors llama.cpp never quantizes (1-D, norms, router `ffn_gate_inp`, `ssm_conv1d`) keep
    their source type; quantized source tensors are only converted with
    `allow_requantize=True` (e.g. to make the F32 copy of a Q4_K_M file: `ftype="F32"`).
    `pure=True` gives every quantizable tensor the ftype's base type (no K-quant mixing).
    """
    if isinstance(ftype, str):
        try:
            code = QUANT_FTYPES[ftype.upper()]
        except KeyError:
            raise ValueError(f"unknown ftype {ftype!r}; known: {sorted(QUANT_FTYPES)}") from None
    else:
        code = int(ftype)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(src)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = n_threads or default_threads()
    params.ftype = code
    params.allow_requantize = allow_requantize
    params.pure = pure
    with _watch(f"llama_quantize({src} -> {dst}, {ftype})"):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise LlamaError(f"llama_model_quantize returned {rc}")
    return dst


class LlamaVocab:
    """A vocab-only load of a GGUF (no tensor is read), for several tokenize/detokenize calls;
    close it (or use `with`) to free it. `llama_tokenize`/`llama_detokenize` load one per call."""

    def __init__(self, gguf_path: str | os.PathLike[str]):
        self.path = Path(gguf_path)
        self._stack = contextlib.ExitStack()
        with _watch(f"LlamaVocab({self.path})"):
            self._model = self._stack.enter_context(_model(self.path, vocab_only=True))
        self._vocab = _vocab(self._model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "LlamaVocab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama.cpp's token ids for `text`. `add_special` adds BOS/EOS as the model's
        `add_bos_token`/`add_eos_token` say; `parse_special` turns special-token text such as
        "<start_of_turn>" into its id instead of spelling it out."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            if n == -(2**31):
                break
            cap = -n
        raise LlamaError(f"llama_tokenize failed ({n}) on {self.path}")

    def detokenize(self, token_ids: Sequence[int], remove_special: bool = False,
                   unparse_special: bool = False) -> str:
        """llama.cpp's text for `token_ids`. `remove_special` drops a leading BOS / trailing EOS
        the model adds; `unparse_special` renders special tokens as their text."""
        ids = _check_ids(token_ids, self.n_vocab)
        arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
        cap = 16 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = llama_cpp.llama_detokenize(self._vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8")
            cap = -n
        raise LlamaError(f"llama_detokenize failed ({n}) on {self.path}")

    def piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes llama.cpp prints for one token."""
        _check_ids([token_id], self.n_vocab)
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, special)
        if n < 0:
            raise LlamaError(f"llama_token_to_piece failed ({n})")
        return buf.raw[:n]


def llama_tokenize(gguf_path: str | os.PathLike[str], text: str, add_special: bool = True,
                   parse_special: bool = False) -> list[int]:
    """`LlamaVocab(gguf_path).tokenize(text, add_special, parse_special)`, freed after."""
    with LlamaVocab(gguf_path) as v:
        return v.tokenize(text, add_special, parse_special)


def llama_detokenize(gguf_path: str | os.PathLike[str], token_ids: Sequence[int], remove_special: bool = False,
                     unparse_special: bool = False) -> str:
    """`LlamaVocab(gguf_path).detokenize(token_ids, ...)`, freed after."""
    with LlamaVocab(gguf_path) as v:
        return v.detokenize(token_ids, remove_special, unparse_special)


def _meta(model: llama_cpp.llama_model_p) -> dict[str, str]:
    """Scalar metadata as llama.cpp renders it (arrays are skipped or summarised by llama.cpp)."""
    out: dict[str, str] = {}
    buf = ctypes.create_string_buffer(4096)
    for i in range(llama_cpp.llama_model_meta_count(model)):
        if llama_cpp.llama_model_meta_key_by_index(model, i, buf, len(buf)) < 0:
            continue
        key = buf.value.decode("utf-8", "replace")
        if llama_cpp.llama_model_meta_val_str_by_index(model, i, buf, len(buf)) < 0:
            continue
        out[key] = buf.value.decode("utf-8", "replace")
    return out


def llama_model_info(gguf_path: str | os.PathLike[str], vocab_only: bool = False, load_mtp: bool = False) -> dict:
    """What llama.cpp made of a file: `n_layer` (trunk blocks, without nextn), `n_layer_nextn`,
    `n_embd`, `n_head`, `n_vocab`, `n_ctx_train`, `n_params`, `desc` and the scalar `meta`.

    A full load (the default) checks every tensor's name, shape and type against the
    architecture (`load_mtp=True` also checks and loads the MTP block's tensors).
    `vocab_only=True` reads the metadata and vocabulary only: llama.cpp then skips the
    hyper-parameters, and only `n_vocab` and `meta` are filled (the rest is None)."""
    with _watch(f"llama_model_info({gguf_path})"), \
            _model(gguf_path, vocab_only=vocab_only, load_mtp=load_mtp) as model:
        info: dict = {"n_vocab": llama_cpp.llama_vocab_n_tokens(_vocab(model)), "meta": _meta(model)}
        hp = ("n_layer", "n_layer_nextn", "n_embd", "n_head", "n_ctx_train", "n_params", "desc")
        if vocab_only:
            return {**dict.fromkeys(hp), **info}
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(model, desc, len(desc))
        return {
            "n_layer": llama_cpp.llama_model_n_layer(model),
            "n_layer_nextn": llama_cpp.llama_model_n_layer_nextn(model),
            "n_embd": llama_cpp.llama_model_n_embd(model),
            "n_head": llama_cpp.llama_model_n_head(model),
            "n_ctx_train": llama_cpp.llama_model_n_ctx_train(model),
            "n_params": llama_cpp.llama_model_n_params(model),
            "desc": desc.value.decode("utf-8", "replace"),
            **info,
        }


