"""Chat templates rendered in a locked-down Jinja sandbox, plus reasoning/answer splitting.

Templates come from untrusted GGUF metadata or files, so rendering runs in jinja2's
ImmutableSandboxedEnvironment with extra guards: any unsafe attribute access fails at once
(instead of printing as empty), `*`/`**` cannot build huge values, and every loop iteration,
call and attribute access checks a per-render deadline.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
from jinja2 import nodes
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from lemonslice.errors import LemonsliceError

__all__ = [
    "BUILTIN_QWEN35_TEMPLATE",
    "ChatTemplate",
    "Reasoning",
    "TemplateError",
    "builtin_template",
    "has_thinking_mode",
    "load_template",
    "opens_think_block",
    "resolve_template",
    "split_reasoning",
]

log = logging.getLogger(__name__)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
DEFAULT_TIME_LIMIT_S = 2.0
_MAX_REPEAT = 1_000_000  # items one `*` may produce ('x' * n, list * n)
_MAX_POW_BITS = 4096  # bits one integer `**` may produce
_LOOP_GUARD = "lemonslice_loop_guard"

# Written for lemonslice from the Qwen3.5 ChatML conventions: history turns drop their
# reasoning, turns after the last user message keep it, and the generation prompt opens a
# think block (thinking on, the default) or emits an empty one (enable_thinking=false).
BUILTIN_QWEN35_TEMPLATE = r"""
{%- if not messages %}
{{- raise_exception('no messages to render') }}
{%- endif %}
{%- set state = namespace(last_user=-1) %}
{%- for turn in messages %}
{%- if turn.role == 'user' %}{% set state.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- for turn in messages %}
{%- set text = (turn.content if turn.content is string else '') | trim %}
{%- if turn.role == 'system' %}
{%- if not loop.first %}{{ raise_exception('a system message must come first') }}{% endif %}
{{- '<|im_start|>system\n' ~ text ~ '<|im_end|>\n' }}
{%- elif turn.role == 'user' %}
{{- '<|im_start|>user\n' ~ text ~ '<|im_end|>\n' }}
{%- elif turn.role == 'assistant' %}
{%- set thought = '' %}
{%- if turn.reasoning_content is string %}
{%- set thought = turn.reasoning_content %}
{%- elif '</think>' in text %}
{%- set thought = text.split('</think>')[0].split('<think>')[-1] %}
{%- set text = text.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{%- if loop.index0 > state.last_user %}
{{- '<|im_start|>assistant\n<think>\n' ~ (thought | trim) ~ '\n</think>\n\n' ~ text ~ '<|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>assistant\n' ~ text ~ '<|im_end|>\n' }}
{%- endif %}
{%- else %}
{{- raise_exception('unsupported message role: ' ~ turn.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\n\n</think>\n\n' }}
{%- else %}
{{- '<think>\n' }}
{%- endif %}
{%- endif %}
"""


class TemplateError(LemonsliceError):
    """A chat template failed to load or render (one line, safe to show the user)."""


class _Raised(Exception):
    """A template's own raise_exception(...), kept apart from sandbox failures."""


class _Timeout(Exception):
    """The per-render deadline passed."""


# The deadline of the render running in this thread/context (monotonic seconds), or None.
_DEADLINE: ContextVar[float | None] = ContextVar("lemonslice_template_deadline", default=None)


def _tick() -> None:
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline:
        raise _Timeout


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _loop_guard(iterable: Iterable[Any]) -> Iterator[Any]:
    # Wraps every {% for %} iterable so nested loops cannot outrun the deadline.
    for item in iterable:
        _tick()
        yield item


def _raise_exception(message: Any) -> None:
    raise _Raised(str(message))


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    # Unlike Jinja's built-in tojson, no HTML escaping: prompts are not HTML.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GuardedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox plus fail-fast unsafe access, size caps and deadline checks."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # The stock sandbox returns an Undefined that renders as "", hiding the attempt.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _tick()
        return super().call(context, obj, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and _is_int(n) and len(seq) * n > _MAX_REPEAT:
                    raise SecurityError(f"repetition would build {len(seq) * n} items")
        elif operator == "**" and _is_int(left) and _is_int(right) and right > 0:
            if abs(left) > 1 and abs(left).bit_length() * right > _MAX_POW_BITS:
                raise SecurityError(f"{left} ** {right} is too large")
        return super().call_binop(context, operator, left, right)


def _make_env() -> _GuardedSandbox:
    # trim_blocks/lstrip_blocks and loopcontrols match how HF transformers renders templates.
    env = _GuardedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters[_LOOP_GUARD] = _loop_guard
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_env()


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _compile(source: str, origin: str) -> jinja2.Template:
    try:
        tree = _ENV.parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"chat template ({origin}) has a syntax error on line {e.lineno}: {_one_line(e.message)}"
        ) from None
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None, lineno=loop.lineno)
    return _ENV.from_string(tree)


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template; `origin` names where it came from in error messages."""

    source: str
    origin: str = "<string>"
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    _compiled: jinja2.Template = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise TemplateError(f"chat template ({self.origin}) is empty")
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s}")
        object.__setattr__(self, "_compiled", _compile(self.source, self.origin))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text; extra kwargs (enable_thinking, tools, bos_token, ...) reach the template."""
        where = f"chat template ({self.origin})"
        token = _DEADLINE.set(time.monotonic() + self.time_limit_s)
        try:
            return self._compiled.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **kwargs
            )
        except _Raised as e:
            raise TemplateError(f"{where} rejected the conversation: {_one_line(e)}") from None
        except _Timeout:
            raise TemplateError(
                f"{where} exceeded its {self.time_limit_s:g} s render time limit (runaway loop?)"
            ) from None
        except (SecurityError, OverflowError) as e:
            # OverflowError is the sandbox refusing range() over MAX_RANGE items.
            raise TemplateError(f"{where} was blocked by the sandbox: {_one_line(e)}") from None
        except RecursionError:
            raise TemplateError(f"{where} recursed too deeply") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"{where} failed: {_one_line(e.message or e)}") from None
        except Exception as e:
            raise TemplateError(f"{where} failed: {type(e).__name__}: {_one_line(e)}") from None
        finally:
            _DEADLINE.reset(token)


def builtin_template() -> ChatTemplate:
    """The built-in Qwen3.5 ChatML template, for GGUFs without tokenizer.chat_template."""
    return ChatTemplate(BUILTIN_QWEN35_TEMPLATE, origin="built-in Qwen3.5")


def load_template(path: str | Path, *, time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> ChatTemplate:
    """A template from a Jinja file (the --chat-template override)."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TemplateError(f"chat template {path} is not UTF-8 text") from None
    except OSError as e:
        raise TemplateError(f"cannot read chat template {path}: {e.strerror or e}") from None
    return ChatTemplate(source, origin=str(path), time_limit_s=time_limit_s)


def resolve_template(override: str | Path | None, embedded: str | None) -> ChatTemplate:
    """The template to use: an override file, else the GGUF's own, else the built-in one."""
    if override is not None:
        log.info("chat template: %s (override)", override)
        return load_template(override)
    if embedded:
        log.info("chat template: from the GGUF's tokenizer.chat_template")
        return ChatTemplate(embedded, origin="GGUF tokenizer.chat_template")
    log.info("chat template: built-in Qwen3.5 (the GGUF has none)")
    return builtin_template()


class Reasoning(NamedTuple):
    reasoning: str
    answer: str


def split_reasoning(text: str, *, opened: bool = False) -> Reasoning:
    """Split generated text into (reasoning, answer) around a <think>...</think> block.

    The opening tag may be missing (the prompt ended with it; pass `opened=True` when it did
    so untagged text counts as reasoning), and an unterminated block, as seen mid-stream,
    is all reasoning with an empty answer so far.
    """
    if THINK_CLOSE in text:
        head, _, tail = text.partition(THINK_CLOSE)
        return Reasoning(head.split(THINK_OPEN)[-1].strip(), tail.lstrip())
    if THINK_OPEN in text:
        before, _, inner = text.partition(THINK_OPEN)
        return Reasoning(inner.lstrip(), before.strip())
    return Reasoning(text.lstrip(), "") if opened else Reasoning("", text)


def opens_think_block(prompt: str) -> bool:
    """Whether a rendered prompt leaves a <think> block open for the model to continue."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


def has_thinking_mode(template: ChatTemplate, **kwargs: Any) -> bool:
    """Whether the template's `enable_thinking` switch changes the prompt it renders; kwargs
    (bos_token, ...) reach the template. A template that cannot render the probe is judged by
    whether its source names the switch."""
    probe = [{"role": "user", "content": "hello"}]
    try:
        on, off = (template.render(probe, add_generation_prompt=True, enable_thinking=flag, **kwargs)
                   for flag in (True, False))
    except TemplateError:
        return "enable_thinking" in template.source
    return on != off
