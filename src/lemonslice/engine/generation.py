"""Token generation on an Engine: the one decode loop, sampling, end ids, multi-turn state reuse.

`decode` is the one place where a chosen token is fed back into the model: it asks a
`Decoder` for the next token(s) and hands the last one back on the next step. Two decoders
exist: `Plain` (one forward per token, a Sampler picks it) and the speculative one of
`speculative.Speculator` (the MTP head drafts, one trunk pass verifies and keeps the
accepted tokens). `Session.generate` wraps `decode` with prefix reuse between turns: it
remembers which ids the engine's state already holds, so the next turn of a chat only feeds
the new tokens when its prompt extends them. Recurrent state cannot be rewound, so the
session also keeps a few checkpoints (the end of a prompt, and cuts the caller names, such as
the end of the conversation before the generation prompt): a prompt that shares a prefix up
to one of them goes back to it instead of starting afresh. Timing lands in `stats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..errors import LemonsliceError
from ..models import AttentionCache
from ..models.protocol import LayerCache
from .engine import Engine, RunStats
from .sampling import Sampler

if TYPE_CHECKING:
    from .speculative import Speculator

__all__ = ["Decoder", "GenStats", "Plain", "Session", "decode"]

# Checkpoints a session keeps (the newest): each holds copies of the recurrent and windowed caches.
MAX_CHECKPOINTS = 4


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
    chosen: list[int], interrupted: Callable[[], bool] | None = None, cuts: Sequence[int] = (),
    on_cut: Callable[[int], None] | None = None,
) -> Iterator[int]:
    """THE decode loop: prefill `new` (the tail of `prompt` the state lacks), then yield up to
    `max_tokens` ids, each chosen token fed back on the next step. An id in `stop_ids` ends it
    (not yielded); `interrupted()` true ends it before the next id is handed out. Every id the
    decoder chose, handed out or not, is appended to `chosen` (the state may hold some of them).
    The prefill stops at each offset of `cuts` into `new` and at its end, and calls `on_cut(n_past)`."""
    stats = decoder.stats
    stats.finish = "stopped"
    history = list(prompt)
    io0 = _io(decoder)
    t0 = time.perf_counter()
    a = 0
    for b in sorted({c for c in cuts if 0 < c < len(new)}) + [len(new)]:
        decoder.prefill(new[a:b])
        a = b
        if on_cut is not None:
            on_cut(decoder.n_past)
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


def _grows(cache: LayerCache) -> bool:
    """A global attention cache: only ever appended to, so going back is a truncation."""
    return isinstance(cache, AttentionCache) and not cache.window


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Session:
    """One conversation with an engine; not thread-safe. With a `speculator`, tokens come from
    MTP speculation with up to `draft_max` drafts per step (each generation starts afresh)."""

    def __init__(self, engine: Engine, speculator: "Speculator | None" = None, draft_max: int = 3):
        self.engine, self.speculator, self.draft_max = engine, speculator, draft_max
        self.fed: list[int] = []  # ids whose effect the engine's state holds, in order
        # (n, per position: a copy of the cache, or None where truncating to n restores it)
        self.checkpoints: list[tuple[int, list[LayerCache | None]]] = []
        self._owner: object = None  # the state the checkpoints belong to
        self.stats = GenStats()

    def reset(self) -> None:
        self.engine.reset()
        self.fed = []
        self.checkpoints = []

    def _save(self, n: int) -> None:
        if not getattr(self.engine.state, "checkpointable", True):  # caches held elsewhere (pipeline stages)
            return
        if self._owner is not self.engine.state:
            self.checkpoints, self._owner = [], self.engine.state
        saved = [None if _grows(c) else c.copy() for c in self.engine.state.caches]
        kept = [cp for cp in self.checkpoints if cp[0] != n]
        self.checkpoints = kept[len(kept) - MAX_CHECKPOINTS + 1:] + [(n, saved)]

    def _restore(self, n: int, saved: list[LayerCache | None]) -> None:
        caches = self.engine.state.caches
        for i, c in enumerate(saved):
            if c is None:
                caches[i].truncate(n)
            else:
                caches[i] = c.copy()  # the checkpoint stays usable for another turn
        self.checkpoints = [cp for cp in self.checkpoints if cp[0] <= n]

    def reusable(self, prompt: Sequence[int]) -> int:
        """How many ids of `prompt` a generation would not feed again (nothing changes)."""
        fed = self.fed if self.engine.n_past == len(self.fed) else []
        common = _common(prompt, fed)
        if self.speculator is not None:
            return 0
        if fed and common == len(fed) < len(prompt):
            return common
        ok = self._owner is self.engine.state
        return max((cp[0] for cp in self.checkpoints if ok and cp[0] <= common and cp[0] < len(prompt)), default=0)

    def _resume(self, prompt: list[int]) -> int:
        """Bring the state to the longest usable prefix of `prompt`; how many ids it holds."""
        fed = self.fed if self.engine.n_past == len(self.fed) else []
        common = _common(prompt, fed)
        if self.speculator is None and fed and common == len(fed) < len(prompt):
            return common
        if self._owner is not self.engine.state:  # someone else replaced the state
            self.checkpoints = []
        usable = [cp for cp in self.checkpoints if cp[0] <= common and cp[0] < len(prompt)]
        if self.speculator is None and usable:
            n, saved = max(usable, key=lambda cp: cp[0])
            self._restore(n, saved)
            return n
        self.reset()
        return 0

    def generate(
        self,
        prompt: Sequence[int],
        sampler: Sampler,
        max_tokens: int,
        stop_ids: frozenset[int] = frozenset(),
        interrupted: Callable[[], bool] | None = None,
        cuts: Sequence[int] = (),
    ) -> Iterator[int]:
        """Yield up to `max_tokens` new ids after `prompt`; an id in `stop_ids` ends it (not yielded).
        Checkpoints are kept at the end of the prompt and at each offset of `cuts` into it."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise LemonsliceError("the prompt has no tokens")
        if max_tokens < 0:
            raise LemonsliceError(f"max_tokens must be >= 0, got {max_tokens}")
        n = self._resume(prompt)
        new = prompt[n:]
        if self.speculator is None:
            decoder: Decoder = Plain(self.engine, sampler)
            on_cut: Callable[[int], None] | None = self._save
        else:
            decoder, on_cut = self.speculator.decoder(sampler, self.draft_max), None
        self.stats = decoder.stats
        self.stats.reused_tokens = n
        seq = list(prompt)
        self.fed = []  # until the loop ends cleanly, the state is not trusted
        try:
            yield from decode(decoder, prompt, new, max_tokens, stop_ids, seq, interrupted,
                              [c - n for c in cuts], on_cut)
        except GeneratorExit:
            self.fed = seq[: decoder.n_past]
            raise
        else:
            self.fed = seq[: decoder.n_past]
