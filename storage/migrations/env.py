"""Alembic environment of the ledger, driven programmatically by ``storage.db``.

``storage.db`` opens the transaction (``BEGIN IMMEDIATE`` on SQLite, an advisory lock on
PostgreSQL), puts the connection into ``config.attributes["connection"]`` and calls
``alembic.command``; the whole migration then runs inside that one transaction.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from storage.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "storage/migrations is driven by storage.db (upgrade/downgrade/status); "
        "pass a connection in config.attributes['connection']"
    )
_run(connection)
