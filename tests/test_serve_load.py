"""`lemonslice serve` under load, aborted streams and a full queue, on the tiny synthetic MoE.

CI's version of bench/serve_load.py (whose pieces it imports): the real server runs as a
subprocess on 127.0.0.1 (`--threads 1`: on a shared two-core machine torch's second thread only
spins against the other test worker), started by a module fixture and always stopped; each
fixture checks that its server process is gone afterwards. Every network call has a timeout.

    (a) 20 s of 4 streaming clients on --parallel 2: no 5xx, every request ends with a finish_reason
        (time to first token and latency are printed, with -s, and never asserted);
    (b) 200 streams closed after their first chunks, 4 at a time: the slots and the queue empty
        within 10 s, the server's RSS grows <= 5%, it still answers;
    (c) --parallel 1 --max-queue 1, the slot held and one request queued: a third request gets a
        503 with an OpenAI-style error at once; after the held stream is closed, the queued one
        and a new one answer.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_load as sl  # noqa: E402

httpx = sl.httpx
pytestmark = pytest.mark.slow

TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=5.0, pool=5.0)
READY_S = 60.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from lemonslice.testing.config import tiny_qwen35moe
    from lemonslice.testing.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("serve_load") / "tiny.gguf", tiny_qwen35moe())


def _gone(server: sl.Server) -> bool:
    """The server process no longer exists (reaped), or its pid now belongs to another process."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return not os.path.exists(f"/proc/{server.pid}")
    try:
        cmd = psutil.Process(server.pid).cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    return cmd != server.command()


def _serve(model: Path, log: Path, **kw: Any) -> Iterator[sl.Server]:
    server = sl.Server(model, threads=1, ready_timeout=READY_S, log=log, **kw)
    try:
        server.start()
        yield server
    finally:
        code = server.stop()
        assert server.proc is None or _gone(server), f"server pid {server.pid} is still there"
        assert code is not None, "the server was not stopped"


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory) -> Iterator[sl.Server]:
    yield from _serve(tiny, tmp_path_factory.mktemp("serve_load_log") / "serve.log", parallel=2)


@pytest.fixture(scope="module")
def queue_server(tiny, tmp_path_factory) -> Iterator[sl.Server]:
    yield from _serve(tiny, tmp_path_factory.mktemp("serve_queue_log") / "serve.log", parallel=1, max_queue=1)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f} ms"


def test_load(server):
    out = sl.run_load(server.base_url, clients=4, duration=20.0, max_tokens=32)
    t, lat = out["ttft_s"], out["latency_s"]
    figures = (f"{out['requests']} requests in {out['wall_s']:.1f} s, status {out['status']}, "
               f"ttft p50 {_ms(t['p50'])} p95 {_ms(t['p95'])}, latency p50 {_ms(lat['p50'])} p95 {_ms(lat['p95'])}, "
               f"{out['tokens_per_s']:.0f} tok/s, finish {out['finish_reasons']}")
    print(f"\nload (4 clients, --parallel 2): {figures}")
    assert out["requests"] > 0, figures
    assert out["server_errors_5xx"] == 0, f"5xx on valid requests: {out['errors']} ({figures})"
    assert out["client_errors"] == 0 and out["stream_errors"] == 0, f"{out['errors']} ({figures})"
    assert out["status"] == {"200": out["requests"]}, figures
    for r in out["results"]:
        assert r["done"] and r["finish_reason"] in ("stop", "length"), r
        assert r["ttft"] is not None or r["completion_tokens"] == 0, r
    assert t["p50"] is not None and t["p95"] is not None, figures
    assert server.alive(), server.log_tail()


def test_aborted_streams(server):
    out = sl.abort_check(server.base_url, server.pid, n=200, concurrency=4, chunks=3, max_tokens=512,
                         idle_timeout=10.0)
    a = out["abort"]
    figures = (f"{a['requests']} streams ({a['aborted']} closed early) in {a['wall_s']:.1f} s, idle after "
               f"{out['idle']['waited_s']:.2f} s, {out['steps_per_stream']:.1f} sequence-steps per stream, RSS "
               f"{out['rss_before'] / 2**20:.1f} -> {out['rss_after'] / 2**20:.1f} MiB "
               f"({out['rss_growth_pct']:+.2f}%)")
    print(f"\naborted streams (4 at a time, --parallel 2): {figures}")
    assert out["warmup_ok"], figures
    assert a["requests"] == 200 and a["status"] == {"200": 200}, f"{a['errors']} ({figures})"
    assert a["aborted"] + a["completed"] == 200 and a["aborted"] >= 150, figures
    assert out["idle"]["idle"], f"not idle within 10 s: {out['idle']} ({figures})"
    # A cancelled stream stops after the step in progress; one left running would cost 512.
    assert out["steps_per_stream"] < 64, figures
    assert out["rss_growth_pct"] <= 5.0, figures
    assert out["health_after"]["status"] == 200, out["health_after"]
    n = out["normal_after"]
    assert n["status"] == 200 and n["done"] and n["finish_reason"], n
    assert server.alive(), server.log_tail()


def _hold_body() -> dict[str, Any]:
    """A stream that runs for seconds (about 17 s alone here): negative penalties make the model
    repeat what it said, so the end-of-turn token (never said yet) does not come before max_tokens.
    (It repeats a newline inside the think block, which the server never sends as text.)"""
    body = sl.chat_body("Hold the slot.", 4000, 1)
    body.update(frequency_penalty=-2.0, presence_penalty=-2.0)
    return body


def test_full_queue(queue_server):
    url = queue_server.base_url
    chat = url + "/v1/chat/completions"
    queued: dict[str, Any] = {}

    def wait_queue():
        with httpx.Client(timeout=TIMEOUT) as c:
            queued.update(sl.stream_chat(c, url, sl.chat_body("Queued request.", 8, 2), deadline_s=30))

    with httpx.Client(timeout=TIMEOUT) as c:
        with c.stream("POST", chat, json=_hold_body()) as hold:
            assert hold.status_code == 200  # headers come once the request holds the slot
            waiter = threading.Thread(target=wait_queue, daemon=True)
            waiter.start()
            t0 = time.monotonic()
            while True:
                code, h = sl.health(url)
                if code == 200 and h["slots_busy"] == 1 and h["queue"] == 1:
                    break
                assert time.monotonic() - t0 < 10, f"the second request did not queue: {code} {h}"
                time.sleep(0.05)

            refused = []
            for stream in (False, True):  # a third request: refused at once, plain or streamed
                t1 = time.monotonic()
                r = c.post(chat, json=sl.chat_body("One too many.", 8, 3, stream=stream), timeout=5.0)
                refused.append((time.monotonic() - t1, r))
            print(f"\nfull queue: 503 after {', '.join(f'{1000 * dt:.0f} ms' for dt, _ in refused)}")
            for dt, r in refused:
                assert r.status_code == 503, (r.status_code, r.text)
                assert r.headers["content-type"].startswith("application/json"), r.headers
                err = r.json()["error"]
                assert isinstance(err["message"], str) and err["message"], err
                assert dt < 5.0, dt
            assert sl.health(url)[1]["slots_busy"] == 1  # the hold was still running all along
        # leaving the block closed the held stream unread: a disconnect, which cancels it

    waiter.join(30)
    assert not waiter.is_alive(), "the queued request never ended"
    assert queued["status"] == 200 and queued["done"] and queued["finish_reason"], queued
    idle = sl.wait_idle(url, 10.0)
    assert idle["idle"], idle
    with httpx.Client(timeout=TIMEOUT) as c:
        r = c.post(chat, json=sl.chat_body("After the queue.", 8, 4, stream=False))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    m = sl.metrics(url)
    assert m.get('lemonslice_requests_total{endpoint="/v1/chat/completions",status="503"}') == 2, m
    assert queue_server.alive(), queue_server.log_tail()


def test_a_client_that_leaves_the_queue_gives_its_place_back(queue_server):
    url = queue_server.base_url
    chat = url + "/v1/chat/completions"
    with httpx.Client(timeout=TIMEOUT) as c:
        with c.stream("POST", chat, json=_hold_body()) as hold:
            assert hold.status_code == 200
            with pytest.raises(httpx.ReadTimeout):  # queued behind the hold, then gone
                httpx.post(chat, json=sl.chat_body("I will leave.", 8, 5, stream=False), timeout=1.0)
            t0 = time.monotonic()
            while sl.health(url)[1]["queue"] != 0:
                assert time.monotonic() - t0 < 2.0, "the departed client kept its place in the queue"
                time.sleep(0.05)
            # Its request ends (499) while the hold still runs: it left the queue, it did not wait.
            left = 'lemonslice_requests_total{endpoint="/v1/chat/completions",status="499"}'
            while (m := sl.metrics(url)).get(left) != 1:
                assert time.monotonic() - t0 < 2.0, m
                time.sleep(0.05)
            steps = m.get("lemonslice_batched_steps", 0.0)
    idle = sl.wait_idle(url, 10.0)
    assert idle["idle"], idle
    # The departed request never ran (it would add a prefill and 8 decode steps); the hold may
    # take a few more steps before its close is noticed.
    time.sleep(0.5)
    assert sl.metrics(url).get("lemonslice_batched_steps", 0.0) - steps < 8
