"""Preferences of text pairs: prompt, generations, comparison and label in one transaction."""

from __future__ import annotations

import zlib

import pytest

from storage.errors import DuplicateLabel, InvalidInput, UnknownId
from storage.ledger import Ledger
from storage.records import NewPairPreference, NewPreference, NewResponse, Recorded


def _pair(prompt: str, a: str, b: str, labeler: str = "alice", **kw) -> NewPairPreference:
    def respond(text: str) -> NewResponse:  # sample index keyed by the text, as an import does
        index = zlib.crc32(text.encode()) & 0x7FFF_FFFF
        return NewResponse(text, len(text.split()), 0, "import", index)

    return NewPairPreference(prompt, respond(a), respond(b), kw.pop("choice", "a"), "human",
                             labeler, selection="import", **kw)


def _facts(ledger: Ledger) -> dict[str, int]:
    rows = ledger.row_counts()
    return {k: rows[k] for k in ("prompt", "generation", "comparison", "preference")}


def test_pairs_and_comparisons_are_labeled_in_one_call_and_again_adds_nothing(
    ledger: Ledger, seed
) -> None:
    s = seed(ledger, "c1", 1, 2)
    before = _facts(ledger)
    items = [
        _pair("new prompt", "yes", "no", strength=0.5),
        NewPreference(s.comparisons[0], "tie", "human", "bob"),
        _pair("c1 prompt 0", "a third answer", "a fourth one", "bob", choice="b"),  # known prompt
    ]
    first = ledger.record_pair_preferences("c1", items, source="import")
    assert [r.created for r in first] == [True, True, True]
    after = _facts(ledger)
    assert after == {"prompt": before["prompt"] + 1, "generation": before["generation"] + 4,
                     "comparison": before["comparison"] + 2, "preference": 3}
    rows = ledger.snapshot("c1", kinds=("human",)).rows
    assert [(r.prompt, r.text_a, r.text_b, r.choice, r.labeler_id, r.strength) for r in rows] == [
        ("new prompt", "yes", "no", "a", "alice", 0.5),
        ("c1 prompt 0", "answer 1.0 v0", "answer 1.1 v0", "tie", "bob", None),
        ("c1 prompt 0", "a third answer", "a fourth one", "b", "bob", None),
    ]
    counts = ledger.comparison_counts("c1")
    assert (counts.pending, counts.claimed, counts.labeled) == (0, 0, 3)
    with ledger.engine.connect() as conn:
        sources = dict(conn.exec_driver_sql("SELECT text, source FROM prompt").all())
    assert sources == {"c1 prompt 0": None, "new prompt": "import"}

    again = ledger.record_pair_preferences("c1", items, source="import")
    assert again == [Recorded(r.id, created=False) for r in first]
    assert _facts(ledger) == after


def test_a_refused_label_leaves_no_prompt_generation_or_comparison_behind(
    ledger: Ledger, seed
) -> None:
    s = seed(ledger, "c1", 1, 2)
    ledger.record_preference("c1", NewPreference(s.comparisons[0], "a", "human", "alice"))
    before = _facts(ledger)
    items = [_pair("new prompt", "yes", "no"),
             NewPreference(s.comparisons[0], "b", "human", "alice")]  # contradicts the ledger
    with pytest.raises(DuplicateLabel, match=r"^preferences\[1\]: labeler 'alice' already"):
        ledger.record_pair_preferences("c1", items)
    assert _facts(ledger) == before
    counts = ledger.comparison_counts("c1")
    assert (counts.pending, counts.claimed, counts.labeled) == (0, 0, 1)


@pytest.mark.parametrize(("items", "error", "message"), [
    ([_pair("p", "x", "y"), _pair("q", "x", "")], InvalidInput,
     r"^generations\[3\]: field 'text' must be a non-empty string"),
    ([_pair("p", "x", "y"), _pair("q" * 101, "x", "y")], InvalidInput,
     r"^prompts\[1\]: field 'text' must be at most 100 characters"),
    ([_pair("p", "same", "same")], InvalidInput,
     r"^comparisons\[0\]: generation_a_id and generation_b_id are both"),
    ([_pair("p", "x", "y"), NewPreference(999, "a", "human", "bob")], UnknownId,
     r"^preferences\[1\]: comparison 999 does not exist"),
    ([_pair("p", "x", "y", choice="c")], InvalidInput,
     r"^preferences\[0\]: field 'choice' must be one of"),
    ([_pair("p", "x", "y"), ("not", "a label")], InvalidInput,
     r"^items\[1\]: expected a NewPreference or a NewPairPreference; got tuple"),
])
def test_a_bad_item_is_named_and_nothing_is_written(ledger: Ledger, items, error, message) -> None:
    before = _facts(ledger)
    with pytest.raises(error, match=message):
        ledger.record_pair_preferences("c1", items)
    assert _facts(ledger) == before
