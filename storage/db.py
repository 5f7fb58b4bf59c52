"""Engines, transactions and Alembic migrations of the ledger database.

SQLite (the embedded default) runs in WAL mode with a busy timeout and foreign keys on; writers
open ``BEGIN IMMEDIATE`` so that two writers never both read and then fail to upgrade their lock
(``database is locked``), readers open a deferred ``BEGIN`` and see a stable WAL snapshot.
PostgreSQL (clusters) goes through psycopg 3 (``postgresql+psycopg://``).

Functions here return data and raise typed errors; the CLI (``prefloop db ...``) prints.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, select
from sqlalchemy.engine import make_url

from storage.errors import MigrationError
from storage.models import Base

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported inside the migration functions: it costs ~0.4 s at import, and worker
# processes (Ray actors, labelers) open the ledger without migrating.

DB_URL_ENV = "PREFLOOP_DB_URL"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
READ_ONLY = "prefloop_read_only"
_PG_MIGRATION_LOCK = 7_271_901  # pg_advisory_xact_lock key: one migrator at a time
_ENGINES: dict[str, tuple[int, Engine]] = {}
_ENGINES_LOCK = threading.Lock()


def resolve_url(explicit: str | None, run_dir: Path) -> str:
    """Pick the ledger URL: the explicit one, else ``$PREFLOOP_DB_URL``, else a SQLite file.

    Args:
        explicit: a URL from the config or the command line, or None.
        run_dir: the campaign's run directory (holds ``ledger.sqlite`` by default).

    Returns:
        A SQLAlchemy URL string.

    >>> resolve_url("postgresql+psycopg://ledger@db:5432/prefloop", Path("runs/demo"))
    'postgresql+psycopg://ledger@db:5432/prefloop'
    """
    if explicit:
        return explicit
    env = os.environ.get(DB_URL_ENV)
    if env:
        return env
    return f"sqlite:///{Path(run_dir).resolve() / 'ledger.sqlite'}"


def make_engine(url: str, *, busy_timeout_s: float = 60.0) -> Engine:
    """Create a new engine for ``url`` with the ledger's connection settings.

    Args:
        url: ``sqlite:///path`` or ``postgresql+psycopg://user@host:port/db``.
        busy_timeout_s: SQLite only: how long a writer waits for the write lock.

    Returns:
        A fresh engine (use ``engine_for`` to share one per process).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, connect_args={"timeout": busy_timeout_s})
    busy_ms = int(busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy's pysqlite recipe: sqlite3 emits no BEGIN; the "begin" hook below does.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that reads and then
        # writes fails with "database is locked" when another writer got there first.
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")

    return engine


def engine_for(url: str) -> Engine:
    """The process's engine for ``url``; rebuilt after a fork (a pool never crosses fork)."""
    pid = os.getpid()
    cached = _ENGINES.get(url)
    if cached is not None and cached[0] == pid:
        return cached[1]
    with _ENGINES_LOCK:
        cached = _ENGINES.get(url)
        if cached is not None and cached[0] == pid:
            return cached[1]
        if cached is not None:
            # Inherited from the parent: drop the pool without closing the parent's connections.
            cached[1].dispose(close=False)
        engine = make_engine(url)
        _ENGINES[url] = (pid, engine)
        return engine


@contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """One write transaction (``BEGIN IMMEDIATE`` on SQLite); commits or rolls back as a whole."""
    with engine.begin() as conn:
        yield conn


@contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    """One read-only transaction (deferred ``BEGIN`` on SQLite: does not block writers)."""
    with engine.connect() as conn:
        conn = conn.execution_options(**{READ_ONLY: True})
        with conn.begin():
            yield conn


def _alembic_config(conn: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


def head_revision() -> str:
    """The newest migration revision shipped with this package."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None, "storage/migrations/versions holds no revision"
    return head


def _current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migration_tx(url: str) -> Iterator[Connection]:
    with write_tx(engine_for(url)) as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        yield conn


def upgrade(url: str, revision: str = "head") -> str | None:
    """Migrate the database at ``url`` up to ``revision`` in one transaction.

    Concurrent callers are serialized (SQLite write lock, PostgreSQL advisory lock), so many
    processes may open the same ledger at once.

    Returns:
        The revision the database is at afterwards.
    """
    from alembic import command

    with _migration_tx(url) as conn:
        command.upgrade(_alembic_config(conn), revision)
        return _current(conn)


def downgrade(url: str, revision: str, *, allow_data_loss: bool = False) -> str | None:
    """Migrate the database at ``url`` down to ``revision`` in one transaction.

    Every revision's downgrade keeps the rows of the tables it leaves in place; only ``base``
    drops tables, and that is refused while any table holds rows unless ``allow_data_loss``.

    Raises:
        MigrationError: the downgrade would drop rows.
    """
    from alembic import command

    with _migration_tx(url) as conn:
        if revision == "base" and not allow_data_loss:
            nonempty = {name: n for name, n in row_counts(conn).items() if n}
            if nonempty:
                raise MigrationError(
                    f"downgrade to base would drop {sum(nonempty.values())} rows "
                    f"(tables {sorted(nonempty)}); pass allow_data_loss=True to drop them"
                )
        command.downgrade(_alembic_config(conn), revision)
        return _current(conn)


def row_counts(conn: Connection) -> dict[str, int]:
    """Rows per ledger table (tables not created yet are left out)."""
    present = set(inspect(conn).get_table_names())
    return {
        table.name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())
        for table in Base.metadata.sorted_tables
        if table.name in present
    }


def status(url: str) -> dict[str, Any]:
    """Describe the database at ``url`` without changing it.

    Returns:
        ``{"url": <password hidden>, "backend": "sqlite"|"postgresql", "current": rev|None,
        "head": rev, "up_to_date": bool, "tables": {table: row count}}``.
    """
    with read_tx(engine_for(url)) as conn:
        current = _current(conn)
        counts = row_counts(conn)
        backend = conn.dialect.name
    head = head_revision()
    return {
        "url": make_url(url).render_as_string(hide_password=True),
        "backend": backend,
        "current": current,
        "head": head,
        "up_to_date": current == head,
        "tables": counts,
    }
