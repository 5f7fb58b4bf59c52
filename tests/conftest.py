"""Test harness shared by every test package.

RAY_AUTH_MODE is pinned before anything imports Ray (see loop/ray_env.py for why), and all
Ray tests share one session-scoped local instance.
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

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (`address="local"` also works while another
    cluster runs on the machine, where a plain `ray.init(num_cpus=2)` would raise)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright launches Debian's Chromium, headless (never a downloaded browser; see
    ../shared/RECIPES.md). Browser tests use its `browser`/`page` fixtures: one Playwright per
    session (a second sync Playwright inside the first one's event loop is refused)."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real, offline data next to the checkout (../shared/data)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need the project's shared data")
    return SHARED_DATA


# -- ledgers on SQLite and PostgreSQL (tests/storage, tests/fault) -----------------------------

PG_ENV = "PREFLOOP_TEST_PG_URL"


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """The test server's URL (fails the test when the variable is missing)."""
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.fail(
            f"{PG_ENV} is not set: PostgreSQL tests need a server. Run them through .ci/test, or "
            "`source .ci/postgres.sh && pg_start` before pytest."
        )
    return url


def _libpq(url: str) -> str:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def pg_fresh_url(pg_server_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    name = f"prefloop_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(pg_server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(pg_server_url).set(database=name).render_as_string(hide_password=False)
    yield url
    engine_for(url).dispose()
    with psycopg.connect(_libpq(pg_server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        yield url
        engine_for(url).dispose()
    else:
        yield request.getfixturevalue("pg_fresh_url")
