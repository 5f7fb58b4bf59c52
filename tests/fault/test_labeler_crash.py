"""Issue #9, item 4: a labeler dies after its database commit but before it returns; Ray
restarts it and retries the call; the ledger holds one row per (comparison, labeler).

A real Ray actor process: a test subclass of the production `Labeler` whose `_record` commits
the preferences (the production path) and then, once (keyed by a marker file), calls
``os._exit(1)``. With ``max_restarts=1, max_task_retries=1`` Ray restarts the actor (a new
process: the test logs each incarnation's PID) and runs the same `label_claims` call again.
The retried call finds its labels by their idempotency keys and writes nothing.

Negative control: the same fault against a labeler that records with a raw INSERT (no
idempotency): the retried call fails on the ledger's unique index instead of returning.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest
import ray
from ray import cloudpickle

from actors.core.judges import GoldJudge, LexiconScorer
from actors.labeler import LabelCounts, Labeler
from storage.ledger import Ledger
from storage.models import Preference, utcnow
from storage.records import ComparisonCounts, NewComparison, NewGeneration, NewPreference

CAMPAIGN = "crash"
_names = itertools.count()
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


class DiesAfterCommit(Labeler.__ray_actor_class__):
    """The production labeler, killed once right after its label transaction commits."""

    def __init__(self, run_dir: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_dir = Path(run_dir)
        with (self.run_dir / "pids").open("a") as log:
            log.write(f"{os.getpid()}\n")

    def _record(self, prefs: list[NewPreference]) -> LabelCounts:
        counts = self._commit(prefs)  # committed: the rows are in the ledger now
        marker = self.run_dir / "crashed"
        if not marker.exists():
            marker.write_text(f"{os.getpid()}\n")
            os._exit(1)  # dies before returning: no reply, no cleanup
        return counts

    def _commit(self, prefs: list[NewPreference]) -> LabelCounts:
        return super()._record(prefs)


class RawInsertDiesAfterCommit(DiesAfterCommit):
    """Negative control: the same fault, recording with a plain INSERT of every row."""

    def _commit(self, prefs: list[NewPreference]) -> LabelCounts:
        rows = [{"comparison_id": p.comparison_id, "choice": p.choice, "strength": p.strength,
                 "labeler_kind": p.labeler_kind, "labeler_id": p.labeler_id,
                 "idempotency_key": p.idempotency_key, "created_at": utcnow()} for p in prefs]
        with self.ledger.engine.begin() as conn:
            conn.execute(Preference.__table__.insert(), rows)
        return LabelCounts(labeled=len(rows))


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    opened = Ledger.open(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    opened.ensure_campaign(CAMPAIGN)
    prompts = opened.add_prompts(CAMPAIGN, ["Say something nice.", "Say something kind."])
    gens = opened.add_generations(CAMPAIGN, [
        NewGeneration(p, f"{word} day {p}", 2, 0, "rollout-0", k)
        for p in prompts for k, word in enumerate(("good", "bad", "great good"))])
    opened.add_comparisons(CAMPAIGN, [NewComparison(gens[3 * i + a], gens[3 * i + b])
                                      for i in range(2) for a, b in ((0, 1), (0, 2), (1, 2))])
    return opened


def crash_and_retry(cls: type, ledger: Ledger, run_dir: Path) -> tuple[object, list[str]]:
    """Start ``cls`` as a restartable actor, lease it 4 comparisons and let it label them.

    Returns:
        (the call's result or the exception it raised, the PIDs of the actor's incarnations)
    """
    name = f"crash-labeler-{next(_names)}"
    actor = (ray.remote(cls)
             .options(name=name, num_cpus=0.25, max_restarts=1, max_task_retries=1)
             .remote(str(run_dir), name, ledger.url, CAMPAIGN, GoldJudge(LexiconScorer()),
                     "random", 60.0, 4))
    try:
        claims = ledger.claim(CAMPAIGN, name, 4, lease_s=60.0)
        assert len(claims) == 4
        try:
            result: object = ray.get(actor.label_claims.remote(claims), timeout=180)
        except ray.exceptions.RayError as exc:
            result = exc
    finally:
        ray.kill(actor)
    return result, (run_dir / "pids").read_text().split()


def rows_per_key(ledger: Ledger) -> dict[tuple[int, str], int]:
    with ledger.engine.connect() as conn:
        found = conn.execute(Preference.__table__.select()).all()
    keys = [(r.comparison_id, r.labeler_id) for r in found]
    return {k: keys.count(k) for k in keys}


def test_a_labeler_killed_after_commit_is_retried_and_writes_one_row(ray_local, ledger,
                                                                       tmp_path):
    result, pids = crash_and_retry(DiesAfterCommit, ledger, tmp_path)

    assert (tmp_path / "crashed").read_text().split() == pids[:1]  # the first one died
    assert len(pids) == 2 and pids[0] != pids[1]  # Ray restarted it in a new process
    assert result == LabelCounts(repeated=4)  # the retry found all 4 labels recorded
    per_key = rows_per_key(ledger)
    assert len(per_key) == 4 and set(per_key.values()) == {1}
    assert ledger.comparison_counts(CAMPAIGN) == ComparisonCounts(2, 0, 4)


def test_negative_control_a_raw_insert_labeler_fails_its_retry(ray_local, ledger, tmp_path):
    result, pids = crash_and_retry(RawInsertDiesAfterCommit, ledger, tmp_path)

    assert len(pids) == 2 and (tmp_path / "crashed").read_text().split() == pids[:1]
    assert isinstance(result, ray.exceptions.RayTaskError)
    assert "UNIQUE constraint failed" in str(result)  # the retry tried to insert them again
    assert set(rows_per_key(ledger).values()) == {1}  # only the unique index kept it at one
