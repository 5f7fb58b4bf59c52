"""Alembic migrations of the ledger, driven by ``storage.db`` (no alembic.ini needed)."""
