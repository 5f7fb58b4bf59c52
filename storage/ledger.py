"""The preference ledger: the only way anything reads or writes the database.

Every call is one transaction (``BEGIN IMMEDIATE`` on SQLite) that validates its whole input
before writing, so a bad row raises a ``LedgerError`` and writes nothing. Facts are append-only
and writes are idempotent on natural keys. Inputs and outputs are frozen dataclasses from
``storage.records``. The per-topic logic lives in ``content``, ``labels``, ``queue``,
``pairs``, ``snapshots``, ``registry``, ``people`` and ``reports``; this class is the
transaction boundary.

Example:
    >>> ledger = Ledger.open("sqlite:///:memory:")  # doctest: +SKIP
    >>> ledger.ensure_campaign("demo").name  # doctest: +SKIP
    'demo'
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError

from storage import content, labels, pairs, people, queue, registry, reports, snapshots
from storage.db import engine_for, read_tx, row_counts, upgrade, write_tx
from storage.errors import LedgerError, SnapshotMismatch
from storage.models import utcnow
from storage.people import QuarantineRow
from storage.records import (
    TRAINING_KINDS,
    Annotator,
    AuditNote,
    AuditRow,
    Campaign,
    Claim,
    ComparisonCounts,
    MetricRow,
    ModelVersion,
    NewComparison,
    NewGeneration,
    NewPairPreference,
    NewPreference,
    Recorded,
    Snapshot,
    SnapshotRef,
)

T = TypeVar("T")
DEFAULT_MAX_TEXT_CHARS = 32_768


class ConstraintViolation(LedgerError):
    """The database refused a write that passed validation (a race the retry did not settle)."""


class Ledger:
    """Append-only, idempotent preference ledger over SQLite or PostgreSQL.

    Args:
        url: SQLAlchemy URL (``sqlite:///run/ledger.sqlite``, ``postgresql+psycopg://...``).
        max_text_chars: longest prompt or generation text accepted.
    """

    def __init__(self, url: str, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> None:
        self.url = url
        self.max_text_chars = max_text_chars
        self._campaign_ids: dict[str, int] = {}

    @classmethod
    def open(
        cls, url: str, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS, *, migrate: bool = True
    ) -> Ledger:
        """Open the ledger at ``url``, migrating the schema to head first (unless told not to)."""
        if migrate:
            upgrade(url)
        return cls(url, max_text_chars)

    @property
    def engine(self) -> Engine:
        """This process's engine (rebuilt after a fork)."""
        return engine_for(self.url)

    # -- transactions -----------------------------------------------------------------------

    def _cid(self, conn: Connection, campaign: str) -> int:
        if campaign not in self._campaign_ids:
            self._campaign_ids[campaign] = content.get_campaign(conn, campaign).id
        return self._campaign_ids[campaign]

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        # One retry: on PostgreSQL a concurrent insert of the same natural key surfaces as a
        # unique violation; the retry then takes the idempotent path.
        for attempt in (1, 2):
            try:
                with write_tx(self.engine) as conn:
                    return fn(conn, *args)
            except IntegrityError as exc:
                if attempt == 2:
                    raise ConstraintViolation(f"database refused the write: {exc.orig}") from exc
        raise AssertionError("unreachable")

    def _in_campaign(self, campaign: str, fn: Callable[..., T], *args: Any) -> T:
        return self._write(lambda conn: fn(conn, self._cid(conn, campaign), *args))

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with read_tx(self.engine) as conn:
            yield conn

    def _read(self, campaign: str, fn: Callable[..., T], *args: Any) -> T:
        with self._reading() as conn:
            return fn(conn, self._cid(conn, campaign), *args)

    # -- campaigns, prompts, generations, comparisons ---------------------------------------

    def ensure_campaign(self, name: str, config: Mapping[str, Any] | None = None) -> Campaign:
        """Create the campaign if it does not exist; return it."""
        cfg = dict(config) if config is not None else None
        return self._write(content.ensure_campaign, name, cfg)

    def get_campaign(self, name: str) -> Campaign:
        """The campaign called ``name`` (``UnknownId`` if missing)."""
        with self._reading() as conn:
            return content.get_campaign(conn, name)

    def add_prompts(
        self, campaign: str, texts: Sequence[str], source: str | None = None
    ) -> list[int]:
        """Add prompts (idempotent on (campaign, sha256 of text)); ids in input order."""
        return self._in_campaign(
            campaign, content.add_prompts, list(texts), source, self.max_text_chars
        )

    def add_generations(self, campaign: str, gens: Sequence[NewGeneration]) -> list[int]:
        """Append generations (idempotent on (prompt, policy_version, worker, sample_index))."""
        return self._in_campaign(campaign, content.add_generations, gens, self.max_text_chars)

    def add_comparisons(self, campaign: str, comps: Sequence[NewComparison]) -> list[int]:
        """Create pending comparisons (idempotent on the ordered generation pair)."""
        return self._in_campaign(campaign, content.add_comparisons, comps)

    # -- the label queue --------------------------------------------------------------------

    def claim(
        self,
        campaign: str,
        owner: str,
        n: int,
        lease_s: float = 300.0,
        now: datetime | None = None,
    ) -> list[Claim]:
        """Lease up to ``n`` pending comparisons to ``owner`` for ``lease_s`` seconds."""
        return self._in_campaign(campaign, queue.claim, owner, n, lease_s, now or utcnow())

    def release(self, campaign: str, owner: str, comparison_ids: Sequence[int]) -> int:
        """Return ``owner``'s leases on these comparisons to the queue; returns how many."""
        return self._in_campaign(campaign, queue.release, owner, list(comparison_ids))

    def expire_leases(self, campaign: str, now: datetime | None = None) -> int:
        """Clear expired leases; returns how many (expired leases are claimable regardless)."""
        return self._in_campaign(campaign, queue.expire, now or utcnow())

    def leased_to(self, campaign: str, owner: str, now: datetime | None = None) -> list[Claim]:
        """The comparisons ``owner`` holds a live lease on, with their texts (claim order)."""
        return self._read(campaign, queue.leased_to, owner, now or utcnow())

    def comparison_counts(self, campaign: str, now: datetime | None = None) -> ComparisonCounts:
        """Pending / claimed / labeled comparison counts."""
        return self._read(campaign, queue.counts, now or utcnow())

    # -- preferences and snapshots ----------------------------------------------------------

    def record_preference(
        self,
        campaign: str,
        pref: NewPreference,
        lease_owner: str | None = None,
        now: datetime | None = None,
        audit: AuditNote | None = None,
    ) -> Recorded:
        """Record one preference; see ``record_preferences``. With ``audit``, its audit row is
        appended in the same transaction (one commit instead of two)."""
        if audit is None:
            return self.record_preferences(campaign, [pref], lease_owner, now)[0]
        when = now or utcnow()

        def record(conn: Connection, cid: int) -> Recorded:
            rec = labels.record_preferences(conn, cid, [pref], lease_owner, when)[0]
            people.add_audit(conn, audit.who, audit.describe(rec), audit.request_hash, when)
            return rec

        return self._in_campaign(campaign, record)

    def record_preferences(
        self,
        campaign: str,
        prefs: Sequence[NewPreference],
        lease_owner: str | None = None,
        now: datetime | None = None,
    ) -> list[Recorded]:
        """Record preferences, all or none, in one transaction.

        A repeat (same idempotency key or natural key, same body) returns the stored id with
        ``created=False``. With ``lease_owner``, every new row's comparison must be leased to
        that owner and the lease still live (``LeaseLost`` otherwise); recording marks the
        comparison labeled.

        Raises:
            InvalidInput, UnknownId: a malformed field, an unknown or foreign comparison.
            IdempotencyConflict: the idempotency key was used with another body.
            DuplicateLabel: a second, different first label by the same labeler (supersede it).
            LeaseLost: see above.
        """
        return self._in_campaign(
            campaign, labels.record_preferences, prefs, lease_owner, now or utcnow()
        )

    def record_pair_preferences(
        self,
        campaign: str,
        items: Sequence[NewPreference | NewPairPreference],
        source: str | None = None,
        now: datetime | None = None,
    ) -> list[Recorded]:
        """Record preferences of comparisons and of text pairs, all or none, in one transaction.

        Each pair's prompt (``source`` if new), generations and comparison are found or created
        first (idempotently), so a refused preference leaves no new row behind. Refusals name
        ``prompts[i]``, ``generations[2i]``/``[2i + 1]`` or ``comparisons[i]`` (the i-th pair
        item) or ``preferences[k]`` (the k-th item); otherwise as ``record_preferences``.
        """
        args = (items, source, self.max_text_chars, now or utcnow())
        return self._in_campaign(campaign, pairs.record_pair_preferences, *args)

    def watermark(self, campaign: str) -> int:
        """Highest preference id of the campaign that is safe to snapshot (0 if none)."""
        return self._read(campaign, snapshots.safe_max_id)

    def snapshot(
        self,
        campaign: str,
        watermark: int | None = None,
        kinds: Sequence[str] = TRAINING_KINDS,
        since: int = 0,
    ) -> Snapshot:
        """The training set at ``watermark`` (default: the current one), with its sha256;
        given ``since``, only its preferences after that id (see `window_start`).

        Raises:
            WatermarkAhead: ``watermark`` is beyond the highest committed preference id.
            InvalidInput: ``since`` is negative or beyond the watermark.
        """
        kinds = snapshots.check_kinds(kinds)
        with self._reading() as conn:  # short: on PostgreSQL it waits for open inserts
            safe = snapshots.safe_max_id(conn)
            mark = snapshots.safe_max_id(conn, self._cid(conn, campaign))
        if watermark is not None:
            mark = snapshots.check_watermark(watermark, safe)
        with self._reading() as conn:
            return snapshots.snapshot_rows(
                conn, campaign, self._cid(conn, campaign), mark, kinds, since
            )

    def window_start(
        self,
        campaign: str,
        before: int,
        rows: int,
        kinds: Sequence[str] = TRAINING_KINDS,
    ) -> int:
        """The ``since`` that makes a snapshot hold the last ``rows`` effective preferences at or
        below id ``before`` and everything after it (0: there are no more than ``rows``)."""
        kinds = snapshots.check_kinds(kinds)
        return self._read(campaign, snapshots.window_start, before, rows, kinds)

    # -- model versions ---------------------------------------------------------------------

    def record_model_version(
        self,
        campaign: str,
        kind: str,
        version: int,
        *,
        snapshot: SnapshotRef | None = None,
        parent_version: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        weight_uri: str | None = None,
    ) -> ModelVersion:
        """Record a candidate RM/policy version; an RM needs the ``SnapshotRef`` it trained on."""

        record = partial(
            registry.record,
            snapshot=snapshot,
            parent_version=parent_version,
            metrics=metrics or {},
            weight_uri=weight_uri,
            now=utcnow(),
        )
        return self._in_campaign(campaign, record, campaign, kind, version)

    def set_model_status(
        self, campaign: str, kind: str, version: int, status: str, reason: str = ""
    ) -> ModelVersion:
        """Append a status event: candidate -> promoted or rejected (``InvalidTransition``)."""
        args = (campaign, kind, version, status, reason, utcnow())
        return self._in_campaign(campaign, registry.set_status, *args)

    def model_version(self, campaign: str, kind: str, version: int) -> ModelVersion:
        """One model version with its current status."""
        return self._read(campaign, registry.get, campaign, kind, version)

    def model_versions(self, campaign: str, kind: str | None = None) -> list[ModelVersion]:
        """All model versions (of one kind) with current statuses, by kind then version."""
        return self._read(campaign, registry.list_versions, campaign, kind)

    def latest_model_version(
        self, campaign: str, kind: str, status: str = "promoted"
    ) -> ModelVersion | None:
        """The highest version of ``kind`` whose current status is ``status``."""
        found = [m for m in self.model_versions(campaign, kind) if m.status == status]
        return found[-1] if found else None

    def training_set(self, campaign: str, rm_version: int) -> Snapshot:
        """Rebuild the snapshot an RM version trained on and check its hash.

        Raises:
            SnapshotMismatch: the rows no longer hash to the recorded sha256.
        """
        ref = self.model_version(campaign, "rm", rm_version).snapshot
        assert ref is not None, "the schema requires a snapshot on every rm version"
        snap = self.snapshot(campaign, ref.watermark, ref.kinds, ref.since)
        if snap.sha256 != ref.sha256:
            raise SnapshotMismatch(
                f"rm version {rm_version}: snapshot at watermark {ref.watermark} (after "
                f"preference {ref.since}) hashes to "
                f"{snap.sha256}, recorded {ref.sha256}"
            )
        return snap

    # -- annotators, audit, metrics ---------------------------------------------------------

    def add_annotator(self, name: str, role: str = "annotator") -> str:
        """Create an annotator (``annotator`` or ``admin``); returns its token, once."""
        return self._write(people.add_annotator, name, role, utcnow())

    def authenticate(self, token: str) -> Annotator | None:
        """The live annotator holding ``token``, else None."""
        with self._reading() as conn:
            return people.authenticate(conn, token)

    def revoke_annotator(self, name: str) -> Annotator:
        """Revoke an annotator's token."""
        return self._write(people.revoke_annotator, name, utcnow())

    def quarantine(
        self,
        campaign: str,
        labeler_id: str,
        reason: str,
        evidence: Mapping[str, Any] | None = None,
    ) -> QuarantineRow:
        """Leave ``labeler_id``'s preferences out of RM training (an append-only fact).

        Snapshots above the current watermark drop all of its preferences; snapshots at or
        below it, and so every recorded RM version's training set, are unchanged. Idempotent:
        quarantining a labeler again returns the first row. Independent of ``revoke_annotator``
        (which stops new labels).
        """
        now = utcnow()
        return self._in_campaign(
            campaign, people.quarantine, labeler_id, reason, evidence or {}, now
        )[0]

    def quarantines(self, campaign: str) -> list[QuarantineRow]:
        """The campaign's quarantined labelers, oldest first."""
        return self._read(campaign, people.quarantines)

    def list_annotators(self) -> list[Annotator]:
        """All annotators, revoked ones included."""
        with self._reading() as conn:
            return people.list_annotators(conn)

    def audit(self, who: str, what: str, request_hash: str) -> int:
        """Append an audit row; returns its id."""
        return self._write(people.add_audit, who, what, request_hash, utcnow())

    def audit_log(self, limit: int = 100) -> list[AuditRow]:
        """Newest audit rows first."""
        with self._reading() as conn:
            return people.audit_log(conn, limit)

    def log_metrics(self, campaign: str, iteration: int, values: Mapping[str, float]) -> int:
        """Append finite scalar metrics for an iteration; returns how many."""
        return self._in_campaign(campaign, people.log_metrics, iteration, values, utcnow())

    def metrics(self, campaign: str, key: str | None = None) -> list[MetricRow]:
        """Logged metrics (latest per iteration and key)."""
        return self._read(campaign, people.metrics, key)

    # -- reports ----------------------------------------------------------------------------

    def labels_by_kind(
        self, campaign: str, bucket_s: int = 3600
    ) -> list[tuple[datetime, str, int]]:
        """Preference rows per labeler kind per ``bucket_s`` time bucket."""
        return self._read(campaign, reports.labels_by_kind, bucket_s)

    def label_counts(self, campaign: str) -> dict[str, int]:
        """Preference rows per labeler kind."""
        return self._read(campaign, reports.labels_by_kind_total)

    def label_counts_by_labeler(self, campaign: str, kind: str | None = None) -> dict[str, int]:
        """Effective (not superseded) preferences per labeler id, of one labeler kind or all."""
        return self._read(campaign, reports.effective_by_labeler, kind)

    def preferences_per_rm_version(self, campaign: str) -> dict[int, int]:
        """Training-set size of each RM version."""
        return self._read(campaign, reports.preferences_per_rm_version)

    def generations_per_policy_version(self, campaign: str) -> dict[int, int]:
        """Generations per policy version."""
        return self._read(campaign, reports.generations_per_policy_version)

    def row_counts(self) -> dict[str, int]:
        """Rows per table."""
        with self._reading() as conn:
            return row_counts(conn)
