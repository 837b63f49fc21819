"""Token generation on an Engine: the one decode loop, sampling, end ids, multi-turn state reuse.

`decode` is the one place where a chosen token is fed back into the model: it asks a
`Decoder` for the next token(s) and hands the last one back on the next step. Two decoders
exist: `Plain` (one forward per token, a Sampler picks it) and the speculative one of
`speculative.Speculator` (the MTP head drafts, one trunk pass verifies and keeps the
accepted tokens). `Session.generate` wraps `decode` with prefix reuse between turns: it
remembers which ids the engine's state already holds, so the next turn of a chat only feeds
the new tokens when its prompt extends them (recurrent state cannot be rewound, so anything
else starts from a fresh state). Timing of the finished or abandoned run lands in `stats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..errors import LemonsliceError
from .engine import Engine, RunStats
from .sampling import Sampler

if TYPE_CHECKING:
    from .speculative import Speculator

__all__ = ["Decoder", "GenStats", "Plain", "Session", "decode"]


@dataclass
class GenStats(RunStats):
    reused_tokens: int = 0  # prompt tokens already in the state from the previous turn
    finish: str = ""  # "eos", "length", or "stopped" (the caller stopped early)
    generated: int = 0  # tokens handed out
    # Weight reading in each phase (residency's counters): bytes read, expert lookups and hits,
    # seconds reads were in flight and seconds compute waited for them.
    prefill_io: dict[str, float] = field(default_factory=dict)
    decode_io: dict[str, float] = field(default_factory=dict)


def _io(decoder: "Decoder") -> dict[str, float]:
    engine = getattr(decoder, "engine", None)
    return engine.residency.io_counters() if engine is not None else {}


def _delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in b if k in a}


class Decoder(Protocol):
    """Feeds one sequence and chooses what follows it."""

    stats: GenStats

    @property
    def n_past(self) -> int:
        """Positions the sequence's state holds."""

    def prefill(self, ids: list[int]) -> None:
        """Append prompt `ids` to the state."""

    def step(self, last: int | None, history: list[int], budget: int) -> list[int]:
        """Feed `last` (the token chosen last step; None right after the prefill) and choose
        the next 1..`budget` tokens; `history` is the prompt and every token handed out."""


class Plain:
    """One forward pass per token; `sampler` picks each from the last logits."""

    def __init__(self, engine: Engine, sampler: Sampler):
        self.engine, self.sampler, self.stats = engine, sampler, GenStats()
        self.logits = None  # [V] after the last fed token

    @property
    def n_past(self) -> int:
        return self.engine.n_past

    def prefill(self, ids: list[int]) -> None:
        self.logits = self.engine.forward(ids)[-1]

    def step(self, last: int | None, history: list[int], budget: int) -> list[int]:
        if last is not None:
            self.logits = self.engine.forward([last])[-1]
        return [self.sampler.sample(self.logits, history)]


def decode(
    decoder: Decoder, prompt: list[int], new: list[int], max_tokens: int, stop_ids: frozenset[int],
    chosen: list[int], interrupted: Callable[[], bool] | None = None,
) -> Iterator[int]:
    """THE decode loop: prefill `new` (the tail of `prompt` the state lacks), then yield up to
    `max_tokens` ids, each chosen token fed back on the next step. An id in `stop_ids` ends it
    (not yielded); `interrupted()` true ends it before the next id is handed out. Every id the
    decoder chose, handed out or not, is appended to `chosen` (the state may hold some of them)."""
    stats = decoder.stats
    stats.finish = "stopped"
    history = list(prompt)
    io0 = _io(decoder)
    t0 = time.perf_counter()
    decoder.prefill(new)
    stats.prefill_tokens, stats.prefill_seconds = len(new), time.perf_counter() - t0
    io1 = _io(decoder)
    stats.prefill_io = _delta(io0, io1)
    start = decoder.n_past
    t0 = time.perf_counter()
    try:
        last = None
        while stats.generated < max_tokens:
            out = decoder.step(last, history, max_tokens - stats.generated)
            chosen.extend(out)
            for token in out:
                if token in stop_ids:
                    stats.finish = "eos"
                    return
                if interrupted is not None and interrupted():
                    return
                stats.generated += 1
                history.append(token)
                yield token
            last = history[-1]
        stats.finish = "length"
    finally:
        stats.decode_seconds = time.perf_counter() - t0
        stats.decode_tokens = decoder.n_past - start
        stats.decode_io = _delta(io1, _io(decoder))


class Session:
    """One conversation with an engine; not thread-safe. With a `speculator`, tokens come from
    MTP speculation with up to `draft_max` drafts per step (each generation starts afresh)."""

    def __init__(self, engine: Engine, speculator: "Speculator | None" = None, draft_max: int = 3):
        self.engine, self.speculator, self.draft_max = engine, speculator, draft_max
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
        interrupted: Callable[[], bool] | None = None,
    ) -> Iterator[int]:
        """Yield up to `max_tokens` new ids after `prompt`; an id in `stop_ids` ends it (not yielded)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise LemonsliceError("the prompt has no tokens")
        if max_tokens < 0:
            raise LemonsliceError(f"max_tokens must be >= 0, got {max_tokens}")
        n_fed = len(self.fed)
        # n_past catches other users of the engine having moved its state since the last turn.
        if (self.speculator is None and n_fed and self.engine.n_past == n_fed and len(prompt) > n_fed
                and prompt[:n_fed] == self.fed):
            new = prompt[n_fed:]
        else:
            self.reset()
            new = prompt
        if self.speculator is None:
            decoder: Decoder = Plain(self.engine, sampler)
        else:
            decoder = self.speculator.decoder(sampler, self.draft_max)
        self.stats = decoder.stats
        self.stats.reused_tokens = len(prompt) - len(new)
        seq = list(prompt)
        self.fed = []  # until the loop ends cleanly, the state is not trusted
        try:
            yield from decode(decoder, prompt, new, max_tokens, stop_ids, seq, interrupted)
        except GeneratorExit:
            self.fed = seq[: decoder.n_past]
            raise
        else:
            self.fed = seq[: decoder.n_past]
