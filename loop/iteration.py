"""One turn of the online loop, as the design's diagram draws it.

    rollout → pair → label → RM refresh (gated) → PPO → publish → monitors → actions → metrics

`CampaignLoop` owns the actor groups for the whole campaign; `run_iteration(i)` makes one call
per stage and records `timing/<stage>` for each. Everything that must survive a crash is a
ledger row (generations, comparisons, preferences, model versions, metrics, alarms); large
tensors (the rollout batch, weights) travel as ObjectRefs.

An alarm acts on the iterations after it, as `monitors.action` says (`act_on`): PPO pauses, β
rises, or the RM refreshes off schedule; each action taken is a `monitor/action/…` metric, so it
reaches the JSONL log and the ledger's metric rows next to the `monitor/alarm/…` that caused it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from actors.core.judges.gold import Scorer, score_all
from actors.core.monitors import Alarm, MonitorBatch, run_monitors
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
            proxy, ppo = self.optimize(batch)
        with timed(m, "publish"):
            if not ppo["ppo/paused"]:  # a paused iteration leaves the policy as it was
                self.publish_policy()
        with timed(m, "monitors"):
            report = self.monitor(batch, proxy, ppo, refreshed, it)
        actions = self.act_on(report.alarms, it)
        m.update(batch.metrics() | counts.as_metrics() | ppo | report.metrics | actions
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
        if not self.collects_labels():
            return 0
        lab = self.cfg.labeling
        scores = self.ppo.score_members(batch) if lab.selection == "disagreement" else None
        plan = plan_pairs(batch, lab.pairs_per_prompt, lab.selection,
                          self.cfg.campaign.seed * 7919 + iteration, scores)
        self.ledger.add_comparisons(self.cfg.campaign.name, list(plan.comparisons))
        return len(plan.comparisons)

    def collects_labels(self) -> bool:
        """Labels feed RM refreshes only: a frozen RM (rm.refresh_every 0) needs none, unless an
        alarm may force a refresh (monitors.action refresh_rm)."""
        return self.cfg.rm.refresh_every > 0 or self.cfg.monitors.action == "refresh_rm"

    def maybe_refresh_rm(self, iteration: int) -> dict[str, float]:
        """RM refresh every `rm.refresh_every` iterations (0: never), or once
        `rm.refresh_min_labels` new labels exist, or when an alarm forced one; a promoted
        candidate becomes the PPO trainer's reward model."""
        rm, name = self.cfg.rm, self.cfg.campaign.name
        fresh = self.ledger.watermark(name) - self.state.labels_at_refresh
        forced = self.state.force_rm_refresh
        due = forced or (rm.refresh_every > 0 and (iteration + 1) % rm.refresh_every == 0) or (
            rm.refresh_min_labels > 0 and fresh >= rm.refresh_min_labels)
        if not due or fresh <= 0:  # a forced refresh waits for labels to train on
            return {}
        self.state.force_rm_refresh = False
        snap = self.rm.snapshot()  # windowed: fresh labels + the replay window
        self.state.rm_versions += 1
        done = self.rm.refresh(snap, self.state.rm_versions)
        self.state.rm_versions = done.version
        self.state.labels_at_refresh = snap.watermark
        if done.promoted:
            self.ppo.set_reward_model(self.rm.serving.version, self.rm.serving.weights)
        return {"rm/refreshed": 1.0, "rm/promoted": float(done.promoted),
                "rm/forced_refresh": float(forced),
                **{k: v for k, v in done.metrics.items() if k.startswith("rm/")}}

    def optimize(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO: one update on the batch, or, while an alarm pauses PPO, only its rewards.

        Returns:
            The `(N,)` proxy rewards of the batch rows and the `ppo/` metrics, `ppo/paused`
            (1.0 or 0.0) among them.
        """
        if self.state.pause_ppo > 0:
            self.state.pause_ppo -= 1
            return self.ppo.score(batch).rewards, {"ppo/paused": 1.0}
        result = self.ppo.update(batch)
        self.state.last_kl = result.metrics.get("ppo/mean_kl", 0.0)
        return result.rewards, {**result.metrics, "ppo/paused": 0.0}

    def act_on(self, alarms: Sequence[Alarm], iteration: int) -> dict[str, float]:
        """Alarm actions (`monitors.action`), in effect from the next iteration on.

        pause_ppo: the next `monitors.pause_iterations` iterations skip the PPO update.
        raise_beta: β ← β · `monitors.beta_factor` (once per iteration with alarms).
        refresh_rm: the next iteration refreshes the RM whatever `rm.refresh_every` says.

        Returns:
            `monitor/action/<action>` 1.0 when an action was taken (absent otherwise); for
            raise_beta also `monitor/action/kl_coef`, the new β.
        """
        mon = self.cfg.monitors
        if not alarms or mon.action == "none":
            return {}
        metrics = {f"monitor/action/{mon.action}": 1.0}
        if mon.action == "pause_ppo":
            self.state.pause_ppo = max(self.state.pause_ppo, mon.pause_iterations)
            effect = f"PPO paused for the next {mon.pause_iterations} iteration(s)"
        elif mon.action == "raise_beta":
            state = self.ppo.state_dict()
            beta = state["kl"]["value"] * mon.beta_factor
            self.ppo.load_state_dict({**state, "kl": {**state["kl"], "value": beta}})
            metrics["monitor/action/kl_coef"] = beta
            effect = f"KL coefficient β {state['kl']['value']:.4g} → {beta:.4g}"
        else:
            self.state.force_rm_refresh = True
            effect = "the RM refreshes next iteration"
        names = ", ".join(alarm.name for alarm in alarms)
        self.say(f"ACTION {mon.action} after iteration {iteration} ({names}): {effect}")
        return metrics

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
                                kl=ppo.get("ppo/mean_kl", self.state.last_kl),
                                rm_fresh_accuracy=fresh)
        report, self.state.history = run_monitors(observed, self.state.history,
                                                  self.cfg.monitors)
        for alarm in report.alarms:
            self.say(f"ALARM {alarm.name} at iteration {iteration}: {alarm.message}")
        return report
