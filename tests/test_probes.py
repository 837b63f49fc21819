"""Probe suites: the scorers against hand-worked values, JSONL validation, and the built-in data.

Expected scores are worked out by hand in the comments from the formulas in
lemonslice.eval.probes; the built-in answers are re-derived from the prompts' own text
(arithmetic, dates) rather than read back from the files.
"""

from __future__ import annotations

import json
import re
from datetime import date, timedelta
from fractions import Fraction
from pathlib import Path

import pytest

from lemonslice.eval.probes import (
    ProbeError,
    load_suite,
    load_suites,
    math_credit,
    normalize_answer,
    parse_number,
    parse_ratings,
    score_eq,
    score_exact,
    score_math,
)

# ---- math ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, ref, want",
    [
        (57, 57, 1.0),
        (-57, 57, 0.0),  # wrong sign
        (None, 57, 0.0),  # no number in the reply
        (5, 0, 0.0),  # inexact against 0: no relative error to speak of
        # "1200" vs "1000": 1 leading digit of 4 shared; |1200-1000|/1000 = 0.2 -> (0.25 + 0.8) / 2
        (1200, 1000, 0.525),
        # 2 digits vs 3: no digit credit; closeness 1 - 10/100 = 0.9 -> 0.45
        (90, 100, 0.45),
        # "46" vs "48": 1 of 2; closeness 1 - 2/48 = 23/24 -> (1/2 + 23/24) / 2 = 35/48
        (46, 48, 35 / 48),
        # first digits differ: only closeness 1 - 1/200 = 0.995 -> 0.4975
        (199, 200, 0.4975),
        # too far: closeness 1 - 350/250 < 0 -> 0, and "600" vs "250" share nothing
        (600, 250, 0.0),
        # a non-integer gets no digit credit: closeness 1 - 0.5/1000 -> 0.49975
        (Fraction(1999, 2), 1000, 0.49975),
        # "130000" vs "130437": 3 of 6; closeness 1 - 437/130437 = 130000/130437
        (130000, 130437, (0.5 + 130000 / 130437) / 2),
    ],
)
def test_math_credit(pred, ref, want):
    assert math_credit(pred, ref) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(
    "reply, want",
    [
        ("57", 57),
        (" The answer is 1,234.", 1234),
        ("4831 * 27 = 130437", 130437),  # the number after the last "="
        ("**585**\n\nBecause 3 weeks ...", 585),
        ("I think...\n12 apples, not 13", 12),  # the first line that holds a number
        ("It is -5 degrees", -5),
        ("3-4 hours", 3),
        ("12.50 dollars", Fraction(25, 2)),
        ("42.0", 42),
        ("x2 and y3", None),  # digits glued to a word are not numbers
        ("no idea", None),
        ("", None),
    ],
)
def test_parse_number(reply, want):
    got = parse_number(reply)
    assert got == want and type(got) is type(want)


def test_score_math_reads_the_reply():
    assert score_math("130437\n", 130437) == 1.0
    # "1,200" -> 1200 against 1000, as above
    assert score_math("Roughly 1,200.", 1000) == pytest.approx(0.525)


# ---- eq -----------------------------------------------------------------------------------

REF = {"Anger": 8, "Joy": 0, "Fear": 3, "Relief": 5}


@pytest.mark.parametrize(
    "reply, want",
    [
        ("Anger: 8\nJoy: 0\nFear: 3\nRelief: 5", 100.0),
        # |7-8| + |1-0| + |3-3| + |9-5| = 6 -> 100 - 5 * 6
        ("Anger: 7\nJoy: 1\nFear: 3\nRelief: 9", 70.0),
        # markdown and other separators; 15 is clamped to 10: 2 + 0 + 0 + 0 -> 90
        ("**Anger**: 15\n- joy = 0\nFEAR - 3\nRelief:** 5/10", 90.0),
        # one line, fractional: 0.5 + 0.5 + 0 + 0 -> 95
        ("Anger: 7.5, Joy: 0.5, Fear: 3, Relief: 5", 95.0),
        # the first mention counts: 0 + 0 + 0 + 5 -> 75
        ("Relief: 10\nAnger: 8\nJoy: 0\nFear: 3\nRelief: 5", 75.0),
        # every rating off by the most: 2 + 10 + 7 + 5 = 24 > 20 -> 0
        ("Anger: 0\nJoy: 10\nFear: 10\nRelief: 0", 0.0),
        ("Anger: 8\nJoy: 0\nFear: 3", 0.0),  # a rating missing
        ("Anger 8 Joy 0 Fear 3 Relief 5", 0.0),  # no separator: not a rating
    ],
)
def test_score_eq(reply, want):
    assert score_eq(reply, REF) == pytest.approx(want)


def test_parse_ratings_multiword_and_word_boundary():
    ref = ["Being touched", "Joy", "Fear", "Hope"]
    assert parse_ratings("Being  touched: 4\nKilljoy: 9\nJoy: 2\nFear: 1\nHope: 0", ref) == {
        "Being touched": 4.0, "Joy": 2.0, "Fear": 1.0, "Hope": 0.0}


def test_eq_done_waits_for_complete_ratings():
    suite = load_suite("eq")
    item = suite.items[0]
    names = list(item.answer)
    full = "\n".join(f"{n}: 3" for n in names)
    assert not item.done(full)  # "3" could still become "30"
    assert not item.done(full + ".")  # or "3.5"
    assert item.done(full + "\n")
    assert item.done(full + ".\n")
    assert not item.done("\n".join(f"{n}: 3" for n in names[:3]) + "\n")


# ---- exact --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("**Answer:** Yes.", "yes"),
        ("\n\n  The answer is   2025-04-07.\nmore", "2025-04-07"),
        ("Final answer: `North`", "north"),
        ("\"Tao\"", "tao"),
        ("ＮＯ", "no"),  # NFKC folds full-width letters
    ],
)
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


@pytest.mark.parametrize(
    "reply, answers, want",
    [
        ("Yes", ["Yes"], 1.0),
        ("yes, because the storm cut the power", ["Yes"], 1.0),
        ("Yes - the storm", ["Yes"], 1.0),
        ("Yesterday", ["Yes"], 0.0),  # a longer word is not the answer
        ("yes because", ["Yes"], 0.0),  # no separator after the answer
        ("North east", ["north"], 0.0),
        ("The answer is Thursday.", ["Thursday"], 1.0),
        ("3", ["three", "3"], 1.0),
        ("\nNo\nYes", ["Yes"], 0.0),  # only the first non-empty line counts
        ("", ["Yes"], 0.0),
    ],
)
def test_score_exact(reply, answers, want):
    assert score_exact(reply, answers) == want


def test_early_stop_agrees_with_scoring():
    """Math and exact read one line: done() fires only once that line is complete."""
    math = load_suite("math").items[0]
    assert not math.done("The answer is 5")
    assert not math.done("Hmm\n")  # no number yet
    assert math.done("Hmm\nIt is 57\n")
    exact = load_suite("reasoning").items[0]
    assert not exact.done("\n\nYes")
    assert exact.done("\n\nYes\n")


# ---- JSONL validation ---------------------------------------------------------------------

GOOD_MATH = {"id": "a", "scorer": "math", "prompt": "1+1?", "answer": 2}
GOOD_EQ = {"id": "e", "scorer": "eq", "dialogue": "A: hi\nB: bye", "character": "A",
           "reference": {"Joy": 1, "Anger": 2, "Fear": 3, "Hope": 4}}


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "lines, message",
    [
        ([GOOD_MATH, "{not json"], ":2: not valid JSON"),
        ([["a list"]], ":1: an item must be a JSON object"),
        ([{**GOOD_MATH, "scorer": "fuzzy"}], ":1: 'scorer' must be one of math, eq, exact"),
        ([{**GOOD_MATH, "answr": 2}], ":1: unknown key 'answr' for a math item"),
        ([{k: v for k, v in GOOD_MATH.items() if k != "prompt"}], ":1: missing key 'prompt'"),
        ([{**GOOD_MATH, "answer": 2.5}], ":1: a math 'answer' must be an integer"),
        ([{**GOOD_MATH, "answer": True}], ":1: a math 'answer' must be an integer"),
        ([{**GOOD_MATH, "id": ""}], ":1: 'id' must be a non-empty string"),
        ([{**GOOD_MATH, "scorer": "exact", "answer": []}], ":1: an exact 'answer' must be"),
        ([{**GOOD_MATH, "scorer": "exact", "answer": ["..."]}], ":1: an exact 'answer' must be"),
        ([GOOD_MATH, "", {**GOOD_MATH}], ":3: duplicate id 'a'"),
        ([GOOD_MATH, GOOD_EQ], ":2: scorer 'eq' differs from the file's 'math'"),
        ([{**GOOD_EQ, "reference": {"Joy": 1, "Anger": 2, "Fear": 3}}], ":1: 'reference' must map exactly 4"),
        ([{**GOOD_EQ, "reference": {"Joy": 1, "Anger": 2, "Fear": 3, "Hope": 11}}],
         ":1: the rating of 'Hope' must be an integer from 0 to 10"),
        ([{**GOOD_EQ, "reference": {"Joy": 1, "Anger": 2, "Fear": 3, "H0pe": 1}}], ":1: emotion name 'H0pe'"),
        ([{**GOOD_EQ, "reference": {"Joy": 1, "joy": 2, "Fear": 3, "Hope": 1}}], ":1: 'reference' names an emotion twice"),
        ([{**GOOD_EQ, "category": 3}], ":1: 'category' must be a non-empty string"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(ProbeError) as e:
        load_suite(str(path))
    text = str(e.value)
    assert text.startswith(f"{path}:") and message in text and "\n" not in text, text


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ProbeError, match=r"empty\.jsonl: no probe items$"):
        load_suite(str(empty))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD_MATH).encode() + b"\n" + b'{"id": "caf\xe9"}\n')
    with pytest.raises(ProbeError, match=r"latin\.jsonl:2: not UTF-8 text"):
        load_suite(str(latin))
    with pytest.raises(ProbeError, match=r"nope\.jsonl: cannot read probe file .*built-in suites: math, eq, reasoning"):
        load_suite(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ProbeError, match="named 'math'"):
        load_suites(f"math,{write_lines(tmp_path / 'math.jsonl', GOOD_MATH)}")


def test_user_suite(tmp_path):
    path = write_lines(tmp_path / "mine.jsonl", GOOD_EQ, {**GOOD_EQ, "id": "f", "category": "work"})
    suite = load_suite(str(path))
    assert (suite.name, suite.scorer, suite.source, len(suite.items)) == ("mine", "eq", str(path), 2)
    item = suite.items[0]
    assert "A: hi\nB: bye" in item.prompt and "how strongly is A feeling" in item.prompt
    assert item.prompt.endswith("Joy: <0-10>\nAnger: <0-10>\nFear: <0-10>\nHope: <0-10>")
    assert item.score("Joy: 1\nAnger: 2\nFear: 3\nHope: 4") == 100.0
    assert suite.items[1].category == "work"


# ---- the built-in suites ------------------------------------------------------------------


def test_builtin_suites_shape():
    suites = {s.name: s for s in load_suites("math,eq,reasoning")}
    assert {n: s.scorer for n, s in suites.items()} == {"math": "math", "eq": "eq", "reasoning": "exact"}
    for s in suites.values():
        assert len(s.items) >= 40
        assert s.source == f"builtin:{s.name}"
    assert {i.category for i in suites["reasoning"].items} == {"causal", "date", "logic", "navigation"}
    # Categories are interleaved, so a small --limit still samples all of them.
    assert {i.category for i in suites["reasoning"].limited(4)} == {"causal", "date", "logic", "navigation"}
    assert {i.category for i in suites["math"].limited(2)} == {"word-problem", "guesstimate"}


_ARITH = re.compile(r"What is (.+)\? Answer with just the number, no working\.")


def _arith_value(question: str) -> int:
    expr = (question.replace(" squared", " ** 2").replace(" divided by ", " // ")
            .replace(" to the power of ", " ** "))
    assert re.fullmatch(r"[\d\s*+\-/]+", expr), expr
    return eval(expr, {"__builtins__": {}})  # digits and operators only, checked above


def test_builtin_guesstimate_answers_follow_from_the_prompts():
    items = [i for i in load_suite("math").items if i.category == "guesstimate"]
    assert len(items) >= 20
    for item in items:
        m = _arith_value(_ARITH.fullmatch(item.prompt).group(1))
        assert item.answer == m, item.id


def test_builtin_date_answers_follow_from_the_prompts():
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    checked = 0
    for item in load_suite("reasoning").items:
        p = item.prompt
        if m := re.search(r"Today is (\d{4}-\d\d-\d\d)\. What (?:is|was) the date (\d+) days (from today|ago)", p):
            sign = 1 if m.group(3) == "from today" else -1
            want = date.fromisoformat(m.group(1)) + sign * timedelta(days=int(m.group(2)))
        elif m := re.search(r"What day of the week was (\d{4}-\d\d-\d\d)\?", p):
            want = days[date.fromisoformat(m.group(1)).weekday()]
        elif m := re.search(r"Today is a (\w+)\. What day of the week (?:will it be|was it) (\d+) days (from today|ago)", p):
            sign = 1 if m.group(3) == "from today" else -1
            want = days[(days.index(m.group(1)) + sign * int(m.group(2))) % 7]
        else:
            continue
        assert item.answer == (str(want),), item.id
        checked += 1
    assert checked >= 6
