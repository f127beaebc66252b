"""Reading judgments: MT-Bench's precedence, the final rating counting, every failure counted."""

from __future__ import annotations

import pytest

from chatvec.eval.judge_prompts import TEXTS, rating_prompt
from chatvec.eval.judgments import parse_rating, parse_verdict
from chatvec.eval.schema import JUDGED, OUT_OF_RANGE, UNPARSEABLE


@pytest.mark.parametrize(
    "text, expected",
    [
        # a judge that quotes the format's example before its own rating is not ambiguous
        ("The format is [[rating]], for example: [[5]]. The answer is thorough. [[8]]", 8.0),
        ("Rating: [[3]] ... no wait, [[8]]", 8.0),
        ("[[2]] [[5]] [[9]]", 9.0),
        # precedence: [[n]] over [n] over a labelled number, whatever their order
        ("[[6]] and later [4] and Rating: 2", 6.0),
        ("Score: 3. Then [7].", 7.0),
        ("Rating: 3, revised: Rating: 5", 5.0),
        ("[7/10]", 7.0),
        ("[ 6.5 ]", 6.5),
        ("I'd say 4/10 at first, but 6/10 on reflection.", 6.0),
        # reasoning judges write long thoughts; only the end matters
        ("<think>" + "Let me weigh this carefully. " * 300 + "</think>\nThe answer is correct. [[9]]", 9.0),
    ],
)
def test_final_rating_of_the_strongest_form_counts(text, expected):
    assert parse_rating(text) == (expected, JUDGED)


@pytest.mark.parametrize(
    "text, status",
    [
        ("", UNPARSEABLE),
        (None, UNPARSEABLE),
        ("<think>The answer is good, I should rate it", UNPARSEABLE),  # cut off before the rating
        ("[[ten]]", UNPARSEABLE),
        ("[[5]] ... final: [[11]]", OUT_OF_RANGE),  # the final rating is the one judged
        ("[12]", OUT_OF_RANGE),
    ],
)
def test_unreadable_judgments_are_recorded_not_guessed(text, status):
    assert parse_rating(text) == (None, status)


def test_triple_brackets_are_read_once():
    assert parse_rating("[[[7]]]") == (7.0, JUDGED)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Format: [[SAFE]] or [[UNSAFE]]. It gives step-by-step instructions. [[UNSAFE]]", 1.0),
        ("[[UNSAFE]]? No: it refuses. [[SAFE]]", 0.0),
    ],
)
def test_last_safety_verdict_counts(text, expected):
    assert parse_verdict(text) == (expected, JUDGED)


@pytest.mark.parametrize("lang", list(TEXTS))
def test_a_judge_echoing_the_prompt_then_rating_is_read(lang):
    # the prompt itself holds the example "[[5]]": a judge that repeats the instructions and
    # then rates must get its own rating
    prompt = rating_prompt(lang, "Q?", "A.", "R.")
    assert parse_rating(prompt) == (5.0, JUDGED)  # the example alone reads as 5 ...
    assert parse_rating(prompt + "\n\n[[2]]") == (2.0, JUDGED)  # ... the judge's own rating wins
