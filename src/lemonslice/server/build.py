"""A validated request -> a Job: the prompt through the chat template (tools, thinking, a
forced tool call), sampling parameters, and the token budget within the context."""

from __future__ import annotations

from typing import Any

from ..engine.sampling import SamplingParams
from ..errors import LemonsliceError
from ..text.chat import ChatTemplate
from ..text.generate import Prompt
from ..text.tools import template_messages
from .protocol import ChatRequest, CompletionRequest, Sampling, message_content
from .service import Job, ModelService

__all__ = ["build_chat", "build_completion"]

_TOOL_OPEN = "<tool_call>\n"
# With no budget given and no context size known, a reply ends after this many tokens.
DEFAULT_MAX_TOKENS = 4096


def _params(body: Sampling) -> SamplingParams:
    given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
             "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
             "repetition_penalty": body.repetition_penalty, "seed": body.seed, "stop": tuple(body.stop or ())}
    return SamplingParams(**{k: v for k, v in given.items() if v is not None})


def _budget(s: ModelService, prompt: Prompt, asked: int | None) -> int:
    n = len(prompt.ids)
    if s.ctx is not None and n >= s.ctx:
        raise LemonsliceError(f"the prompt has {n} tokens; the context is {s.ctx} tokens (--ctx)")
    room = s.ctx - n if s.ctx is not None else DEFAULT_MAX_TOKENS
    return min(asked, room) if asked is not None else room


def _messages(body: ChatRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(body.messages):
        d = m.model_dump(exclude_none=True)
        try:
            d["content"] = message_content(m.content)
        except ValueError as e:
            raise LemonsliceError(f"messages.{i}.content: {e}") from None
        if d["role"] == "developer":
            d["role"] = "system"
        out.append(d)
    return template_messages(out)


def _forced(body: ChatRequest, tools: list[dict[str, Any]] | None) -> str:
    """The start of the reply that `tool_choice` required or named imposes."""
    choice = body.tool_choice
    if choice is None or isinstance(choice, str) and choice in ("auto", "none"):
        return ""
    if tools is None:
        raise LemonsliceError("tool_choice needs tools")
    if isinstance(choice, str):  # required
        return _TOOL_OPEN
    name = choice.function.get("name")
    if name not in {t["function"]["name"] for t in tools}:
        raise LemonsliceError(f"tool_choice names {name!r}, which is not among the tools")
    return f"{_TOOL_OPEN}<function={name}>\n"


def build_chat(s: ModelService, body: ChatRequest, default_thinking: bool) -> Job:
    kwargs = dict(body.chat_template_kwargs or {})
    thinking = kwargs.pop("enable_thinking", default_thinking)
    if not isinstance(thinking, bool):
        raise LemonsliceError("chat_template_kwargs.enable_thinking must be true or false")
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    if body.tool_choice == "none":
        tools = None
    forced = _forced(body, tools)
    if tools is not None:
        kwargs["tools"] = tools
    messages = _messages(body)
    if body.chat_template is not None:
        kwargs["template"] = ChatTemplate(body.chat_template, origin="the request's chat_template")
    prompt = s.text.chat(messages, thinking, **kwargs)
    if forced:
        # The reply is made to start with the call; an open think block is closed first.
        close = "\n</think>\n\n" if prompt.opened else ""
        prompt = s.text.chat(messages, thinking, suffix=close + forced, **kwargs)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return Job(prompt, _params(body), _budget(s, prompt, asked), emit=lambda ev: None, chat=True, tools=tools,
               forced=forced, parallel_tools=body.parallel_tool_calls)


def build_completion(s: ModelService, body: CompletionRequest) -> Job:
    if isinstance(body.prompt, str):
        prompt = s.text.encode(body.prompt)
    else:
        if not body.prompt or any(not 0 <= t < s.tok.n_vocab for t in body.prompt):
            raise LemonsliceError(f"prompt token ids must be a non-empty list in [0, {s.tok.n_vocab})")
        prompt = Prompt(list(body.prompt))
    return Job(prompt, _params(body), _budget(s, prompt, body.max_tokens), emit=lambda ev: None, chat=False)
