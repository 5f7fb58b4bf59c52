"""Snapshots by watermark and the model versions that pin them."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import astuple, replace

import pytest
from sqlalchemy import text

from storage.db import engine_for
from storage.errors import IdempotencyConflict, InvalidInput, InvalidTransition, WatermarkAhead
from storage.ledger import Ledger
from storage.records import NewPreference, Snapshot

# sha256 of the 8-row training set that _label_fixture() builds in a fresh database; the same
# on SQLite and PostgreSQL. A change here means the canonical serialization changed.
GOLDEN_SHA256 = "8585c27f60d212d2c630f64816e51a693a08c259e2facfd3075f66a1f567c3c9"


def _label_fixture(ledger: Ledger, seed) -> list[int]:
    s = seed(ledger, "c1", 2, 3)  # 6 comparisons
    choices = ["a", "b", "tie", "a", "b", "a"]
    prefs = [
        NewPreference(cid, ch, "ai", "judge", strength=0.25 * k)
        for k, (cid, ch) in enumerate(zip(s.comparisons, choices, strict=True))
    ]
    prefs += [NewPreference(s.comparisons[k], "b", "human", "alice") for k in (0, 1)]
    prefs += [NewPreference(s.comparisons[0], "a", "gold", "gold-rm")]
    ledger.record_preferences("c1", prefs)
    return s.comparisons


def _reference_sha256(snap: Snapshot) -> str:
    digest = hashlib.sha256()
    for row in snap.rows:
        line = json.dumps(list(astuple(row)), sort_keys=True, separators=(",", ":"))
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def test_same_watermark_gives_same_rows_and_hash(ledger: Ledger, seed, db_url: str) -> None:
    comparisons = _label_fixture(ledger, seed)
    first = ledger.snapshot("c1")
    assert (first.watermark, len(first.rows), first.kinds) == (9, 8, ("ai", "human"))
    assert [r.preference_id for r in first.rows] == list(range(1, 9))  # gold (9) left out
    assert first.sha256 == _reference_sha256(first)
    assert ledger.snapshot("c1", kinds=["gold"]).rows[0].labeler_id == "gold-rm"

    ledger.record_preferences(
        "c1",
        [
            NewPreference(comparisons[0], "b", "ai", "judge", supersedes=1),
            NewPreference(comparisons[2], "a", "human", "alice"),
        ],
    )
    again = ledger.snapshot("c1", first.watermark)
    assert (again.sha256, again.rows) == (first.sha256, first.rows)
    latest = ledger.snapshot("c1")
    assert (latest.watermark, len(latest.rows)) == (11, 9)  # -1 superseded, +2 new
    assert latest.sha256 != first.sha256
    assert 1 not in [r.preference_id for r in latest.rows]

    engine_for(db_url).dispose()
    reopened = Ledger.open(db_url).snapshot("c1", first.watermark)
    assert reopened.sha256 == first.sha256
    with pytest.raises(WatermarkAhead, match="watermark 12 is ahead of the ledger"):
        ledger.snapshot("c1", 12)


def test_snapshot_hash_is_pinned(ledger: Ledger, seed) -> None:
    _label_fixture(ledger, seed)
    assert ledger.snapshot("c1").sha256 == GOLDEN_SHA256


def test_rm_version_pins_its_training_set(ledger: Ledger, seed) -> None:
    comparisons = _label_fixture(ledger, seed)
    snap1 = ledger.snapshot("c1")
    rm1 = ledger.record_model_version("c1", "rm", 1, snapshot=snap1.ref, metrics={"acc": 0.75})
    assert (rm1.status, rm1.snapshot, rm1.parent_version) == ("candidate", snap1.ref, None)
    again = ledger.record_model_version("c1", "rm", 1, snapshot=snap1.ref, metrics={"acc": 0.75})
    assert again.id == rm1.id
    with pytest.raises(IdempotencyConflict, match=r"model_version\(rm v1\)"):
        ledger.record_model_version("c1", "rm", 1, snapshot=snap1.ref, metrics={"acc": 0.5})
    with pytest.raises(InvalidInput, match="field 'snapshot' must be the SnapshotRef"):
        ledger.record_model_version("c1", "rm", 2)

    ledger.record_preference("c1", NewPreference(comparisons[3], "b", "human", "alice"))
    snap2 = ledger.snapshot("c1")
    ledger.record_model_version("c1", "rm", 2, snapshot=snap2.ref, parent_version=1)
    assert ledger.training_set("c1", 1).sha256 == snap1.sha256
    assert ledger.preferences_per_rm_version("c1") == {1: 8, 2: 9}

    assert ledger.set_model_status("c1", "rm", 1, "promoted").status == "promoted"
    assert ledger.set_model_status("c1", "rm", 2, "rejected", "accuracy fell").status == "rejected"
    with pytest.raises(InvalidTransition, match="is 'promoted'; allowed next statuses: \\[\\]"):
        ledger.set_model_status("c1", "rm", 1, "rejected")
    assert ledger.latest_model_version("c1", "rm").version == 1
    assert ledger.latest_model_version("c1", "policy") is None
    assert ledger.model_version("c1", "rm", 2).parent_version == 1
    assert ledger.row_counts()["model_version_event"] == 4  # 2 candidates, promote, reject


@pytest.mark.postgres
def test_postgres_watermark_waits_for_uncommitted_inserts(pg_fresh_url: str, seed) -> None:
    ledger = Ledger.open(pg_fresh_url)
    s = seed(ledger, "c1", 1, 3)
    ledger.record_preference("c1", NewPreference(s.comparisons[0], "a", "ai", "judge"))
    insert = text(
        "INSERT INTO preference (comparison_id, choice, labeler_kind, labeler_id, created_at) "
        "VALUES (:c, 'b', 'ai', 'slow', now()) RETURNING id"
    )
    seen: list[int] = []
    with engine_for(pg_fresh_url).connect() as conn:
        slow_id = conn.execute(insert, {"c": s.comparisons[1]}).scalar_one()  # not committed
        waiter = threading.Thread(target=lambda: seen.append(ledger.watermark("c1")))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and seen == []  # blocked behind the open insert
        conn.commit()
    waiter.join(timeout=10)
    assert seen == [slow_id] == [2]


def test_a_window_is_the_tail_of_the_snapshot_and_pins_its_rm_version(ledger: Ledger,
                                                                      seed) -> None:
    _label_fixture(ledger, seed)  # effective training rows: preference ids 1..8
    full = ledger.snapshot("c1")
    # the last 3 effective rows at or below id 6 are 4, 5, 6: the window starts after 3
    assert ledger.window_start("c1", before=6, rows=3) == 3
    assert ledger.window_start("c1", before=6, rows=6) == 0  # no more than 6 rows: everything
    assert ledger.window_start("c1", before=8, rows=0) == 8
    window = ledger.snapshot("c1", since=3)
    assert (window.watermark, window.since) == (full.watermark, 3)
    assert window.rows == tuple(r for r in full.rows if r.preference_id > 3)
    assert window.sha256 == _reference_sha256(window) != full.sha256
    assert ledger.snapshot("c1", since=0).sha256 == full.sha256 == GOLDEN_SHA256

    rm = ledger.record_model_version("c1", "rm", 1, snapshot=window.ref)
    assert (rm.snapshot.since, rm.snapshot.watermark) == (3, 9)
    rebuilt = ledger.training_set("c1", 1)
    assert (rebuilt.since, rebuilt.sha256, rebuilt.rows) == (3, window.sha256, window.rows)
    with pytest.raises(InvalidInput, match="since"):
        ledger.snapshot("c1", watermark=5, since=6)
    with pytest.raises(InvalidInput, match="since"):
        ledger.record_model_version("c1", "rm", 2, snapshot=replace(window.ref, since=10))


def test_window_start_counts_effective_rows_only(ledger: Ledger, seed) -> None:
    comparisons = _label_fixture(ledger, seed)
    # a correction (id 10) supersedes row 5: at or below 10 the effective rows are
    # 1..4, 6..8, 10; the last 3 of them are 7, 8, 10
    ledger.record_preference(
        "c1", NewPreference(comparisons[4], "a", "ai", "judge", supersedes=5))
    assert ledger.window_start("c1", before=10, rows=3) == 6
    assert ledger.window_start("c1", before=10, rows=4) == 4  # 6, 7, 8, 10; row 5 is not one
    assert ledger.window_start("c1", before=10, rows=3, kinds=["human"]) == 0  # 7, 8 only


def test_a_window_is_read_by_preference_id_not_by_campaign(tmp_path) -> None:
    """SQLite's plan for a window walks the preference-id range (bounded however large the
    campaign is); with the comparison index usable it walked every comparison of the campaign."""
    from storage.snapshots import effective_query

    ledger = Ledger.open(f"sqlite:///{tmp_path}/ledger.sqlite")
    query = effective_query(1, 1000, ("ai", "human"), 900, window=True)
    sql = str(query.compile(ledger.engine, compile_kwargs={"literal_binds": True}))
    with ledger.engine.connect() as conn:
        plan = [row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
    assert plan[0] == "SEARCH preference USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"
    assert not any("TEMP B-TREE" in step for step in plan)  # id order comes for free
