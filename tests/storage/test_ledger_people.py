"""Annotator tokens, audit rows, metrics and report queries."""

from __future__ import annotations

import hashlib
from datetime import datetime

import pytest
from sqlalchemy import text

from storage.errors import InvalidInput, UnknownId
from storage.ledger import Ledger
from storage.records import AuditNote, NewGeneration, NewPreference


def test_annotator_tokens_are_stored_only_as_hashes(ledger: Ledger) -> None:
    token = ledger.add_annotator("alice")
    admin_token = ledger.add_annotator("root", role="admin")
    assert len(token) == 43 and token != admin_token  # 32 random bytes, urlsafe base64
    with ledger.engine.connect() as conn:
        rows = conn.execute(text("SELECT name, token_hash FROM annotator ORDER BY id")).all()
        dump = " ".join(
            str(v) for row in conn.execute(text("SELECT * FROM annotator")) for v in row
        )
    assert rows[0] == ("alice", hashlib.sha256(token.encode()).hexdigest())
    assert token not in dump and admin_token not in dump

    alice = ledger.authenticate(token)
    assert (alice.name, alice.role, alice.revoked_at) == ("alice", "annotator", None)
    assert ledger.authenticate(admin_token).role == "admin"
    assert ledger.authenticate(token + "x") is None
    assert ledger.authenticate("") is None

    revoked = ledger.revoke_annotator("alice")
    assert revoked.revoked_at is not None
    assert ledger.authenticate(token) is None
    assert ledger.revoke_annotator("alice").revoked_at == revoked.revoked_at  # idempotent
    assert [(a.name, a.revoked_at is None) for a in ledger.list_annotators()] == [
        ("alice", False),
        ("root", True),
    ]
    with pytest.raises(UnknownId, match="annotator 'nobody' does not exist"):
        ledger.revoke_annotator("nobody")
    with pytest.raises(InvalidInput, match="name 'alice' is taken"):
        ledger.add_annotator("alice")
    with pytest.raises(InvalidInput, match=r"field 'role' must be one of \['annotator', 'admin'\]"):
        ledger.add_annotator("carol", role="boss")
    assert ledger.row_counts()["annotator"] == 2


def test_audit_rows_append(ledger: Ledger) -> None:
    digest = hashlib.sha256(b"{}").hexdigest()
    first = ledger.audit("alice", "POST /labels", digest)
    second = ledger.audit("root", "revoke bob", digest)
    assert second == first + 1
    assert [(a.id, a.who) for a in ledger.audit_log(limit=5)] == [
        (second, "root"),
        (first, "alice"),
    ]
    with pytest.raises(InvalidInput, match="field 'request_hash' must be 64 lowercase hex"):
        ledger.audit("alice", "x", "not-a-hash")
    assert ledger.row_counts()["audit"] == 2


def test_a_preference_and_its_audit_row_commit_together(ledger: Ledger, seed) -> None:
    cid = seed(ledger, "c1", 1, 2).comparisons[0]
    pref = NewPreference(cid, "a", "human", "alice", idempotency_key="k1")
    bad = AuditNote("alice", "not-a-hash", lambda rec: f"label -> {rec.id}")
    with pytest.raises(InvalidInput, match="request_hash"):
        ledger.record_preference("c1", pref, audit=bad)
    assert (ledger.row_counts()["preference"], ledger.row_counts()["audit"]) == (0, 0)
    digest = hashlib.sha256(b"{}").hexdigest()
    note = AuditNote("alice", digest, lambda rec: f"label -> {rec.id} {rec.created}")
    first = ledger.record_preference("c1", pref, audit=note)
    again = ledger.record_preference("c1", pref, audit=note)  # a replay is audited too
    assert (first.created, again.created, again.id) == (True, False, first.id)
    assert [a.what for a in ledger.audit_log()] == [f"label -> {first.id} False",
                                                     f"label -> {first.id} True"]
    assert ledger.row_counts()["preference"] == 1


def test_metrics_keep_the_latest_value_per_iteration(ledger: Ledger) -> None:
    assert ledger.log_metrics("c1", 0, {"rm/acc": 0.5, "ppo/kl": 0.01}) == 2
    ledger.log_metrics("c1", 1, {"rm/acc": 0.6})
    ledger.log_metrics("c1", 1, {"rm/acc": 0.625})  # a resumed iteration logs again
    assert [(m.iteration, m.value) for m in ledger.metrics("c1", "rm/acc")] == [
        (0, 0.5),
        (1, 0.625),
    ]
    assert [(m.iteration, m.key) for m in ledger.metrics("c1")] == [
        (0, "ppo/kl"),
        (0, "rm/acc"),
        (1, "rm/acc"),
    ]
    assert ledger.row_counts()["metric"] == 4


def test_report_counts(ledger: Ledger, seed) -> None:
    s = seed(ledger, "c1", 2, 3)
    ledger.add_generations("c1", [NewGeneration(s.prompts[0], "new", 1, 1, "w1", 0)])
    prefs = [NewPreference(c, "a", "ai", "judge") for c in s.comparisons[:3]]
    prefs += [NewPreference(s.comparisons[0], "b", "human", "alice")]
    prefs += [NewPreference(s.comparisons[1], "b", "gold", "gold-rm")]
    ledger.record_preferences("c1", prefs)
    assert ledger.label_counts("c1") == {"ai": 3, "human": 1, "gold": 1}
    bucket = datetime(2001, 9, 9, 1, 46, 40)  # 1e9 s after the epoch: one bucket holds now
    assert ledger.labels_by_kind("c1", bucket_s=10**9) == [
        (bucket, "ai", 3),
        (bucket, "gold", 1),
        (bucket, "human", 1),
    ]
    assert ledger.generations_per_policy_version("c1") == {0: 6, 1: 1}
    counts = ledger.comparison_counts("c1")
    assert (counts.pending, counts.claimed, counts.labeled) == (3, 0, 3)
