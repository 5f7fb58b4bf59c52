"""The label queue: claims, leases, release, expiry and lease fencing (single process)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from storage.errors import InvalidInput, LeaseLost
from storage.ledger import Ledger
from storage.records import NewComparison, NewPreference

T0 = datetime(2030, 1, 1, 12, 0, 0)


def _queue(ledger: Ledger, seed) -> list[int]:
    """Six comparisons; the last two of the first prompt get priority 5 and 2."""
    s = seed(ledger, "c1", 2, 3)
    g = s.generations[0]
    extra = ledger.add_comparisons(
        "c1",
        [
            NewComparison(g[1], g[0], "ensemble_disagreement", 5.0),
            NewComparison(g[2], g[0], "ensemble_disagreement", 2.0),
        ],
    )
    return extra + s.comparisons  # claim order: priority desc, then id


def _label(cid: int, labeler: str) -> NewPreference:
    return NewPreference(cid, "a", "ai", labeler)


def _counts(ledger: Ledger, now: datetime) -> tuple[int, int, int]:
    c = ledger.comparison_counts("c1", now)
    return (c.pending, c.claimed, c.labeled)


def test_claims_follow_priority_and_never_overlap(ledger: Ledger, seed) -> None:
    order = _queue(ledger, seed)
    a = ledger.claim("c1", "A", 3, lease_s=60, now=T0)
    assert [c.comparison_id for c in a] == order[:3]
    assert {(c.owner, c.attempt, c.expires_at) for c in a} == {("A", 1, T0 + timedelta(seconds=60))}
    assert a[0].prompt == "c1 prompt 0" and a[0].text_a == "answer 1.1 v0"
    b = ledger.claim("c1", "B", 10, lease_s=60, now=T0)
    assert [c.comparison_id for c in b] == order[3:]
    assert ledger.claim("c1", "C", 10, lease_s=60, now=T0) == []
    assert _counts(ledger, T0) == (0, 8, 0)
    with pytest.raises(InvalidInput, match="field 'lease_s' must be > 0 seconds"):
        ledger.claim("c1", "C", 1, lease_s=0)


def test_release_and_expiry_make_comparisons_claimable_again(ledger: Ledger, seed) -> None:
    order = _queue(ledger, seed)
    ledger.claim("c1", "A", 4, lease_s=60, now=T0)
    ledger.claim("c1", "B", 4, lease_s=60, now=T0)
    assert ledger.release("c1", "A", [order[0], order[1], order[4]]) == 2  # order[4] is B's
    assert _counts(ledger, T0) == (2, 6, 0)
    with pytest.raises(LeaseLost, match=f"comparison {order[0]} is not leased by 'A'"):
        ledger.record_preference("c1", _label(order[0], "A"), lease_owner="A", now=T0)

    later = T0 + timedelta(seconds=61)
    assert _counts(ledger, later) == (8, 0, 0)  # expired leases count as pending
    assert ledger.expire_leases("c1", now=later) == 6
    again = ledger.claim("c1", "C", 10, lease_s=60, now=later)
    assert [c.comparison_id for c in again] == order
    assert [c.attempt for c in again] == [2] * 8
    assert ledger.row_counts()["preference"] == 0


def test_a_lease_fences_the_label(ledger: Ledger, seed) -> None:
    order = _queue(ledger, seed)
    ledger.claim("c1", "A", 1, lease_s=10, now=T0)
    later = T0 + timedelta(seconds=11)
    (reclaimed,) = ledger.claim("c1", "B", 1, lease_s=10, now=later)
    assert (reclaimed.comparison_id, reclaimed.attempt) == (order[0], 2)
    with pytest.raises(LeaseLost, match="lease owner 'B'"):  # A's lease expired, B holds it
        ledger.record_preference("c1", _label(order[0], "A"), lease_owner="A", now=later)
    done = ledger.record_preference("c1", _label(order[0], "B"), lease_owner="B", now=later)
    assert done.created
    assert _counts(ledger, later) == (7, 0, 1)
    with pytest.raises(LeaseLost, match="status 'labeled'"):
        ledger.record_preference("c1", _label(order[0], "C"), lease_owner="B", now=later)
    rest = ledger.claim("c1", "C", 10, lease_s=10, now=later)
    assert order[0] not in [c.comparison_id for c in rest] and len(rest) == 7
    assert ledger.row_counts()["preference"] == 1


def test_leased_to_lists_an_owners_live_leases_as_claimed(ledger: Ledger, seed) -> None:
    order = _queue(ledger, seed)
    a = ledger.claim("c1", "A", 3, lease_s=60, now=T0)
    b = ledger.claim("c1", "B", 2, lease_s=30, now=T0)
    assert ledger.leased_to("c1", "A", now=T0) == a  # same ids, texts, expiry and attempt
    assert ledger.leased_to("c1", "B", now=T0) == b
    assert ledger.leased_to("c1", "C", now=T0) == []

    ledger.record_preference("c1", _label(order[0], "A"), lease_owner="A", now=T0)
    assert ledger.release("c1", "A", [order[2]]) == 1
    assert ledger.leased_to("c1", "A", now=T0) == [a[1]]  # labeled and released ones leave
    at_expiry = T0 + timedelta(seconds=60)
    assert ledger.leased_to("c1", "A", now=at_expiry) == [a[1]]  # live until its last instant
    assert ledger.leased_to("c1", "B", now=at_expiry) == []
    assert ledger.leased_to("c1", "A", now=at_expiry + timedelta(microseconds=1)) == []
    later = T0 + timedelta(seconds=61)
    retaken = ledger.claim("c1", "B", 8, lease_s=60, now=later)
    assert [c.comparison_id for c in retaken] == order[1:]  # A's expired lease is B's now
    assert ledger.leased_to("c1", "B", now=later) == retaken
    assert [c.attempt for c in retaken] == [2, 2, 2, 2, 1, 1, 1]  # released counts too
    assert ledger.leased_to("c1", "A", now=later) == []


def test_leased_to_is_per_campaign_and_checks_the_owner(ledger: Ledger, seed) -> None:
    _queue(ledger, seed)
    seed(ledger, "c2", 1, 2)
    mine = ledger.claim("c2", "A", 1, lease_s=60, now=T0)
    assert ledger.leased_to("c1", "A", now=T0) == []
    assert ledger.leased_to("c2", "A", now=T0) == mine
    with pytest.raises(InvalidInput, match="leased_to: field 'owner' must be a non-empty string"):
        ledger.leased_to("c1", "")
