"""Many processes against one ledger: SQLite writers, and PostgreSQL lease consumers that die.

Process bodies live in ``storage_test_procs``; each child gets the ``Ledger`` pickled (as a Ray
actor would) and builds its own engine.
"""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from storage.ledger import Ledger


def test_sqlite_8_processes_x_1000_inserts_without_lock_errors(tmp_path: Path, seed, procs) -> None:
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    s = seed(ledger, "c1", 100, 5)  # 100 prompts x 10 pairs = 1,000 comparisons
    assert len(s.comparisons) == 1000
    out = procs.ctx.Queue()
    writers = procs.start(
        procs.bodies.sqlite_writer, *[(ledger, w, s.comparisons, out) for w in range(8)]
    )
    results = sorted(procs.results(out, writers, 8, timeout=150))
    for p in writers:
        p.join(timeout=30)
    assert [p.exitcode for p in writers] == [0] * 8
    assert results == [(w, 1000, 0) for w in range(8)]  # every insert landed, none locked
    assert ledger.row_counts()["preference"] == 8000
    assert ledger.label_counts("c1") == {"ai": 8000}


@pytest.mark.parametrize("immediate", [False, True], ids=["deferred-BEGIN", "BEGIN-IMMEDIATE"])
def test_negative_control_deferred_read_then_write_hits_database_is_locked(
    tmp_path: Path, immediate: bool, procs
) -> None:
    path = tmp_path / "ledger.sqlite"
    Ledger.open(f"sqlite:///{path}")  # same schema, WAL mode
    n, rounds = 4, 5
    barrier, out = procs.ctx.Barrier(n), procs.ctx.Queue()
    writers = procs.start(
        procs.bodies.naive_writer, *[(str(path), immediate, rounds, barrier, out)] * n
    )
    results = procs.results(out, writers, n, timeout=60)
    for p in writers:
        p.join(timeout=10)
    ok = sum(r[0] for r in results)
    locked = sum(r[1] for r in results)
    if immediate:  # the ledger's way: writers queue on the write lock, nobody fails
        assert (ok, locked) == (n * rounds, 0)
    else:  # one writer per round wins, every other snapshot is stale: "database is locked"
        assert (ok, locked) == (rounds, (n - 1) * rounds)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM audit").fetchone() == (ok,)


@pytest.mark.postgres
def test_postgres_16_consumers_with_4_killed_label_everything_once(
    pg_fresh_url: str, seed, procs
) -> None:
    ledger = Ledger.open(pg_fresh_url)
    s = seed(ledger, "c1", 16, 5)  # 160 comparisons
    total = len(s.comparisons)
    victims = {0, 5, 10, 15}
    claimed, out, go = procs.ctx.Queue(), procs.ctx.Queue(), procs.ctx.Event()
    args = [(pg_fresh_url, w, w in victims, claimed, go, out) for w in range(16)]
    consumers = procs.start(procs.bodies.lease_consumer, *args)
    stranded = dict(procs.results(claimed, consumers, len(victims), timeout=90))
    for w in victims:
        os.kill(consumers[w].pid, signal.SIGKILL)
    go.set()
    labeled = dict(procs.results(out, consumers, 16 - len(victims), timeout=90))
    for p in consumers:
        p.join(timeout=30)

    killed = sorted(w for w, p in enumerate(consumers) if p.exitcode == -signal.SIGKILL)
    assert killed == [0, 5, 10, 15]
    assert [p.exitcode for w, p in enumerate(consumers) if w not in victims] == [0] * 12
    assert sum(len(ids) for ids in stranded.values()) == 16
    assert sum(labeled.values()) == total
    with ledger.engine.connect() as conn:
        per = conn.execute(
            text("SELECT comparison_id, count(*), min(labeler_id) FROM preference GROUP BY 1")
        ).all()
        attempts = dict(conn.execute(text("SELECT id, lease_count FROM comparison")).all())
    assert len(per) == total and {n for _, n, _ in per} == {1}  # each labeled exactly once
    by = {cid: who for cid, _, who in per}
    reclaimed = [cid for ids in stranded.values() for cid in ids]
    assert all(by[cid] not in {f"worker-{v}" for v in victims} for cid in reclaimed)
    assert all(attempts[cid] >= 2 for cid in reclaimed)  # the expired lease was re-taken
    counts = ledger.comparison_counts("c1")
    assert (counts.pending, counts.claimed, counts.labeled) == (0, 0, total)
