"""Prometheus metrics of one server, on a registry of its own (two apps in one process, as in
tests, never share counters)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lemonslice_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lemonslice_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.prefill_tokens = Counter("lemonslice_prefill_tokens",
                                      "Prompt tokens fed to the model (prompt tokens less those re-used)", registry=r)
        self.cached_tokens = Counter("lemonslice_cached_prompt_tokens",
                                     "Prompt tokens re-used from a slot's state instead of fed again", registry=r)
        self.completion_tokens = Counter("lemonslice_completion_tokens", "Generated tokens", registry=r)
        self.prefill_tps = Gauge("lemonslice_prefill_tokens_per_second", "Prefill speed of the last request",
                                 registry=r)
        self.decode_tps = Gauge("lemonslice_decode_tokens_per_second", "Decode speed of the last request", registry=r)
        self.queue = Gauge("lemonslice_queue_depth", "Requests waiting for a slot", registry=r)
        self.slots_busy = Gauge("lemonslice_slots_busy", "Slots generating now", registry=r)
        self.slots = Gauge("lemonslice_slots", "Slots (--parallel)", registry=r)
        self.bytes_read = Gauge("lemonslice_weight_bytes_read", "Weight bytes read from disk since start", registry=r)
        self.steps = Gauge("lemonslice_batched_steps", "Batched forward steps run", registry=r)
        self.rows = Gauge("lemonslice_batched_sequences",
                          "Sequences carried by the batched steps, summed (rows / steps = mean batch)", registry=r)

    def finished(self, prompt: int, cached: int, completion: int, prefill_tps: float, decode_tps: float) -> None:
        self.prompt_tokens.inc(prompt)
        self.cached_tokens.inc(cached)
        self.prefill_tokens.inc(prompt - cached)
        self.completion_tokens.inc(completion)
        if prefill_tps:
            self.prefill_tps.set(prefill_tps)
        if decode_tps:
            self.decode_tps.set(decode_tps)

    def render(self, service: Any | None, io: Callable[[], dict[str, float]] | None) -> bytes:
        if service is not None:
            self.queue.set(service.waiting)
            self.slots_busy.set(service.busy)
            self.slots.set(len(service.slots))
            self.steps.set(service.batcher.steps)
            self.rows.set(service.batcher.rows)
            if io is not None:
                self.bytes_read.set(io().get("bytes_read", 0))
        return generate_latest(self.registry)
