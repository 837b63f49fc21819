"""The model behind the server: slots on one engine, and one request's run as events.

    ModelService   the engine, tokenizer, template; `parallel` slots sharing one StepBatcher
    Slot           a SlotEngine (own sequence state) and a TextGenerator on it (prefix reuse)
    Job            one request: prompt -> Generation -> reasoning/answer split -> tool calls,
                   run in a worker thread, handing Events to the event loop as they come

The HTTP side (app.py) only validates, waits for a slot and turns events into JSON or SSE.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..engine.batching import SlotEngine, StepBatcher
from ..engine.sampling import Sampler, SamplingParams
from ..errors import LemonsliceError
from ..text.deltas import ReasoningStream
from ..text.generate import Prompt, TextGenerator
from ..text.tokenizer import Tokenizer
from ..text.tools import ContentDelta, ToolCall, ToolCallDelta, ToolCallStream

log = logging.getLogger(__name__)

__all__ = ["Busy", "Event", "Job", "ModelService", "Outcome", "Slot"]


class Busy(LemonsliceError):
    """Every slot is taken and the queue is full."""


@dataclass
class Outcome:
    finish_reason: str  # "stop", "length" or "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prefill_tps: float
    decode_tps: float


@dataclass
class Event:
    kind: str  # "reasoning", "content", "tool_call", "done" or "error"
    text: str = ""
    call: ToolCall | None = None
    index: int = 0
    outcome: Outcome | None = None


@dataclass
class Slot:
    index: int
    engine: SlotEngine
    text: TextGenerator
    last_used: float = 0.0


@dataclass
class Job:
    """One request's generation; `run` is called in a worker thread."""

    prompt: Prompt
    params: SamplingParams
    max_tokens: int
    emit: Callable[[Event], None]
    chat: bool = True  # split reasoning from the answer
    tools: list[dict[str, Any]] | None = None  # parse tool calls out of the answer
    forced: str = ""  # text the reply was made to start with (a forced tool call)
    parallel_tools: bool = True
    cancel: threading.Event = field(default_factory=threading.Event)

    def run(self, slot: Slot, batcher: StepBatcher, ctx: int | None) -> None:
        batcher.enter()
        try:
            gen = slot.text.generate(self.prompt, Sampler(self.params), self.max_tokens, stop=self.params.stop,
                                     ctx_size=ctx, interrupted=self.cancel.is_set)
            split = ReasoningStream(self.prompt.opened) if self.chat else None
            calls = ToolCallStream(self.tools) if self.tools is not None else None
            n_calls = self._parts(split, calls, self.forced, 0)
            for piece in gen:
                n_calls = self._parts(split, calls, piece.text, n_calls)
            n_calls = self._parts(split, calls, None, n_calls)
            stats = gen.stats
            finish = "tool_calls" if n_calls else "length" if gen.finish in ("length", "context") else "stop"
            self.emit(Event("done", outcome=Outcome(finish, len(self.prompt.ids), len(gen.ids), stats.reused_tokens,
                                                    stats.prefill_tps, stats.decode_tps)))
        except Exception as e:  # noqa: BLE001  (the client gets it as an error event)
            log.exception("generation failed")
            self.emit(Event("error", text=str(e) or type(e).__name__))
        finally:
            batcher.leave()

    def _parts(self, split: ReasoningStream | None, calls: ToolCallStream | None, text: str | None,
               n_calls: int) -> int:
        """Hand out what `text` completes (None: the end of the reply); the tool calls so far."""
        if split is None:
            parts = [("content", text)] if text else []
        else:
            parts = split.feed(text) if text is not None else split.flush()
        for kind, part in parts:
            if kind == "reasoning" or calls is None:
                self.emit(Event(kind, part))
                continue
            n_calls = self._content(calls.feed(part), n_calls)
        if text is None and calls is not None:
            n_calls = self._content(calls.flush(), n_calls)
        return n_calls

    def _content(self, deltas: list[Any], n_calls: int) -> int:
        for d in deltas:
            if isinstance(d, ToolCallDelta):
                if self.parallel_tools or n_calls == 0:
                    self.emit(Event("tool_call", call=d.call, index=n_calls))
                    n_calls += 1
            elif isinstance(d, ContentDelta) and d.text:
                self.emit(Event("content", d.text))
        return n_calls


class ModelService:
    """`parallel` slots on one engine; requests wait for a slot in a queue of `max_queue`."""

    def __init__(self, engine: Any, tokenizer: Tokenizer, *, template: Any = None, parallel: int = 1,
                 ctx: int | None = None, max_queue: int = 64, model_id: str = "model"):
        if parallel < 1:
            raise LemonsliceError(f"--parallel must be >= 1, got {parallel}")
        self.engine, self.tok, self.model_id, self.max_queue = engine, tokenizer, model_id, max_queue
        self.batcher = StepBatcher(engine)
        self.slots = []
        for i in range(parallel):
            se = SlotEngine(self.batcher)
            self.slots.append(Slot(i, se, TextGenerator(se, tokenizer, template=template)))
        self.ctx = _context(engine, ctx)
        self._free = list(self.slots)
        self._waiting = 0
        self._cond: asyncio.Condition | None = None
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="lemonslice-slot")
        self.started = time.time()

    @property
    def text(self) -> TextGenerator:
        """Prompt building (any slot's generator renders the same way)."""
        return self.slots[0].text

    @property
    def busy(self) -> int:
        return len(self.slots) - len(self._free)

    @property
    def waiting(self) -> int:
        return self._waiting

    def close(self) -> None:
        self.batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.engine, "close", None)
        if close is not None:  # a pipeline's stages end with the server
            close()

    async def acquire(self, ids: list[int]) -> Slot:
        """The free slot that re-uses most of `ids` (then the least recently used); waits in
        the queue when none is free, and refuses with Busy when the queue is full."""
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            if not self._free:
                if self._waiting >= self.max_queue:
                    raise Busy(f"all {len(self.slots)} slots are busy and {self._waiting} requests are waiting")
                self._waiting += 1
                try:
                    await self._cond.wait_for(lambda: bool(self._free))
                except asyncio.CancelledError:
                    if self._free:  # a wake-up meant for this waiter goes to the next one
                        self._cond.notify()
                    raise
                finally:
                    self._waiting -= 1
            slot = max(self._free, key=lambda s: (s.text.session.reusable(ids), -s.last_used))
            self._free.remove(slot)
            return slot

    async def release(self, slot: Slot) -> None:
        assert self._cond is not None
        async with self._cond:
            slot.last_used = time.monotonic()
            self._free.append(slot)
            self._cond.notify()

    async def run(self, job: Job, slot: Slot) -> None:
        """Run `job` on `slot` in a worker thread; the slot is free again when this returns."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, job.run, slot, self.batcher, self.ctx)
        finally:
            await self.release(slot)


def _context(engine: Any, ctx: int | None) -> int | None:
    """The context size in tokens: --ctx, else the model's context_length (None: unknown)."""
    if ctx is not None:
        if ctx < 1:
            raise LemonsliceError(f"--ctx must be >= 1, got {ctx}")
        return ctx
    n = engine.store.metadata.get(f"{engine.args.arch}.context_length")
    return int(n) if n else None
