"""One turn of the online loop, as the design's diagram draws it.

    rollout → pair → label → RM refresh (gated) → PPO → publish → monitors → metrics

`CampaignLoop` owns the actor groups for the whole campaign; `run_iteration(i)` makes one call
per stage and records `timing/<stage>` for each. Everything that must survive a crash is a
ledger row (generations, comparisons, preferences, model versions, metrics, alarms); large
tensors (the rollout batch, weights) travel as ObjectRefs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray
import torch

from actors.core.judges.gold import Scorer, score_all
from actors.core.monitors import MonitorBatch, run_monitors
from actors.core.sampling import RolloutBatch
from actors.labeler import LabelerGroup
from actors.ppo_trainer import PPOTrainerGroup
from actors.rollout import RolloutGroup
from loop.config import Config
from loop.pairing import plan_pairs
from loop.prompts import PromptStream
from loop.rm_refresh import RMService
from loop.state import LoopState
from storage.ledger import Ledger


@contextmanager
def timed(metrics: dict[str, float], stage: str):
    """Record the wall time of the block as `timing/<stage>`."""
    start = time.perf_counter()
    yield
    metrics[f"timing/{stage}"] = time.perf_counter() - start


@dataclass
class CampaignLoop:
    """The actor groups and handles of one running campaign."""

    cfg: Config
    ledger: Ledger
    prompts: PromptStream
    rollout: RolloutGroup
    labelers: LabelerGroup
    rm: RMService
    ppo: PPOTrainerGroup
    gold: Scorer
    say: Callable[[str], None]
    state: LoopState = field(default_factory=LoopState)

    def run_iteration(self) -> dict[str, float]:
        """One turn of the loop; returns the iteration's metrics (all prefixes)."""
        m: dict[str, float] = {}
        it = self.state.iteration
        with timed(m, "rollout"):
            batch = self.generate(it)
        with timed(m, "pair"):
            queued = self.queue_pairs(batch, it)
        with timed(m, "label"):
            counts = self.labelers.label(queued)
        with timed(m, "rm_refresh"):
            refreshed = self.maybe_refresh_rm(it)
        with timed(m, "ppo"):
            result = self.ppo.update(ray.put(batch))
        with timed(m, "publish"):
            self.publish_policy()
        with timed(m, "monitors"):
            report = self.monitor(batch, result.rewards, result.metrics, refreshed, it)
        m.update(batch.metrics() | counts.as_metrics() | result.metrics | report.metrics
                 | {"label/queued": float(queued), "rm/serving_version":
                    float(self.rm.serving.version)} | refreshed)
        self.state.iteration += 1
        return m

    def generate(self, iteration: int) -> RolloutBatch:
        """Rollout: this iteration's prompts, K samples each, logged with the policy version."""
        prompts = self.prompts.batch(iteration)
        seed = self.cfg.campaign.seed * 100_003 + iteration
        refs = self.rollout.generate(prompts, seed=seed,
                                     sample_offset=iteration * self.cfg.rollout.samples_per_prompt)
        return self.rollout.collect(refs)

    def queue_pairs(self, batch: RolloutBatch, iteration: int) -> int:
        """Pair: queue comparisons of this batch's samples; returns how many were queued."""
        lab = self.cfg.labeling
        scores = self.ppo.score_members(batch) if lab.selection == "disagreement" else None
        plan = plan_pairs(batch, lab.pairs_per_prompt, lab.selection,
                          self.cfg.campaign.seed * 7919 + iteration, scores)
        self.ledger.add_comparisons(self.cfg.campaign.name, list(plan.comparisons))
        return len(plan.comparisons)

    def maybe_refresh_rm(self, iteration: int) -> dict[str, float]:
        """RM refresh every `rm.refresh_every` iterations, or once `rm.refresh_min_labels` new
        labels exist; a promoted candidate becomes the PPO trainer's reward model."""
        rm, name = self.cfg.rm, self.cfg.campaign.name
        fresh = self.ledger.watermark(name) - self.state.labels_at_refresh
        due = (iteration + 1) % rm.refresh_every == 0 or (
            rm.refresh_min_labels > 0 and fresh >= rm.refresh_min_labels)
        if not due or fresh <= 0:
            return {}
        snap = self.ledger.snapshot(name)
        self.state.rm_versions += 1
        done = self.rm.refresh(snap, self.state.rm_versions)
        self.state.rm_versions = done.version
        self.state.labels_at_refresh = snap.watermark
        if done.promoted:
            self.ppo.set_reward_model(self.rm.serving.version, self.rm.serving.weights)
        return {"rm/refreshed": 1.0, "rm/promoted": float(done.promoted),
                **{k: v for k, v in done.metrics.items() if k.startswith("rm/")}}

    def publish_policy(self) -> None:
        """Publish: the updated policy to the rollout workers (one ray.put) and the ledger."""
        version = self.state.policy_version + 1
        weights = self.ppo.publish(version)
        self.rollout.publish(version, weights)
        self.ledger.record_model_version(self.cfg.campaign.name, "policy", version,
                                         parent_version=self.state.policy_version,
                                         metrics={"rm_version": self.rm.serving.version})
        self.state.policy_version = version

    def monitor(self, batch: RolloutBatch, proxy: torch.Tensor, ppo: dict[str, float],
                refreshed: dict[str, float], iteration: int):
        """Monitors: gold vs proxy, length/format/confidence/sycophancy, KL; alarms logged."""
        prompts = [batch.prompts[i] for i in batch.prompt_index.tolist()]
        gold = torch.tensor(score_all(self.gold, prompts, list(batch.texts)))
        fresh = refreshed.get("rm/fresh_accuracy")
        observed = MonitorBatch(prompts=tuple(prompts), responses=batch.texts,
                                proxy=proxy.float().tolist(), gold=gold.tolist(),
                                iteration=iteration,
                                kl=ppo.get("ppo/mean_kl", 0.0), rm_fresh_accuracy=fresh)
        report, self.state.history = run_monitors(observed, self.state.history,
                                                  self.cfg.monitors)
        for alarm in report.alarms:
            self.say(f"ALARM {alarm.name} at iteration {iteration}: {alarm.message}")
        return report
