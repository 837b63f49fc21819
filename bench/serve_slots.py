"""Slots that decode together: aggregate decode tokens/s of `lemonslice serve --parallel N`
with N concurrent streams against one stream, on the streaming real-shape qwen35moe bench
model (bench/engine.py builds it: 8 layers, vocabulary 248320, 256 experts top-8).

    python bench/serve_slots.py --layers 8 --vocab 248320 --streams 4 -n 48

The server streams the model within `--budget` (default 600 MB: `lemonslice inspect --budget
600MB` says 67 MB of layer tensors plus the routed experts that miss a 12 MB cache are read
per token). At bench/engine.py's streaming budget (`--budget shared+largest`, 1.25 GB) this
model keeps every layer tensor resident and its experts all hit the cache, so nothing is read
per token and a step is bound by compute instead. Each stream is a /v1/completions request with its own
random prompt ids and greedy decoding. Prompts run in steps of their own, so the aggregate is
measured while every stream decodes: the tokens all streams received between the moment the
last of them got its first token and the moment the first of them got its last, over that
time (one stream: its tokens after the first over their time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from engine import add_model_args, build, parse_size  # noqa: E402

LEMONSLICE = str(Path(sys.executable).with_name("lemonslice"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, parallel: int, budget: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([LEMONSLICE, "serve", str(model), "--port", str(port), "--parallel", str(parallel),
                             "--max-memory", str(budget), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not become healthy in 600 s")


def stream(url: str, prompt: list[int], n: int) -> list[float]:
    """The arrival time of every token of one greedy streamed completion."""
    times: list[float] = []
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return times


def run(url: str, prompts: list[list[int]], n: int) -> dict:
    with ThreadPoolExecutor(len(prompts)) as pool:
        res = list(pool.map(lambda p: stream(url, p, n), prompts))
    t0, t1 = max(r[0] for r in res), min(r[-1] for r in res)
    tokens = sum(sum(1 for t in r if t0 < t <= t1) for r in res)
    return {"streams": len(prompts), "decode_tokens": tokens, "decode_s": t1 - t0,
            "aggregate_tps": tokens / (t1 - t0), "per_stream_tokens": [len(r) for r in res]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, layers=8, vocab=248320)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("-n", type=int, default=48, help="tokens per stream")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per stream")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", default="600MB",
                    help="weight budget, e.g. 600MB, or 'shared+largest' (as bench/engine.py streams)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model, split, sizes = build(args)
    budget = sizes["shared"] + sizes["largest"] if args.budget == "shared+largest" else parse_size(args.budget)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, args.vocab - 3) for _ in range(args.prompt)] for _ in range(args.streams)]
    print(f"model {split} ({sizes['total'] / 1e9:.2f} GB), budget {budget / 1e6:.0f} MB, {args.threads} threads, "
          f"{args.streams} streams x {args.n} tokens", flush=True)
    proc, url = start(split, args.streams, budget, args.threads)
    try:
        run(url, [prompts[0][:8]], 4)  # warm-up: first reads, allocations
        one = run(url, prompts[:1], args.n)
        print(f"1 stream:  {one['aggregate_tps']:.2f} tok/s", flush=True)
        many = run(url, prompts, args.n)
        print(f"{args.streams} streams: {many['aggregate_tps']:.2f} tok/s aggregate", flush=True)
        ratio = many["aggregate_tps"] / one["aggregate_tps"]
        print(f"ratio: {ratio:.2f}x")
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        proc.terminate()
        proc.wait(30)
    steps = rows = 0.0
    for line in metrics.splitlines():
        if line.startswith("lemonslice_batched_steps "):
            steps = float(line.split()[1])
        if line.startswith("lemonslice_batched_sequences "):
            rows = float(line.split()[1])
    result = {"model": str(split), "budget": budget, "threads": args.threads, "one": one, "many": many,
              "ratio": ratio, "mean_batch": rows / steps if steps else 0.0}
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
