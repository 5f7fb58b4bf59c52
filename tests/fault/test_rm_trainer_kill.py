"""Issue #9, item 1 (and issue #7): RM-trainer ranks killed mid-training; the refreshes finish.

A real `RMService` with a 2-rank DeepSpeed ZeRO-2 group on Ray and a real SQLite ledger and
weight store runs four refreshes (v1 from the backbone, v2–v4 warm-started) on labels submitted
to the ledger between them. A background thread `ray.kill`s a rank three times, each while
`fit` runs: the test's trainer class is the production `RewardTrainer` with a marker file
written when `fit` starts (and another when it returns) and a short sleep per step, so a fit
lasts seconds and the killer fires 0.5 s after the marker — mid-fit, which the missing
"returned" marker of every killed fit confirms. Kills: rank 1 in v1's fit, then rank 0 and rank
1 in two successive tries of v3 (v2's and v4's fits run undisturbed).

Asserted: every refresh finishes, with `rm/restarts` 1, 0, 2, 0 and `RMService.restarts` 3;
the service started four groups and every rank of the three discarded ones is dead (a gloo group
cannot take back one restarted rank, so the whole group goes); RM versions are 1, 2, 3, 4 —
strictly increasing, one ledger row each — and each row (status, parent, snapshot watermark and
hash, the training metrics) and each published weight equals that of the same refreshes run
undisturbed on an identical ledger; preference rows = labels submitted, with no duplicate
(comparison, labeler).

Negative control (fast, ~40 s; the kill test is `slow`, ~200 s): with `rm.max_restarts=0` the
same kill fails the first refresh with `RMTrainerDied` naming the version and the death, the
surviving rank is killed too, and nothing is recorded or published.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray
import torch
from ray import cloudpickle
from sqlalchemy import func, select

import actors.reward_trainer as reward_trainer
from actors.core.ensemble import load_reward_model
from actors.core.hh import PreferencePair
from actors.reward_trainer import RewardTrainerGroup
from loop.config import Config
from loop.config_load import load_config
from loop.rm_refresh import RMRefresh, RMService, RMTrainerDied
from loop.seed import seed_pairs
from storage.ledger import Ledger
from storage.models import Preference

pytestmark = pytest.mark.timeout(1800)  # DeepSpeed group starts: slow on 2 cores

CAMPAIGN = "rmkill"
OVERRIDES = [f"campaign.name={CAMPAIGN}", "rm.seed_pairs=null", "rm.eval_pairs=null",
             "rm.trainers=2", "rm.zero_stage=2", "rm.micro_batch_size=4", "rm.epochs=2",
             "rm.lr=0.001", "rm.fresh_eval_fraction=0.25", "rm.replay_fraction=0.5",
             "rm.promotion_min_pairs=4", "rm.promotion_tolerance=1.0"]
BATCHES = [48, 32, 32, 32]
"""Labels submitted before each refresh (v1 trains on the first 48)."""
STEP_S = 0.25
"""Sleep per training step: a fit of ≥ 8 steps lasts ≥ 2 s."""
KILL_DELAY_S = 0.5
"""The killer fires this long after a fit's start marker."""
KILLS = {0: 1, 3: 0, 4: 1}
"""Fit call (0-based, counted over the run) → the rank killed during it: v1's first try, v3's
first and second tries."""
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/


def synthetic_pairs(start: int, n: int) -> list[PreferencePair]:
    topics = ["rain", "bread", "maps", "tea", "bikes", "stars", "clay", "boats"]
    return [PreferencePair(f"Human: tell me about {topics[i % 8]} {i}\n\nAssistant:",
                           f"gladly, here is a careful answer about {topics[i % 8]}",
                           f"no about {topics[i % 8]}")
            for i in range(start, start + n)]


def marked_trainer(marks: Path):
    """The production `RewardTrainer`, slowed per step, with start/return markers per fit."""

    class MarkedTrainer(reward_trainer.RewardTrainer.__ray_actor_class__):
        def fit(self, *args, **kwargs):
            stamp = f"{time.time_ns()}-r{self.rank}-p{os.getpid()}"
            (marks / f"fit-{stamp}").write_text("")
            history = super().fit(*args, **kwargs)
            (marks / f"done-{stamp}").write_text("")
            return history

        def _step(self, batch, counts):
            time.sleep(STEP_S)
            return super()._step(batch, counts)

    return ray.remote(num_cpus=1)(MarkedTrainer)


class Killer(threading.Thread):
    """Kills rank KILLS[n] (`ray.kill`, by its actor name) KILL_DELAY_S after fit call n
    starts; fit calls are counted by rank 0's start markers."""

    def __init__(self, marks: Path, kills: dict[int, int]):
        super().__init__(daemon=True)
        self.marks, self.kills = marks, kills
        self.done = threading.Event()
        self.killed: list[tuple[int, int, str]] = []  # (fit call, rank, its start marker)
        self.error: BaseException | None = None

    def fit_starts(self, rank: int) -> list[str]:
        return sorted(p.name for p in self.marks.glob(f"fit-*-r{rank}-*"))

    def run(self) -> None:
        handled = 0
        try:
            while not self.done.is_set():
                starts = self.fit_starts(0)
                while handled < len(starts):
                    rank = self.kills.get(handled)
                    if rank is not None:
                        time.sleep(KILL_DELAY_S)
                        victim = self.fit_starts(rank)[-1]  # this fit's, on the victim rank
                        ray.kill(ray.get_actor(f"rm-trainer-{rank}"))
                        self.killed.append((handled, rank, victim))
                    handled += 1
                time.sleep(0.02)
        except BaseException as err:  # surfaced by the test
            self.error = err


def start_service(cfg: Config, ledger: Ledger, run_dir: Path, lines: list[str],
                  groups: list[list]) -> RMService:
    """An `RMService` started with a launch callable (as `campaign.start_rm_group` does) that
    also records the ranks of every group it starts."""
    service = RMService(cfg, ledger, run_dir, lines.append)

    def launch() -> RewardTrainerGroup:
        group = RewardTrainerGroup.launch(cfg.rm.trainers, cfg.models.reward, cfg.rm,
                                          cfg.campaign.seed, num_cpus=0.25)
        groups.append(list(group.actors))
        return group

    service.start(launch)
    return service


def run_refreshes(cfg: Config, run_dir: Path, on_start: Callable[[], None] = lambda: None
                  ) -> tuple[list[RMRefresh], RMService, Ledger, list[list], list[str]]:
    """Submit BATCHES[i] labels, then refresh v(i + 1), for each i."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite")
    ledger.ensure_campaign(CAMPAIGN)
    lines: list[str] = []
    groups: list[list] = []
    service = start_service(cfg, ledger, run_dir, lines, groups)
    on_start()
    done, start = [], 0
    try:
        for version, n in enumerate(BATCHES, 1):
            seed_pairs(ledger, CAMPAIGN, synthetic_pairs(start, n), source=f"batch-{version}")
            start += n
            snap = service.snapshot()
            done.append(service.refresh(snap, version))
    finally:
        service.shutdown()
    return done, service, ledger, groups, lines


def is_dead(actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=60)
    except ray.exceptions.RayActorError:
        return True
    return False


def version_rows(ledger: Ledger) -> list[tuple]:
    """Per RM version what must not depend on the kills (timings and throughput do)."""
    rows = []
    for v in ledger.model_versions(CAMPAIGN, "rm"):
        metrics = {k: round(float(x), 9) for k, x in v.metrics.items()
                   if not k.startswith("timing/") and k != "rm/pairs_per_s"}
        rows.append((v.version, v.status, v.parent_version, v.snapshot.watermark,
                     v.snapshot.sha256, metrics))
    return rows


@pytest.fixture
def tiny_cfg(monkeypatch, tmp_path):
    """The tiny config for these refreshes, with the marked trainer class in place."""
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setattr(reward_trainer, "RewardTrainer", marked_trainer(marks))

    def make(*extra: str) -> Config:
        return load_config("configs/tiny.yaml", [*OVERRIDES, *extra,
                                                 f"campaign.run_dir={tmp_path}"])
    return make, marks


@pytest.mark.slow  # five group starts: ~200 s on 2 cores
def test_three_rank_kills_mid_fit_restart_the_group_and_every_refresh_finishes(
        ray_local, tiny_cfg, tmp_path):
    make, marks = tiny_cfg
    cfg = make()
    assert cfg.rm.max_restarts == 3  # the default
    calm, _, calm_ledger, calm_groups, _ = run_refreshes(cfg, tmp_path / "undisturbed")
    assert len(calm_groups) == 1 and [r.metrics["rm/restarts"] for r in calm] == [0.0] * 4
    for stale in marks.iterdir():  # the killer counts the fits of the killed run only
        stale.unlink()

    killer = Killer(marks, KILLS)
    try:
        done, service, ledger, groups, lines = run_refreshes(cfg, tmp_path / "killed",
                                                             on_start=killer.start)
    finally:
        killer.done.set()
        killer.join(timeout=10)
    assert killer.error is None, repr(killer.error)

    # three kills, each mid-fit: the killed fit never returned on the killed rank
    assert [(n, rank) for n, rank, _ in killer.killed] == sorted(KILLS.items())
    for _, _, victim in killer.killed:
        assert not (marks / victim.replace("fit-", "done-", 1)).exists(), victim
    assert len(killer.fit_starts(0)) == 7  # 4 refreshes + 3 retried fits

    # every refresh finished; restarts counted; four groups, the discarded three all dead
    assert [r.version for r in done] == [1, 2, 3, 4]
    assert [r.metrics["rm/restarts"] for r in done] == [1.0, 0.0, 2.0, 0.0]
    assert service.restarts == 3
    assert len(groups) == 4 and all(is_dead(rank) for group in groups for rank in group)
    restarted = [line for line in lines if "an RM trainer rank died" in line]
    assert len(restarted) == 3 and "ActorDiedError" in restarted[0], restarted

    # versions strictly increasing, one row each, equal to the undisturbed refreshes
    rows = version_rows(ledger)
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert rows == version_rows(calm_ledger)
    assert [r.promoted for r in done] == [r.promoted for r in calm]
    for version in (1, 2, 3, 4):
        got = load_reward_model(tmp_path / f"killed/weights/rm/v{version}").state_dict()
        want = load_reward_model(tmp_path / f"undisturbed/weights/rm/v{version}").state_dict()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    assert sorted(p.name for p in (tmp_path / "killed/weights/rm").iterdir()) == [
        "v1", "v2", "v3", "v4"]  # no orphan from an interrupted publish

    # preference rows = labels submitted; no duplicate (comparison, labeler)
    with ledger.engine.connect() as conn:
        total = conn.scalar(select(func.count()).select_from(Preference))
        distinct = conn.scalar(select(func.count()).select_from(
            select(Preference.comparison_id, Preference.labeler_id).distinct().subquery()))
    assert total == distinct == sum(BATCHES)


def test_negative_control_no_restarts_allowed_fails_the_refresh_with_a_clear_error(
        ray_local, tiny_cfg, tmp_path):
    make, marks = tiny_cfg
    cfg = make("rm.max_restarts=0")
    ledger = Ledger.open(f"sqlite:///{tmp_path}/ledger.sqlite")
    ledger.ensure_campaign(CAMPAIGN)
    seed_pairs(ledger, CAMPAIGN, synthetic_pairs(0, BATCHES[0]), source="batch-1")
    groups: list[list] = []
    service = start_service(cfg, ledger, tmp_path, [], groups)
    killer = Killer(marks, {0: 1})
    killer.start()
    try:
        with pytest.raises(RMTrainerDied) as raised:
            service.refresh(service.snapshot(), version=1)
    finally:
        killer.done.set()
        killer.join(timeout=10)
        service.shutdown()
    message = str(raised.value)
    assert message.startswith("RM v1: the RM trainer group lost a rank 1 time(s)")
    assert "rm.max_restarts=0" in message and "1) ActorDiedError" in message
    assert [(n, rank) for n, rank, _ in killer.killed] == [(0, 1)]
    assert service.group is None and len(groups) == 1
    assert all(is_dead(rank) for rank in groups[0])  # the survivor was killed too
    assert ledger.model_versions(CAMPAIGN, "rm") == []
    assert not (tmp_path / "weights/rm").exists() or not any(
        (tmp_path / "weights/rm").iterdir())
