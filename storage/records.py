"""Frozen dataclasses that go into and come out of the ledger (never ORM objects).

Inputs are named ``New*``; outputs are plain values read inside one transaction, safe to pickle
across processes and Ray actors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Labeler kinds a reward model trains on by default; ``gold`` only measures Goodhart.
TRAINING_KINDS: tuple[str, ...] = ("ai", "human")


@dataclass(frozen=True)
class Campaign:
    """A campaign row."""

    id: int
    name: str
    created_at: datetime


@dataclass(frozen=True)
class NewGeneration:
    """A sampled response to append; natural key (prompt_id, policy_version, worker, sample_index).

    Example:
        >>> g = NewGeneration(prompt_id=1, text="Paris.", token_count=2, policy_version=0,
        ...                   worker="rollout-0", sampling_params={"temperature": 1.0})
        >>> g.sample_index
        0
    """

    prompt_id: int
    text: str
    token_count: int
    policy_version: int
    worker: str
    sample_index: int = 0
    sampling_params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NewComparison:
    """Two generations of one prompt to compare; natural key (generation_a_id, generation_b_id).

    ``selection`` names the policy that picked the pair (``random``, ``ensemble_disagreement``,
    ...); ``priority`` orders claims (highest first), e.g. the ensemble's disagreement.
    """

    generation_a_id: int
    generation_b_id: int
    selection: str = "random"
    priority: float = 0.0


@dataclass(frozen=True)
class Claim:
    """A leased comparison, with the texts a labeler needs.

    ``attempt`` counts leases taken on this comparison (2+ means an earlier lease expired).
    """

    comparison_id: int
    prompt_id: int
    prompt: str
    generation_a_id: int
    text_a: str
    generation_b_id: int
    text_b: str
    owner: str
    expires_at: datetime
    attempt: int


@dataclass(frozen=True)
class NewPreference:
    """A label to record.

    Attributes:
        comparison_id: the comparison labeled.
        choice: ``a``, ``b`` or ``tie``.
        labeler_kind: ``ai``, ``human`` or ``gold``.
        labeler_id: who labeled (judge name, annotator name); one first label per comparison.
        strength: optional finite margin/confidence.
        idempotency_key: a retried write with the same key and body returns the first row.
        supersedes: id of this labeler's earlier preference that this row corrects.
    """

    comparison_id: int
    choice: str
    labeler_kind: str
    labeler_id: str
    strength: float | None = None
    idempotency_key: str | None = None
    supersedes: int | None = None


@dataclass(frozen=True)
class NewResponse:
    """One side of a ``NewPairPreference``: a generation of the pair's prompt (same natural key
    and fields as ``NewGeneration``, without ``prompt_id``)."""

    text: str
    token_count: int
    policy_version: int
    worker: str
    sample_index: int = 0
    sampling_params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NewPairPreference:
    """A label of two responses to a prompt that the ledger may not hold yet.

    ``Ledger.record_pair_preferences`` finds or creates the prompt (by its text), both
    generations (by their natural keys) and their comparison (by the ordered pair, with
    ``selection``), then records the label as a ``NewPreference`` of that comparison.
    """

    prompt: str
    response_a: NewResponse
    response_b: NewResponse
    choice: str
    labeler_kind: str
    labeler_id: str
    strength: float | None = None
    selection: str = "random"
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Recorded:
    """Result of recording one preference: its id, and False when it already existed."""

    id: int
    created: bool


@dataclass(frozen=True)
class AuditNote:
    """An audit row to append with a write: who, the sha256 (hex) of the request body, and
    what happened, worded from the write's result."""

    who: str
    request_hash: str
    describe: Callable[[Recorded], str]


@dataclass(frozen=True)
class SnapshotRow:
    """One effective preference of a training set, with its texts."""

    preference_id: int
    comparison_id: int
    prompt_id: int
    prompt: str
    generation_a_id: int
    text_a: str
    policy_version_a: int
    generation_b_id: int
    text_b: str
    policy_version_b: int
    choice: str
    strength: float | None
    labeler_kind: str
    labeler_id: str


@dataclass(frozen=True)
class SnapshotRef:
    """What identifies a training set: campaign, watermark, labeler kinds, its sha256, and the
    preference id it starts after (0: the campaign's first preference)."""

    watermark: int
    sha256: str
    kinds: tuple[str, ...] = TRAINING_KINDS
    since: int = 0


@dataclass(frozen=True)
class Snapshot:
    """The training set at a watermark: effective preferences with since < id <= watermark, by
    id (``since`` 0: all of them; a window keeps what an RM refresh reads bounded)."""

    campaign: str
    watermark: int
    kinds: tuple[str, ...]
    rows: tuple[SnapshotRow, ...]
    sha256: str
    since: int = 0

    @property
    def ref(self) -> SnapshotRef:
        """The small, picklable identity of this snapshot (store it with the RM version)."""
        return SnapshotRef(watermark=self.watermark, sha256=self.sha256, kinds=self.kinds,
                           since=self.since)


@dataclass(frozen=True)
class ModelVersion:
    """A model version with its current status (the latest status event)."""

    id: int
    campaign: str
    kind: str
    version: int
    parent_version: int | None
    metrics: Mapping[str, Any]
    weight_uri: str | None
    snapshot: SnapshotRef | None
    status: str
    created_at: datetime


@dataclass(frozen=True)
class Annotator:
    """A label-API user; the token itself is never stored."""

    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class ComparisonCounts:
    """Comparisons by queue state: unleased pending, leased (live lease), labeled."""

    pending: int
    claimed: int
    labeled: int


@dataclass(frozen=True)
class MetricRow:
    """One logged scalar."""

    iteration: int
    key: str
    value: float
    created_at: datetime


@dataclass(frozen=True)
class AuditRow:
    """One audit entry."""

    id: int
    who: str
    what: str
    request_hash: str
    created_at: datetime
