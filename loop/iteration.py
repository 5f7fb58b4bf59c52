"""One turn of the online loop, as the design's diagram draws it.

    rollout → pair → audit → label → RM refresh (gated) → PPO → publish → monitors → actions

`CampaignLoop` owns the actor groups for the whole campaign; `run_iteration(i)` makes one call
per stage and records `timing/<stage>` for each. Everything that must survive a crash is a
ledger row (generations, comparisons, preferences, model versions, metrics, alarms); large
tensors (the rollout batch, weights) travel as ObjectRefs.

Synchronous by default. With `campaign.overlap_rollout`, iteration i starts the rollout of
batch i+1 once batch i is labeled, while the workers still hold v_i, and RM refresh and PPO run
meanwhile; the driver waits for that batch before it publishes v_{i+1}:

    rollout i ─ pair ─ label ─ sample ahead ─ RM refresh ─ PPO ─ rollout wait ─ publish v_{i+1} …
                                    └── batch i+1 sampled by v_i ──────────┘

so batch i+1 trains v_{i+1} one version stale, never more (`check_staleness`); PPO weights it
(`ppo.stale_is_cap`), and the ledger's policy row records the batch's version and staleness.
No batch is sampled ahead across a checkpoint (`loop.checkpoint.checkpoints_after`): a resumed
campaign runs the same iterations as an uninterrupted one.

The audit quarantines human annotators who disagree with the other labelers of the same
comparisons far more than honest noise explains (`loop.audit`); their labels leave every RM
refresh from this iteration's on.

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
from loop.audit import audit_campaign
from loop.checkpoint import checkpoints_after
from loop.config import Config
from loop.pairing import plan_pairs
from loop.prompts import PromptStream
from loop.rm_refresh import RMService
from loop.state import LoopState
from storage.ledger import Ledger

MAX_STALENESS = 1
"""Policy versions a trained batch may lag the policy it trains (`campaign.overlap_rollout`)."""


class StalenessError(RuntimeError):
    """A rollout batch sampled by a policy older than the staleness bound reached PPO."""


def check_staleness(sampled: int, current: int, bound: int = MAX_STALENESS) -> int:
    """How many versions a batch sampled by policy `sampled` lags the policy `current` that it
    trains; `StalenessError` when that is more than `bound` (or negative)."""
    lag = current - sampled
    if not 0 <= lag <= bound:
        raise StalenessError(
            f"a rollout batch sampled by policy v{sampled} would train policy v{current}: "
            f"{lag} version(s) stale, outside [0, {bound}] (campaign.overlap_rollout samples "
            "at most one version ahead)")
    return lag


@dataclass(frozen=True)
class Rollout:
    """One iteration's rollout batch and the policy version that sampled it.

    Attributes:
        iteration: The iteration whose prompts it answers.
        policy_version: The batch's own stamp (the worker's weights), or, for a batch without
            one, the version the driver had published when it asked.
        batch: The `RolloutBatch`.
    """

    iteration: int
    policy_version: int
    batch: RolloutBatch


@dataclass(frozen=True)
class PendingRollout:
    """A rollout the workers were asked for and the driver has not collected yet.

    Attributes:
        iteration: The iteration whose prompts it answers.
        asked_at: The policy version the workers held when asked.
        handle: What `RolloutGroup.generate` returned, for `RolloutGroup.collect`.
    """

    iteration: int
    asked_at: int
    handle: object


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
    ahead: Rollout | None = None
    """The next iteration's batch, sampled during this one (overlap; never checkpointed)."""

    def run_iteration(self) -> dict[str, float]:
        """One turn of the loop; returns the iteration's metrics (all prefixes)."""
        m: dict[str, float] = {}
        it = self.state.iteration
        with timed(m, "rollout"):
            rollout, staleness = self.take_rollout(it)
            batch = rollout.batch
        with timed(m, "pair"):
            queued = self.queue_pairs(batch, it)
        with timed(m, "audit"):  # before labeling: this iteration's labels pass a quarantine
            audited = self.audit_annotators(it)
        with timed(m, "label"):
            counts = self.labelers.label(queued)
        with timed(m, "sample_ahead"):  # overlap: batch i+1 samples from here to rollout_wait
            pending = self.sample_ahead(it + 1)
        with timed(m, "rm_refresh"):
            refreshed = self.maybe_refresh_rm(it)
        with timed(m, "ppo"):
            proxy, ppo = self.optimize(batch)
        with timed(m, "rollout_wait"):  # batch i+1 is done before v_{i+1} reaches the workers
            self.ahead = self.finish(pending)
        with timed(m, "publish"):
            if not ppo["ppo/paused"]:  # a paused iteration leaves the policy as it was
                self.publish_policy(rollout.policy_version, staleness)
        with timed(m, "monitors"):
            report = self.monitor(batch, proxy, ppo, refreshed, it)
        actions = self.act_on(report.alarms, it)
        m.update(batch.metrics() | counts.as_metrics() | ppo | report.metrics | actions
                 | {"label/queued": float(queued), "rm/serving_version":
                    float(self.rm.serving.version), "rollout/staleness": float(staleness),
                    "rollout/policy_version": float(rollout.policy_version)} | refreshed
                 | audited)
        self.state.iteration += 1
        return m

    def take_rollout(self, iteration: int) -> tuple[Rollout, int]:
        """Rollout: this iteration's batch — sampled during the last iteration (overlap), or
        now — and its staleness, checked against `MAX_STALENESS`."""
        rollout, self.ahead = self.ahead, None
        if rollout is None:
            rollout = self.finish(self.start_rollout(iteration))
        if rollout.iteration != iteration:
            raise RuntimeError(f"iteration {iteration} was handed the batch of iteration "
                               f"{rollout.iteration}")
        return rollout, check_staleness(rollout.policy_version, self.state.policy_version)

    def start_rollout(self, iteration: int) -> PendingRollout:
        """Ask the workers for this iteration's prompts, K samples each, logged with the policy
        version they hold (generation runs in the workers; nothing waits here)."""
        prompts = self.prompts.batch(iteration)
        seed = self.cfg.campaign.seed * 100_003 + iteration
        handle = self.rollout.generate(
            prompts, seed=seed, sample_offset=iteration * self.cfg.rollout.samples_per_prompt)
        return PendingRollout(iteration, self.state.policy_version, handle)

    def finish(self, pending: PendingRollout | None) -> Rollout | None:
        """Wait for a started rollout and collect its batch (None: none was started)."""
        if pending is None:
            return None
        batch = self.rollout.collect(pending.handle)
        version = pending.asked_at if batch.policy_version is None else batch.policy_version
        return Rollout(pending.iteration, version, batch)

    def sample_ahead(self, iteration: int) -> PendingRollout | None:
        """Overlap: start the rollout of `iteration` now, while the workers hold the policy
        that this iteration's PPO updates. Never across a checkpoint (the batch would not
        survive a resume) nor past the last iteration; None when not started."""
        c = self.cfg.campaign
        if not c.overlap_rollout or checkpoints_after(iteration, c.checkpoint_every,
                                                      c.iterations):
            return None
        return self.start_rollout(iteration)

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

    def audit_annotators(self, iteration: int) -> dict[str, float]:
        """Audit every `labeling.audit.every` iterations: quarantine the human annotators who
        disagree with the others too often (`loop.audit`). It runs before the iteration's
        labels are recorded, so they lift the watermark above the quarantine's and the next RM
        refresh trains without the quarantined annotators.

        Returns:
            `label/audited_annotators` and `label/quarantined` (annotators quarantined in the
            campaign so far); nothing when no audit was due.
        """
        audit = self.cfg.labeling.audit
        if audit.every == 0 or iteration % audit.every:
            return {}
        outcome = audit_campaign(self.ledger, self.cfg.campaign.name, audit, apply=True)
        for verdict in outcome.flagged:
            self.say(f"quarantined annotator {verdict.labeler_id!r} from RM training: "
                     f"{verdict.reason}")
        return {"label/audited_annotators": float(len(outcome.audits)),
                "label/quarantined": float(len(outcome.earlier) + len(outcome.quarantined))}

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
        self.state.rm_refreshes += 1
        done = self.rm.refresh(snap, self.state.rm_versions, self.state.rm_refreshes)
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

    def publish_policy(self, rollout_version: int, staleness: int) -> None:
        """Publish: the updated policy to the rollout workers (one ray.put) and the ledger,
        whose row names the RM it optimized and the policy version that sampled its batch."""
        version = self.state.policy_version + 1
        weights = self.ppo.publish(version)
        self.rollout.publish(version, weights)
        self.ledger.record_model_version(
            self.cfg.campaign.name, "policy", version, parent_version=self.state.policy_version,
            metrics={"rm_version": self.rm.serving.version,
                     "rollout_policy_version": rollout_version, "staleness": staleness})
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
