"""Probe suites: JSONL items, validated on load, turned into prompts and scored from the reply.

A suite is one JSONL file, one item per line, every item with the same scorer:

* ``{"id", "scorer": "math", "prompt", "answer": <integer>}``
* ``{"id", "scorer": "exact", "prompt", "answer": <string or list of strings>}``
* ``{"id", "scorer": "eq", "dialogue", "character", "reference": {<4 emotions>: <0..10>}}``

plus an optional ``"category"`` string. The built-in suites are ``math`` (word problems and
no-working arithmetic guesstimates), ``eq`` and ``reasoning`` (causal, date, logic and
navigation items, scorer ``exact``); each interleaves its categories, so the first N items
cover all of them.

Scoring (item scores; a suite's score is their mean):

* math, in [0, 1]. The reply's number is the first number on the first line that holds
  one, or the first number after that line's last ``=``; commas between digit groups are
  dropped. With p that number and r the answer: 1 if p == r; 0 if there is none or the
  signs differ; else (digits + closeness) / 2, where
  ``digits = (leading digits |p| and |r| share) / len(|r|)`` when both are integers with
  equally many digits (0 otherwise) and ``closeness = max(0, 1 - |p - r| / |r|)`` (0 if r == 0).
  E.g. r = 130437, p = 130000: digits 3/6, closeness 1 - 437/130437, score 0.7483.
* eq, in [0, 100]. The reply must rate every one of the four emotions as ``Name: N``
  (first mention counts, N clamped to [0, 10]), else the item scores 0. With the total
  absolute difference D from the reference, the score is ``max(0, 100 - 5 * D)``.
* exact, 0 or 1. The first non-empty line of the reply, normalised (NFKC, lower case,
  markdown ``*_``` removed, whitespace collapsed, a leading "answer:", "final answer:" or
  "the answer is" dropped, surrounding punctuation stripped), must equal a normalised
  answer, or start with it followed by one of ``, . ; : ! ( -``.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ..errors import LemonsliceError

__all__ = [
    "BUILTIN_SUITES", "SCORERS", "ProbeError", "ProbeItem", "ProbeSuite", "eq_prompt", "load_suite",
    "load_suites", "math_credit", "normalize_answer", "parse_number", "parse_ratings", "score_eq",
    "score_exact", "score_math",
]

SCORERS = ("math", "eq", "exact")
BUILTIN_SUITES = ("math", "eq", "reasoning")
EQ_EMOTIONS = 4
EQ_COST_PER_POINT = 5.0

_COMMON_KEYS = {"id", "scorer", "category"}
_KEYS = {
    "math": _COMMON_KEYS | {"prompt", "answer"},
    "exact": _COMMON_KEYS | {"prompt", "answer"},
    "eq": _COMMON_KEYS | {"dialogue", "character", "reference"},
}


class ProbeError(LemonsliceError):
    """A probe file is missing or malformed (the message names the file and line)."""


# ---- math ---------------------------------------------------------------------------------

# A number not glued to a word or another number: 1,234,567 or 1234 or 12.5, optionally negative.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _first_line_with(text: str, pattern: re.Pattern[str]) -> str | None:
    for line in text.splitlines():
        if pattern.search(line):
            return line
    return None


def parse_number(reply: str) -> int | Fraction | None:
    """The number a math reply gives (see the module doc), or None."""
    line = _first_line_with(reply, _NUMBER)
    if line is None:
        return None
    after_eq = line.rpartition("=")[2]
    m = _NUMBER.search(after_eq) or _NUMBER.search(line)
    assert m is not None
    try:
        value = Decimal(m.group().replace(",", ""))
    except InvalidOperation:
        return None
    return int(value) if value == value.to_integral_value() else Fraction(value)


def math_credit(pred: int | Fraction | None, ref: int) -> float:
    """Partial credit of a predicted number against the integer answer (module doc)."""
    if pred is None:
        return 0.0
    if pred == ref:
        return 1.0
    if (pred < 0) != (ref < 0) or ref == 0:
        return 0.0
    r = str(abs(ref))
    digits = 0.0
    if isinstance(pred, int):
        p = str(abs(pred))
        if len(p) == len(r):
            shared = next((k for k, (a, b) in enumerate(zip(p, r)) if a != b), len(r))
            digits = shared / len(r)
    closeness = max(0.0, 1.0 - float(abs(Fraction(pred) - ref) / abs(ref)))
    return (digits + closeness) / 2


def score_math(reply: str, answer: int) -> float:
    return math_credit(parse_number(reply), answer)


def _math_done(reply: str) -> bool:
    # The scorer reads one line only: once it is complete, more tokens cannot change the score.
    line = _first_line_with(reply, _NUMBER)
    return line is not None and (line + "\n") in reply


# ---- eq -----------------------------------------------------------------------------------


def _rating_pattern(emotion: str) -> re.Pattern[str]:
    name = r"\s+".join(re.escape(w) for w in emotion.split())
    return re.compile(rf"(?<![A-Za-z]){name}\s*\**\s*[:=\-\u2013]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def _ratings(reply: str, emotions: list[str]) -> list[re.Match[str] | None]:
    return [_rating_pattern(e).search(reply) for e in emotions]


def parse_ratings(reply: str, emotions: list[str]) -> dict[str, float] | None:
    """Each emotion's first "Name: N" rating, clamped to [0, 10]; None unless all are there."""
    found = _ratings(reply, emotions)
    if any(m is None for m in found):
        return None
    return {e: min(10.0, max(0.0, float(m.group(1)))) for e, m in zip(emotions, found) if m is not None}


def score_eq(reply: str, reference: Mapping[str, int]) -> float:
    ratings = parse_ratings(reply, list(reference))
    if ratings is None:
        return 0.0
    total = sum(abs(ratings[e] - r) for e, r in reference.items())
    return max(0.0, 100.0 - EQ_COST_PER_POINT * total)


def _eq_done(reply: str, emotions: list[str]) -> bool:
    # Every rating is found and ends before the reply does ("7" might still become "7.5" or "70").
    return all(m is not None and re.match(r"\.?[^\d.]", reply[m.end():]) for m in _ratings(reply, emotions))


def eq_prompt(dialogue: str, character: str, emotions: list[str]) -> str:
    lines = "\n".join(f"{e}: <0-10>" for e in emotions)
    return (
        f"Read this dialogue:\n\n{dialogue}\n\n"
        f"At the end of the dialogue, how strongly is {character} feeling each of these emotions? "
        "Rate each from 0 (not at all) to 10 (extremely). "
        f"Answer with exactly these four lines and nothing else:\n{lines}"
    )


# ---- exact --------------------------------------------------------------------------------

_LABEL = re.compile(r"^(?:final answer|the answer is|answer)\s*[:\-]?\s*")
_STRIP = " .,;:!?\"'()[]"
_AFTER_ANSWER = re.compile(r"\s*[,.;:!(\-\u2013\u2014]")


def normalize_answer(text: str) -> str:
    """The first non-empty line, normalised for exact matching (module doc)."""
    text = unicodedata.normalize("NFKC", text).lower()
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = " ".join(re.sub(r"[*_`]", "", line).split())
    return _LABEL.sub("", line).strip(_STRIP)


def score_exact(reply: str, answers: tuple[str, ...] | list[str]) -> float:
    got = normalize_answer(reply)
    for answer in answers:
        want = normalize_answer(answer)
        if got == want or (got.startswith(want) and _AFTER_ANSWER.match(got, len(want))):
            return 1.0
    return 0.0


def _exact_done(reply: str) -> bool:
    return bool(reply.strip()) and "\n" in reply.lstrip()


# ---- items and suites ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeItem:
    """One validated item; `prompt` is the user message (built from the dialogue for eq)."""

    id: str
    scorer: str
    prompt: str
    answer: Any  # math: int; exact: tuple of strings; eq: dict emotion -> int
    category: str | None = None

    def score(self, reply: str) -> float:
        if self.scorer == "math":
            return score_math(reply, self.answer)
        if self.scorer == "eq":
            return score_eq(reply, self.answer)
        return score_exact(reply, self.answer)

    def done(self, reply: str) -> bool:
        """Whether the reply already holds everything the scorer reads (generation may stop)."""
        if self.scorer == "math":
            return _math_done(reply)
        if self.scorer == "eq":
            return _eq_done(reply, list(self.answer))
        return _exact_done(reply)


@dataclass(frozen=True)
class ProbeSuite:
    name: str
    source: str  # "builtin:<name>" or the file's path
    sha256: str  # of the file's bytes
    scorer: str
    items: tuple[ProbeItem, ...]

    def limited(self, limit: int | None) -> tuple[ProbeItem, ...]:
        return self.items if limit is None else self.items[:limit]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ProbeError(f"{where}: {key!r} must be a non-empty string")
    return v


def _item(obj: Any, where: str) -> ProbeItem:
    if not isinstance(obj, dict):
        raise ProbeError(f"{where}: an item must be a JSON object, got {type(obj).__name__}")
    scorer = obj.get("scorer")
    if scorer not in SCORERS:
        raise ProbeError(f"{where}: 'scorer' must be one of {', '.join(SCORERS)}, got {scorer!r}")
    unknown = sorted(set(obj) - _KEYS[scorer])
    if unknown:
        raise ProbeError(f"{where}: unknown key {unknown[0]!r} for a {scorer} item")
    missing = sorted(_KEYS[scorer] - {"category"} - set(obj))
    if missing:
        raise ProbeError(f"{where}: missing key {missing[0]!r}")
    item_id = _text(obj, "id", where)
    category = obj.get("category")
    if category is not None and (not isinstance(category, str) or not category.strip()):
        raise ProbeError(f"{where}: 'category' must be a non-empty string")
    if scorer == "math":
        if not _is_int(obj["answer"]):
            raise ProbeError(f"{where}: a math 'answer' must be an integer, got {obj['answer']!r}")
        return ProbeItem(item_id, scorer, _text(obj, "prompt", where), obj["answer"], category)
    if scorer == "exact":
        ans = obj["answer"]
        answers = [ans] if isinstance(ans, str) else ans
        if not isinstance(answers, list) or not answers or not all(
            isinstance(a, str) and normalize_answer(a) for a in answers
        ):
            raise ProbeError(f"{where}: an exact 'answer' must be a non-empty string or list of them")
        return ProbeItem(item_id, scorer, _text(obj, "prompt", where), tuple(answers), category)
    ref = obj["reference"]
    if not isinstance(ref, dict) or len(ref) != EQ_EMOTIONS:
        raise ProbeError(f"{where}: 'reference' must map exactly {EQ_EMOTIONS} emotions to ratings")
    for emotion, rating in ref.items():
        if not emotion.strip() or not re.fullmatch(r"[A-Za-z][A-Za-z' ]*", emotion):
            raise ProbeError(f"{where}: emotion name {emotion!r} must be letters and spaces")
        if not _is_int(rating) or not 0 <= rating <= 10:
            raise ProbeError(f"{where}: the rating of {emotion!r} must be an integer from 0 to 10, got {rating!r}")
    if len({e.lower() for e in ref}) != len(ref):
        raise ProbeError(f"{where}: 'reference' names an emotion twice")
    dialogue, character = _text(obj, "dialogue", where), _text(obj, "character", where)
    return ProbeItem(item_id, scorer, eq_prompt(dialogue, character, list(ref)), dict(ref), category)


def parse_suite(data: bytes, name: str, source: str) -> ProbeSuite:
    """Validate JSONL bytes; errors read "<source>:<line>: <problem>"."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise ProbeError(f"{source}:{lineno}: not UTF-8 text") from None
    items: list[ProbeItem] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        item = _item(obj, where)
        if item.id in seen:
            raise ProbeError(f"{where}: duplicate id {item.id!r}")
        if items and item.scorer != items[0].scorer:
            raise ProbeError(f"{where}: scorer {item.scorer!r} differs from the file's {items[0].scorer!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ProbeError(f"{source}: no probe items")
    return ProbeSuite(name, source, hashlib.sha256(data).hexdigest(), items[0].scorer, tuple(items))


def load_suite(spec: str) -> ProbeSuite:
    """A built-in suite by name (math, eq, reasoning) or a JSONL file by path."""
    if spec in BUILTIN_SUITES:
        data = resources.files(__package__).joinpath("data", f"{spec}.jsonl").read_bytes()
        return parse_suite(data, spec, f"builtin:{spec}")
    path = Path(spec)
    try:
        data = path.read_bytes()
    except OSError as e:
        known = ", ".join(BUILTIN_SUITES)
        raise ProbeError(f"{spec}: cannot read probe file ({e.strerror or e}); built-in suites: {known}") from None
    return parse_suite(data, path.stem, str(path))


def load_suites(specs: str) -> list[ProbeSuite]:
    """Comma-separated suite names or paths; suite names (file stems for paths) must differ."""
    parts = [s.strip() for s in specs.split(",") if s.strip()]
    if not parts:
        raise ProbeError("no probe suites given")
    suites = [load_suite(p) for p in parts]
    names = [s.name for s in suites]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ProbeError(f"two probe suites are named {dup!r}; rename one of the files")
    return suites
