"""Qwen3.5 tool calls: the model's XML-ish call blocks in, OpenAI `tool_calls` out.

Qwen3.5's chat template asks the model to answer a call as

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

`parse_tool_calls` splits a finished reply into content and calls; `ToolCallStream` does the
same incrementally and yields the same result however the text is cut into pieces (both run
the same scanner). `template_messages` turns OpenAI-format history into what the template reads.

Rules shared by both parsers:
- Whitespace touching a well-formed block is dropped; when content sits on both sides of one
  or more blocks, the two sides are joined by a blank line ("\\n\\n", as the template separates
  content from a call). Text with no blocks comes back unchanged.
- A block is `<tool_call>` ... the first `</tool_call>` after it (the last `<tool_call>` before
  that closing tag, so a stray opening tag earlier is plain text). A block that is not exactly
  one `<function=NAME>` holding `<parameter=KEY>VALUE</parameter>` items (distinct keys,
  whitespace between tags only) is malformed and kept verbatim as content.
- An unclosed `<tool_call>` is content once the text ends.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lemonslice.errors import LemonsliceError

__all__ = [
    "ContentDelta",
    "Delta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallError",
    "ToolCallStream",
    "new_call_id",
    "parse_tool_calls",
    "template_messages",
]

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_ID_ALPHABET = string.ascii_letters + string.digits
_BLOCK_SEPARATOR = "\n\n"

_FUNCTION_OPEN = re.compile(r"\s*<function=([^<>\n]+)>")
_PARAMETER = re.compile(r"\s*<parameter=([^<>\n]+)>(.*?)</parameter>", re.DOTALL)
_FUNCTION_CLOSE = re.compile(r"\s*</function>\s*\Z")
# Inside a value these mean a `</parameter>` went missing and the value swallowed the next tag.
_SWALLOWED_TAGS = ("<parameter=", "</function>")
_INTEGER = re.compile(r"[+-]?\d+")


class ToolCallError(LemonsliceError):
    """A request's tool-call history cannot be rendered (one line, safe to show the user)."""


def new_call_id() -> str:
    """A fresh OpenAI-style call id: `call_` and 24 random letters/digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    """One call as OpenAI reports it: `arguments` is a JSON object in a string."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)


@dataclass(frozen=True)
class ContentDelta:
    """Reply text that is not part of a tool call."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A complete call; `index` counts calls in the reply from 0."""

    index: int
    call: ToolCall


Delta = ContentDelta | ToolCallDelta


# --- typing parameter values by the tool's JSON schema -------------------------------------

def _no_constant(name: str) -> Any:
    # NaN/Infinity parse in Python but are not JSON, so the arguments string could not carry them.
    raise ValueError(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 overflows to inf, which is not JSON either
        raise ValueError(text)
    return value


def _json_value(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except ValueError:
        return False, None


def _integer(text: str) -> tuple[bool, Any]:
    if not _INTEGER.fullmatch(text):
        return False, None
    try:
        return True, int(text)
    except ValueError:  # past Python's limit on digits in an int()
        return False, None


def _as_type(raw: str, kind: str) -> tuple[bool, Any]:
    """(fits, value) for one JSON-schema type name."""
    text = raw.strip()
    if kind == "string":
        return True, raw
    if kind == "integer":
        return _integer(text)
    if kind == "number":
        ok, value = _integer(text)
        if ok:
            return ok, value
        ok, value = _json_value(text)
        return (True, value) if ok and isinstance(value, float) else (False, None)
    if kind == "boolean":
        # Any case: the template writes a history call's Python bool as "True"/"False".
        lowered = text.lower()
        return (True, lowered == "true") if lowered in ("true", "false") else (False, None)
    if kind in ("object", "array", "null"):
        return _json_value(text)
    return False, None


def _typed_value(raw: str, schema: Any) -> Any:
    """A parameter's value typed by its JSON schema.

    The template writes each value between one newline after `<parameter=KEY>` and one before
    `</parameter>`; exactly those two are removed. Then: "string" keeps the text as is;
    "integer"/"number" become numbers, "boolean" true/false (any case), "object"/"array"/"null"
    the parsed JSON, each only when the text parses as that. A list of types tries them in
    order, non-string ones first. A value that fits none of its types, or whose key, tool or
    type is unknown, is parsed as JSON when it parses and otherwise kept as the string.
    """
    if raw.startswith("\n"):
        raw = raw[1:]
    if raw.endswith("\n"):
        raw = raw[:-1]
    kinds = schema.get("type") if isinstance(schema, Mapping) else None
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
    for kind in sorted((k for k in kinds if isinstance(k, str)), key=lambda k: k == "string"):
        ok, value = _as_type(raw, kind)
        if ok:
            return value
    ok, value = _json_value(raw)
    return value if ok else raw


def _parameter_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    """Tool name -> its `parameters.properties`; entries of the wrong shape are skipped."""
    schemas: dict[str, Mapping[str, Any]] = {}
    for tool in tools or ():
        spec = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            continue
        params = spec.get("parameters")
        props = params.get("properties") if isinstance(params, Mapping) else None
        schemas[spec["name"]] = props if isinstance(props, Mapping) else {}
    return schemas


# --- one block ------------------------------------------------------------------------------

def _parse_block(inner: str, schemas: Mapping[str, Mapping[str, Any]]) -> ToolCall | None:
    """The call in the text between `<tool_call>` and `</tool_call>`, or None if malformed."""
    opening = _FUNCTION_OPEN.match(inner)
    if opening is None or not opening.group(1).strip():
        return None
    name = opening.group(1).strip()
    props = schemas.get(name, {})
    arguments: dict[str, Any] = {}
    pos = opening.end()
    while (param := _PARAMETER.match(inner, pos)) is not None:
        key, raw = param.group(1).strip(), param.group(2)
        if not key or key in arguments or any(tag in raw for tag in _SWALLOWED_TAGS):
            return None
        arguments[key] = _typed_value(raw, props.get(key))
        pos = param.end()
    if _FUNCTION_CLOSE.match(inner, pos) is None:
        return None
    return ToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))


# --- the scanner both parsers run ------------------------------------------------------------

def _held_tail(text: str) -> int:
    """Where the text that must wait for more input starts: a trailing partial `<tool_call>`
    and the whitespace before it (dropped if a block follows)."""
    keep = len(text)
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:size]):
            keep = len(text) - size
            break
    return len(text[:keep].rstrip())


class ToolCallStream:
    """Incremental `parse_tool_calls`: feed pieces of the reply, then flush once at the end.

    Content is released as soon as it cannot belong to a block; held back are only a possible
    partial `<tool_call>` with the whitespace before it, and an open block until it closes.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self._schemas = _parameter_schemas(tools)
        self._buffer = ""
        self._close_from = 0  # where the search for `</tool_call>` resumes in the buffer
        self._calls = 0
        self._said_content = False  # content went out (a later content needs a separator)
        self._after_block = False  # a block went out since the last content
        self._done = False

    def feed(self, piece: str) -> list[Delta]:
        """Deltas that `piece` completes; may be none while a tag or block is open."""
        if self._done:
            raise RuntimeError("feed() after flush()")
        self._buffer += piece
        return self._scan(final=False)

    def flush(self) -> list[Delta]:
        """The rest at the end of the reply: held text, and any unclosed block, as content."""
        if self._done:
            return []
        self._done = True
        return self._scan(final=True)

    def _content(self, text: str, out: list[Delta]) -> None:
        if self._after_block:
            text = text.lstrip()
        if not text:
            return
        if self._after_block and self._said_content:
            text = _BLOCK_SEPARATOR + text
        self._after_block = False
        self._said_content = True
        out.append(ContentDelta(text))

    def _take(self, end: int) -> str:
        taken, self._buffer = self._buffer[:end], self._buffer[end:]
        self._close_from = 0
        return taken

    def _scan(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while self._buffer:
            opened = self._buffer.find(OPEN)
            if opened < 0:
                end = len(self._buffer) if final else _held_tail(self._buffer)
                self._content(self._take(end), out)
                return out
            start_search = max(opened + len(OPEN), self._close_from)
            closed = self._buffer.find(CLOSE, start_search)
            if closed < 0:
                self._wait_for_close(opened, final, out)
                return out
            self._block(self._buffer.rfind(OPEN, opened, closed), closed, out)
        return out

    def _wait_for_close(self, opened: int, final: bool, out: list[Delta]) -> None:
        if final:
            self._content(self._take(len(self._buffer)), out)
            return
        # Release what precedes the block (less its trailing whitespace) and keep the rest.
        self._content(self._take(len(self._buffer[:opened].rstrip())), out)
        body = self._buffer.find(OPEN) + len(OPEN)
        self._close_from = max(body, len(self._buffer) - len(CLOSE) + 1)

    def _block(self, start: int, closed: int, out: list[Delta]) -> None:
        call = _parse_block(self._buffer[start + len(OPEN):closed], self._schemas)
        end = closed + len(CLOSE)
        if call is None:
            self._content(self._take(end), out)
            return
        self._content(self._take(start).rstrip(), out)
        self._take(end - start)
        out.append(ToolCallDelta(self._calls, call))
        self._calls += 1
        self._after_block = True


def parse_tool_calls(
    text: str, tools: Sequence[Mapping[str, Any]] | None
) -> tuple[str, list[ToolCall]]:
    """A finished reply split into (content, calls); `tools` types the argument values."""
    stream = ToolCallStream(tools)
    deltas = stream.feed(text) + stream.flush()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    return content, [d.call for d in deltas if isinstance(d, ToolCallDelta)]


# --- OpenAI history -> what the template reads -------------------------------------------------

def _arguments_object(arguments: Any, where: str) -> Any:
    if not isinstance(arguments, str):
        return arguments
    if not arguments.strip():
        return {}  # some clients send "" for a call without arguments
    ok, value = _json_value(arguments)
    if not ok or not isinstance(value, dict):
        raise ToolCallError(f"{where}: tool call arguments must be a JSON object")
    return value


def _template_call(call: Any, where: str) -> Any:
    if not isinstance(call, Mapping):
        return call
    call = dict(call)
    function = call.get("function")
    if isinstance(function, Mapping):
        call["function"] = dict(function)
        if "arguments" in function:
            call["function"]["arguments"] = _arguments_object(function["arguments"], where)
    elif "arguments" in call:
        call["arguments"] = _arguments_object(call["arguments"], where)
    return call


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-format messages as Qwen3.5's template needs them: each tool call's `arguments`
    JSON string decoded to a dict (the template iterates it with `|items`). Copies; the input
    is left as it was. Raises ToolCallError when arguments are not a JSON object."""
    converted = []
    for i, message in enumerate(messages):
        message = dict(message)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message["tool_calls"] = [_template_call(c, f"message {i}") for c in calls]
        converted.append(message)
    return converted
