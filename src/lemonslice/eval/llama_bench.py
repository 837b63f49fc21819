"""llama.cpp through llama-cpp-python's low-level API, for benchmarks on the same GGUF.

One model and one context on the CPU, the KV cache kept between calls (so a chat's next turn
feeds only its new tokens) and cleared on request. The repacked weight buffers
(`use_extra_bufts`) are off unless asked for: their AMX path crashes on some Xeons.
"""

from __future__ import annotations

import ctypes
import re
from typing import Any, Sequence

from ..errors import LemonsliceError

INSTALL_HINT = "pip install 'lemonslice[edit]'"
# ggml type ids of the KV cache types both engines store.
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}
_keep: list[Any] = []  # the log callback must outlive every llama.cpp call of the process


def _module() -> Any:
    try:
        import llama_cpp  # pip install 'lemonslice[edit]'
    except ImportError as e:
        raise LemonsliceError(f"--llama needs llama-cpp-python: {INSTALL_HINT} ({e})") from None
    return llama_cpp


class LlamaRunner:
    """llama.cpp on one GGUF file: `feed` appends tokens to the sequence and returns the greedy
    next token; `clear` empties the cache."""

    def __init__(self, path: str, n_ctx: int, threads: int, cache_type: str = "f16", repack: bool = False):
        self.lib = lib = _module()
        self.log: list[str] = []
        self._install_log()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = repack
        self.model = lib.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise LemonsliceError(f"llama.cpp could not load {path}: {self._errors()}")
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max = n_ctx, 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.n_batch, cp.n_ubatch = 2048, 512  # llama.cpp's defaults for prompt work
        cp.type_k = cp.type_v = KV_TYPES[cache_type]
        cp.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise LemonsliceError(f"llama.cpp could not make a {n_ctx}-token context: {self._errors()}")
        self.n_batch = cp.n_batch
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.n_past = 0

    def _install_log(self) -> None:
        lib, log = self.lib, self.log

        @lib.llama_log_callback
        def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            log.append(text.decode("utf-8", "replace"))

        _keep.append(on_log)
        lib.llama_log_set(on_log, ctypes.c_void_p(0))
        lib.llama_backend_init()

    def _errors(self) -> str:
        return "".join(self.log[-5:]).strip() or "no message"

    @property
    def kv_bytes(self) -> int:
        """The KV buffers' size, from the load log's "KV buffer size = X MiB" lines."""
        found = re.findall(r"KV buffer size\s*=\s*([\d.]+) MiB", "".join(self.log))
        return int(sum(float(x) for x in found) * 2**20)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def feed(self, tokens: Sequence[int]) -> int:
        """Append `tokens` (in batches of n_batch); the greedy token after the last one."""
        import numpy as np

        lib, batch = self.lib, self.batch
        for s in range(0, len(tokens), self.n_batch):
            part = tokens[s : s + self.n_batch]
            batch.n_tokens = len(part)
            for i, t in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, self.n_past + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(part) - 1
            if lib.llama_decode(self.ctx, batch) != 0:
                raise LemonsliceError(f"llama_decode failed at position {self.n_past}: {self._errors()}")
            self.n_past += len(part)
        row = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, len(part) - 1), shape=(self.n_vocab,))
        return int(np.argmax(row))

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)
