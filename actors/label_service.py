"""What the label routes do, over one ledger and campaign (`LabelService`).

Each annotator is shown one comparison at a time, leased to it under its name. The service
remembers which one; after a restart it reads it back from the ledger (`Ledger.leased_to`), so
a page reload shows the comparison the annotator was looking at. It reads the ledger once per
annotator: from then on every lease the annotator holds was taken by this service, which
remembers it (or that it was labeled or put aside). Every label, skip and import call is
audited (`ledger.audit`) with the sha256 of its body.

The `remaining` count that /api/next shows is the last ledger count, lowered by the comparisons
this service leased since it was taken, and recounted in the background once it is
`REMAINING_TTL_S` old (in the request when there is none yet, or no comparison was left to
claim): exact for this service's own claims, about that long behind other processes' claims and
leases that run out. /api/stats always counts.

On SQLite the service's writes (claims, labels, audit rows) take turns on a lock of its own
before `BEGIN IMMEDIATE`: SQLite's busy handler retries a refused write lock after sleeps of up
to 100 ms, with no queue, so route threads that collided there waited up to seconds for a lock
held a few milliseconds; on the Python lock they wake as soon as it is free.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import threading
import time
from datetime import timedelta
from typing import Any

from actors.label_gate import TokenBucket
from actors.label_schemas import (
    ApiError,
    ImportRequest,
    LabelRequest,
    LabelSettings,
    SkipRequest,
    parse,
)
from storage.errors import DuplicateLabel, IdempotencyConflict, LeaseLost, LedgerError, UnknownId
from storage.ledger import Ledger
from storage.models import utcnow
from storage.records import Annotator, Claim, NewPreference

_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
REMAINING_TTL_S = 1.0  # how long a ledger count of claimable comparisons is reused


def _ledger_refusal(exc: LedgerError, what: str) -> ApiError:
    """The HTTP form of a ledger refusal (``what``: the caller's own wording of it)."""
    text = re.sub(r"^preferences\[(\d+)\]: ", lambda m: f"labels[{m[1]}]: ", str(exc))
    if isinstance(exc, UnknownId):
        return ApiError(404, "unknown_comparison", text)
    if isinstance(exc, IdempotencyConflict):
        return ApiError(409, "idempotency_conflict", what or text)
    if isinstance(exc, LeaseLost):
        return ApiError(409, "lease_lost", what or text)
    if isinstance(exc, DuplicateLabel):
        return ApiError(409, "duplicate_label", text)
    return ApiError(422, "invalid_request", text)


class LabelService:
    """What the routes do, over one ledger and campaign (thread-safe; routes run in a pool)."""

    def __init__(self, ledger: Ledger, campaign: str, settings: LabelSettings) -> None:
        self.ledger, self.campaign, self.settings = ledger, campaign, settings
        self.bucket = TokenBucket(settings.rate_per_s, settings.burst)
        self._held: dict[str, Claim] = {}  # the comparison each annotator is looking at
        self._skipped: dict[str, set[int]] = {}  # put aside, still leased: not to show again
        self._synced: set[str] = set()  # annotators whose leases were read from the ledger
        self._lock = threading.Lock()
        self._leased = 0  # comparisons this service leased so far
        # (monotonic time, claimable count, self._leased before counting): the last ledger count
        self._count: tuple[float, int, int] | None = None
        self._counting = False  # a background recount is running
        sqlite = ledger.engine.dialect.name == "sqlite"
        self._writing = threading.Lock() if sqlite else contextlib.nullcontext()

    def caller(self, authorization: str | None) -> Annotator:
        """The live annotator behind an `Authorization: Bearer` header, rate-limited."""
        if authorization is None:
            raise ApiError(401, "missing_token", "send `Authorization: Bearer <token>`; "
                           "an admin creates tokens with `prefloop annotators add NAME`",
                           {"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 256:
            raise ApiError(401, "malformed_token", "the Authorization header must be "
                           "`Bearer <token>`", {"WWW-Authenticate": "Bearer"})
        who = self.ledger.authenticate(token)
        if who is None:
            raise ApiError(401, "invalid_token", "the token is unknown or revoked; ask an "
                           "admin for a new one", {"WWW-Authenticate": "Bearer"})
        wait = self.bucket.take(who.id)
        if wait > 0:
            retry = math.ceil(wait)
            raise ApiError(429, "rate_limited", f"too many requests for annotator {who.name!r}; "
                           f"retry in {retry} s", {"Retry-After": str(retry)})
        return who

    def audit(self, who: Annotator, what: str, raw: bytes) -> None:
        """Append an audit row with the sha256 of the request body."""
        with self._writing:
            self.ledger.audit(who.name, what, hashlib.sha256(raw).hexdigest())

    def _holding(self, who: Annotator) -> Claim | None:
        """The comparison ``who`` is looking at: the remembered one, else (first time since a
        restart) its latest live lease in the ledger that it did not put aside."""
        with self._lock:
            held = self._held.get(who.name)
            skipped = set(self._skipped.get(who.name, ()))
            synced = who.name in self._synced
        if held is not None or synced:
            return held
        leases = self.ledger.leased_to(self.campaign, who.name)
        with self._lock:  # a skipped comparison whose lease ended may come back as new work
            if who.name in self._skipped:
                self._skipped[who.name] &= {c.comparison_id for c in leases}
            self._synced.add(who.name)
        shown = [c for c in leases if c.comparison_id not in skipped]
        return max(shown, key=lambda c: (c.expires_at, c.comparison_id), default=None)

    def next_for(self, who: Annotator) -> dict[str, Any]:
        """The comparison ``who`` holds if its lease has over half its time left, else a new one."""
        held = self._holding(who)
        fresh_until = utcnow() + timedelta(seconds=self.settings.lease_s / 2)
        claimed = held is None or held.expires_at < fresh_until
        if claimed:
            with self._writing:
                claims = self.ledger.claim(self.campaign, who.name, 1, self.settings.lease_s)
            held = claims[0] if claims else None
        with self._lock:
            if held is None:
                self._held.pop(who.name, None)
            else:
                self._held[who.name] = held
                self._skipped.get(who.name, set()).discard(held.comparison_id)  # shown again
                self._leased += int(claimed)
        remaining = self._remaining(fresh=claimed and held is None)  # none left: count again
        if held is None:
            return {"comparison": None, "remaining": remaining}
        shown = {"id": held.comparison_id, "prompt": held.prompt, "response_a": held.text_a,
                 "response_b": held.text_b, "expires_at": held.expires_at.isoformat() + "Z",
                 "attempt": held.attempt}
        return {"comparison": shown, "remaining": remaining}

    def _remaining(self, fresh: bool = False) -> int:
        """Claimable comparisons: the last ledger count less what this service leased since it
        was taken. A count over ``REMAINING_TTL_S`` old is refreshed in the background (one
        thread at a time) while this answer uses it; with none yet, or ``fresh``, count now."""
        with self._lock:
            count, leased = self._count, self._leased
            stale = count is None or time.monotonic() - count[0] >= REMAINING_TTL_S
            background = stale and not fresh and count is not None and not self._counting
            if background:
                self._counting = True
        if background:
            threading.Thread(target=self._recount, args=(True,), name="label-remaining",
                             daemon=True).start()
        if fresh or count is None:
            count = self._recount()
            with self._lock:
                leased = self._leased
        return max(0, count[1] - (leased - count[2]))

    def _recount(self, background: bool = False) -> tuple[float, int, int]:
        """Count claimable comparisons in the ledger; keep the count unless a later one landed
        first; return the one kept."""
        try:
            with self._lock:
                started, leased = time.monotonic(), self._leased
            pending = self.ledger.comparison_counts(self.campaign).pending
            with self._lock:
                if self._count is None or started >= self._count[0]:
                    self._count = (started, pending, leased)
                return self._count
        finally:
            if background:
                with self._lock:
                    self._counting = False

    def _let_go(self, who: Annotator, comparison_id: int) -> None:
        with self._lock:
            held = self._held.get(who.name)
            if held is not None and held.comparison_id == comparison_id:
                del self._held[who.name]

    def label(self, who: Annotator, key: str | None, raw: bytes) -> tuple[dict[str, Any], bool]:
        """Record ``who``'s label; returns the result and whether it was a replay."""
        where = f"label campaign={self.campaign!r} key={(key or '')[:100]!r}"
        try:
            if key is None or not _KEY.fullmatch(key):
                raise ApiError(400, "bad_idempotency_key", "send an `Idempotency-Key` header of "
                               "1-100 characters from A-Z a-z 0-9 _ . : - (new for each label)")
            req = parse(LabelRequest, raw)
            pref = NewPreference(req.comparison_id, req.choice, "human", who.name,
                                 idempotency_key=f"label-api:{who.id}:{key}")
            try:
                with self._writing:
                    rec = self.ledger.record_preference(self.campaign, pref,
                                                        lease_owner=who.name)
            except LedgerError as exc:
                raise _ledger_refusal(exc, {
                    IdempotencyConflict: f"Idempotency-Key {key!r} was already used for a "
                    "different label; send a new key for a new label",
                    LeaseLost: f"comparison {req.comparison_id} is not leased to you (the lease "
                    "expired or was never yours); GET /api/next for work",
                }.get(type(exc), "")) from None
        except ApiError as err:
            self.audit(who, f"{where} -> refused {err.status} {err.code}", raw)
            raise
        self._let_go(who, req.comparison_id)
        state = "created" if rec.created else "replayed"
        self.audit(who, f"{where} comparison={req.comparison_id} choice={req.choice} -> "
                   f"preference {rec.id} {state}", raw)
        result = {"preference_id": rec.id, "comparison_id": req.comparison_id,
                  "choice": req.choice}
        return result, not rec.created

    def skip(self, who: Annotator, raw: bytes) -> dict[str, Any]:
        """Stop showing a comparison to ``who`` (it stays leased until the lease runs out)."""
        req = parse(SkipRequest, raw)
        self._let_go(who, req.comparison_id)
        with self._lock:
            self._skipped.setdefault(who.name, set()).add(req.comparison_id)
        self.audit(who, f"skip campaign={self.campaign!r} comparison={req.comparison_id}", raw)
        return {"skipped": req.comparison_id}

    def import_labels(self, who: Annotator, raw: bytes) -> dict[str, Any]:
        """Admin only: record human labels of existing comparisons, all or none."""
        where = f"import campaign={self.campaign!r}"
        try:
            if who.role != "admin":
                raise ApiError(403, "admin_only", f"annotator {who.name!r} has role "
                               f"{who.role!r}; importing labels needs an admin token")
            req = parse(ImportRequest, raw)
            prefs = [NewPreference(x.comparison_id, x.choice, "human", x.annotator, x.strength)
                     for x in req.labels]
            try:
                with self._writing:
                    recs = self.ledger.record_preferences(self.campaign, prefs)
            except LedgerError as exc:
                raise _ledger_refusal(exc, "") from None
        except ApiError as err:
            self.audit(who, f"{where} -> refused {err.status} {err.code}", raw)
            raise
        created = sum(r.created for r in recs)
        with self._lock:  # imported labels may have taken claimable comparisons: count again
            self._count = None
        self.audit(who, f"{where} labels={len(recs)} -> created {created}", raw)
        return {"created": created, "existing": len(recs) - created,
                "preference_ids": [r.id for r in recs]}

    def stats(self, who: Annotator) -> dict[str, Any]:
        """Queue counts, labels by kind, and effective human labels per annotator (admins see
        everyone; an annotator sees itself)."""
        counts = self.ledger.comparison_counts(self.campaign)
        per = self.ledger.label_counts_by_labeler(self.campaign, "human")
        mine = {who.name: per.get(who.name, 0)}
        return {
            "campaign": self.campaign,
            "comparisons": {"pending": counts.pending, "claimed": counts.claimed,
                            "labeled": counts.labeled},
            "labels_by_kind": self.ledger.label_counts(self.campaign),
            "by_annotator": dict(sorted(per.items())) if who.role == "admin" else mine,
            "you": {"name": who.name, "role": who.role, "labeled": mine[who.name]},
        }
