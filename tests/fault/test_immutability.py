"""Issue #9, item 8: an UPDATE or DELETE of a preference through any API is refused, and the
training set of every RM version rebuilds from the ledger with the hash it was recorded with.

Write paths covered: the ledger API (relabel, idempotency-key reuse, pair relabel, double
correction; no public method updates or deletes), raw SQL and the ORM on SQLite and PostgreSQL
(UPDATE, DELETE, TRUNCATE, on every fact table), and the label service's HTTP API (other
methods on /api/labels, relabel with the same or a new key, admin import of a different
label). After each, the preference table is byte-for-byte what it was.

Negative control: with the triggers gone (the ledger downgraded to revision 0001) the same
UPDATE succeeds, and the RM version whose training set it touched no longer rebuilds
(`SnapshotMismatch`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from actors.label_app import LabelSettings, create_app
from storage import db
from storage.errors import DuplicateLabel, IdempotencyConflict, SnapshotMismatch
from storage.ledger import Ledger
from storage.models import FACT_TABLES, Preference
from storage.records import (
    NewComparison,
    NewGeneration,
    NewPairPreference,
    NewPreference,
    NewResponse,
)

REFUSED = "immutable facts"


def dump(ledger: Ledger, table: str = "preference") -> list[tuple]:
    """Every row of ``table``, every column, by id."""
    with ledger.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))]


def seeded(url: str, n_prompts: int = 3) -> tuple[Ledger, list[int]]:
    """Campaign c1: ``n_prompts`` prompts x 3 generations, every pair a comparison."""
    ledger = Ledger.open(url)
    ledger.ensure_campaign("c1")
    prompts = ledger.add_prompts("c1", [f"prompt {i}" for i in range(n_prompts)])
    gens = ledger.add_generations("c1", [NewGeneration(p, f"answer {p}.{k}", 2, 0, "w0", k)
                                         for p in prompts for k in range(3)])
    pairs = [NewComparison(gens[3 * i + a], gens[3 * i + b])
             for i in range(n_prompts) for a, b in ((0, 1), (0, 2), (1, 2))]
    return ledger, ledger.add_comparisons("c1", pairs)


def history(ledger: Ledger, comparisons: list[int]) -> dict[int, tuple[str, int]]:
    """Three RM versions over a ledger that keeps changing between them: new labels, a
    correction, a quarantine. Returns {rm version: (sha256, rows)} as recorded at the time."""
    c = comparisons
    recorded = {}
    first = ledger.record_preferences("c1", [NewPreference(c[i], "a", "ai", "judge-1")
                                             for i in range(4)])
    ledger.record_preference("c1", NewPreference(c[0], "b", "human", "alice"))
    ledger.record_preference("c1", NewPreference(c[0], "a", "gold", "gold"))  # not trained on
    for version in (1, 2, 3):
        snap = ledger.snapshot("c1")
        ledger.record_model_version("c1", "rm", version, snapshot=snap.ref)
        recorded[version] = (snap.sha256, len(snap.rows))
        if version == 1:  # a correction and new labels
            ledger.record_preference("c1", NewPreference(c[1], "b", "ai", "judge-1",
                                                         supersedes=first[1].id))
            ledger.record_preferences("c1", [NewPreference(c[i], "b", "human", "mallory")
                                             for i in range(6)])
        elif version == 2:  # mallory quarantined; the next label moves the watermark past it
            ledger.quarantine("c1", "mallory", "test: poisoned labels")
            ledger.record_preference("c1", NewPreference(c[5], "tie", "human", "alice"))
    return recorded


def test_the_ledger_api_never_changes_a_stored_preference(db_url: str):
    ledger, c = seeded(db_url)
    first = ledger.record_preference("c1", NewPreference(c[0], "a", "human", "alice",
                                                         idempotency_key="k-1"))
    before = dump(ledger)

    with pytest.raises(DuplicateLabel, match="already labeled comparison"):
        ledger.record_preference("c1", NewPreference(c[0], "b", "human", "alice"))
    with pytest.raises(IdempotencyConflict):
        ledger.record_preference("c1", NewPreference(c[1], "b", "human", "alice",
                                                     idempotency_key="k-1"))
    assert ledger.record_preference("c1", NewPreference(c[0], "a", "human", "alice",
                                                        idempotency_key="k-1")).created is False
    pair = NewPairPreference("prompt 0", NewResponse("answer 1.0", 2, 0, "w0", 0),
                             NewResponse("answer 1.1", 2, 0, "w0", 1), "b", "human", "alice")
    with pytest.raises(DuplicateLabel):  # the same comparison, reached through its texts
        ledger.record_pair_preferences("c1", [pair])
    assert dump(ledger) == before

    fix = ledger.record_preference("c1", NewPreference(c[0], "b", "human", "alice",
                                                       supersedes=first.id))
    with pytest.raises(DuplicateLabel, match="already superseded"):
        ledger.record_preference("c1", NewPreference(c[0], "tie", "human", "alice",
                                                     supersedes=first.id))
    after = dump(ledger)
    assert after[:-1] == before and after[-1][0] == fix.id  # a correction is a new row
    public = [name for name in dir(ledger) if not name.startswith("_")]
    assert not [n for n in public if any(w in n for w in ("update", "delete", "remove", "edit",
                                                          "purge", "truncate", "overwrite"))]


def test_raw_sql_and_the_orm_cannot_update_or_delete_any_fact(db_url: str):
    ledger, c = seeded(db_url)
    history(ledger, c)
    ledger.log_metrics("c1", 0, {"rm/acc": 0.5})
    ledger.audit("alice", "label", "0" * 64)
    ledger.set_model_status("c1", "rm", 1, "promoted")
    before = {table: dump(ledger, table) for table in FACT_TABLES}
    assert all(before.values())  # every fact table holds rows to refuse changes to

    statements = [f"UPDATE {table} SET id = id" for table in FACT_TABLES]
    statements += [f"DELETE FROM {table}" for table in FACT_TABLES]
    statements += ["UPDATE preference SET choice = 'b' WHERE choice = 'a'",
                   "DELETE FROM preference WHERE labeler_id = 'mallory'"]
    if ledger.engine.dialect.name == "postgresql":
        statements += [f"TRUNCATE {table} CASCADE" for table in FACT_TABLES]
    for sql in statements:
        with pytest.raises(DBAPIError, match=REFUSED), ledger.engine.begin() as conn:
            conn.execute(text(sql))

    with Session(ledger.engine) as session:  # through the ORM
        row = session.get(Preference, 1)
        row.choice = "tie"
        with pytest.raises(DBAPIError, match=REFUSED):
            session.commit()
        session.rollback()
        session.delete(session.get(Preference, 1))
        with pytest.raises(DBAPIError, match=REFUSED):
            session.commit()
    assert {table: dump(ledger, table) for table in FACT_TABLES} == before


def test_the_label_service_cannot_change_a_recorded_label(tmp_path: Path):
    ledger, _ = seeded(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    alice, root = ledger.add_annotator("alice"), ledger.add_annotator("root", role="admin")
    app = create_app(ledger, "c1", LabelSettings(rate_per_s=1000.0, burst=1000))
    client = TestClient(app, base_url="http://127.0.0.1:8765")

    def post(token: str, path: str, body: dict, key: str | None = None):
        headers = {"Authorization": f"Bearer {token}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        return client.post(path, content=json.dumps(body), headers=headers)

    shown = client.get("/api/next", headers={"Authorization": f"Bearer {alice}"}).json()
    cid = shown["comparison"]["id"]
    made = post(alice, "/api/labels", {"comparison_id": cid, "choice": "a"}, key="k1")
    assert made.status_code == 200
    before = dump(ledger)

    for method in ("PUT", "PATCH", "DELETE"):
        answer = client.request(method, "/api/labels", content=json.dumps(
            {"comparison_id": cid, "choice": "b"}), headers={"Authorization": f"Bearer {alice}"})
        assert (answer.status_code, answer.json()["error"]) == (405, "method_not_allowed")
    pid = made.json()["preference_id"]
    assert client.delete(f"/api/labels/{pid}",
                         headers={"Authorization": f"Bearer {root}"}).status_code == 404
    same_key = post(alice, "/api/labels", {"comparison_id": cid, "choice": "b"}, key="k1")
    assert (same_key.status_code, same_key.json()["error"]) == (409, "idempotency_conflict")
    new_key = post(alice, "/api/labels", {"comparison_id": cid, "choice": "b"}, key="k2")
    assert (new_key.status_code, new_key.json()["error"]) == (409, "duplicate_label")
    imported = post(root, "/api/import", {"labels": [
        {"comparison_id": cid, "choice": "b", "annotator": "alice"}]})
    assert (imported.status_code, imported.json()["error"]) == (409, "duplicate_label")
    assert dump(ledger) == before


def test_every_rm_version_rebuilds_its_training_set_with_the_same_hash(db_url: str):
    ledger, c = seeded(db_url)
    recorded = history(ledger, c)
    # three different training sets: 5 rows; 5 + 6 (one corrected); 11 - 6 (quarantined) + 1
    assert [n for _, n in recorded.values()] == [5, 11, 6]
    assert len({sha for sha, _ in recorded.values()}) == 3
    for sql in ("UPDATE preference SET choice = 'tie'", "DELETE FROM preference"):
        with pytest.raises(DBAPIError, match=REFUSED), ledger.engine.begin() as conn:
            conn.execute(text(sql))
    for version, (sha, n) in recorded.items():
        rebuilt = ledger.training_set("c1", version)
        assert (rebuilt.sha256, len(rebuilt.rows)) == (sha, n)
    assert ledger.preferences_per_rm_version("c1") == {1: 5, 2: 11, 3: 6}


def test_negative_control_without_the_triggers_an_update_succeeds_and_is_caught(db_url: str):
    ledger, c = seeded(db_url)
    ledger.record_preferences("c1", [NewPreference(c[i], "a", "ai", "judge-1") for i in range(4)])
    ledger.record_model_version("c1", "rm", 1, snapshot=ledger.snapshot("c1").ref)
    tamper = text("UPDATE preference SET choice = 'b' WHERE id = 2")

    db.downgrade(db_url, "0001_tables")  # the same tables, without the triggers
    with ledger.engine.begin() as conn:
        assert conn.execute(tamper).rowcount == 1
    db.upgrade(db_url)
    with pytest.raises(SnapshotMismatch, match="rm version 1"):
        ledger.training_set("c1", 1)
    with pytest.raises(DBAPIError, match=REFUSED), ledger.engine.begin() as conn:
        conn.execute(text("UPDATE preference SET choice = 'a' WHERE id = 2"))
