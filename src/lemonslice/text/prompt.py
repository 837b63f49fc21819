"""From a GGUF's metadata to prompt ids: the chat template to use, the ids that end a turn,
and one-turn prompts with thinking on or off.

A GGUF without `tokenizer.chat_template` gets a built-in template for its architecture
(Gemma 3's GGUFs often have none; Qwen3.5 gets the built-in ChatML one).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Mapping

from ..gguf.constants import Keys
from .chat import ChatTemplate, builtin_template, load_template, opens_think_block
from .tokenizer import Tokenizer

__all__ = [
    "BUILTIN_GEMMA3_TEMPLATE", "COMPLETION_TEMPLATE", "ChatPrompter", "chat_template_for", "encode_prompt", "special_kwargs", "stop_ids",
]

log = logging.getLogger(__name__)

# Written for lemonslice after Gemma 3's turn format: a system message is folded into the
# first user turn, the assistant's role is "model", and no thinking mode exists.
BUILTIN_GEMMA3_TEMPLATE = r"""
{%- if not messages %}{{ raise_exception('no messages to render') }}{% endif %}
{{- bos_token }}
{%- set state = namespace(prefix='') %}
{%- for turn in messages %}
{%- set text = (turn.content if turn.content is string else '') | trim %}
{%- if turn.role == 'system' %}
{%- if not loop.first %}{{ raise_exception('a system message must come first') }}{% endif %}
{%- set state.prefix = text ~ '\n\n' %}
{%- elif turn.role in ('user', 'assistant') %}
{{- '<start_of_turn>' ~ ('model' if turn.role == 'assistant' else 'user') ~ '\n' ~ state.prefix ~ text ~ '<end_of_turn>\n' }}
{%- set state.prefix = '' %}
{%- else %}
{{- raise_exception('unsupported message role: ' ~ turn.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}
"""

# For base (not chat-tuned) models: one question, answered by continuing the text.
COMPLETION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages if m.role == 'user' %}Question: {{ m.content | trim }}\n"
    "{% endfor %}Answer:"
)

# Control tokens that end a turn in the chat formats lemonslice meets (looked up by text).
_END_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<eos>")
_EOT_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def chat_template_for(metadata: Mapping[str, Any], override: str | None = None, style: str = "chat"
                      ) -> ChatTemplate:
    """An override file, else the GGUF's own template, else a built-in one for its architecture.

    style "completion" is a plain question/answer text for base models; "auto" uses it when the
    GGUF has no template of its own (which usually means a base model) and no override is given.
    """
    if style not in ("chat", "completion", "auto"):
        raise ValueError(f"prompt style must be chat, completion or auto, got {style!r}")
    if override is not None:
        return load_template(override)
    if style == "completion" or (style == "auto" and not metadata.get(Keys.CHAT_TEMPLATE)):
        return ChatTemplate(COMPLETION_TEMPLATE, origin="built-in question/answer completion")
    embedded = metadata.get(Keys.CHAT_TEMPLATE)
    if embedded:
        return ChatTemplate(embedded, origin="GGUF tokenizer.chat_template")
    if metadata.get(Keys.ARCHITECTURE) == "gemma3":
        log.info("chat template: built-in Gemma 3 (the GGUF has none)")
        return ChatTemplate(BUILTIN_GEMMA3_TEMPLATE, origin="built-in Gemma 3")
    log.info("chat template: built-in Qwen3.5 (the GGUF has none)")
    return builtin_template()


def stop_ids(tokenizer: Tokenizer, metadata: Mapping[str, Any]) -> frozenset[int]:
    """EOS, the GGUF's end-of-turn ids, and every end-of-turn control token the vocabulary has."""
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    ids |= {int(metadata[k]) for k in _EOT_KEYS if metadata.get(k) is not None}
    ids |= {i for i, t in enumerate(tokenizer.tokens) if t in _END_TOKENS}
    return frozenset(i for i in ids if 0 <= i < tokenizer.n_vocab)


def special_kwargs(tok: Tokenizer) -> dict[str, str]:
    """The bos_token / eos_token texts that templates expect as variables."""
    return {
        "bos_token": tok.tokens[tok.bos_id] if tok.bos_id is not None else "",
        "eos_token": tok.tokens[tok.eos_id] if tok.eos_id is not None else "",
    }


def encode_prompt(tok: Tokenizer, text: str, templated: bool) -> list[int]:
    """Prompt ids; a rendered template gets BOS only when the vocabulary asks and the text lacks it."""
    ids = tok.encode(text, add_special=not templated, parse_special=True)
    if templated and tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids.insert(0, tok.bos_id)
    return ids


class ChatPrompter:
    """Turns one user message into prompt ids with the chat template, thinking on or off."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, thinking: bool = False):
        self.tokenizer, self.template, self.thinking = tokenizer, template, thinking
        self._special = special_kwargs(tokenizer)

    @property
    def fingerprint(self) -> str:
        """sha256 of the template source: a changed template means different prompts."""
        return hashlib.sha256(self.template.source.encode("utf-8")).hexdigest()

    def render(self, user: str) -> str:
        return self.template.render(
            [{"role": "user", "content": user}], add_generation_prompt=True,
            enable_thinking=self.thinking, **self._special,
        )

    def ids(self, user: str) -> tuple[list[int], bool]:
        """(prompt ids, whether the prompt leaves a <think> block open)."""
        text = self.render(user)
        return encode_prompt(self.tokenizer, text, templated=True), opens_think_block(text)
