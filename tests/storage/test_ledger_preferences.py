"""Preferences: idempotent retry, key conflict, one label per labeler, supersede, immutability."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from storage.errors import DuplicateLabel, IdempotencyConflict, InvalidInput
from storage.ledger import Ledger
from storage.records import NewPreference


def _pref(cid: int, choice: str = "a", labeler: str = "judge", **kw) -> NewPreference:
    return NewPreference(cid, choice, kw.pop("kind", "ai"), labeler, **kw)


def test_retry_with_same_key_and_body_returns_the_stored_row(ledger: Ledger, seed) -> None:
    s = seed(ledger, "c1", 1, 2)
    first = ledger.record_preference(
        "c1", _pref(s.comparisons[0], strength=0.8, idempotency_key="req-1")
    )
    retry = ledger.record_preference(
        "c1", _pref(s.comparisons[0], strength=0.8, idempotency_key="req-1")
    )
    assert (first.created, retry.created, retry.id) == (True, False, first.id)
    assert ledger.row_counts()["preference"] == 1


def test_same_key_with_another_body_raises_naming_the_key(ledger: Ledger, seed) -> None:
    s = seed(ledger, "c1", 1, 3)
    ledger.record_preference("c1", _pref(s.comparisons[0], idempotency_key="req-1"))
    with pytest.raises(IdempotencyConflict, match="'req-1'") as err:
        ledger.record_preference("c1", _pref(s.comparisons[1], idempotency_key="req-1"))
    assert err.value.key == "req-1"
    assert ledger.row_counts()["preference"] == 1


def test_batch_repeats_resolve_to_one_row(ledger: Ledger, seed) -> None:
    s = seed(ledger, "c1", 1, 3)
    batch = [_pref(s.comparisons[0]), _pref(s.comparisons[1]), _pref(s.comparisons[0])]
    out = ledger.record_preferences("c1", batch)
    assert [r.created for r in out] == [True, True, False]
    assert out[0].id == out[2].id
    assert ledger.row_counts()["preference"] == 2


def test_one_label_per_labeler_and_corrections_supersede(ledger: Ledger, seed) -> None:
    s = seed(ledger, "c1", 1, 2)
    cid = s.comparisons[0]
    first = ledger.record_preference("c1", _pref(cid, "a"))
    with pytest.raises(DuplicateLabel, match=f"supersedes={first.id}"):
        ledger.record_preference("c1", _pref(cid, "b"))
    other = ledger.record_preference("c1", _pref(cid, "b", labeler="alice", kind="human"))
    fix = ledger.record_preference("c1", _pref(cid, "b", supersedes=first.id))
    assert fix.created and fix.id > other.id > first.id
    with pytest.raises(DuplicateLabel, match=f"already superseded by preference {fix.id}"):
        ledger.record_preference("c1", _pref(cid, "tie", supersedes=first.id))
    with pytest.raises(DuplicateLabel, match="same labeler on the same comparison"):
        ledger.record_preference("c1", _pref(cid, "a", labeler="bob", supersedes=first.id))
    again = ledger.record_preference("c1", _pref(cid, "tie", supersedes=fix.id))
    assert ledger.row_counts()["preference"] == 4
    rows = ledger.snapshot("c1").rows
    assert [(r.preference_id, r.labeler_id, r.choice) for r in rows] == [
        (other.id, "alice", "b"),
        (again.id, "judge", "tie"),
    ]


def test_label_counts_by_labeler_count_effective_labels(ledger: Ledger, seed) -> None:
    s = seed(ledger, "c1", 1, 4)  # 6 comparisons
    c = s.comparisons
    first = ledger.record_preferences(
        "c1",
        [_pref(c[k]) for k in range(3)]  # judge (ai): 3
        + [_pref(c[k], labeler="alice", kind="human") for k in (0, 1)]
        + [_pref(c[3], labeler="bob", kind="human"), _pref(c[0], labeler="gold-rm", kind="gold")],
    )
    fix = ledger.record_preference("c1", _pref(c[0], "b", supersedes=first[0].id))
    ledger.record_preference("c1", _pref(c[0], "tie", supersedes=fix.id))
    ledger.record_preference("c1", _pref(c[1], "b", "alice", kind="human", supersedes=first[4].id))
    other = seed(ledger, "c2", 1, 2)
    ledger.record_preference("c2", _pref(other.comparisons[0], labeler="alice", kind="human"))

    assert ledger.label_counts_by_labeler("c1") == {"alice": 2, "bob": 1, "gold-rm": 1, "judge": 3}
    assert ledger.label_counts_by_labeler("c1", "human") == {"alice": 2, "bob": 1}
    assert ledger.label_counts_by_labeler("c1", "ai") == {"judge": 3}
    assert ledger.label_counts_by_labeler("c2", "gold") == {}
    assert ledger.label_counts("c1") == {"ai": 5, "human": 4, "gold": 1}  # rows, not effective
    snap = ledger.snapshot("c1", kinds=("human",))  # the same count the slow way
    assert ledger.label_counts_by_labeler("c1", "human") == Counter(r.labeler_id for r in snap.rows)
    with pytest.raises(InvalidInput, match="field 'kind' must be one of"):
        ledger.label_counts_by_labeler("c1", "robot")


@pytest.mark.parametrize(
    ("table", "statement"),
    [
        ("preference", "UPDATE preference SET choice = 'b'"),
        ("preference", "DELETE FROM preference"),
        ("generation", "UPDATE generation SET text = 'x'"),
        ("generation", "DELETE FROM generation"),
    ],
)
def test_database_refuses_update_and_delete_of_facts(
    ledger: Ledger, seed, table: str, statement: str
) -> None:
    s = seed(ledger, "c1", 1, 2)
    ledger.record_preference("c1", _pref(s.comparisons[0]))
    before = ledger.row_counts()
    with pytest.raises(DBAPIError, match="immutable facts"), ledger.engine.begin() as conn:
        conn.execute(text(statement))
    assert ledger.row_counts() == before
    assert ledger.snapshot("c1").rows[0].choice == "a"
    assert before[table] > 0
