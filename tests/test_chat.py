"""Chat templates: the built-in Qwen3.5 rendering, overrides, the sandbox's refusals and time
limit, and splitting generated text into reasoning and answer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lemonslice.text import (
    ChatTemplate,
    TemplateError,
    builtin_template,
    load_template,
    opens_think_block,
    resolve_template,
    split_reasoning,
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello!"},
    {"role": "user", "content": "2+2?"},
]


def test_builtin_multi_turn_with_thinking_on() -> None:
    # History turns drop their reasoning; thinking on (the default) opens a think block.
    assert builtin_template().render(CONVERSATION) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_builtin_thinking_off_adds_an_empty_think_block() -> None:
    out = builtin_template().render([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_builtin_without_generation_prompt_keeps_reasoning_after_the_last_user_turn() -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>plan</think>answer"},
    ]
    assert builtin_template().render(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nplan\n</think>\n\nanswer<|im_end|>\n"
    )


def test_builtin_rejects_a_late_system_message() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(TemplateError, match="rejected the conversation: a system message must"):
        builtin_template().render(messages)


def test_builtin_matches_the_released_qwen35_template_on_text_chats() -> None:
    from llama_sdist import llama_cpp_dir

    upstream = load_template(llama_cpp_dir() / "models" / "templates" / "Qwen3.5-4B.jinja")
    chats = [
        CONVERSATION,
        [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Hello"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "x", "reasoning_content": " why "},
        ],
    ]
    for chat in chats:
        for kwargs in ({}, {"enable_thinking": False}, {"add_generation_prompt": False}):
            assert builtin_template().render(chat, **kwargs) == upstream.render(chat, **kwargs)


def test_override_file_and_kwargs_pass_through(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(
        "{% for m in messages %}\n[{{ m.role }}]{{ m.content }}\n{% endfor %}\n"
        "{% if add_generation_prompt %}>{% endif %}{{ bos_token }}{{ tools | tojson }}\n",
        encoding="utf-8",
    )
    tools = [{"name": "café<&>"}]
    out = resolve_template(path, "ignored").render(
        [{"role": "user", "content": "Hi"}], bos_token="<s>", tools=tools
    )
    # trim_blocks drops the newline after each block tag; tojson neither escapes HTML nor ASCII.
    assert out == '[user]Hi\n><s>[{"name": "café<&>"}]'


def test_template_choice_order() -> None:
    assert resolve_template(None, "{{ 'gguf' }}").render([]) == "gguf"
    assert resolve_template(None, None).origin == builtin_template().origin
    assert resolve_template(None, "").origin == builtin_template().origin


def test_unreadable_and_broken_templates(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="cannot read chat template .*missing.jinja"):
        load_template(tmp_path / "missing.jinja")
    with pytest.raises(TemplateError, match="syntax error on line 2"):
        ChatTemplate("ok\n{% for x in %}")
    with pytest.raises(TemplateError, match="is empty"):
        ChatTemplate("  \n")


@pytest.mark.parametrize(
    ("payload", "attribute"),
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "__class__"),
        ("{{ cycler.__init__.__globals__.os }}", "__init__"),
        ("{{ self.__init__.__globals__ }}", "__init__"),
        ("{{ ''|attr('__class__')|attr('__mro__') }}", "__class__"),
        ("{{ (messages|attr('__class__'))|attr('__subclasses__') }}", "__class__"),
        ("{{ lipsum.__globals__ }}", "__globals__"),
        ("{{ joiner.__init__.__globals__['os'] }}", "__init__"),
        ("{{ self._TemplateReference__context }}", "_TemplateReference__context"),
        ("{{ ''['__class__'] }}", "__class__"),
        ("{{ '{0.__class__}'.format('') }}", "__class__"),
        ("{{ messages.append(1) }}", "append"),
    ],
)
def test_sandbox_escapes_fail_loudly(payload: str, attribute: str) -> None:
    with pytest.raises(TemplateError, match="blocked by the sandbox") as info:
        ChatTemplate(payload).render([{"role": "user", "content": "x"}])
    message = str(info.value)
    assert f"{attribute!r}" in message and "unsafe" in message and "\n" not in message


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("{% for i in range(10**9) %}{% endfor %}", "MAX_RANGE"),
        ("{{ 'a' * 10**9 }}", "repetition would build"),
        ("{{ 10 ** 100000 }}", "too large"),
    ],
)
def test_huge_values_are_refused_at_once(payload: str, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(TemplateError, match=message):
        ChatTemplate(payload).render([])
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize(
    "payload",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set xs = range(100000)|list %}{% for a in xs %}{% for b in xs %}{% endfor %}{% endfor %}",
    ],
)
def test_runaway_loops_hit_the_time_limit(payload: str) -> None:
    assert ChatTemplate("x").time_limit_s == 2.0  # the default; a short one keeps this fast
    start = time.monotonic()
    with pytest.raises(TemplateError, match=r"exceeded its 0.3 s render time limit"):
        ChatTemplate(payload, time_limit_s=0.3).render([])
    assert time.monotonic() - start < 1.5


def test_runaway_recursion_is_stopped() -> None:
    with pytest.raises(TemplateError, match="recursed too deeply"):
        ChatTemplate("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}").render([])


@pytest.mark.parametrize(
    ("text", "opened", "expected"),
    [
        ("<think>\nWhy.\n</think>\n\nBecause.", False, ("Why.", "Because.")),
        ("Why.\n</think>\n\nBecause.", False, ("Why.", "Because.")),  # <think> was in the prompt
        ("<think>\nStill going", False, ("Still going", "")),  # unterminated, mid-stream
        ("Still going", True, ("Still going", "")),
        ("Plain answer.", False, ("", "Plain answer.")),
        ("<think>\n\n</think>\n\nAnswer.", False, ("", "Answer.")),  # thinking off
        ("", True, ("", "")),
    ],
)
def test_split_reasoning(text: str, opened: bool, expected: tuple[str, str]) -> None:
    assert split_reasoning(text, opened=opened) == expected


def test_opens_think_block() -> None:
    template = builtin_template()
    messages = [{"role": "user", "content": "Hi"}]
    assert opens_think_block(template.render(messages))
    assert not opens_think_block(template.render(messages, enable_thinking=False))
