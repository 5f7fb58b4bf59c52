"""`campaign.overlap_rollout`: the next rollout overlaps RM refresh and PPO, one version stale.

Two halves. In process: `CampaignLoop.run_iteration` runs for real around stand-ins for the actor
groups that behave like Ray actors where it matters — a rollout worker answers calls in the order
they were made, so a generate asked before a publish samples with the old weights — and that log
every call, so the tests read the stage order, each batch's policy version and what the ledger
was told. End to end: real tiny campaigns (Ray, DeepSpeed, SQLite ledger) with overlap on, one
uninterrupted and one that crashes with a batch sampled ahead already in the ledger and resumes;
both must leave the same ledger.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sqlalchemy import select

from actors.core.judges.gold import FunctionScorer
from actors.core.metrics import read_jsonl
from actors.core.sampling import RolloutBatch
from actors.labeler import LabelCounts
from actors.ppo_trainer import PPOResult, RewardScores
from loop.checkpoint import checkpoints_after
from loop.config_load import ConfigError, load_config
from loop.iteration import CampaignLoop, StalenessError, check_staleness
from loop.prompts import PromptStream
from storage.ledger import Ledger
from storage.models import Generation, Prompt

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FORMATTED, PLAIN = "# T\n- a\n- b", "plain words here"
"""Replies that raise the format alarm (3 markers in 3 words) and replies that do not."""


# -- in process: stand-ins that log what the loop asks, in order ----------------------------

@dataclass
class Log:
    events: list[tuple] = field(default_factory=list)

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]


def batch_of(texts: tuple[str, ...], version: int) -> RolloutBatch:
    """2 prompts × 2 samples, one token each, stamped with the version that sampled them."""
    ones = torch.ones((4, 1), dtype=torch.long)
    return RolloutBatch(prompts=("p0", "p1"), prompt_index=torch.tensor([0, 0, 1, 1]),
                        sample_index=torch.tensor([0, 1, 0, 1]), prompt_ids=ones,
                        prompt_mask=ones, response_ids=ones, response_mask=ones,
                        logprobs=torch.zeros((4, 1)), ended=torch.ones(4, dtype=torch.bool),
                        texts=texts, temperature=1.0, top_p=1.0, pad_token_id=0,
                        policy_version=version, generation_ids=(1, 2, 3, 4))


@dataclass
class FakeRollout:
    """One worker: a generate samples with the weights it holds when the call is made (a Ray
    actor runs its calls in order, so a publish made later waits behind it). `formatted` lists
    the iterations whose replies raise the format alarm; `lag` makes a broken worker that stamps
    its batches `lag` versions older than it holds."""

    log: Log
    formatted: frozenset[int] = frozenset()
    lag: int = 0
    version: int = 0

    def generate(self, prompts, seed, sample_offset):
        iteration = sample_offset // 2  # tiny.yaml: 2 samples per prompt
        self.log.events.append(("generate", iteration, self.version))
        texts = (FORMATTED, PLAIN, FORMATTED, PLAIN) if iteration in self.formatted else (
            "plain words here", "other plain words", "more words", "last words")
        return SimpleNamespace(iteration=iteration,  # a handle, passed through untouched
                               batch=batch_of(texts, max(self.version - self.lag, 0)))

    def collect(self, handle) -> RolloutBatch:
        self.log.events.append(("collect", handle.iteration))
        return handle.batch

    def publish(self, version, weights) -> None:
        self.log.events.append(("publish", version))
        self.version = version


@dataclass
class FakeLedger:
    log: Log
    labels: int = 0
    policy_rows: dict[int, dict] = field(default_factory=dict)

    def add_comparisons(self, campaign, comps) -> None:
        pass

    def watermark(self, campaign) -> int:
        return self.labels

    def snapshot(self, campaign, kinds=("ai", "human")):
        return SimpleNamespace(watermark=self.labels, rows=())  # no human labels: nobody audited

    def quarantines(self, campaign) -> list:
        return []

    def record_model_version(self, campaign, kind, version, parent_version=None,
                             metrics=None) -> None:
        self.policy_rows[version] = {"parent": parent_version, **metrics}


@dataclass
class FakeLabelers:
    ledger: FakeLedger

    def label(self, max_items: int) -> LabelCounts:
        self.ledger.log.events.append(("label",))
        self.ledger.labels += max_items
        return LabelCounts(labeled=max_items)


@dataclass
class FakeRM:
    ledger: FakeLedger
    serving: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(version=1,
                                                                             weights=None))

    def snapshot(self):
        return self.ledger.snapshot("overlap")

    def refresh(self, snap, version, refresh=None):
        self.ledger.log.events.append(("rm_refresh",))
        self.serving = SimpleNamespace(version=version, weights=None)
        return SimpleNamespace(version=version, promoted=True, metrics={})


@dataclass
class FakePPO:
    """Logs the version of each batch it trains and the version its weights are at."""

    log: Log
    published: int = 0

    def update(self, batch) -> PPOResult:
        self.log.events.append(("ppo_update", batch.policy_version, self.published))
        return PPOResult({"ppo/kl_coef": 0.1, "ppo/mean_kl": 0.25},
                         torch.arange(4, dtype=torch.float32), 1, ())

    def score(self, batch) -> RewardScores:
        self.log.events.append(("ppo_score", batch.policy_version))
        rewards = torch.arange(4, dtype=torch.float32)
        return RewardScores(1, rewards, rewards[None])

    def publish(self, version):
        self.published = version

    def set_reward_model(self, version, weights) -> None:
        pass


def make_loop(*overrides: str, formatted=frozenset(), lag: int = 0) -> CampaignLoop:
    cfg = load_config(REPO / "configs/tiny.yaml", ["monitors.window=2", *overrides])
    log = Log()
    ledger = FakeLedger(log)
    return CampaignLoop(cfg, ledger, PromptStream(("p0", "p1"), 0, 2),
                        FakeRollout(log, frozenset(formatted), lag), FakeLabelers(ledger),
                        FakeRM(ledger), FakePPO(log), FunctionScorer(lambda p, r: 0.0),
                        lambda line: None)


def run(loop: CampaignLoop) -> list[dict[str, float]]:
    """Iterate to the end as `loop.campaign.iterate` does; at every checkpoint step, check that
    no batch sampled ahead is pending."""
    rows, c = [], loop.cfg.campaign
    while loop.state.iteration < c.iterations:
        rows.append(loop.run_iteration())
        step = loop.state.iteration
        assert (loop.ahead is None) == checkpoints_after(step, c.checkpoint_every,
                                                         c.iterations), step
    return rows


OVERLAP = ("campaign.overlap_rollout=true", "campaign.iterations=6", "campaign.checkpoint_every=3")


def test_synchronous_by_default_every_batch_is_sampled_by_the_policy_it_trains():
    loop = make_loop("campaign.iterations=3")
    rows = run(loop)
    log = loop.ppo.log
    assert log.of("generate") == [("generate", 0, 0), ("generate", 1, 1), ("generate", 2, 2)]
    assert [(v, at) for _, v, at in log.of("ppo_update")] == [(0, 0), (1, 1), (2, 2)]
    assert [r["rollout/staleness"] for r in rows] == [0.0, 0.0, 0.0]
    assert loop.ledger.policy_rows[3] == {"parent": 2, "rm_version": 4,
                                          "rollout_policy_version": 2, "staleness": 0}
    first = log.events[:7]  # iteration 0, stage by stage
    assert first == [("generate", 0, 0), ("collect", 0), ("label",), ("rm_refresh",),
                     ("ppo_update", 0, 0), ("publish", 1), ("generate", 1, 1)]


def test_overlap_samples_the_next_batch_during_rm_refresh_and_ppo_one_version_stale():
    loop = make_loop(*OVERLAP)
    rows = run(loop)
    log = loop.ppo.log
    # batch i+1 is asked for after batch i is labeled, under v_i, except across the checkpoint
    # after iteration 2 (3 % checkpoint_every = 0) and past the last iteration
    assert log.of("generate") == [("generate", 0, 0), ("generate", 1, 0), ("generate", 2, 1),
                                  ("generate", 3, 3), ("generate", 4, 3), ("generate", 5, 4)]
    trained = [(v, at) for _, v, at in log.of("ppo_update")]
    assert trained == [(0, 0), (0, 1), (1, 2), (3, 3), (3, 4), (4, 5)]
    assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert [r["rollout/policy_version"] for r in rows] == [0.0, 0.0, 1.0, 3.0, 3.0, 4.0]
    # stage by stage: batch i+1 starts once batch i is labeled, RM refresh and PPO run while
    # it samples, and it is collected before v_{i+1} goes out; iteration 1 trains batch 1,
    # which iteration 0 collected, so it asks the workers for nothing of its own
    assert log.events[:14] == [
        ("generate", 0, 0), ("collect", 0), ("label",), ("generate", 1, 0), ("rm_refresh",),
        ("ppo_update", 0, 0), ("collect", 1), ("publish", 1),
        ("label",), ("generate", 2, 1), ("rm_refresh",), ("ppo_update", 0, 1), ("collect", 2),
        ("publish", 2)]
    rows_by_version = loop.ledger.policy_rows
    assert [(rows_by_version[v]["rollout_policy_version"], rows_by_version[v]["staleness"])
            for v in range(1, 7)] == [(0, 0), (0, 1), (1, 1), (3, 0), (3, 1), (4, 1)]
    assert all(rows_by_version[v]["parent"] == v - 1 for v in range(1, 7))
    for row in rows:
        assert {"timing/rollout", "timing/sample_ahead", "timing/rollout_wait",
                "timing/publish"} <= set(row)


def test_pause_ppo_still_samples_and_the_next_batch_is_fresh():
    loop = make_loop(*OVERLAP, "monitors.action=pause_ppo", formatted={0})
    rows = run(loop)
    assert [r["ppo/paused"] for r in rows] == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    log = loop.ppo.log
    # iteration 1 (paused) trains nothing and publishes nothing, yet batch 2 was sampled
    # ahead under v1, which iteration 2 then trains: no staleness
    assert log.of("ppo_score") == [("ppo_score", 0)]
    assert ("generate", 2, 1) in log.events
    assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert log.of("publish") == [("publish", v) for v in (1, 2, 3, 4, 5)]
    assert loop.ledger.policy_rows[2]["rollout_policy_version"] == 1  # v2 trained batch 2
    assert rows[1]["monitor/proxy_mean"] == 1.5  # the monitors still saw the paused batch


def test_the_staleness_bound_is_one_version():
    assert check_staleness(5, 5) == 0
    assert check_staleness(4, 5) == 1
    with pytest.raises(StalenessError, match=r"sampled by policy v3 would train policy v5: 2 "
                                             r"version\(s\) stale, outside \[0, 1\]"):
        check_staleness(3, 5)
    with pytest.raises(StalenessError, match="-1 version"):
        check_staleness(6, 5)  # sampled by a policy newer than the trained one


def test_a_batch_two_versions_old_stops_the_loop():
    """Negative control: a worker that stamps its batches two versions behind."""
    loop = make_loop(*OVERLAP, lag=2)
    loop.run_iteration()  # v0 sampled v0 (clamped at 0)
    loop.run_iteration()  # batch 1 sampled ahead at v0, trains v1: one version
    with pytest.raises(StalenessError, match="sampled by policy v0 would train policy v2"):
        loop.run_iteration()
    assert len(loop.ppo.log.of("ppo_update")) == 2  # PPO never saw it


def test_config_refuses_overlap_with_a_checkpoint_every_iteration():
    with pytest.raises(ConfigError, match=r"campaign.overlap_rollout=true samples no batch "
                                          r"ahead across a checkpoint, and "
                                          r"campaign.checkpoint_every=1"):
        load_config(REPO / "configs/tiny.yaml", ["campaign.overlap_rollout=true"])
    with pytest.raises(ConfigError, match=r"ppo\.stale_is_cap"):
        load_config(REPO / "configs/tiny.yaml", ["ppo.stale_is_cap=0.5"])
    cfg = load_config(REPO / "configs/tiny.yaml", list(OVERLAP))
    assert cfg.campaign.overlap_rollout and cfg.ppo.stale_is_cap == 2.0


# -- end to end: real tiny campaigns ---------------------------------------------------------

RUN = ["campaign.name=overlap", "campaign.iterations=4", "campaign.checkpoint_every=2",
       "campaign.overlap_rollout=true", "metrics.progress=lines"]
"""Iterations 0 and 2 sample the next batch ahead; 1 and 3 precede checkpoints it-2, it-4."""
STALENESS = [0.0, 1.0, 0.0, 1.0]
SAMPLED_BY = [0, 0, 2, 2]
"""The policy version that sampled each iteration's batch."""


def prefloop(*args: str, child: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(HERE / "crash_child.py"), "sample_ahead"] if child else ["-m", "loop.main", "run"]
    return subprocess.run([sys.executable, *cmd, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def overlap_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("overlap") / "full"
    result = prefloop("configs/tiny.yaml", f"campaign.run_dir={run_dir}", *RUN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def ledger_of(run_dir: Path) -> Ledger:
    return Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite")


def generations(run_dir: Path) -> list[tuple[int, str, str, int]]:
    """(sample index, prompt, text, policy version) of every rollout generation, sorted."""
    with ledger_of(run_dir).engine.connect() as conn:
        rows = conn.execute(select(Generation.sample_index, Prompt.text, Generation.text,
                                   Generation.policy_version)
                            .join(Prompt, Prompt.id == Generation.prompt_id)
                            .where(Generation.worker.like("rollout-%"))).all()
    return sorted(tuple(r) for r in rows)


def policy_rows(run_dir: Path) -> list[tuple[int, int | None, object, object]]:
    """(version, parent, version that sampled its batch, staleness) of every policy row."""
    return [(v.version, v.parent_version, v.metrics.get("rollout_policy_version"),
             v.metrics.get("staleness"))
            for v in ledger_of(run_dir).model_versions("overlap", "policy")]


def test_an_overlap_campaign_trains_each_batch_one_version_stale(overlap_run):
    rows = [r for r in read_jsonl(overlap_run / "metrics.jsonl") if r["step"] >= 1]
    assert [r["rollout/staleness"] for r in rows] == STALENESS
    assert [r["rollout/policy_version"] for r in rows] == SAMPLED_BY
    for row, stale in zip(rows, STALENESS, strict=True):
        assert row["timing/rollout_wait"] >= 0 and row["timing/sample_ahead"] >= 0
        if stale:  # the trainer saw an older batch and weighted it
            assert row["ppo/staleness"] == 1.0
            assert 0.0 < row["ppo/is_weight_mean"] <= 2.0
            assert 0.0 <= row["ppo/is_capped_frac"] <= 1.0
            assert row["ppo/sampler_logprob_gap"] > 1e-3  # the policy moved since sampling
        else:
            assert "ppo/staleness" not in row and "ppo/is_weight_mean" not in row
            assert row["ppo/sampler_logprob_gap"] < 1e-3
    assert policy_rows(overlap_run) == [(0, None, None, None), (1, 0, 0, 0), (2, 1, 0, 1),
                                        (3, 2, 2, 0), (4, 3, 2, 1)]


def test_every_generation_and_preference_has_a_known_policy_version(overlap_run):
    ledger = ledger_of(overlap_run)
    sampled = Counter(version for *_, version in generations(overlap_run))
    assert set(sampled) == {0, 2}  # 2 batches of 4 prompts × 2 each (empty replies unlogged)
    assert 0 < sampled[0] <= 16 and 0 < sampled[2] <= 16
    known = {v.version for v in ledger.model_versions("overlap", "policy")}
    labels = ledger.snapshot("overlap", kinds=("ai",)).rows
    assert labels
    assert all({r.policy_version_a, r.policy_version_b} <= known & {0, 2} for r in labels)
    keys = [(r.comparison_id, r.labeler_id) for r in labels]
    assert len(keys) == len(set(keys))
    assert sorted(p.name for p in (overlap_run / "checkpoints").iterdir()) == [
        "it-000002", "it-000004"]


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory) -> tuple[Path, dict, str]:
    """The same campaign crashed in iteration 2 once batch 3, sampled ahead by v2, is in the
    ledger (`crash_child.py sample_ahead`), then resumed with `prefloop run --resume`.

    The crash comes before the iteration's RM refresh, so the RM versions keep their numbers; a
    crash after one is `test_resume_mid_iteration`'s."""
    run_dir = tmp_path_factory.mktemp("overlap") / "crashed"
    crashed = prefloop("configs/tiny.yaml", f"campaign.run_dir={run_dir}", *RUN, child=True)
    assert crashed.returncode != 0 and "injected crash with batch 3 sampled ahead" in (
        crashed.stderr), crashed.stdout[-2000:] + crashed.stderr[-3000:]
    at_crash = {"checkpoints": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
                "generations": generations(run_dir), "policies": policy_rows(run_dir),
                "rms": rm_rows(run_dir)}
    resumed = prefloop("configs/tiny.yaml", f"campaign.run_dir={run_dir}", *RUN,
                       "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return run_dir, at_crash, resumed.stdout


def rm_rows(run_dir: Path) -> list[tuple[int, str, int, int | None]]:
    """(version, status, snapshot watermark, parent) of every RM row."""
    return [(v.version, v.status, v.snapshot.watermark, v.parent_version)
            for v in ledger_of(run_dir).model_versions("overlap", "rm")]


@pytest.mark.timeout(1800)
def test_a_crashed_overlap_campaign_resumes_to_the_same_ledger(overlap_run,
                                                               crashed_and_resumed):
    run_dir, at_crash, out = crashed_and_resumed
    # the crash lost a batch sampled ahead whose rows (v2, sample indices 6 and 7) were written
    assert at_crash["checkpoints"] == ["it-000002"]
    assert {(s, v) for s, _, _, v in at_crash["generations"]} >= {(6, 2), (7, 2)}
    assert [p[0] for p in at_crash["policies"]] == [0, 1, 2]
    assert [r[0] for r in at_crash["rms"]] == [1, 2, 3]
    assert f"resumed from {run_dir / 'checkpoints/it-000002'}: iteration 2, policy v2" in out
    # the resumed campaign sampled it again, identically, and ended where the uninterrupted
    # one did: the same generations, policy and RM versions, labels
    assert generations(run_dir) == generations(overlap_run)
    full, resumed = (ledger_of(d) for d in (overlap_run, run_dir))
    assert ([(v.version, v.parent_version, v.metrics) for v in resumed.model_versions(
        "overlap", "policy")] == [(v.version, v.parent_version, v.metrics)
                                  for v in full.model_versions("overlap", "policy")])
    assert rm_rows(run_dir) == rm_rows(overlap_run)

    def content(ledger):
        return sorted((r.text_a, r.text_b, r.choice, r.policy_version_a, r.policy_version_b)
                      for r in ledger.snapshot("overlap", kinds=("ai",)).rows)

    assert content(resumed) == content(full)  # each comparison labeled once, the same way
    keys = [(r.comparison_id, r.labeler_id)
            for r in resumed.snapshot("overlap", kinds=("ai",)).rows]
    assert len(keys) == len(set(keys))
    last = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}  # the resumed rows
    for want in read_jsonl(overlap_run / "metrics.jsonl")[1:]:
        got = last[want["step"]]
        for key in [k for k in want if k.startswith(("ppo/", "rollout/", "monitor/"))
                    and not k.endswith("per_s")]:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["step"], key)
