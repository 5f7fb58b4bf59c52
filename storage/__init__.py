"""Everything durable: the SQL preference ledger and the versioned weight store.

``storage`` imports SQLAlchemy, Alembic, psycopg and fsspec; never Ray, torch, ``actors`` or
``loop``. The ledger (``Ledger``) is the only way anything reads or writes the database.
"""

from storage.db import downgrade, make_engine, resolve_url, status, upgrade
from storage.errors import (
    DuplicateLabel,
    IdempotencyConflict,
    InvalidInput,
    LeaseLost,
    LedgerError,
    MigrationError,
    StorageError,
    UnknownId,
    VersionExists,
    VersionNotFound,
    WeightStoreError,
)
from storage.ledger import Ledger
from storage.records import (
    Claim,
    NewComparison,
    NewGeneration,
    NewPreference,
    Snapshot,
    SnapshotRef,
    SnapshotRow,
)
from storage.weights import WeightStore, WeightVersion, open_weight_store

__all__ = [
    "Claim",
    "DuplicateLabel",
    "IdempotencyConflict",
    "InvalidInput",
    "LeaseLost",
    "Ledger",
    "LedgerError",
    "MigrationError",
    "NewComparison",
    "NewGeneration",
    "NewPreference",
    "Snapshot",
    "SnapshotRef",
    "SnapshotRow",
    "StorageError",
    "UnknownId",
    "VersionExists",
    "VersionNotFound",
    "WeightStore",
    "WeightStoreError",
    "WeightVersion",
    "downgrade",
    "make_engine",
    "open_weight_store",
    "resolve_url",
    "status",
    "upgrade",
]
