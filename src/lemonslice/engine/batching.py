"""Slots that decode together: several sequences on one engine, one batched forward per step.

Each slot runs the ordinary generation loop (`Session` -> `generation.decode`) in a thread of
its own, on a `SlotEngine`: an Engine look-alike with its own sequence state whose `forward`
hands the rows to a `StepBatcher`. The batcher's one worker thread takes what the active
slots have submitted and runs it through `Compute.forward` as one batch, so each layer, and
each routed expert, is read once per step for all sequences. The kernels give a row the same
bits whatever else is in the batch, so a slot's tokens equal what it would give alone.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import LemonsliceError
from .engine import Engine
from .state import SequenceState

__all__ = ["MAX_ROWS", "SlotEngine", "StepBatcher"]

# Sequences per decode step: the batch size up to which every kernel gives a row the same bits
# as a batch of one (the kernels' small-batch path).
MAX_ROWS = 16


@dataclass(eq=False)
class _Job:
    state: SequenceState
    ids: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class StepBatcher:
    """Owns the engine's compute: every forward of every slot goes through its worker thread.

    A step waits for all slots inside a generation to submit (at most `gather_s` after the
    first), so slots that finished sampling a moment apart still share the step. Decode steps
    (one token per sequence, at most MAX_ROWS of them) run together; a prompt runs in a step
    of its own, so every row meets the kernels in a batch of the shape it would meet alone.
    """

    def __init__(self, engine: Engine, gather_s: float = 0.02):
        self.engine, self.gather_s = engine, gather_s
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._active = 0
        self._closed = False
        self.steps = 0  # batched forwards run
        self.rows = 0  # sequences they carried, summed
        self.busy_seconds = 0.0
        self._worker = threading.Thread(target=self._loop, name="lemonslice-steps", daemon=True)
        self._worker.start()

    # ---- what slots call ------------------------------------------------------------------

    def enter(self) -> None:
        """A slot starts a generation: steps now wait for it too."""
        with self._cond:
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    @property
    def active(self) -> int:
        return self._active

    def forward(self, state: SequenceState, ids: Sequence[int]) -> torch.Tensor:
        """Append `ids` to `state` in the next step; the logits [1, V] of the last one."""
        job = _Job(state, [int(t) for t in ids])
        with self._cond:
            if self._closed:
                raise LemonsliceError("the engine is shutting down")
            self._pending.append(job)
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.logits is not None
        return job.logits

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # ---- the worker -----------------------------------------------------------------------

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.gather_s
            while len(self._pending) < self._active and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            # In arrival order: a prompt that came first runs (alone) before decoding goes on.
            if len(self._pending[0].ids) > 1:
                batch = self._pending[:1]
            else:
                batch = [j for j in self._pending if len(j.ids) == 1][:MAX_ROWS]
            self._pending = [j for j in self._pending if j not in batch]
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            t0 = time.perf_counter()
            try:
                outs = self.engine.forward_batch([j.state for j in batch], [j.ids for j in batch], logits="last")
                for j, out in zip(batch, outs):
                    j.logits = out
            except BaseException as e:  # noqa: BLE001  (handed to the slots that asked)
                for j in batch:
                    j.error = e
            finally:
                self.steps += 1
                self.rows += len(batch)
                self.busy_seconds += time.perf_counter() - t0
                for j in batch:
                    j.done.set()
        with self._cond:  # closed: nobody waits forever
            for j in self._pending:
                j.error = LemonsliceError("the engine is shutting down")
                j.done.set()
            self._pending = []


class SlotEngine:
    """One slot's view of the shared engine: its own sequence state, the shared weights; what
    `Session`, `Plain` and `TextGenerator` use of an Engine."""

    def __init__(self, batcher: StepBatcher):
        self.batcher = batcher
        base = batcher.engine
        self.store, self.args, self.residency, self.family = base.store, base.args, base.residency, base.family
        self.state = base.new_state()

    @property
    def n_past(self) -> int:
        return self.state.n_past

    @property
    def n_vocab(self) -> int:
        return self.batcher.engine.n_vocab

    def reset(self) -> None:
        release = getattr(self.batcher.engine, "release_state", None)
        if release is not None:  # caches held elsewhere (pipeline stages) are dropped there
            release(self.state)
        self.state = self.batcher.engine.new_state()

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        if all_logits:
            raise LemonsliceError("a slot returns the last position's logits only")
        return self.batcher.forward(self.state, ids)
