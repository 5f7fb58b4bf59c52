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
leases that run out. /api/stats counts the same way, all of its counts at once, answering from
counts at most `STATS_TTL_S` old (its `as_of` says when they were taken): recounted in the
background when older, in the request once they are over `STATS_STALE_S` old (or after an
import), plus the labels this service recorded since they were taken, so that an annotator's
own count (`you`) is exact. Counting scans the campaign's comparisons and labels (~25 ms at
20,000 comparisons), which the route would otherwise do on every call from every open page.

On SQLite the service's writes (claims, labels, audit rows) take turns on a lock of its own
before `BEGIN IMMEDIATE`: SQLite's busy handler retries a refused write lock after sleeps of up
to 100 ms, with no queue, so route threads that collided there waited up to seconds for a lock
held a few milliseconds; on the Python lock they wake as soon as it is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

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
from storage.records import Annotator, AuditNote, Claim, NewPreference, Recorded

T = TypeVar("T")
_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
REMAINING_TTL_S = 1.0  # how long a ledger count of claimable comparisons is reused
AUTH_TTL_S = 1.0  # how long a token the ledger accepted is trusted without asking it again
STATS_TTL_S = 1.0  # how long the counts of /api/stats are reused as they are
STATS_STALE_S = 10.0  # counts older than this are taken again in the request


@dataclass(frozen=True)
class _Counts:
    """The ledger counts behind /api/stats, taken together."""

    taken: float  # time.monotonic() when counting began
    as_of: str  # the same moment in UTC, ISO 8601
    comparisons: dict[str, int]
    by_kind: dict[str, int]
    by_annotator: dict[str, int]  # effective human labels
    recorded: dict[str, int]  # LabelService._recorded when counting began


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
    """What the routes do, over one ledger and campaign (thread-safe; `run` calls them)."""

    POOL_THREADS = 4
    """Threads that make a non-SQLite ledger's calls (they wait on the database server)."""

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
        self._stats: _Counts | None = None  # the last counts of /api/stats
        self._stats_counting = False  # a background recount of them is running
        self._stats_since = 0.0  # counts taken before this (an import) are not kept
        self._recorded: Counter[str] = Counter()  # labels created through this service
        # sha256 of a token -> (its annotator, time.monotonic() when the ledger said so)
        self._tokens: dict[bytes, tuple[Annotator, float]] = {}
        sqlite = ledger.engine.dialect.name == "sqlite"
        self._writing = threading.Lock() if sqlite else contextlib.nullcontext()
        self._pool = None if sqlite else ThreadPoolExecutor(self.POOL_THREADS, "label-ledger")

    async def run(self, method: Callable[..., T], *args: Any) -> T:
        """``method(*args)``: on the event loop for SQLite (its calls take a few hundred
        microseconds of CPU each), in the pool otherwise (they wait on a server)."""
        if self._pool is None:
            return method(*args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, method, *args)

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
        who = self._authenticate(token)
        if who is None:
            raise ApiError(401, "invalid_token", "the token is unknown or revoked; ask an "
                           "admin for a new one", {"WWW-Authenticate": "Bearer"})
        wait = self.bucket.take(who.id)
        if wait > 0:
            retry = math.ceil(wait)
            raise ApiError(429, "rate_limited", f"too many requests for annotator {who.name!r}; "
                           f"retry in {retry} s", {"Retry-After": str(retry)})
        return who

    def _authenticate(self, token: str) -> Annotator | None:
        """The ledger's answer for ``token``, reused for `AUTH_TTL_S` when it named a live
        annotator (so a revocation takes effect within that long); refusals are never reused."""
        key, now = hashlib.sha256(token.encode("utf-8")).digest(), time.monotonic()
        with self._lock:
            known = self._tokens.get(key)
        if known is not None and now - known[1] < AUTH_TTL_S:
            return known[0]
        who = self.ledger.authenticate(token)
        with self._lock:
            if who is None:
                self._tokens.pop(key, None)
            else:
                if len(self._tokens) >= 4096:  # tokens seen in the last second, bounded
                    self._tokens = {k: v for k, v in self._tokens.items()
                                    if now - v[1] < AUTH_TTL_S}
                self._tokens[key] = (who, now)
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

            def recorded(rec: Recorded) -> str:  # the audit row, written with the label
                state = "created" if rec.created else "replayed"
                return (f"{where} comparison={req.comparison_id} choice={req.choice} -> "
                        f"preference {rec.id} {state}")

            note = AuditNote(who.name, hashlib.sha256(raw).hexdigest(), recorded)
            try:
                with self._writing:
                    rec = self.ledger.record_preference(self.campaign, pref,
                                                        lease_owner=who.name, audit=note)
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
        if rec.created:
            with self._lock:
                self._recorded[who.name] += 1
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
            self._count = self._stats = None
            self._stats_since = time.monotonic()
        self.audit(who, f"{where} labels={len(recs)} -> created {created}", raw)
        return {"created": created, "existing": len(recs) - created,
                "preference_ids": [r.id for r in recs]}

    def stats(self, who: Annotator) -> dict[str, Any]:
        """Queue counts, labels by kind, and effective human labels per annotator (admins see
        everyone; an annotator sees itself), as of `as_of` (see the module docstring)."""
        counts = self._stats_counts()
        with self._lock:
            since = {n: k - counts.recorded.get(n, 0) for n, k in self._recorded.items()}
        per = {n: counts.by_annotator.get(n, 0) + since.get(n, 0)
               for n in counts.by_annotator.keys() | {n for n, k in since.items() if k}}
        by_kind = dict(counts.by_kind)
        if sum(since.values()):
            by_kind["human"] = by_kind.get("human", 0) + sum(since.values())
        mine = {who.name: per.get(who.name, 0)}
        return {
            "campaign": self.campaign,
            "as_of": counts.as_of,
            "comparisons": counts.comparisons,
            "labels_by_kind": by_kind,
            "by_annotator": dict(sorted(per.items())) if who.role == "admin" else mine,
            "you": {"name": who.name, "role": who.role, "labeled": mine[who.name]},
        }

    def _stats_counts(self) -> _Counts:
        """The last counts if under `STATS_TTL_S` old; under `STATS_STALE_S`, the same while a
        background thread (one at a time) counts again; else counted now."""
        with self._lock:
            last = self._stats
            age = math.inf if last is None else time.monotonic() - last.taken
            background = STATS_TTL_S <= age < STATS_STALE_S and not self._stats_counting
            if background:
                self._stats_counting = True
        if background:
            threading.Thread(target=self._count_stats, args=(True,), name="label-stats",
                             daemon=True).start()
        if last is None or age >= STATS_STALE_S:
            return self._count_stats()
        return last

    def _count_stats(self, background: bool = False) -> _Counts:
        """Count in the ledger; keep the counts unless later ones landed first; return the
        ones kept."""
        try:
            with self._lock:
                taken, recorded = time.monotonic(), dict(self._recorded)
            as_of = utcnow().isoformat() + "Z"
            status = self.ledger.comparison_counts(self.campaign)
            counts = _Counts(taken, as_of,
                             {"pending": status.pending, "claimed": status.claimed,
                              "labeled": status.labeled},
                             self.ledger.label_counts(self.campaign),
                             self.ledger.label_counts_by_labeler(self.campaign, "human"),
                             recorded)
            with self._lock:
                if taken >= self._stats_since and (self._stats is None
                                                   or taken >= self._stats.taken):
                    self._stats = counts
                return counts if self._stats is None else self._stats
        finally:
            if background:
                with self._lock:
                    self._stats_counting = False
