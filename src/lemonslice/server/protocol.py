"""The OpenAI-compatible request bodies (validated with pydantic) and response shapes.

Known fields are checked for type and range; fields this server does not know are accepted
and ignored, as OpenAI clients send many. Every error leaves as OpenAI's JSON error shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatRequest", "CompletionRequest", "DetokenizeRequest", "TokenizeRequest", "error_body"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    max_tokens: Optional[int] = Field(None, ge=0)
    n: int = Field(1, ge=1, le=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Union[str, list[str], None]) -> Union[list[str], None]:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 16 or any(not s for s in stops)):
            raise ValueError("stop takes at most 16 non-empty strings")
        return stops


class Function(_Body):
    name: str = Field(min_length=1, max_length=128)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: Function


class NamedChoice(_Body):
    type: Literal["function"] = "function"
    function: dict[str, str]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    name: Optional[str] = None
    reasoning_content: Optional[str] = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedChoice, None] = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    chat_template: Optional[str] = Field(None, max_length=1 << 20)  # rendered in the sandbox, as every template


class CompletionRequest(Sampling):
    prompt: Union[str, list[int]]
    echo: bool = False


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    parse_special: bool = True


class DetokenizeRequest(_Body):
    tokens: list[int]


def error_body(message: str, kind: str = "invalid_request_error", code: Any = None,
               param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def message_content(content: Union[str, list[dict[str, Any]], None]) -> str:
    """OpenAI content parts (text only) joined; None as empty."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError("only text content parts are supported")
        texts.append(part["text"])
    return "".join(texts)
