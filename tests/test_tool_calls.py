"""Qwen3.5 tool calls: parsing replies into content and OpenAI calls (whole and streamed), and
rendering tools and tool-call history through Qwen3.5's own chat template."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lemonslice.text.chat import ChatTemplate, TemplateError, load_template
from lemonslice.text.tools import (
    ContentDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallError,
    ToolCallStream,
    new_call_id,
    parse_tool_calls,
    template_messages,
)

TEMPLATE_PATH = Path(__file__).parent / "data" / "qwen35_chat_template.jinja"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TYPED = {
    "type": "function",
    "function": {
        "name": "typed",
        "parameters": {
            "type": "object",
            "properties": {
                "s": {"type": "string"},
                "i": {"type": "integer"},
                "n": {"type": "number"},
                "b": {"type": "boolean"},
                "o": {"type": "object"},
                "a": {"type": "array"},
                "z": {"type": "null"},
                "u": {"type": ["integer", "string"]},
            },
        },
    },
}
TOOLS = [WEATHER, TYPED]

PARIS_BLOCK = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
PARIS_ARGS = '{"city": "Paris", "days": 3}'


def block(name: str, **params: str) -> str:
    """A call block laid out as the template writes one."""
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def calls_of(calls: list[ToolCall]) -> list[tuple[str, str]]:
    # Ids are random, so calls compare by name and arguments.
    return [(c.name, c.arguments) for c in calls]


# --- parse_tool_calls ---------------------------------------------------------------------

def test_one_call() -> None:
    content, calls = parse_tool_calls(PARIS_BLOCK, TOOLS)
    assert content == ""
    assert calls_of(calls) == [("get_weather", PARIS_ARGS)]


def test_several_calls_in_order() -> None:
    text = PARIS_BLOCK + "\n" + block("get_weather", city="Oslo") + "\n\n" + block("typed", i="1")
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == ""
    assert calls_of(calls) == [
        ("get_weather", PARIS_ARGS),
        ("get_weather", '{"city": "Oslo"}'),
        ("typed", '{"i": 1}'),
    ]


def test_text_before_the_call_is_content_without_the_surrounding_whitespace() -> None:
    content, calls = parse_tool_calls("I will check the weather.\n\n" + PARIS_BLOCK + "\n", TOOLS)
    assert content == "I will check the weather."
    assert calls_of(calls) == [("get_weather", PARIS_ARGS)]


def test_thinking_before_the_call_is_plain_content() -> None:
    text = "<think>\nThe user wants Paris.\n</think>\n\n" + PARIS_BLOCK
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "<think>\nThe user wants Paris.\n</think>"
    assert calls_of(calls) == [("get_weather", PARIS_ARGS)]


def test_content_on_both_sides_of_calls_is_joined_by_a_blank_line() -> None:
    text = "Before. " + PARIS_BLOCK + " \n " + PARIS_BLOCK + "\nAfter.\n"
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Before.\n\nAfter.\n"
    assert len(calls) == 2


def test_text_without_blocks_comes_back_unchanged() -> None:
    text = "  Plain answer, with <b>tags</b> and a </tool_call> stray.\n"
    assert parse_tool_calls(text, TOOLS) == (text, [])


def test_values_typed_by_each_schema_type() -> None:
    text = block(
        "typed", s="007", i="-12", n="2.5", b="true", o='{"k": [1, "x"]}', a="[1, 2]", z="null",
        u="5",
    )
    _, calls = parse_tool_calls(text, TOOLS)
    assert calls[0].arguments == (
        '{"s": "007", "i": -12, "n": 2.5, "b": true, "o": {"k": [1, "x"]}, "a": [1, 2], '
        '"z": null, "u": 5}'
    )


def test_numbers_booleans_and_type_lists_accept_their_other_spellings() -> None:
    text = block("typed", n="7", b="False", u="five")
    _, calls = parse_tool_calls(text, TOOLS)
    # A whole "number" stays an integer; the template writes Python's False; "five" is no integer.
    assert calls[0].arguments == '{"n": 7, "b": false, "u": "five"}'


def test_values_that_do_not_parse_as_their_type_fall_back() -> None:
    text = block("typed", i="3.5", n="many", b="yes", o="{broken", a="[1e400]", z="NaN")
    _, calls = parse_tool_calls(text, TOOLS)
    # JSON when the text is JSON (3.5), else the text itself; inf and NaN are not JSON.
    assert calls[0].arguments == (
        '{"i": 3.5, "n": "many", "b": "yes", "o": "{broken", "a": "[1e400]", "z": "NaN"}'
    )


def test_integer_past_pythons_digit_limit_stays_text() -> None:
    digits = "9" * 5000  # int() refuses more than 4300 digits
    _, calls = parse_tool_calls(block("typed", i=digits), TOOLS)
    assert calls[0].arguments == '{"i": "' + digits + '"}'


def test_string_value_keeps_inner_newlines_and_angle_brackets() -> None:
    code = 'if a < b:\n    print("<tag>")\n'  # ends in a newline of its own
    text = (
        f"<tool_call>\n<function=typed>\n<parameter=s>\n{code}\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    _, calls = parse_tool_calls(text, TOOLS)
    assert calls[0].arguments == '{"s": "if a < b:\\n    print(\\"<tag>\\")\\n"}'


def test_string_value_that_looks_like_json_stays_a_string() -> None:
    _, calls = parse_tool_calls(block("get_weather", city="123", days="2"), TOOLS)
    assert calls[0].arguments == '{"city": "123", "days": 2}'


def test_unknown_tool_and_unknown_key_are_parsed_as_json_or_kept_as_text() -> None:
    text = block("search", query="cats", limit="5", exact="false", extra="[1, 2]")
    _, calls = parse_tool_calls(text, TOOLS)
    assert calls_of(calls) == [
        ("search", '{"query": "cats", "limit": 5, "exact": false, "extra": [1, 2]}')
    ]
    _, calls = parse_tool_calls(block("get_weather", city="Rome", unit="C"), TOOLS)
    assert calls[0].arguments == '{"city": "Rome", "unit": "C"}'


def test_without_tools_every_value_falls_back() -> None:
    _, calls = parse_tool_calls(block("get_weather", city="Paris", days="3"), None)
    assert calls[0].arguments == PARIS_ARGS


def test_call_without_parameters_has_empty_arguments() -> None:
    text = "<tool_call>\n<function=now>\n</function>\n</tool_call>"
    content, calls = parse_tool_calls(text, None)
    assert (content, calls_of(calls)) == ("", [("now", "{}")])


MALFORMED = [
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n",
    "<tool_call>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\nplease\n<parameter=city>\nParis\n</parameter>\n"
    "</function>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n</function>\ntrailing junk\n</tool_call>",
    "<tool_call>\n<function=a>\n</function>\n<function=b>\n</function>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n"
    "<parameter=city>\nB\n</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n<parameter=days>\n2\n"
    "</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function=>\n</function>\n</tool_call>",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
]


@pytest.mark.parametrize("bad", MALFORMED)
def test_malformed_block_is_kept_as_text(bad: str) -> None:
    text = "Checking.\n" + bad + "\n"
    assert parse_tool_calls(text, TOOLS) == (text, [])


def test_malformed_block_does_not_hide_a_good_one_after_it() -> None:
    bad = "<tool_call>\n<function=x>\noops\n</tool_call>"
    content, calls = parse_tool_calls(bad + "\n" + PARIS_BLOCK, TOOLS)
    assert content == bad
    assert calls_of(calls) == [("get_weather", PARIS_ARGS)]


def test_stray_opening_tag_before_a_block_is_text() -> None:
    content, calls = parse_tool_calls("a <tool_call> b\n" + PARIS_BLOCK, TOOLS)
    assert content == "a <tool_call> b"
    assert calls_of(calls) == [("get_weather", PARIS_ARGS)]


def test_call_ids_are_openai_style_and_random() -> None:
    _, calls = parse_tool_calls(PARIS_BLOCK + PARIS_BLOCK, TOOLS)
    ids = [c.id for c in calls] + [new_call_id()]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    assert len(set(ids)) == 3


# --- ToolCallStream -------------------------------------------------------------------------

def test_stream_releases_content_at_once_and_holds_only_a_possible_tag() -> None:
    stream = ToolCallStream(TOOLS)
    assert stream.feed("Hello") == [ContentDelta("Hello")]
    assert stream.feed(" there <tool") == [ContentDelta(" there")]
    assert stream.feed("box>") == [ContentDelta(" <toolbox>")]
    assert stream.feed(" x\n") == [ContentDelta(" x")]
    assert stream.feed("<tool_call>\n<function=get_weather>\n") == []
    assert stream.flush() == [ContentDelta("\n<tool_call>\n<function=get_weather>\n")]


def test_stream_emits_each_call_when_it_closes() -> None:
    stream = ToolCallStream(TOOLS)
    assert stream.feed("Sure.\n" + PARIS_BLOCK[:-3]) == [ContentDelta("Sure.")]
    [first] = stream.feed(PARIS_BLOCK[-3:] + "\n")
    assert isinstance(first, ToolCallDelta) and first.index == 0
    assert (first.call.name, first.call.arguments) == ("get_weather", PARIS_ARGS)
    [second] = stream.feed(block("get_weather", city="Oslo"))
    assert isinstance(second, ToolCallDelta) and second.index == 1
    assert second.call.arguments == '{"city": "Oslo"}'
    assert stream.flush() == []


def test_stream_flush_releases_held_whitespace_and_prefix() -> None:
    stream = ToolCallStream(None)
    assert stream.feed("Done. \n<tool_ca") == [ContentDelta("Done.")]
    assert stream.flush() == [ContentDelta(" \n<tool_ca")]
    assert stream.flush() == []


FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<function=get_weather>", "<function=typed>", "</function>",
    "<parameter=city>", "<parameter=days>", "<parameter=b>", "</parameter>", "\n", " ", "\n\n",
    "Paris", "3", "true", "<tool", "_call>", "</think>", PARIS_BLOCK, block("typed", b="true"),
]


def streamed(text: str, cuts: list[int]) -> tuple[str, list[tuple[int, str, str]]]:
    stream = ToolCallStream(TOOLS)
    deltas = []
    bounds = [0, *sorted(cuts), len(text)]
    for start, end in zip(bounds, bounds[1:]):
        deltas += stream.feed(text[start:end])
    deltas += stream.flush()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls = [
        (d.index, d.call.name, d.call.arguments) for d in deltas if isinstance(d, ToolCallDelta)
    ]
    return content, calls


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS) | st.text("ab<>/=_\n ", max_size=4), max_size=14),
    data=st.data(),
)
def test_stream_matches_whole_parse_however_the_text_is_cut(
    parts: list[str], data: st.DataObject
) -> None:
    text = "".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    content, calls = parse_tool_calls(text, TOOLS)
    expected = (content, [(i, c.name, c.arguments) for i, c in enumerate(calls)])
    assert streamed(text, cuts) == expected


# --- Qwen3.5's chat template ----------------------------------------------------------------

SYSTEM_AND_USER = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
]
CALL_HISTORY = SYSTEM_AND_USER + [
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [{
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
        }],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21C"},
]
RENDERED_CALL = (
    "<|im_start|>assistant\n<think>\n\n</think>\n\nLet me check.\n\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
)
RENDERED_RESULT = "<|im_start|>user\n<tool_response>\nSunny, 21C\n</tool_response><|im_end|>\n"


@pytest.fixture(scope="module")
def qwen35() -> ChatTemplate:
    return load_template(TEMPLATE_PATH)


def test_template_file_is_the_published_one() -> None:
    digest = hashlib.sha256(TEMPLATE_PATH.read_bytes()).hexdigest()
    assert digest == "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715"


def test_tools_appear_in_the_system_prompt(qwen35: ChatTemplate) -> None:
    prompt = qwen35.render(SYSTEM_AND_USER, add_generation_prompt=True, tools=[WEATHER])
    assert prompt.startswith(
        "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather for a '
        'city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, '
        '"days": {"type": "integer"}}, "required": ["city"]}}}\n</tools>\n\n'
        "If you choose to call a function ONLY reply in the following format with NO suffix:"
    )
    assert (
        "</IMPORTANT>\n\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    ) in prompt


@pytest.mark.parametrize(("thinking", "opening"), [
    (True, "<|im_start|>assistant\n<think>\n"),
    (False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
])
def test_tool_call_history_renders_in_function_form(
    qwen35: ChatTemplate, thinking: bool, opening: str
) -> None:
    prompt = qwen35.render(
        template_messages(CALL_HISTORY), add_generation_prompt=True, enable_thinking=thinking,
        tools=[WEATHER],
    )
    user = "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    assert prompt.endswith(user + RENDERED_CALL + RENDERED_RESULT + opening)


def test_without_tools_there_is_no_tools_section(qwen35: ChatTemplate) -> None:
    prompt = qwen35.render(SYSTEM_AND_USER, add_generation_prompt=True, enable_thinking=False)
    assert prompt == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_template_needs_arguments_as_an_object(qwen35: ChatTemplate) -> None:
    # Why template_messages exists: the template iterates arguments with |items.
    with pytest.raises(TemplateError, match="mapping"):
        qwen35.render(CALL_HISTORY, add_generation_prompt=True, tools=[WEATHER])


def test_a_rendered_call_parses_back_to_the_same_call() -> None:
    call_text = RENDERED_CALL.split("Let me check.\n\n")[1].removesuffix("<|im_end|>\n")
    content, calls = parse_tool_calls(call_text, [WEATHER])
    assert (content, calls_of(calls)) == ("", [("get_weather", '{"city": "Paris", "days": 2}')])


def test_template_messages_decodes_arguments_and_leaves_the_input_alone() -> None:
    before = copy.deepcopy(CALL_HISTORY)
    converted = template_messages(CALL_HISTORY)
    assert CALL_HISTORY == before
    assert converted[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "days": 2}
    assert converted[2]["tool_calls"][0]["id"] == "call_1"
    assert converted[:2] == SYSTEM_AND_USER and converted[3] == CALL_HISTORY[3]


def test_template_messages_edge_cases() -> None:
    def one(arguments: object) -> list[dict]:
        call = {"type": "function", "function": {"name": "now", "arguments": arguments}}
        return [{"role": "assistant", "content": None, "tool_calls": [call]}]

    assert template_messages(one(""))[0]["tool_calls"][0]["function"]["arguments"] == {}
    assert template_messages(one({"a": 1}))[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    for bad in ("[1, 2]", "{not json"):
        with pytest.raises(ToolCallError, match="message 0"):
            template_messages(one(bad))


def test_json_dumps_of_parsed_arguments_is_an_object() -> None:
    # The arguments string is always a JSON object, as OpenAI clients expect.
    _, calls = parse_tool_calls(block("typed", a="[1]"), TOOLS)
    assert isinstance(json.loads(calls[0].arguments), dict)
