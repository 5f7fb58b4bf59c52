"""Ledger write throughput: labels/s through the API against raw sqlite3, and on PostgreSQL.

Three measurements, each repeated (default 3 times, medians reported):

1. SQLite via ``Ledger.record_preferences`` in batches (validation, idempotency lookups, one
   ``BEGIN IMMEDIATE`` transaction per batch, comparisons marked labeled).
2. Raw ``sqlite3`` ``executemany`` of the same rows into the same schema file, same batch size,
   same pragmas: the ceiling the API is compared against (goal: API >= 0.5x raw).
3. PostgreSQL with 8 concurrent writer processes through the API (goal: >= 5,000 labels/s).
   The server comes from ``--pg-url``, else ``$PREFLOOP_TEST_PG_URL``, else one started here
   with ``.ci/postgres.sh``; a fresh database is created on it and dropped afterwards.

Usage: ``python bench/ledger.py [--repeats 3] [--batch 1000] [--pg-url URL | --no-pg]``.
The last line is ``RESULT ratio_vs_sqlite=<x> labels_per_s=<x> pg_labels_per_s=<x>``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from storage.db import engine_for  # noqa: E402
from storage.ledger import Ledger  # noqa: E402
from storage.records import NewComparison, NewGeneration, NewPreference  # noqa: E402

PROMPTS, PER_PROMPT = 200, 5  # 200 x C(5, 2) = 2,000 comparisons
LABELERS_PER_REPEAT = 10  # 2,000 x 10 = 20,000 labels per SQLite repeat
PG_WRITERS, PG_LABELS_PER_WRITER = 8, 10_000


def seed(ledger: Ledger) -> list[int]:
    """A campaign with 2,000 pending comparisons; returns their ids."""
    ledger.ensure_campaign("bench")
    prompts = ledger.add_prompts("bench", [f"prompt {i}" for i in range(PROMPTS)])
    gens = ledger.add_generations(
        "bench",
        [NewGeneration(p, f"answer {p}.{k}", 4, 0, "w0", k) for p in prompts for k in range(5)],
    )
    pairs = [
        NewComparison(gens[i * PER_PROMPT + a], gens[i * PER_PROMPT + b])
        for i in range(PROMPTS)
        for a in range(PER_PROMPT)
        for b in range(a + 1, PER_PROMPT)
    ]
    return ledger.add_comparisons("bench", pairs)


def labels(comparisons: list[int], tag: str, n_labelers: int) -> list[NewPreference]:
    """``n_labelers`` labels per comparison, each with an idempotency key."""
    return [
        NewPreference(cid, "ab"[j % 2], "ai", f"{tag}-{k}", 0.5, f"{tag}-{k}-{cid}")
        for k in range(n_labelers)
        for j, cid in enumerate(comparisons)
    ]


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


RAW_INSERT = (
    "INSERT INTO preference (comparison_id, choice, strength, labeler_kind, labeler_id, "
    "supersedes_id, idempotency_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
RAW_NOW = "2030-01-01 00:00:00.000000"


def raw_connection(path: Path) -> sqlite3.Connection:
    """Plain sqlite3 with the ledger's pragmas (WAL is already set in the file)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def raw_batch(conn: sqlite3.Connection, chunk: list[NewPreference]) -> None:
    """The ceiling: one transaction, one ``executemany``, no checks, no ids returned."""
    rows = [
        (
            p.comparison_id,
            p.choice,
            p.strength,
            p.labeler_kind,
            p.labeler_id,
            None,
            p.idempotency_key,
            RAW_NOW,
        )
        for p in chunk
    ]
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(RAW_INSERT, rows)
    conn.execute("COMMIT")


def sqlite_repeat(
    ledger: Ledger, raw: sqlite3.Connection, comparisons: list[int], rep: int, batch: int
) -> tuple[float, float]:
    """Alternate API and raw batches of equal size, so both see the same table and noise."""
    api_prefs = labels(comparisons, f"api{rep}", LABELERS_PER_REPEAT)
    raw_prefs = labels(comparisons, f"raw{rep}", LABELERS_PER_REPEAT)
    api_s = raw_s = 0.0
    for api_chunk, raw_chunk in zip(
        batches(api_prefs, batch), batches(raw_prefs, batch), strict=True
    ):
        start = time.perf_counter()
        ledger.record_preferences("bench", api_chunk)
        middle = time.perf_counter()
        raw_batch(raw, raw_chunk)
        api_s, raw_s = api_s + middle - start, raw_s + time.perf_counter() - middle
    return len(api_prefs) / api_s, len(raw_prefs) / raw_s


def bench_sqlite(repeats: int, batch: int) -> tuple[float, float, float]:
    """Median API labels/s, raw labels/s, and median of the per-repeat ratios."""
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-") as tmp:
        path = Path(tmp) / "ledger.sqlite"
        ledger = Ledger.open(f"sqlite:///{path}")
        comparisons = seed(ledger)
        raw_conn = raw_connection(path)
        api, raw = [], []
        for rep in range(repeats):
            a, r = sqlite_repeat(ledger, raw_conn, comparisons, rep, batch)
            api.append(a)
            raw.append(r)
            print(
                f"sqlite repeat {rep}: api {a:,.0f} labels/s, raw {r:,.0f} labels/s, "
                f"ratio {a / r:.2f}"
            )
        raw_conn.close()
        engine_for(ledger.url).dispose()
    ratios = [a / r for a, r in zip(api, raw, strict=True)]
    return statistics.median(api), statistics.median(raw), statistics.median(ratios)


def _pg_writer(url: str, prefs: list[NewPreference], batch: int, barrier, out) -> None:
    ledger = Ledger(url)
    ledger.row_counts()  # connect before the clock starts
    barrier.wait()
    start = time.perf_counter()
    for chunk in batches(prefs, batch):
        ledger.record_preferences("bench", chunk)
    out.put((start, time.perf_counter()))


def time_pg(url: str, comparisons: list[int], tag: str, batch: int) -> float:
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(PG_WRITERS), ctx.Queue()
    per_labeler = PG_LABELS_PER_WRITER // len(comparisons)
    work = [labels(comparisons, f"{tag}-w{w}", per_labeler) for w in range(PG_WRITERS)]
    engine_for(url).dispose()  # no pooled connection crosses the fork
    procs = [
        ctx.Process(target=_pg_writer, args=(url, work[w], batch, barrier, out))
        for w in range(PG_WRITERS)
    ]
    for p in procs:
        p.start()
    spans = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a PostgreSQL writer failed: {[p.exitcode for p in procs]}")
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return sum(len(w) for w in work) / wall


@contextmanager
def pg_server(explicit: str | None) -> Iterator[str]:
    """A PostgreSQL server URL: the given one, the CI one, or a throwaway started here."""
    url = explicit or os.environ.get("PREFLOOP_TEST_PG_URL")
    if url:
        yield url
        return
    script = (
        'source .ci/postgres.sh && pg_start >&2 && echo "$PREFLOOP_TEST_PG_URL" && read _; pg_stop'
    )
    proc = subprocess.Popen(
        ["bash", "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline().strip() if proc.stdout else ""
        if not line:
            raise RuntimeError("could not start PostgreSQL with .ci/postgres.sh (see stderr)")
        yield line
    finally:
        if proc.stdin:
            proc.stdin.write("\n")
            proc.stdin.close()
        proc.wait(timeout=60)


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    name = f"prefloop_bench_{uuid.uuid4().hex[:10]}"
    admin = make_url(server_url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        engine_for(url).dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_pg(explicit: str | None, repeats: int, batch: int) -> float:
    with pg_server(explicit) as server, fresh_database(server) as url:
        ledger = Ledger.open(url)
        comparisons = seed(ledger)
        rates = []
        for rep in range(repeats):
            rates.append(time_pg(url, comparisons, f"pg{rep}", batch))
            print(f"postgres repeat {rep}: {PG_WRITERS} writers, {rates[-1]:,.0f} labels/s")
        return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--pg-url", default=None)
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL measurement")
    args = parser.parse_args()

    api, raw, ratio = bench_sqlite(args.repeats, args.batch)
    print(
        f"sqlite median: api {api:,.0f} labels/s, raw executemany {raw:,.0f} labels/s, "
        f"median ratio {ratio:.2f} (goal >= 0.5)"
    )
    pg = float("nan")
    if args.no_pg:
        print("postgres: SKIPPED (--no-pg)")
    else:
        pg = bench_pg(args.pg_url, args.repeats, args.batch)
        print(f"postgres median: {pg:,.0f} labels/s with {PG_WRITERS} writers (goal >= 5,000)")
    print(f"RESULT ratio_vs_sqlite={ratio:.3f} labels_per_s={api:.0f} pg_labels_per_s={pg:.0f}")


if __name__ == "__main__":
    main()
