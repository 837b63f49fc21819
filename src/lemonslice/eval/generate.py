"""Greedy generation with stop tokens, for probe runs.

Greedy decoding through the one text loop (`text.generate.TextGenerator`): stops at an
end-of-generation token (EOS, end-of-turn), after `max_new_tokens`, or once a caller's
`done(text)` says the reply holds everything it needs. Prompts come from `text.prompt`
(re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..engine import Engine
from ..engine.sampling import Sampler, SamplingParams
from ..text.generate import Prompt, TextGenerator
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
    text = TextGenerator(engine, tokenizer, stops=stop, skip_special=False)
    gen = text.generate(Prompt(list(prompt), opened_think), Sampler(_GREEDY), max_new_tokens)
    reason = None
    for piece in gen:
        if piece.token is not None and done is not None and done(gen.answer):
            # Closing before `piece.token` is fed saves one forward pass.
            gen.close()
            reason = "done"
            break
    return Generation(gen.ids, gen.text, gen.answer, reason or gen.finish)
