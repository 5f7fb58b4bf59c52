"""Alembic migrations, status, URL resolution and engine settings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

from storage import db
from storage.errors import MigrationError
from storage.ledger import Ledger
from storage.models import Base
from storage.records import NewPreference

HEAD = "0005_snapshot_window"
TABLES = {
    "annotator",
    "audit",
    "campaign",
    "comparison",
    "generation",
    "metric",
    "model_version",
    "model_version_event",
    "preference",
    "prompt",
    "quarantine",
}
TOUCH = text("UPDATE preference SET choice = choice")  # a no-op UPDATE, refused by the guard


def _populate(url: str, seed) -> dict[str, int]:
    ledger = Ledger.open(url)
    s = seed(ledger, "c1", 2, 3)
    ledger.record_preferences("c1", [NewPreference(c, "a", "ai", "j") for c in s.comparisons])
    ledger.record_model_version("c1", "rm", 1, snapshot=ledger.snapshot("c1").ref)
    ledger.add_annotator("alice")
    ledger.log_metrics("c1", 0, {"rm/acc": 0.5})
    ledger.audit("alice", "label", hashlib.sha256(b"").hexdigest())
    ledger.quarantine("c1", "j", "audit: disagrees with the other labelers")
    return ledger.row_counts()


def test_status_of_an_empty_then_migrated_database(db_url: str) -> None:
    before = db.status(db_url)
    assert (before["current"], before["head"], before["tables"]) == (None, HEAD, {})
    assert db.upgrade(db_url) == HEAD
    after = db.status(db_url)
    assert after["up_to_date"] is True
    assert after["tables"] == dict.fromkeys(TABLES, 0)
    assert after["backend"] in ("sqlite", "postgresql")


def test_downgrade_and_upgrade_keep_every_row(db_url: str, seed) -> None:
    counts = _populate(db_url, seed)
    assert set(counts) == TABLES and min(counts.values()) >= 1
    engine = db.engine_for(db_url)
    with pytest.raises(DBAPIError, match="immutable facts"), engine.begin() as conn:
        conn.execute(TOUCH)

    assert db.downgrade(db_url, "0001_tables") == "0001_tables"
    assert db.status(db_url)["tables"] == counts
    with engine.begin() as conn:  # the guard is gone with revision 0002
        assert conn.execute(TOUCH).rowcount == counts["preference"]

    assert db.upgrade(db_url) == HEAD
    assert db.status(db_url)["tables"] == counts
    with pytest.raises(DBAPIError, match="immutable facts"), engine.begin() as conn:
        conn.execute(TOUCH)
    total = sum(counts.values())
    with pytest.raises(MigrationError, match=f"downgrade to base would drop {total} rows"):
        db.downgrade(db_url, "base")
    assert db.status(db_url)["current"] == HEAD


def test_base_round_trip_on_an_empty_database(db_url: str) -> None:
    db.upgrade(db_url)
    assert db.downgrade(db_url, "base") is None
    assert db.status(db_url)["tables"] == {}
    assert db.upgrade(db_url) == HEAD


def test_models_match_the_migrations(db_url: str) -> None:
    db.upgrade(db_url)
    with db.engine_for(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def _plans(ledger: Ledger, call) -> list[str]:
    """The query plans of the SELECTs on ``comparison`` that ``call()`` runs, as text (on
    PostgreSQL with sequential scans and sorts priced out, so a plan shows whether an index
    can serve the query: the test tables are too small for the planner to prefer one)."""
    statements: list[tuple[str, object]] = []

    def seen(_conn, _cursor, sql: str, params, _context, _many) -> None:
        if sql.startswith("SELECT") and "FROM comparison" in sql:
            statements.append((sql, params))

    event.listen(ledger.engine, "before_cursor_execute", seen)
    try:
        call()
    finally:
        event.remove(ledger.engine, "before_cursor_execute", seen)
    sqlite = ledger.engine.dialect.name == "sqlite"
    plans = []
    with ledger.engine.begin() as conn:
        if not sqlite:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            conn.exec_driver_sql("SET LOCAL enable_sort = off")
        for sql, params in statements:
            rows = conn.exec_driver_sql(f"EXPLAIN {'QUERY PLAN ' if sqlite else ''}{sql}", params)
            plans.append("\n".join(str(row[-1] if sqlite else row[0]) for row in rows))
    return plans


def test_the_queue_indexes_serve_claim_and_leased_to_without_sorting(db_url: str, seed) -> None:
    ledger = Ledger.open(db_url)
    seed(ledger, "c1", 4, 4)
    pick = _plans(ledger, lambda: ledger.claim("c1", "alice", 2, 60.0))[0]
    assert "ix_comparison_claim" in pick, pick
    assert "TEMP B-TREE" not in pick and "Sort" not in pick, pick
    if ledger.engine.dialect.name == "sqlite":  # the PostgreSQL choice needs real statistics
        (leases,) = _plans(ledger, lambda: ledger.leased_to("c1", "alice"))
        assert "ix_comparison_lease" in leases and "TEMP B-TREE" not in leases, leases


def test_resolve_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(db.DB_URL_ENV, raising=False)
    assert db.resolve_url(None, tmp_path) == f"sqlite:///{tmp_path}/ledger.sqlite"
    monkeypatch.setenv(db.DB_URL_ENV, "postgresql+psycopg://u@h/db")
    assert db.resolve_url(None, tmp_path) == "postgresql+psycopg://u@h/db"
    assert db.resolve_url("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    db.upgrade(url)
    with db.engine_for(url).connect() as conn:
        pragmas = [
            conn.exec_driver_sql(f"PRAGMA {p}").scalar()
            for p in ("journal_mode", "foreign_keys", "busy_timeout")
        ]
    assert pragmas == ["wal", 1, 60_000]


def test_concurrent_first_open_migrates_once(tmp_path: Path, procs) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    out = procs.ctx.Queue()
    openers = procs.start(procs.bodies.open_ledger, *[(url, out)] * 4)
    assert len(set(procs.results(out, openers, 4, timeout=60))) == 4
    for p in openers:
        p.join(timeout=10)
    assert [p.exitcode for p in openers] == [0, 0, 0, 0]
    assert db.status(url)["current"] == HEAD
    assert db.status(url)["tables"]["campaign"] == 1


def test_engine_is_rebuilt_after_fork(db_url: str, procs) -> None:
    db.upgrade(db_url)
    out = procs.ctx.Queue()
    probe = procs.start(procs.bodies.fork_probe, (db_url, out))
    # (child built a new engine, child query ok), parent connection ok, parent engine kept
    assert procs.results(out, probe, 1, timeout=60) == [("1 1", True, True)]
    probe[0].join(timeout=10)
