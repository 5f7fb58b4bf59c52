"""The annotator audit run against the ledger: who disagrees with the other labelers more than
honest noise explains, and their quarantine from RM training.

    outcome = audit_campaign(ledger, "demo", cfg.labeling.audit, apply=True)
    outcome.quarantined        # labeler ids quarantined by this call

It reads the campaign's effective human preferences at the current watermark, runs
`actors.core.annotator_audit.audit_annotators` over them (agreement with the other labelers of
the same comparison; needs comparisons labeled by several annotators, as a crowd batch imported
with `prefloop label import` has), and, with `apply`, records a quarantine for every annotator
it flags (`Ledger.quarantine`: append-only, idempotent, with the audit's numbers as evidence).

A quarantine leaves the labeler out of every snapshot *above* its watermark, so the training
sets of RM versions recorded before it never change. The campaign therefore audits before its
labelers label (`CampaignLoop.audit_annotators`): the iteration's own labels raise the
watermark, and its RM refresh trains without the quarantined labeler. Labelers quarantined
earlier are left out of the audited labels (and of the pool the others are compared with) and
are listed apart.

`prefloop annotators audit` runs the same audit by hand (a dry run unless `--apply`).
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.core.annotator_audit import AnnotatorAudit, audit_annotators
from loop.config import AuditConfig
from storage.ledger import Ledger
from storage.people import QuarantineRow


@dataclass(frozen=True)
class AuditOutcome:
    """What one audit saw and did.

    Attributes:
        watermark: The preference id the audited labels were read at.
        labels: Human labels audited.
        audits: One verdict per audited annotator (sorted by labeler id).
        quarantined: Labeler ids quarantined by this call (empty on a dry run).
        earlier: Quarantines recorded before this call (their labels were not audited).
    """

    watermark: int
    labels: int
    audits: list[AnnotatorAudit]
    quarantined: list[str]
    earlier: list[QuarantineRow]

    @property
    def flagged(self) -> list[AnnotatorAudit]:
        """The audits whose verdict is quarantine."""
        return [a for a in self.audits if a.quarantine]


def audit_campaign(ledger: Ledger, campaign: str, cfg: AuditConfig, apply: bool) -> AuditOutcome:
    """Audit the campaign's human annotators; with `apply`, quarantine those flagged.

    Raises:
        storage.errors.UnknownId: no such campaign.
    """
    earlier = ledger.quarantines(campaign)
    snap = ledger.snapshot(campaign, kinds=("human",))
    # A snapshot at a quarantine's own watermark still holds the labeler's rows: drop them.
    out = {q.labeler_id for q in earlier}
    rows = [row for row in snap.rows if row.labeler_id not in out]
    audits = audit_annotators(rows, alpha=cfg.alpha, margin=cfg.margin,
                              min_scored=cfg.min_scored, min_others=cfg.min_others)
    quarantined = []
    if apply:
        for audit in audits:
            if audit.quarantine:
                ledger.quarantine(campaign, audit.labeler_id, audit.reason, audit.evidence())
                quarantined.append(audit.labeler_id)
    return AuditOutcome(snap.watermark, len(rows), audits, quarantined, earlier)
