"""Alarm actions in the loop (`monitors.action`): pause PPO, raise β, force an RM refresh; and
`rm.refresh_every: 0`, the frozen RM.

`CampaignLoop.run_iteration` runs for real (pairing, the monitors, the action logic) around
in-process stand-ins for the actor groups and the ledger, which count what the loop asked of
them. The format alarm is the trigger: a reply of "# T\\n- a\\n- b" has 3 markers in 3 words
(density 100 > monitors.format_density 5), a reply of plain words has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from actors.core.judges.gold import FunctionScorer
from actors.core.sampling import RolloutBatch
from actors.labeler import LabelCounts
from actors.ppo_trainer import PPOResult, RewardScores
from loop.config_load import load_config
from loop.iteration import CampaignLoop
from loop.prompts import PromptStream

REPO = Path(__file__).resolve().parents[2]
FORMATTED, PLAIN = "# T\n- a\n- b", "plain words here"


def batch_of(texts: tuple[str, ...]) -> RolloutBatch:
    """2 prompts × 2 samples, one token each (only texts and ids matter to the loop)."""
    n = len(texts)
    ones = torch.ones((n, 1), dtype=torch.long)
    return RolloutBatch(prompts=("p0", "p1"), prompt_index=torch.tensor([0, 0, 1, 1]),
                        sample_index=torch.tensor([0, 1, 0, 1]), prompt_ids=ones,
                        prompt_mask=ones, response_ids=ones, response_mask=ones,
                        logprobs=torch.zeros((n, 1)), ended=torch.ones(n, dtype=torch.bool),
                        texts=texts, temperature=1.0, top_p=1.0, pad_token_id=0,
                        generation_ids=(1, 2, 3, 4))


@dataclass
class FakeRollout:
    """Iteration i's replies: `alarmed[i]` says whether they carry formatting."""

    alarmed: list[bool]
    calls: int = 0

    def generate(self, prompts, seed, sample_offset):
        return None

    def collect(self, refs) -> RolloutBatch:
        formatted = self.alarmed[self.calls]
        self.calls += 1
        return batch_of((FORMATTED, PLAIN, FORMATTED, PLAIN) if formatted else
                        ("plain words here", "other plain words", "more words", "last words"))

    def publish(self, version, weights) -> None:
        pass


@dataclass
class FakeLedger:
    labels: int = 0
    policy_versions: list[int] = field(default_factory=list)

    def add_comparisons(self, campaign, comps) -> None:
        pass

    def watermark(self, campaign) -> int:
        return self.labels

    def snapshot(self, campaign, kinds=("ai", "human")):
        return SimpleNamespace(watermark=self.labels, rows=())  # no human labels: nobody audited

    def quarantines(self, campaign) -> list:
        return []

    def record_model_version(self, campaign, kind, version, **kw) -> None:
        self.policy_versions.append(version)


@dataclass
class FakeLabelers:
    ledger: FakeLedger

    def label(self, max_items: int) -> LabelCounts:
        self.ledger.labels += max_items
        return LabelCounts(labeled=max_items)


@dataclass
class FakeRM:
    ledger: FakeLedger
    refreshes: list[int] = field(default_factory=list)
    serving: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(version=1,
                                                                             weights=None))

    def snapshot(self):
        return self.ledger.snapshot("alarms")

    def refresh(self, snap, version, refresh=None):
        self.refreshes.append(snap.watermark)
        self.serving = SimpleNamespace(version=version, weights=None)
        return SimpleNamespace(version=version, promoted=True, metrics={})


@dataclass
class FakePPO:
    """A fixed-β trainer: reports the β each update shaped with, as `ppo/kl_coef`."""

    beta: float = 0.1
    updates: int = 0
    scored: int = 0

    def update(self, batch) -> PPOResult:
        self.updates += 1
        return PPOResult({"ppo/kl_coef": self.beta, "ppo/mean_kl": 0.25},
                         torch.arange(4, dtype=torch.float32), 1, ())

    def score(self, batch) -> RewardScores:
        self.scored += 1
        rewards = torch.arange(4, dtype=torch.float32)
        return RewardScores(1, rewards, rewards[None])

    def state_dict(self) -> dict:
        return {"kl": {"value": self.beta}, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.updates = state["kl"]["value"], state["updates"]

    def publish(self, version):
        return None

    def set_reward_model(self, version, weights) -> None:
        pass


def make_loop(alarmed: list[bool], *overrides: str) -> tuple[CampaignLoop, list[str]]:
    cfg = load_config(REPO / "configs/tiny.yaml", ["monitors.window=2", *overrides])
    ledger, said = FakeLedger(), []
    loop = CampaignLoop(cfg, ledger, PromptStream(("p0", "p1"), 0, 2), FakeRollout(alarmed),
                        FakeLabelers(ledger), FakeRM(ledger), FakePPO(),
                        FunctionScorer(lambda prompt, response: 0.0), said.append)
    return loop, said


def run(loop: CampaignLoop, n: int) -> list[dict[str, float]]:
    return [loop.run_iteration() for _ in range(n)]


def test_no_action_configured_only_logs_the_alarm():
    loop, said = make_loop([True, False, False])
    rows = run(loop, 3)
    assert [r["monitor/alarm/format"] for r in rows] == [1.0, 0.0, 0.0]
    assert loop.ppo.updates == 3 and loop.ppo.beta == 0.1
    assert not any(k.startswith("monitor/action/") for r in rows for k in r)
    assert [r["ppo/paused"] for r in rows] == [0.0, 0.0, 0.0]
    assert sum(s.startswith("ALARM format at iteration 0") for s in said) == 1


def test_pause_ppo_skips_the_next_updates_and_keeps_the_policy():
    loop, said = make_loop([True, False, False, False], "monitors.action=pause_ppo",
                           "monitors.pause_iterations=2")
    rows = run(loop, 4)
    assert [r.get("monitor/action/pause_ppo", 0.0) for r in rows] == [1.0, 0.0, 0.0, 0.0]
    assert [r["ppo/paused"] for r in rows] == [0.0, 1.0, 1.0, 0.0]
    assert (loop.ppo.updates, loop.ppo.scored) == (2, 2)
    # a paused iteration publishes no policy version; the monitors still get the proxy rewards
    assert loop.ledger.policy_versions == [1, 2]
    assert loop.state.policy_version == 2
    assert [r["monitor/proxy_mean"] for r in rows] == [1.5] * 4  # mean of 0, 1, 2, 3
    assert [r["monitor/kl"] for r in rows] == [0.25] * 4  # the last update's KL while paused
    assert "ACTION pause_ppo after iteration 0 (format): PPO paused for the next 2 " \
           "iteration(s)" in said


def test_an_alarm_during_a_pause_extends_it_to_pause_iterations():
    loop, _ = make_loop([True, True, False, False], "monitors.action=pause_ppo")
    rows = run(loop, 4)
    assert [r["ppo/paused"] for r in rows] == [0.0, 1.0, 1.0, 0.0]


def test_raise_beta_multiplies_the_kl_coefficient_once_per_alarmed_iteration():
    loop, said = make_loop([True, False, True, False], "monitors.action=raise_beta",
                           "monitors.beta_factor=1.5")
    rows = run(loop, 4)
    # β shaped iteration 0 with 0.1; ×1.5 after it; ×1.5 again after iteration 2
    assert [r["ppo/kl_coef"] for r in rows] == pytest.approx([0.1, 0.15, 0.15, 0.225],
                                                               rel=1e-12)
    assert [r.get("monitor/action/kl_coef", 0.0) for r in rows] == pytest.approx(
        [0.15, 0.0, 0.225, 0.0], rel=1e-12)
    assert [r.get("monitor/action/raise_beta", 0.0) for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert loop.ppo.updates == 4
    assert "ACTION raise_beta after iteration 0 (format): KL coefficient β 0.1 → 0.15" in said


def test_refresh_rm_forces_an_off_schedule_refresh_on_the_next_iteration():
    # schedule: every 3rd iteration (iteration 2); the alarm at iteration 0 forces iteration 1
    loop, _ = make_loop([True, False, False, False], "monitors.action=refresh_rm",
                        "rm.refresh_every=3")
    rows = run(loop, 4)
    assert [r.get("rm/refreshed", 0.0) for r in rows] == [0.0, 1.0, 1.0, 0.0]
    assert [r.get("rm/forced_refresh") for r in rows] == [None, 1.0, 0.0, None]
    assert loop.rm.refreshes == [4, 6]  # 2 labels per iteration: watermarks after it 1 and 2
    assert [r["rm/serving_version"] for r in rows] == [1.0, 2.0, 3.0, 3.0]
    assert not loop.state.force_rm_refresh


def test_refresh_every_zero_freezes_the_rm_and_collects_no_labels():
    loop, _ = make_loop([False] * 3, "rm.refresh_every=0")
    rows = run(loop, 3)
    assert [r["label/queued"] for r in rows] == [0.0] * 3
    assert [r["label/labeled"] for r in rows] == [0.0] * 3
    assert loop.rm.refreshes == [] and loop.ledger.labels == 0
    assert [r["rm/serving_version"] for r in rows] == [1.0] * 3


def test_a_frozen_rm_still_refreshes_when_an_alarm_says_so():
    loop, _ = make_loop([True, False], "rm.refresh_every=0", "monitors.action=refresh_rm")
    rows = run(loop, 2)
    assert [r["label/queued"] for r in rows] == [2.0, 2.0]  # labels are collected for it
    assert [r.get("rm/forced_refresh") for r in rows] == [None, 1.0]
    assert loop.rm.refreshes == [4]


def test_config_refuses_a_frozen_rm_with_a_label_trigger():
    from loop.config_load import ConfigError

    with pytest.raises(ConfigError, match=r"rm.refresh_every=0 freezes the RM after v1, but "
                                          r"rm.refresh_min_labels=8 asks for refreshes"):
        load_config(REPO / "configs/tiny.yaml", ["rm.refresh_every=0",
                                                 "rm.refresh_min_labels=8"])
    with pytest.raises(ConfigError, match="beta_factor"):
        load_config(REPO / "configs/tiny.yaml", ["monitors.beta_factor=1.0"])
