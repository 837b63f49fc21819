"""Token generation on an Engine: sampling, end-of-generation ids, multi-turn state reuse.

`Session.generate` is a generator of token ids, so callers can stream text as it comes and
stop early (a stop string); the timing of the finished or abandoned run lands in
`session.stats`. A Session remembers which ids the engine's state already holds, so the next
turn of a chat only feeds the new tokens when its prompt extends them (recurrent state
cannot be rewound, so anything else starts from a fresh state).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import LemonsliceError
from .engine import Engine, RunStats
from .sampling import Sampler


@dataclass
class GenStats(RunStats):
    reused_tokens: int = 0  # prompt tokens already in the state from the previous turn
    finish: str = ""  # "eos", "length", or "stopped" (the caller stopped early)


class Session:
    """One conversation with an engine; not thread-safe."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.fed: list[int] = []  # ids whose effect the engine's state holds, in order
        self.stats = GenStats()

    def reset(self) -> None:
        self.engine.reset()
        self.fed = []

    def generate(
        self,
        prompt: Sequence[int],
        sampler: Sampler,
        max_tokens: int,
        stop_ids: frozenset[int] = frozenset(),
    ) -> Iterator[int]:
        """Yield up to `max_tokens` new ids after `prompt`; an id in `stop_ids` ends it (not yielded)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise LemonsliceError("the prompt has no tokens")
        if max_tokens < 0:
            raise LemonsliceError(f"max_tokens must be >= 0, got {max_tokens}")
        n_fed = len(self.fed)
        # n_past catches other users of the engine having moved its state since the last turn.
        if n_fed and self.engine.n_past == n_fed and len(prompt) > n_fed and prompt[:n_fed] == self.fed:
            new = prompt[n_fed:]
        else:
            self.reset()
            new = prompt
        stats = GenStats(reused_tokens=len(prompt) - len(new), finish="stopped")
        self.stats = stats
        t0 = time.perf_counter()
        logits = self.engine.forward(new)[-1]  # [V]
        self.fed.extend(new)
        stats.prefill_tokens, stats.prefill_seconds = len(new), time.perf_counter() - t0
        history = list(prompt)
        t0 = time.perf_counter()
        try:
            n = 0
            while True:
                if n == max_tokens:
                    stats.finish = "length"
                    return
                token = sampler.sample(logits, history)
                if token in stop_ids:
                    stats.finish = "eos"
                    return
                n += 1
                history.append(token)
                yield token
                if n < max_tokens:
                    logits = self.engine.forward([token])[-1]
                    self.fed.append(token)
                    stats.decode_tokens += 1
        finally:
            stats.decode_seconds = time.perf_counter() - t0
