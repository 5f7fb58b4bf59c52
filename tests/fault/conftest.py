"""Fixtures of the fault-tolerance tests (issue #9): ledgers on SQLite and on PostgreSQL.

PostgreSQL needs ``PREFLOOP_TEST_PG_URL`` (``.ci/test`` or ``scripts/fault_suite.py`` starts a
server and sets it); where it is missing the PostgreSQL cases fail, never skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from storage.db import engine_for

PG_ENV = "PREFLOOP_TEST_PG_URL"


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    server = os.environ.get(PG_ENV)
    if not server:
        pytest.fail(f"{PG_ENV} is not set: run `source .ci/postgres.sh && pg_start` first")
    name = f"prefloop_fault_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(server), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    yield url
    engine_for(url).dispose()
    with psycopg.connect(_libpq(server), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        yield url
        engine_for(url).dispose()
    else:
        yield request.getfixturevalue("pg_url")
