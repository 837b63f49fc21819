"""Greedy generation with stop tokens, for probe runs.

Greedy decoding on the engine's `Session.generate`: stops at an end-of-generation token
(EOS, end-of-turn), after `max_new_tokens`, or once a caller's `done(text)` says the reply
holds everything it needs. Prompts come from `text.prompt` (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..engine import Engine
from ..engine.generation import Session
from ..engine.sampling import Sampler, SamplingParams
from ..text.chat import split_reasoning
from ..text.prompt import BUILTIN_GEMMA3_TEMPLATE, ChatPrompter, chat_template_for, stop_ids
from ..text.tokenizer import Tokenizer

__all__ = ["BUILTIN_GEMMA3_TEMPLATE", "ChatPrompter", "Generation", "chat_template_for", "greedy", "stop_ids"]

_GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class Generation:
    ids: list[int]  # new tokens, the stop token excluded
    text: str  # their text
    answer: str  # the text after any reasoning block
    stop: str  # "eos", "length" or "done"


def greedy(
    engine: Engine,
    prompt: Sequence[int],
    tokenizer: Tokenizer,
    max_new_tokens: int,
    stop: frozenset[int],
    done: Callable[[str], bool] | None = None,
    opened_think: bool = False,
) -> Generation:
    """Greedy decoding from a fresh state; `done` sees the answer part of the text so far."""
    session = Session(engine)
    session.reset()
    new: list[int] = []
    reason = "length"
    tokens = session.generate(prompt, Sampler(_GREEDY), max_new_tokens, stop)
    for token in tokens:
        new.append(token)
        if done is not None and done(split_reasoning(tokenizer.decode(new), opened=opened_think).answer):
            # Closing the generator before it feeds `token` saves one forward pass.
            tokens.close()
            reason = "done"
            break
    else:
        reason = session.stats.finish
    text = tokenizer.decode(new)
    return Generation(new, text, split_reasoning(text, opened=opened_think).answer, reason)
