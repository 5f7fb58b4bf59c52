"""Every bad input raises a typed error naming what was wrong, and writes nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from storage.errors import InvalidInput, LedgerError, UnknownId
from storage.ledger import Ledger
from storage.records import NewComparison, NewGeneration, NewPreference

Seeded = Any  # conftest.Seeded: prompts, generations, comparisons
Case = Callable[[Ledger, Seeded, Seeded], object]


def _ok(s: Seeded, i: int = 0) -> NewPreference:
    return NewPreference(s.comparisons[i], "a", "ai", "judge", idempotency_key=f"ok-{i}")


def _bad_pref(s: Seeded, **change) -> list[NewPreference]:
    fields = {
        "comparison_id": s.comparisons[1],
        "choice": "b",
        "labeler_kind": "ai",
        "labeler_id": "judge",
        **change,
    }
    return [_ok(s), NewPreference(**fields)]  # a valid row first: it must not be written


CASES: dict[str, tuple[Case, type[LedgerError], str]] = {
    "nan strength": (
        lambda led, s, o: led.record_preferences("c1", _bad_pref(s, strength=math.nan)),
        InvalidInput,
        r"preferences\[1\]: field 'strength' must be a finite number",
    ),
    "inf strength": (
        lambda led, s, o: led.record_preferences("c1", _bad_pref(s, strength=-math.inf)),
        InvalidInput,
        r"preferences\[1\]: field 'strength'.*-inf",
    ),
    "unknown comparison": (
        lambda led, s, o: led.record_preferences("c1", _bad_pref(s, comparison_id=999_999)),
        UnknownId,
        r"preferences\[1\]: comparison 999999 does not exist",
    ),
    "choice outside a/b/tie": (
        lambda led, s, o: led.record_preferences("c1", _bad_pref(s, choice="c")),
        InvalidInput,
        r"field 'choice' must be one of \['a', 'b', 'tie'\]; got 'c'",
    ),
    "unknown labeler kind": (
        lambda led, s, o: led.record_preferences("c1", _bad_pref(s, labeler_kind="robot")),
        InvalidInput,
        r"field 'labeler_kind' must be one of \['ai', 'human', 'gold'\]",
    ),
    "empty labeler id": (
        lambda led, s, o: led.record_preferences("c1", _bad_pref(s, labeler_id="")),
        InvalidInput,
        r"field 'labeler_id' must be a non-empty string",
    ),
    "comparison of another campaign": (
        lambda led, s, o: led.record_preferences(
            "c1", _bad_pref(s, comparison_id=o.comparisons[0])
        ),
        UnknownId,
        r"comparison \d+ belongs to campaign id \d+, not to campaign id \d+",
    ),
    "empty prompt": (
        lambda led, s, o: led.add_prompts("c1", ["fine", ""]),
        InvalidInput,
        r"prompts\[1\]: field 'text' must be a non-empty string",
    ),
    "over-limit prompt": (
        lambda led, s, o: led.add_prompts("c1", ["fine", "x" * 101]),
        InvalidInput,
        r"prompts\[1\]: field 'text' must be at most 100 characters.*'101'",
    ),
    "empty generation": (
        lambda led, s, o: led.add_generations(
            "c1",
            [
                NewGeneration(s.prompts[0], "ok", 1, 5, "w", 0),
                NewGeneration(s.prompts[0], "", 0, 5, "w", 1),
            ],
        ),
        InvalidInput,
        r"generations\[1\]: field 'text' must be a non-empty string",
    ),
    "over-limit generation": (
        lambda led, s, o: led.add_generations(
            "c1", [NewGeneration(s.prompts[0], "y" * 101, 1, 5, "w", 0)]
        ),
        InvalidInput,
        r"generations\[0\]: field 'text' must be at most 100 characters",
    ),
    "generation of unknown prompt": (
        lambda led, s, o: led.add_generations("c1", [NewGeneration(424242, "t", 1, 0, "w", 0)]),
        UnknownId,
        r"generations\[0\]: field 'prompt_id': prompt 424242 does not exist",
    ),
    "negative policy version": (
        lambda led, s, o: led.add_generations(
            "c1", [NewGeneration(s.prompts[0], "t", 1, -1, "w", 0)]
        ),
        InvalidInput,
        r"field 'policy_version' must be an integer >= 0; got -1",
    ),
    "comparison with itself": (
        lambda led, s, o: led.add_comparisons(
            "c1", [NewComparison(s.generations[0][0], s.generations[0][0])]
        ),
        InvalidInput,
        r"comparisons\[0\]: generation_a_id and generation_b_id are both \d+",
    ),
    "generations of different prompts": (
        lambda led, s, o: led.add_comparisons(
            "c1", [NewComparison(s.generations[0][0], s.generations[1][0])]
        ),
        InvalidInput,
        r"comparisons\[0\]: generations \d+ and \d+ belong to different prompts",
    ),
    "generation of another campaign": (
        lambda led, s, o: led.add_comparisons(
            "c1", [NewComparison(s.generations[0][0], o.generations[0][1])]
        ),
        UnknownId,
        r"field 'generation_b_id': generation \d+ does not exist in this campaign",
    ),
    "nan metric": (
        lambda led, s, o: led.log_metrics("c1", 0, {"rm/acc": 0.5, "rm/loss": math.nan}),
        InvalidInput,
        r"field \"values\['rm/loss'\]\" must be a finite number",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_typed_error_and_writes_nothing(ledger: Ledger, seed, case: str) -> None:
    own = seed(ledger, "c1", 2, 2)
    other = seed(ledger, "c2", 1, 2)
    before = ledger.row_counts()
    run, error, message = CASES[case]
    with pytest.raises(error, match=message):
        run(ledger, own, other)
    assert ledger.row_counts() == before
