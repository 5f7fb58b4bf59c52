"""Model versions (RM and policy) and their append-only status history.

A version row never changes. Its status is the latest ``model_version_event``: ``candidate`` on
creation, then at most one of ``promoted`` / ``rejected``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select

from storage import validate as v
from storage.errors import IdempotencyConflict, InvalidTransition, UnknownId
from storage.models import MODEL_KINDS, MODEL_STATUSES, ModelVersion, ModelVersionEvent
from storage.records import ModelVersion as ModelVersionRecord
from storage.records import SnapshotRef
from storage.snapshots import check_kinds

_SHA256 = re.compile(r"[0-9a-f]{64}")
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "candidate": ("promoted", "rejected"),
    "promoted": (),
    "rejected": (),
}


def _status_of() -> Any:
    """Subquery: model_version_id -> latest status."""
    latest = (
        select(func.max(ModelVersionEvent.id).label("event_id"))
        .group_by(ModelVersionEvent.model_version_id)
        .subquery()
    )
    return (
        select(ModelVersionEvent.model_version_id, ModelVersionEvent.status)
        .join(latest, latest.c.event_id == ModelVersionEvent.id)
        .subquery()
    )


def _records(
    conn: Connection, campaign_id: int, campaign: str, *where: Any
) -> list[ModelVersionRecord]:
    status = _status_of()
    parent = ModelVersion.__table__.alias("parent")
    table = ModelVersion.__table__
    query = (
        select(table, status.c.status, parent.c.version.label("parent_version"))
        .join(status, status.c.model_version_id == ModelVersion.id)
        .outerjoin(parent, parent.c.id == ModelVersion.parent_id)
        .where(ModelVersion.campaign_id == campaign_id, *where)
        .order_by(ModelVersion.kind, ModelVersion.version)
    )
    out = []
    for mv in conn.execute(query):
        ref = None
        if mv.snapshot_watermark is not None and mv.snapshot_hash is not None:
            kinds = tuple((mv.training_kinds or "").split(",")) if mv.training_kinds else ()
            ref = SnapshotRef(mv.snapshot_watermark, mv.snapshot_hash, kinds, mv.snapshot_since)
        out.append(
            ModelVersionRecord(
                id=mv.id,
                campaign=campaign,
                kind=mv.kind,
                version=mv.version,
                parent_version=mv.parent_version,
                metrics=dict(mv.metrics),
                weight_uri=mv.weight_uri,
                snapshot=ref,
                status=mv.status,
                created_at=mv.created_at,
            )
        )
    return out


def get(
    conn: Connection, campaign_id: int, campaign: str, kind: str, version: int
) -> ModelVersionRecord:
    """One version with its current status.

    Raises:
        UnknownId: no such version.
    """
    found = _records(
        conn, campaign_id, campaign, ModelVersion.kind == kind, ModelVersion.version == version
    )
    if not found:
        raise UnknownId(
            f"model_version: {kind} version {version} of campaign {campaign!r} does not exist"
        )
    return found[0]


def list_versions(
    conn: Connection, campaign_id: int, campaign: str, kind: str | None
) -> list[ModelVersionRecord]:
    """All versions (of one kind), by kind then version."""
    where = [ModelVersion.kind == kind] if kind is not None else []
    return _records(conn, campaign_id, campaign, *where)


_COMPARED = (
    "metrics",
    "weight_uri",
    "parent_id",
    "snapshot_watermark",
    "snapshot_hash",
    "snapshot_since",
    "training_kinds",
)


def _values(
    kind: str,
    version: int,
    snapshot: SnapshotRef | None,
    metrics: Mapping[str, Any],
    weight_uri: str | None,
) -> dict[str, Any]:
    """Validated column values of a new version (``parent_id`` and ids filled in later)."""
    where = f"model_version({kind} v{version})"
    v.one_of(kind, MODEL_KINDS, where, "kind")
    v.nonneg_int(version, where, "version")
    if kind == "rm" and snapshot is None:
        raise v.fail(where, "snapshot", "the SnapshotRef an RM was trained on", None)
    if weight_uri is not None:
        v.text(weight_uri, where, "weight_uri", 1000)
    values: dict[str, Any] = {
        "kind": kind,
        "version": version,
        "metrics": v.json_object(metrics, where, "metrics"),
        "weight_uri": weight_uri,
        "snapshot_watermark": None,
        "snapshot_hash": None,
        "snapshot_since": 0,
        "training_kinds": None,
    }
    if snapshot is not None:
        if not isinstance(snapshot.sha256, str) or not _SHA256.fullmatch(snapshot.sha256):
            raise v.fail(where, "snapshot.sha256", "64 lowercase hex characters", snapshot.sha256)
        values["snapshot_watermark"] = v.nonneg_int(snapshot.watermark, where, "watermark")
        values["snapshot_hash"] = snapshot.sha256
        values["snapshot_since"] = v.nonneg_int(snapshot.since, where, "since")
        if snapshot.since > snapshot.watermark:
            raise v.fail(where, "snapshot.since", f"<= the watermark {snapshot.watermark}",
                         snapshot.since)
        values["training_kinds"] = ",".join(check_kinds(snapshot.kinds))
    return values


def record(
    conn: Connection,
    campaign_id: int,
    campaign: str,
    kind: str,
    version: int,
    *,
    snapshot: SnapshotRef | None,
    parent_version: int | None,
    metrics: Mapping[str, Any],
    weight_uri: str | None,
    now: datetime,
) -> ModelVersionRecord:
    """Insert a candidate version (idempotent on (campaign, kind, version) with the same body)."""
    values = _values(kind, version, snapshot, metrics, weight_uri)
    values.update(campaign_id=campaign_id, parent_id=None, created_at=now)
    if parent_version is not None:
        values["parent_id"] = get(conn, campaign_id, campaign, kind, parent_version).id
    table = ModelVersion.__table__
    existing = conn.execute(
        select(table).where(
            table.c.campaign_id == campaign_id, table.c.kind == kind, table.c.version == version
        )
    ).first()
    if existing is None:
        new_id = conn.execute(table.insert().values(values)).inserted_primary_key[0]
        conn.execute(
            ModelVersionEvent.__table__.insert().values(
                model_version_id=new_id, status="candidate", reason="", created_at=now
            )
        )
    for key in _COMPARED if existing is not None else ():
        if getattr(existing, key) != values[key]:
            raise IdempotencyConflict(
                f"model_version({kind} v{version})", f"field {key!r} differs from the stored row"
            )
    return get(conn, campaign_id, campaign, kind, version)


def set_status(
    conn: Connection,
    campaign_id: int,
    campaign: str,
    kind: str,
    version: int,
    status: str,
    reason: str,
    now: datetime,
) -> ModelVersionRecord:
    """Append a status event (candidate -> promoted | rejected); repeating one is a no-op."""
    v.one_of(status, MODEL_STATUSES, f"model_version({kind} v{version})", "status")
    current = get(conn, campaign_id, campaign, kind, version)
    if current.status == status:
        return current
    if status not in TRANSITIONS[current.status]:
        raise InvalidTransition(
            f"model_version({kind} v{version}) is {current.status!r}; allowed next statuses: "
            f"{list(TRANSITIONS[current.status])}, got {status!r}"
        )
    conn.execute(
        ModelVersionEvent.__table__.insert().values(
            model_version_id=current.id, status=status, reason=reason, created_at=now
        )
    )
    return get(conn, campaign_id, campaign, kind, version)
