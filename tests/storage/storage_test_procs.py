"""Process bodies of the multi-process storage tests (importable by spawned children).

The tests start these with the ``procs`` fixture (``spawn``: children never inherit pytest's
threads, e.g. a session-wide Ray). Results come back through a ``multiprocessing`` queue.
"""

from __future__ import annotations

import os
import sqlite3
import time

from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from storage import db
from storage.ledger import Ledger
from storage.records import NewPreference

VICTIM_LEASE_S = 1.5  # a killed consumer's leases run out soon, so the others take them over
LEASE_S = 30.0  # a live consumer never loses its lease, however loaded the machine


def sqlite_writer(ledger: Ledger, worker: int, comparisons: list[int], out) -> None:
    """One label per comparison, one transaction each; counts inserts and lock errors."""
    inserted = locked = 0
    for j, cid in enumerate(comparisons):
        pref = NewPreference(cid, "ab"[j % 2], "ai", f"judge-{worker}", 0.5, f"w{worker}-{j}")
        try:
            inserted += ledger.record_preference("c1", pref).created
        except OperationalError as exc:
            if "locked" not in str(exc):
                raise
            locked += 1
    out.put((worker, inserted, locked))


def naive_writer(path: str, immediate: bool, rounds: int, barrier, out) -> None:
    """Read, wait until every process has read, then write: the pattern that fails on SQLite.

    With a deferred ``BEGIN`` the read takes a WAL snapshot; once another writer commits, the
    snapshot is stale and the write fails with ``database is locked`` whatever the busy
    timeout (SQLite does not wait when upgrading a read transaction). ``BEGIN IMMEDIATE``
    takes the write lock before reading, so writers queue instead.
    """
    conn = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    ok = locked = 0
    for _ in range(rounds):
        conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        conn.execute("SELECT count(*) FROM audit").fetchone()  # takes a read snapshot
        if not immediate:
            barrier.wait()  # every process now holds a snapshot; all try to write
        try:
            conn.execute(
                "INSERT INTO audit (who, what, request_hash, created_at) "
                "VALUES ('naive', 'x', 'h', '2030-01-01 00:00:00')"
            )
            conn.execute("COMMIT")
            ok += 1
        except sqlite3.OperationalError as exc:
            assert "database is locked" in str(exc), exc
            conn.execute("ROLLBACK")
            locked += 1
        if not immediate:
            barrier.wait()  # the round is over for everyone before the next read
    out.put((ok, locked))


def lease_consumer(url: str, worker: int, victim: bool, claimed, go, out) -> None:
    """Claim, label, repeat until nothing is pending or leased. A victim claims and hangs."""
    ledger = Ledger(url)
    owner = f"worker-{worker}"
    if victim:
        claims = ledger.claim("c1", owner, 4, lease_s=VICTIM_LEASE_S)
        claimed.put((worker, [c.comparison_id for c in claims]))
        time.sleep(120)  # SIGKILLed here: after claiming, before recording
        return
    go.wait(timeout=60)
    labeled = 0
    while True:
        claims = ledger.claim("c1", owner, 8, lease_s=LEASE_S)
        if not claims:
            counts = ledger.comparison_counts("c1")
            if counts.pending + counts.claimed == 0:
                break
            time.sleep(0.05)
            continue
        prefs = [NewPreference(c.comparison_id, "a", "ai", owner) for c in claims]
        labeled += len(ledger.record_preferences("c1", prefs, lease_owner=owner))
    out.put((worker, labeled))


def open_ledger(url: str, out) -> None:
    """Open (and so migrate) the ledger, create a campaign."""
    Ledger.open(url).ensure_campaign("c1")
    out.put(os.getpid())


def fork_probe(url: str, out) -> None:
    """Use the engine, fork, and use it on both sides (run in a single-threaded process)."""
    engine = db.engine_for(url)
    with engine.connect() as conn:  # leaves a pooled connection behind
        conn.execute(text("SELECT 1"))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must build its own engine and leave the parent's connection open
        child = db.engine_for(url)
        with child.connect() as conn:
            ok = conn.execute(text("SELECT 2")).scalar_one() == 2
        os.write(write_fd, b"%d %d" % (child is not engine, ok))
        os._exit(0)
    os.waitpid(pid, 0)
    child_report = os.read(read_fd, 16).decode()
    with engine.connect() as conn:  # the parent's pooled connection still works
        parent_ok = conn.execute(text("SELECT 3")).scalar_one() == 3
    out.put((child_report, parent_ok, db.engine_for(url) is engine))
