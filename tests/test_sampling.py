"""Sampling: parameter validation, presets, each logit filter against hand-computed values,
the filter order, seeded determinism, and stop-string matching on streamed text."""

from __future__ import annotations

import math

import pytest
import torch

from lemonslice.engine.sampling import (
    PRESETS,
    Sampler,
    SamplingParams,
    StopMatcher,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    filter_logits,
)

# A 6-token vocabulary whose softmax is exactly these probabilities, deliberately unsorted.
# Sorted: id1 0.40, id3 0.25, id4 0.15, id0 0.10, id5 0.06, id2 0.04 (cumulative 0.40, 0.65,
# 0.80, 0.90, 0.96, 1.00).
PROBS = [0.10, 0.40, 0.04, 0.25, 0.15, 0.06]
LOGITS = torch.tensor([math.log(p) for p in PROBS])  # [6]
ALL = {0, 1, 2, 3, 4, 5}


def kept(logits: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(logits.tolist()) if v != float("-inf")}


def assert_kept_unchanged(out: torch.Tensor, keep: set[int]) -> None:
    assert kept(out) == keep
    for i in keep:
        assert out[i].item() == LOGITS[i].item()


@pytest.mark.parametrize(
    ("k", "expected"),
    [(1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (0, ALL), (6, ALL), (10, ALL)],
)
def test_top_k(k: int, expected: set[int]) -> None:
    assert_kept_unchanged(apply_top_k(LOGITS, k), expected)


def test_top_k_keeps_ties_at_the_boundary() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 3.0, 2.0, -1.0])
    assert kept(apply_top_k(logits, 1)) == {1, 3}
    assert kept(apply_top_k(logits, 3)) == {1, 3, 4}


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.30, {1}),  # 0.40 >= 0.30 already
        (0.50, {1, 3}),  # 0.40 < 0.50 <= 0.65
        (0.70, {1, 3, 4}),  # 0.65 < 0.70 <= 0.80
        (0.85, {1, 3, 4, 0}),  # 0.80 < 0.85 <= 0.90
        (0.99, ALL),  # 0.96 < 0.99, so the last token is needed too
        (1.00, ALL),
    ],
)
def test_top_p(p: float, expected: set[int]) -> None:
    assert_kept_unchanged(apply_top_p(LOGITS, p), expected)


def test_top_p_always_keeps_the_top_token() -> None:
    assert kept(apply_top_p(LOGITS, 1e-6)) == {1}


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        (1.0, {1}),  # only p >= 0.40
        (0.5, {1, 3}),  # p >= 0.20
        (0.3, {1, 3, 4}),  # p >= 0.12
        (0.2, {1, 3, 4, 0}),  # p >= 0.08
        (0.12, {1, 3, 4, 0, 5}),  # p >= 0.048
        (0.0, ALL),
    ],
)
def test_min_p(min_p: float, expected: set[int]) -> None:
    assert_kept_unchanged(apply_min_p(LOGITS, min_p), expected)


PEN_LOGITS = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 0.0])
PEN_HISTORY = [0, 1, 1, 5]  # token 1 twice: still penalised once


@pytest.mark.parametrize(
    ("rep", "presence", "expected"),
    [
        (2.0, 0.0, [1.0, -2.0, 0.5, 3.0, -2.0, 0.0]),  # 2/2, -1*2, 0*2
        (1.0, 0.5, [1.5, -1.5, 0.5, 3.0, -2.0, -0.5]),
        (2.0, 0.5, [0.5, -2.5, 0.5, 3.0, -2.0, -0.5]),
        (0.5, 0.0, [4.0, -0.5, 0.5, 3.0, -2.0, 0.0]),  # a penalty < 1 favours repeats
        (1.0, 0.0, [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]),
    ],
)
def test_penalties(rep: float, presence: float, expected: list[float]) -> None:
    out = apply_penalties(PEN_LOGITS, PEN_HISTORY, rep, presence)
    assert out.tolist() == expected
    assert PEN_LOGITS.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]  # input untouched


def test_penalties_reject_out_of_vocab_ids() -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        apply_penalties(PEN_LOGITS, [6], 2.0, 0.0)


@pytest.mark.parametrize(
    ("last_n", "expected"),
    [
        (4, [0.5, -2.5, 0.5, 3.0, -2.0, -0.5]),  # the leading 3 is outside the window
        (-1, [0.5, -2.5, 0.5, 1.0, -2.0, -0.5]),  # 3/2 - 0.5
        (0, [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]),
    ],
)
def test_penalty_window(last_n: int, expected: list[float]) -> None:
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, penalty_last_n=last_n)
    assert filter_logits(PEN_LOGITS, [3, *PEN_HISTORY], params).tolist() == expected


def test_top_p_sees_the_distribution_left_by_top_k() -> None:
    # After top-k=2 the survivors renormalise to 0.615/0.385, so top-p 0.6 keeps one token;
    # top-p on the full distribution would have kept two (0.40 < 0.6).
    assert kept(filter_logits(LOGITS, [], SamplingParams(top_k=2, top_p=0.6))) == {1}
    assert kept(apply_top_p(LOGITS, 0.6)) == {1, 3}


def test_greedy_takes_the_argmax_after_penalties() -> None:
    greedy = Sampler(SamplingParams(temperature=0.0))
    assert greedy.sample(PEN_LOGITS) == 3
    penalised = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    assert penalised.sample(PEN_LOGITS, [3]) == 0  # 3.0 / 2 = 1.5 < 2.0


def draws(params: SamplingParams, n: int = 200, history: list[int] | None = None) -> list[int]:
    sampler = Sampler(params)
    return [sampler.sample(LOGITS, history or []) for _ in range(n)]


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    first = draws(SamplingParams(seed=1234))
    assert first == draws(SamplingParams(seed=1234))
    assert first != draws(SamplingParams(seed=1235))
    assert set(first) == ALL


def test_unseeded_sampler_records_a_reproducible_seed() -> None:
    sampler = Sampler(SamplingParams())
    got = [sampler.sample(LOGITS) for _ in range(50)]
    assert got == draws(SamplingParams(seed=sampler.seed), 50)


def test_draws_stay_inside_the_filtered_set() -> None:
    got = draws(SamplingParams(top_k=3, seed=0), 300)
    assert set(got) == {1, 3, 4}
    assert set(draws(SamplingParams(min_p=0.5, temperature=5.0, seed=0), 100)) == {1, 3}


def test_presets_have_the_recommended_values() -> None:
    fields = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repetition_penalty")
    expected = {
        "thinking-general": (1.0, 0.95, 20, 0.0, 1.5, 1.0),
        "thinking-coding": (0.6, 0.95, 20, 0.0, 0.0, 1.0),
        "instruct-general": (0.7, 0.8, 20, 0.0, 1.5, 1.0),
        "instruct-reasoning": (1.0, 1.0, 40, 0.0, 1.5, 1.0),
    }
    assert set(PRESETS) == set(expected)
    for name, values in expected.items():
        assert tuple(getattr(PRESETS[name], f) for f in fields) == values, name


def test_preset_overrides_and_unknown_names() -> None:
    p = SamplingParams.preset("thinking-coding", seed=3, stop=["</s>"])
    assert (p.temperature, p.seed, p.stop) == (0.6, 3, ("</s>",))
    with pytest.raises(ValueError, match="unknown sampling preset 'nope'"):
        SamplingParams.preset("nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
        ({"min_p": 1.1}, r"min_p must be in \[0, 1\]"),
        ({"top_k": -1}, r"top_k must be an integer >= 0"),
        ({"top_k": 2.5}, r"top_k must be an integer >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"presence_penalty": float("inf")}, "presence_penalty must be a finite number"),
        ({"penalty_last_n": -2}, "penalty_last_n must be an integer >= -1"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64\)"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"stop": ["ok", ""]}, "stop strings must be non-empty strings"),
    ],
)
def test_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_stop_accepts_a_single_string() -> None:
    assert SamplingParams(stop="###").stop == ("###",)


def feed_all(matcher: StopMatcher, chunks: list[str]) -> list[tuple[str, bool]]:
    return [matcher.feed(c) for c in chunks]


def test_stop_split_across_chunks() -> None:
    m = StopMatcher(["</s>"])
    assert feed_all(m, ["Hello </", "s> more"]) == [("Hello ", False), ("", True)]
    assert m.feed("later") == ("", True)
    assert m.flush() == ""


def test_stop_split_over_three_chunks() -> None:
    m = StopMatcher(["STOP"])
    assert feed_all(m, ["xx S", "TO", "P yy"]) == [("xx ", False), ("", False), ("", True)]


def test_partial_prefix_is_released_when_it_does_not_complete() -> None:
    m = StopMatcher(["</s>"])
    assert feed_all(m, ["a <", "b", " </", "x"]) == [
        ("a ", False), ("<b", False), (" ", False), ("</x", False)
    ]


def test_held_tail_is_flushed_at_end_of_stream() -> None:
    m = StopMatcher(["</s>"])
    assert m.feed("end </") == ("end ", False)
    assert m.flush() == "</"


def test_earliest_stop_wins_and_self_overlapping_stops() -> None:
    assert StopMatcher(["###", "\n\n"]).feed("a\n\nb###") == ("a", True)
    m = StopMatcher(["aab"])
    assert feed_all(m, ["aa", "a", "b"]) == [("", False), ("a", False), ("", True)]


def test_no_stop_strings_pass_text_through() -> None:
    m = StopMatcher([])
    assert feed_all(m, ["a", "b<"]) == [("a", False), ("b<", False)]


def test_argmax_is_torchs_first_index_on_ties():
    from lemonslice.engine.sampling import argmax

    for values in ([1.0, 3.0, 3.0, 2.0], [float("nan"), 1.0, float("nan")], [-1.0, float("inf"), 5.0, float("inf")]):
        x = torch.tensor(values)
        assert argmax(x) == int(torch.argmax(x))
    x = torch.randn(262144, generator=torch.Generator().manual_seed(0))
    assert argmax(x) == int(torch.argmax(x))
    assert argmax(x[::2]) == int(torch.argmax(x[::2]))  # a strided view
