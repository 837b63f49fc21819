"""Speed against context depth and over the turns of a chat, for lemonslice and llama.cpp.

A `BenchSpec` names the model, the depths, the chat's turns and the token ids both engines
get (random ids, drawn once). Each engine runs in its own process (`run_worker`: this module
with `python -m`), which writes one row per measurement:

* depth D: a fresh sequence prefills the first D ids, then decodes n tokens (greedy);
* turn t: a user message of `user_tokens` ids is appended to the conversation so far and a
  reply is generated on top of it (its first token from the prefill, then n decoded).
  lemonslice keeps its state between turns as `chat` and `serve` do (`Session`: only the
  new ids are fed); llama.cpp keeps its KV cache.

`write_csv`, `write_json`, `plot` write the rows; `summary` pairs the engines' rates.
"""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import LemonsliceError
from ..slicing.atomic import staged_output, write_text

ENGINES = ("lemonslice", "llama")
LABELS = {"lemonslice": "lemonslice", "llama": "llama.cpp"}
COLUMNS = ("engine", "kind", "x", "context", "prefill_tokens", "prefill_s", "prefill_tps", "decode_tokens",
           "decode_s", "decode_tps", "kv_bytes")


@dataclass
class BenchSpec:
    model: str
    depths: list[int]
    turns: int
    n: int
    threads: int
    prompt: list[int]  # the longest depth's ids; a depth D takes the first D
    messages: list[list[int]] = field(default_factory=list)  # one user message per turn
    cache_type: str = "f16"
    max_memory: int | None = None
    llama_repack: bool = False  # llama.cpp's repacked weight buffers (their AMX path crashes on some Xeons)

    @property
    def n_ctx(self) -> int:
        """Positions the longest run needs: a depth and its decode, or the whole chat."""
        chat = sum(len(m) for m in self.messages) + self.turns * (self.n + 1)
        return max(max(self.depths, default=0) + self.n + 1, chat + 1)


def random_ids(n_vocab: int, count: int, rng: random.Random) -> list[int]:
    """Ordinary-looking token ids: away from the low ids (bytes, specials) and the last few."""
    lo = min(1000, n_vocab // 2)
    return [rng.randrange(lo, n_vocab - 4) for _ in range(count)]


def vocab_size(path: str | Path) -> int:
    """Tokens of a model's vocabulary (its tokenizer's, else the embedding's rows)."""
    from ..engine import WeightStore
    from ..gguf.constants import Tensors as TN

    with WeightStore(path) as store:
        return store.args.n_vocab or store.info(TN.TOKEN_EMBD).shape[1]


def make_spec(model: str, n_vocab: int, depths: Sequence[int], turns: int, n: int, threads: int,
              user_tokens: int = 128, seed: int = 0, **options: Any) -> BenchSpec:
    rng = random.Random(seed)
    prompt = random_ids(n_vocab, max(depths, default=0), rng)
    messages = [random_ids(n_vocab, user_tokens, rng) for _ in range(turns)]
    return BenchSpec(model, list(depths), turns, n, threads, prompt, messages, **options)


def _row(engine: str, kind: str, x: int, context: int, prefill: tuple[int, float], decode: tuple[int, float],
         kv_bytes: int) -> dict[str, Any]:
    (pt, ps), (dt, ds) = prefill, decode
    return {"engine": engine, "kind": kind, "x": x, "context": context, "prefill_tokens": pt, "prefill_s": ps,
            "prefill_tps": pt / ps if ps else 0.0, "decode_tokens": dt, "decode_s": ds,
            "decode_tps": dt / ds if ds else 0.0, "kv_bytes": kv_bytes}


# ---- the workers (each in its own process) ---------------------------------------------------


def lemonslice_rows(spec: BenchSpec) -> list[dict[str, Any]]:
    from ..engine import Engine, runtime
    from ..engine.generation import Session
    from ..engine.sampling import Sampler, SamplingParams
    from ..models.caches import AttentionCache

    runtime.setup(kv_types=(spec.cache_type, spec.cache_type))
    engine = Engine(spec.model, max_memory=spec.max_memory)
    runtime.setup(threads=spec.threads, compact_heap=engine.streaming)
    engine.generate(_warmup(spec), 2)  # kernels built, first-call allocations made

    def kv() -> int:
        return sum(c.nbytes for c in engine.state.caches if isinstance(c, AttentionCache))

    rows = []
    for d in spec.depths:
        engine.generate(spec.prompt[:d], spec.n + 1)  # the first token comes out of the prefill
        s = engine.stats
        rows.append(_row("lemonslice", "depth", d, 0, (d, s.prefill_seconds), (s.decode_tokens, s.decode_seconds),
                         kv()))
    session, sampler, history = Session(engine), Sampler(SamplingParams(temperature=0.0)), []
    for t, message in enumerate(spec.messages, 1):
        history += message
        history += list(session.generate(history, sampler, spec.n + 1))
        s = session.stats
        rows.append(_row("lemonslice", "turn", t, s.reused_tokens, (s.prefill_tokens, s.prefill_seconds),
                         (s.decode_tokens, s.decode_seconds), kv()))
    return rows


def _warmup(spec: BenchSpec) -> list[int]:
    return (spec.prompt or spec.messages[0])[:8]


def llama_rows(spec: BenchSpec) -> list[dict[str, Any]]:
    from .llama_bench import LlamaRunner

    ctx = -(-spec.n_ctx // 256) * 256
    runner = LlamaRunner(spec.model, ctx, spec.threads, spec.cache_type, spec.llama_repack)
    runner.feed([runner.feed(_warmup(spec))])
    rows = []
    for d in spec.depths:
        runner.clear()
        pre, dec, _ = _llama_turn(runner, spec.prompt[:d], spec.n + 1)
        rows.append(_row("llama", "depth", d, 0, pre, dec, runner.kv_bytes))
    runner.clear()
    history: list[int] = []
    for t, message in enumerate(spec.messages, 1):
        history += message
        held = runner.n_past
        pre, dec, reply = _llama_turn(runner, history[held:], spec.n + 1)
        history += reply
        rows.append(_row("llama", "turn", t, held, pre, dec, runner.kv_bytes))
    runner.close()
    return rows


def _llama_turn(runner: Any, new: list[int], count: int) -> tuple[tuple[int, float], tuple[int, float], list[int]]:
    """Feed `new`, then choose `count` tokens (the first from the prefill's logits); (prefill
    tokens, seconds), (decode forwards, seconds) and the tokens."""
    t0 = time.perf_counter()
    out = [runner.feed(new)]
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(count - 1):
        out.append(runner.feed(out[-1:]))
    return (len(new), prefill_s), (count - 1, time.perf_counter() - t0), out


_WORKERS: dict[str, Callable[[BenchSpec], list[dict[str, Any]]]] = {"lemonslice": lemonslice_rows,
                                                                     "llama": llama_rows}


def _launch(argv: list[str]) -> tuple[int, str]:
    r = subprocess.run(argv, capture_output=True, text=True)
    return r.returncode, r.stderr


def run_worker(engine: str, spec: BenchSpec, launch: Callable[[list[str]], tuple[int, str]] = _launch
               ) -> list[dict[str, Any]]:
    """One engine's rows, from a process of its own; `launch(argv)` -> (exit status, stderr)."""
    with tempfile.TemporaryDirectory(prefix="lemonslice-bench-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "rows.json"
        spec_file.write_text(json.dumps(asdict(spec)))
        code, stderr = launch([sys.executable, "-m", __name__, engine, str(spec_file), str(out_file)])
        if code != 0 or not out_file.exists():
            last = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or ["no message"]
            raise LemonsliceError(f"the {LABELS[engine]} worker failed (exit {code}): {last[0].strip()}")
        return json.loads(out_file.read_text())


# ---- results ------------------------------------------------------------------------------------


def summary(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Per x of `kind`: each engine's row side by side ({x, context, lemonslice: row, llama: row})."""
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["kind"] == kind:
            out.setdefault(r["x"], {"x": r["x"], "context": r["context"]})[r["engine"]] = r
    return [out[x] for x in sorted(out)]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def write_json(spec: BenchSpec, rows: list[dict[str, Any]], path: Path) -> None:
    meta = {k: v for k, v in asdict(spec).items() if k not in ("prompt", "messages")}
    meta["user_tokens"] = len(spec.messages[0]) if spec.messages else 0
    write_text(path, json.dumps({**meta, "rows": rows}, indent=1) + "\n")


def plot(rows: list[dict[str, Any]], kind: str, path: Path, title: str) -> None:
    """Prefill and decode tok/s of each engine against depth (log scale) or turn."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3.6))
    for ax, rate in zip(fig.subplots(1, 2), ("prefill_tps", "decode_tps")):
        for engine in ENGINES:
            mine = [r for r in rows if r["kind"] == kind and r["engine"] == engine]
            if mine:
                ax.plot([r["x"] for r in mine], [r[rate] for r in mine], marker="o", label=LABELS[engine])
        if kind == "depth":
            ax.set_xscale("log", base=2)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("context depth (tokens)" if kind == "depth" else "chat turn")
        ax.set_ylabel(rate.replace("_tps", " tok/s"))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with staged_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def _worker_main(argv: list[str]) -> None:
    engine, spec_file, out_file = argv
    spec = BenchSpec(**json.loads(Path(spec_file).read_text()))
    try:
        rows = _WORKERS[engine](spec)
    except LemonsliceError as e:
        raise SystemExit(str(e)) from None  # one line for the parent's error
    write_text(Path(out_file), json.dumps(rows))


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
