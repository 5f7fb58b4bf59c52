"""Typed errors raised by the storage layer.

Every message names the field, the row or id, and what was expected, so that a person reading a
log line can act on it without opening the code.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by ``storage``."""


class LedgerError(StorageError):
    """Base class of errors raised by the preference ledger."""


class InvalidInput(LedgerError, ValueError):
    """A field of an input is malformed (empty text, NaN strength, unknown choice, ...)."""


class UnknownId(LedgerError, LookupError):
    """An input refers to a row that does not exist (or belongs to another campaign)."""


class IdempotencyConflict(LedgerError):
    """The same idempotency key (or natural key) was sent again with a different body.

    Attributes:
        key: the idempotency key or natural key that collided.
    """

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used with a different body: {detail}"
        )
        self.key = key


class DuplicateLabel(LedgerError):
    """A labeler sent a second, different label for a comparison without superseding the first."""


class LeaseLost(LedgerError):
    """A write that requires a lease was attempted by an owner that no longer holds it."""


class WatermarkAhead(LedgerError):
    """A snapshot was requested past the highest preference id that is safe to read."""


class SnapshotMismatch(LedgerError):
    """A training set no longer hashes to the value recorded with its model version."""


class InvalidTransition(LedgerError):
    """A model version status change that the state machine does not allow."""


class MigrationError(StorageError):
    """A schema migration cannot be applied or would lose data."""


class WeightStoreError(StorageError):
    """Base class of weight-store errors."""


class VersionExists(WeightStoreError, FileExistsError):
    """A weight version was published twice; versions are immutable."""


class VersionNotFound(WeightStoreError, LookupError):
    """A weight version does not exist or is not complete (no completion marker)."""


class CorruptVersion(WeightStoreError):
    """A complete weight version whose files do not match the sha256s in its marker."""
