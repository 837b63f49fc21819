"""Text generation: the one text-level loop, over the engine's one decode loop.

    TextGenerator  prompt rendering (chat template), end-of-turn ids, a Session (prefix reuse)
      Generation   one reply: Session.generate -> StreamDecoder -> StopMatcher -> ReasoningSplit
        generation.decode  (engine/) the one place a token is chosen and fed back

`TextGenerator.generate` returns a `Generation`; iterating it yields a `Piece` per token
(the text that token completed, UTF-8-safe and with no part of a stop string) and one last
piece for a tail held back to the end. `run`, `chat`, `sweep`/the probes and `run --mtp`
all read replies this way, so stop strings, the reasoning split, context limits and the
statistics behave the same everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engine import Engine
from ..engine.generation import GenStats, Session
from ..engine.sampling import Sampler, StopMatcher
from ..errors import LemonsliceError
from .chat import ChatTemplate, Reasoning, opens_think_block, split_reasoning
from .prompt import chat_template_for, encode_prompt, special_kwargs, stop_ids
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from ..engine.speculative import Speculator

__all__ = ["FINISHES", "Generation", "Piece", "Prompt", "ReasoningSplit", "TextGenerator", "context_limit"]

# Why a reply ended: an end-of-turn id, a stop string, -n, the context size, or the caller.
FINISHES = ("eos", "stop string", "length", "context", "stopped")


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    opened: bool = False  # the prompt leaves a <think> block open, so the reply starts inside it
    # Where each message of the conversation ends: the prefill stops and checkpoints there,
    # since the next turn shares those prefixes even when the template re-renders this reply.
    cuts: tuple[int, ...] = ()


@dataclass(frozen=True)
class Piece:
    token: int | None  # the id that completed this text; None for the tail released at the end
    text: str


class ReasoningSplit:
    """The reply's text as it grows, and its `split_reasoning` when asked (the split is a few
    string searches; the pieces are joined only when the text is read)."""

    def __init__(self, opened: bool = False):
        self.opened = opened
        self._parts: list[str] = []

    def feed(self, piece: str) -> None:
        if piece:
            self._parts.append(piece)

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def split(self) -> Reasoning:
        return split_reasoning(self.text, opened=self.opened)


def context_limit(engine: Engine, ctx_size: int | None) -> int | None:
    """The context size under -c/--ctx-size: None for no limit, 0 for the model's context_length."""
    if ctx_size is None:
        return None
    if ctx_size < 0:
        raise LemonsliceError(f"-c/--ctx-size must be >= 0, got {ctx_size}")
    limit = ctx_size or engine.store.metadata.get(f"{engine.args.arch}.context_length")
    if not limit:
        raise LemonsliceError("the model records no context_length: give -c/--ctx-size N with N > 0")
    return int(limit)


class TextGenerator:
    """Replies from one engine: prompts through the chat template, sampling, streaming text.

    Turn after turn, the engine's state is built upon when a prompt extends what it holds
    (plain decoding only; with a `speculator`, each reply is decoded with MTP from afresh).
    Without a tokenizer, replies are ids only (pieces carry no text).
    """

    def __init__(
        self, engine: Engine, tokenizer: Tokenizer | None = None, *, template: ChatTemplate | None = None,
        stops: frozenset[int] | None = None, speculator: "Speculator | None" = None, draft_max: int = 3,
        skip_special: bool = True,
    ):
        self.engine, self.tok, self.skip_special = engine, tokenizer, skip_special
        self.session = Session(engine, speculator, draft_max)
        meta = engine.store.metadata
        if tokenizer is None:
            self.template, self.stops = template, stops if stops is not None else frozenset()
        else:
            self.template = template if template is not None else chat_template_for(meta)
            self.stops = stops if stops is not None else stop_ids(tokenizer, meta)

    def reset(self) -> None:
        """Forget the conversation the engine's state holds."""
        self.session.reset()

    # ---- prompts ----------------------------------------------------------------------------

    def _need_tokenizer(self) -> Tokenizer:
        if self.tok is None:
            raise LemonsliceError("text prompts need the model's tokenizer")
        return self.tok

    def encode(self, text: str) -> Prompt:
        """A raw text prompt (BOS as the vocabulary asks)."""
        return Prompt(encode_prompt(self._need_tokenizer(), text, templated=False))

    def chat(self, messages: Sequence[Mapping[str, Any]], thinking: bool = True, *, suffix: str = "",
             template: ChatTemplate | None = None, **template_kwargs: Any) -> Prompt:
        """The conversation through the chat template (`template`, else this generator's), with
        the generation prompt and then `suffix` (text the reply is made to start with);
        `template_kwargs` (tools, ...) reach the template."""
        tok = self._need_tokenizer()
        template = template or self.template
        kw = special_kwargs(tok) | template_kwargs | {"enable_thinking": thinking}
        text = template.render(messages, add_generation_prompt=True, **kw) + suffix
        ids = encode_prompt(tok, text, templated=True)
        return Prompt(ids, opens_think_block(text), self._message_ends(template, messages, ids, kw))

    def _message_ends(self, template: ChatTemplate, messages: Sequence[Mapping[str, Any]], ids: list[int],
                      kw: dict[str, Any]) -> tuple[int, ...]:
        """Where each message ends in `ids`, when the conversation up to it renders as a prefix
        of the whole. The prefill stops there, so a later turn that re-uses the state up to a
        message end (its own prompt stops at the same places) computes exactly what a fresh
        state would: the same chunks from the same states."""
        cuts = []
        for i in range(1, len(messages) + 1):
            try:
                part = template.render(messages[:i], add_generation_prompt=False, **kw)
            except LemonsliceError:  # a template that renders only some prefixes: no cut there
                continue
            head = encode_prompt(self.tok, part, templated=True) if part else []
            if 0 < len(head) < len(ids) and ids[: len(head)] == head:
                cuts.append(len(head))
        return tuple(sorted(set(cuts)))

    # ---- replies ----------------------------------------------------------------------------

    def generate(
        self, prompt: Prompt | Sequence[int], sampler: Sampler, max_tokens: int, *, stop: Sequence[str] = (),
        ctx_size: int | None = None, interrupted: Callable[[], bool] | None = None,
    ) -> "Generation":
        """One reply of up to `max_tokens` tokens, within `ctx_size` tokens of context (0: the
        model's) when given; nothing runs until it is iterated."""
        if not isinstance(prompt, Prompt):
            prompt = Prompt([int(t) for t in prompt])
        if max_tokens < 0:
            raise LemonsliceError(f"-n must be >= 0, got {max_tokens}")
        limit, context = context_limit(self.engine, ctx_size), None
        if limit is not None:
            n = len(prompt.ids)
            if n >= limit:
                raise LemonsliceError(f"the prompt has {n} tokens; a context of {limit} leaves no room to generate")
            if limit - n < max_tokens:
                max_tokens, context = limit - n, limit
        return Generation(self, prompt, sampler, max_tokens, tuple(stop), context, interrupted)


class Generation:
    """One reply being generated. Iterate it for the pieces; then `finish` (one of FINISHES),
    `stop_string`, `ids`, `text`, `answer`, `reasoning` and `stats` tell the rest."""

    def __init__(self, gen: TextGenerator, prompt: Prompt, sampler: Sampler, max_tokens: int,
                 stop: tuple[str, ...], context: int | None, interrupted: Callable[[], bool] | None):
        self._gen, self.prompt, self._sampler, self.max_tokens = gen, prompt, sampler, max_tokens
        self.tokenizer, self.stops = gen.tok, gen.stops  # None: a reply of ids only
        self.context = context  # the context size, when it is what caps max_tokens
        self._interrupted, self.stop_strings = interrupted, stop
        self._matcher = StopMatcher(stop)
        self._split = ReasoningSplit(prompt.opened)
        self._raw: list[str] = []  # decoded text before the stop matcher
        self.ids: list[int] = []  # tokens handed out (an end-of-turn id is not one)
        self.finish = "stopped"
        self.stop_string: str | None = None
        self._iter: Iterator[Piece] | None = None

    @property
    def stats(self) -> GenStats:
        return self._gen.session.stats

    @property
    def text(self) -> str:
        return self._split.text

    @property
    def answer(self) -> str:
        return self._split.split().answer

    @property
    def reasoning(self) -> str:
        return self._split.split().reasoning

    def __iter__(self) -> Iterator[Piece]:
        if self._iter is None:
            self._iter = self._pieces()
        return self._iter

    def __next__(self) -> Piece:
        return next(iter(self))

    def close(self) -> None:
        """Stop before another token is fed (the state keeps what it was fed so far)."""
        if self._iter is not None:
            self._iter.close()

    def run(self) -> "Generation":
        for _ in self:
            pass
        return self

    def _pieces(self) -> Iterator[Piece]:
        gen = self._gen
        dec = gen.tok.stream(skip_special=gen.skip_special) if gen.tok is not None else None
        tokens = gen.session.generate(self.prompt.ids, self._sampler, self.max_tokens, gen.stops, self._interrupted,
                                      self.prompt.cuts)
        tail = ""
        try:
            for t in tokens:
                self.ids.append(t)
                piece = self._show(dec.feed(t)) if dec is not None else ""
                yield Piece(t, piece)
                if self._matcher.stopped:
                    break
        finally:
            # A stop string ends the reply before its last token is fed; so does a caller's close.
            tokens.close()
            if dec is not None:
                tail = self._show(dec.flush())
                held = self._matcher.flush()  # a tail that might have begun a stop string
                self._split.feed(held)
                tail += held
            self._done()
        if tail:
            yield Piece(None, tail)

    def _show(self, raw: str) -> str:
        self._raw.append(raw)
        piece, _ = self._matcher.feed(raw)
        self._split.feed(piece)
        return piece

    def _done(self) -> None:
        finish = self.stats.finish
        if self._matcher.stopped:
            whole = "".join(self._raw)
            self.finish = "stop string"
            self.stop_string = min((s for s in self.stop_strings if s in whole), key=whole.find)
        elif finish == "length" and self.context is not None:
            self.finish = "context"
        else:
            self.finish = finish

    def describe(self) -> str:
        """Why it ended, in words: end of text, stop string "...", context full, length."""
        if self.finish == "stop string":
            return f"stop string {json.dumps(self.stop_string, ensure_ascii=False)}"
        if self.finish == "eos":
            return "end of text"
        if self.finish == "context":
            return f"context full ({self.context} tokens)"
        if self.finish == "length":
            return f"length ({self.max_tokens} tokens)"
        return "stopped"
