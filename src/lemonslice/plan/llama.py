"""llama.cpp's plan: a `llama-server` command line for the budgets, and the buffers and peak
memory it will have, per device.

Buffer sizes follow what llama.cpp allocates at load (and prints: "KV buffer size", "RS buffer
size", "compute buffer size"): KV cells for the context rounded up to 256, a sliding-window
layer's cells for its window plus a micro-batch, the recurrent state per sequence, logits for a
micro-batch in the compute buffer. On the CPU the weights are memory-mapped and read whole at
load, so their page cache is part of the peak; of the compute buffer only the pages one
micro-batch writes are touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.budget import human
from ..errors import LemonsliceError
from .facts import LayerFacts, ModelFacts

# Measured with ../shared/tools/capped.sh (page cache counted, cold): llama-cpp-python loading
# the 8-layer test model (706 KB) and generating 8 tokens peaks at 129 MB. llama-server, a
# C++ program without Python, starts smaller.
BASE = 129_000_000
# Vocabulary in llama.cpp's memory beyond the mapped file, per token and per BPE merge: set from
# bench/plan.py's runs (Gemma's 262,144 tokens and the test models' 248,320 came to 0-200 B each).
PER_TOKEN = 100
PER_MERGE = 150
N_UBATCH = 512  # llama-server's default micro-batch
KV_PAD = 256  # KV cells are allocated in multiples of this
# Each CUDA device holds its context and cuBLAS workspace beside the buffers llama.cpp prints:
# a few hundred MiB by common report (not measured here: no GPU).
GPU_OVERHEAD = 400 << 20
MARGIN_FRACTION = 20
_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class Device:
    name: str  # "CPU" or "CUDA0", ...
    buffers: dict[str, int]  # what llama.cpp allocates there, as it prints them
    peak: int  # predicted peak use: RAM for the CPU (page cache included), VRAM for a GPU
    budget: int | None


@dataclass(frozen=True)
class LlamaPlan:
    argv: list[str]
    devices: list[Device]
    notes: list[str] = field(default_factory=list)

    def command(self) -> str:
        return " ".join(self.argv)


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def kv_cells(layer: LayerFacts, n_ctx: int, n_seq: int) -> int:
    """Cells llama.cpp gives a layer (swa_full off, as llama-server runs)."""
    full = _pad(n_ctx, KV_PAD)
    return min(full, _pad(layer.window * n_seq + N_UBATCH, KV_PAD)) if layer.window else full


def layer_kv(facts: ModelFacts, layer: LayerFacts, n_ctx: int, n_seq: int, types: tuple[str, str]) -> int:
    if layer.kind == "recurrent":
        return 0
    per_cell = sum(_TYPE_BYTES[t] * layer.n_head_kv * layer.head_dim for t in types)
    return int(kv_cells(layer, n_ctx, n_seq) * per_cell)


def compute_buffer(facts: ModelFacts, n_ctx: int) -> int:
    """The compute buffer as llama.cpp sizes it: a micro-batch's activations and logits, and its
    attention mask over the context (f16, flash attention), which shares the logits' memory
    unless it is the larger (llama.cpp's graph allocator; within 10% on the test models)."""
    logits = 4 * N_UBATCH * facts.n_vocab
    mask = 2 * N_UBATCH * _pad(n_ctx, KV_PAD) if any(x.kind != "recurrent" for x in facts.layers) else 0
    return 4 * N_UBATCH * 4 * facts.n_embd + (logits if logits >= mask else mask + logits)


def _touched_compute(facts: ModelFacts) -> int:
    """Pages of the compute buffer a prompt's micro-batch writes on the CPU (one row of logits)."""
    return 4 * (N_UBATCH * (facts.n_embd * 4 + facts.n_ff * 3) + facts.n_vocab)


def _check_types(types: tuple[str, str]) -> None:
    for t in types:
        if t not in _TYPE_BYTES:
            raise LemonsliceError(f"cache type {t!r} is not one of {', '.join(_TYPE_BYTES)}")


@dataclass(frozen=True)
class _Offload:
    """Blocks on the GPUs: the last `n_gpu` trunk blocks (llama.cpp's -ngl), of which the first
    `cpu_moe` keep their routed experts in RAM (--n-cpu-moe)."""

    n_gpu: int
    cpu_moe: int
    output: bool  # the LM head on the GPU (-ngl above the block count)

    def on_gpu(self, facts: ModelFacts, i: int) -> bool:
        return i >= len(facts.layers) - self.n_gpu

    def weights(self, facts: ModelFacts) -> int:
        """Weight bytes on the GPUs."""
        head = sum(n for name, n in facts.shared.items() if name.startswith("output")) if self.output else 0
        return head + sum(x.dense_bytes + (x.expert_bytes if i >= self.cpu_moe else 0)
                          for i, x in enumerate(facts.layers) if self.on_gpu(facts, i))

    def caches(self, facts: ModelFacts, per_layer: list[int]) -> int:
        """KV and recurrent-state bytes on the GPUs (`per_layer`: each block's)."""
        return sum(c for i, c in enumerate(per_layer) if self.on_gpu(facts, i))


def _choose_offload(facts: ModelFacts, caches: list[int], room: int) -> _Offload | None:
    """The most bytes on the GPUs within `room` (less the compute buffer): for MoE every block
    with the fewest --n-cpu-moe, else (or when even that does not fit) the most blocks by -ngl."""
    n = len(facts.layers)
    tries = [_Offload(n, m, True) for m in range(n + 1)] if facts.is_moe else []
    tries += [_Offload(k, 0, k == n) for k in range(n, 0, -1)]
    return next((o for o in tries if o.weights(facts) + o.caches(facts, caches) <= room), None)


def plan_llama(facts: ModelFacts, ram: int | None, vram: list[int], ctx: int, parallel: int = 1,
               kv_types: tuple[str, str] = ("f16", "f16")) -> LlamaPlan:
    """A llama-server command line for these budgets and its predicted buffers and peaks."""
    _check_types(kv_types)
    n_ctx = ctx * parallel
    kvs = [layer_kv(facts, x, n_ctx, parallel, kv_types) for x in facts.layers]
    rss = [x.state_bytes * parallel for x in facts.layers]
    caches = [a + b for a, b in zip(kvs, rss)]
    offload = None
    if vram:
        room = sum(v - GPU_OVERHEAD - v // MARGIN_FRACTION for v in vram) - compute_buffer(facts, n_ctx)
        offload = _choose_offload(facts, caches, room)
        if offload is None:
            one = _Offload(1, 0, False)
            least = one.weights(facts) + one.caches(facts, caches) + compute_buffer(facts, n_ctx) + GPU_OVERHEAD
            raise LemonsliceError(f"a VRAM budget of {' + '.join(human(v) for v in vram)} cannot hold one block "
                                  f"with llama.cpp's compute buffer: that needs {human(least)} on a device")
    k, v = kv_types
    argv = ["llama-server", "-m", facts.path, "-c", str(n_ctx), "-np", str(parallel), "-ctk", k, "-ctv", v,
            "-ngl", str(0 if offload is None else offload.n_gpu + int(offload.output))]
    if offload is not None and offload.cpu_moe:
        argv += ["--n-cpu-moe", str(offload.cpu_moe)]
    if len(vram) > 1:
        argv += ["-ts", ",".join(str(max(1, (x - GPU_OVERHEAD) >> 20)) for x in vram)]
    on_gpu = [offload is not None and offload.on_gpu(facts, i) for i in range(len(facts.layers))]
    gpu_weights = 0 if offload is None else offload.weights(facts)
    cpu = _cpu(facts, ram, n_ctx, facts.tensor_bytes - gpu_weights,
               sum(x for x, g in zip(kvs, on_gpu) if not g), sum(x for x, g in zip(rss, on_gpu) if not g),
               parallel, offload is not None)
    gpus = [] if offload is None else _gpus(facts, vram, gpu_weights, offload.caches(facts, caches), n_ctx)
    notes = []
    if ram is not None and cpu.peak >= ram - ram // MARGIN_FRACTION:
        notes.append("the mapped weights do not all fit in RAM: llama.cpp reads the rest from disk for every "
                     "token, and its page cache fills the budget")
    return LlamaPlan(argv, [cpu, *gpus], notes)


def _cpu(facts: ModelFacts, ram: int | None, n_ctx: int, weights: int, kv: int, rs: int, parallel: int,
         gpu: bool) -> Device:
    buffers = {"model (mapped)": weights, "KV": kv, "RS": rs, "output": 4 * facts.n_vocab * parallel,
               "compute": 4 * N_UBATCH * facts.n_embd * 4 if gpu else compute_buffer(facts, n_ctx)}
    held = (BASE + PER_TOKEN * facts.n_vocab + PER_MERGE * facts.n_merges + kv + rs + buffers["output"]
            + min(buffers["compute"], _touched_compute(facts)))
    if ram is not None and held > ram - ram // MARGIN_FRACTION:
        raise LemonsliceError(f"a RAM budget of {human(ram)} cannot run llama.cpp at -c {n_ctx}: it holds "
                              f"{human(held)} besides the mapped weights, "
                              f"{human(held - (ram - ram // MARGIN_FRACTION))} more than the budget less 5%")
    # The whole file is mapped and read at load; its page cache stays while memory allows.
    peak = held + facts.file_bytes
    return Device("CPU", buffers, peak if ram is None else min(peak, ram), ram)


def _gpus(facts: ModelFacts, vram: list[int], weights: int, caches: int, n_ctx: int) -> list[Device]:
    """Per device: its share of the offloaded blocks by -ts (its VRAM less the overhead), the
    compute buffer on the first."""
    shares = [max(0, v - GPU_OVERHEAD) for v in vram]
    out = []
    for d, (v, s) in enumerate(zip(vram, shares)):
        f = s / sum(shares)
        buffers = {"model": int(weights * f), "KV + RS": int(caches * f),
                   "compute": compute_buffer(facts, n_ctx) if d == 0 else 0, "CUDA context (estimate)": GPU_OVERHEAD}
        out.append(Device(f"CUDA{d}", buffers, sum(buffers.values()), v))
    return out
