"""Text-side helpers: chat templates and reasoning/answer splitting."""

from lemonslice.text.chat import (
    BUILTIN_QWEN35_TEMPLATE,
    ChatTemplate,
    Reasoning,
    TemplateError,
    builtin_template,
    load_template,
    opens_think_block,
    resolve_template,
    split_reasoning,
)

__all__ = [
    "BUILTIN_QWEN35_TEMPLATE",
    "ChatTemplate",
    "Reasoning",
    "TemplateError",
    "builtin_template",
    "load_template",
    "opens_think_block",
    "resolve_template",
    "split_reasoning",
]
