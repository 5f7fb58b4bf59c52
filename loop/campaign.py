"""The campaign driver: what `prefloop run` (and `python -m loop.main run` under
`ray job submit`) does.

    run directory → ledger → Ray → placement group → RM trainers → seed labels → RM v1 →
    rollout workers, labelers, PPO trainer → iterations of `CampaignLoop.run_iteration`
    (metrics to JSONL, the ledger, the Ray dashboard) → shutdown

One placement group holds a bundle for every actor (`loop.placement`), reserved before any
actor starts. The RM trainer group lives for the whole campaign (`RMService`); the rollout
workers, labelers and the PPO trainer are started once and reused every iteration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from actors.core.judges.factory import make_judge
from actors.core.judges.gold import gold_scorer
from actors.core.metrics import MetricSink
from actors.labeler import LabelerGroup
from actors.ppo_trainer import PPOTrainerGroup
from actors.reward_trainer import RewardTrainerGroup
from actors.rollout import RolloutGroup
from loop.checkpoint import checkpoints_after, latest_checkpoint, load_state, save_checkpoint
from loop.config import Config
from loop.iteration import CampaignLoop, timed
from loop.placement import Placement, plan_bundles, reserve
from loop.progress import CampaignProgress
from loop.prompts import PromptStream, load_prompts
from loop.ray_env import connect
from loop.report import write_report
from loop.rm_refresh import RMService
from loop.run_dir import prepare_run_dir
from loop.seed import load_seed_pairs, resolve_pairs_path, seed_pairs
from loop.sinks import open_sinks
from loop.state import LoopState
from storage.db import resolve_url
from storage.ledger import Ledger


class Reporter:
    """Plain progress lines (what job logs and terminals both read well)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def stamp(self, message: str) -> str:
        """`message` with the time since the campaign started."""
        return f"[prefloop {time.monotonic() - self.t0:7.1f}s] {message}"

    def __call__(self, message: str) -> None:
        print(self.stamp(message), flush=True)


def seed_ledger(cfg: Config, ledger: Ledger, say: Reporter) -> dict[str, float]:
    """Write rm.seed_pairs into the ledger (idempotent: a resumed campaign adds nothing)."""
    path = resolve_pairs_path(cfg.rm.seed_pairs, "rm.seed_pairs")
    loaded = load_seed_pairs(cfg, path)
    seeded = seed_pairs(ledger, cfg.campaign.name, loaded.pairs, source=cfg.rm.seed_pairs,
                        labeler_kind=loaded.labeler_kind, seed=cfg.campaign.seed)
    say(f"seeded the ledger from {path}: {seeded.pairs} pairs, {seeded.created} new "
        f"preferences ({seeded.skipped} skipped: empty or identical replies), "
        f"watermark {seeded.watermark}")
    return {"label/seed_pairs": seeded.pairs, "label/seed_created": seeded.created,
            "label/seed_skipped": seeded.skipped}


def start_rm_group(cfg: Config, rm: RMService, placement: Placement, say: Reporter) -> None:
    """Start the RM trainer ranks in their bundles; the service keeps them for the campaign
    and starts a new group in the same bundles when a rank dies (`RMService.refresh`)."""
    spec = placement.plan.actor_resources("rm-trainer")

    def launch() -> RewardTrainerGroup:
        say(f"starting {cfg.rm.trainers} RM trainer rank(s): {cfg.models.reward.name}, "
            f"DeepSpeed ZeRO-{cfg.rm.zero_stage}, {cfg.rm.ensemble.members} member(s)")
        return RewardTrainerGroup.launch(cfg.rm.trainers, cfg.models.reward, cfg.rm,
                                         cfg.campaign.seed, num_cpus=spec.cpus,
                                         num_gpus=spec.gpus,
                                         scheduling=placement.strategies("rm-trainer"))

    rm.start(launch)


def release_stale_leases(ledger: Ledger, campaign: str, owners: Sequence[str],
                         say: Callable[[str], None]) -> int:
    """Give back the leases these labelers still hold from a run that was stopped (its actors
    died with their leases live): without this their comparisons wait out the lease."""
    released = 0
    for owner in owners:
        held = [c.comparison_id for c in ledger.leased_to(campaign, owner)]
        if held:
            released += ledger.release(campaign, owner, held)
            say(f"released {len(held)} lease(s) that {owner} of an earlier run still held")
    return released


def start_loop(cfg: Config, ledger: Ledger, url: str, rm: RMService, placement: Placement,
               say: Reporter) -> CampaignLoop:
    """Start the rollout workers, labelers and PPO trainer, each in its bundle, around a
    serving RM."""
    name, seed, plan = cfg.campaign.name, cfg.campaign.seed, placement.plan
    say(f"starting {cfg.rollout.workers} rollout worker(s) ({cfg.models.policy.name}), "
        f"{cfg.labeling.labelers} {cfg.labeling.judge} labeler(s), the PPO trainer")
    prompts = PromptStream(tuple(load_prompts(cfg)), seed, cfg.rollout.prompts_per_iteration)
    gold = gold_scorer(cfg.labeling.gold)
    judge = make_judge(cfg.labeling, gold=gold, seed=seed)
    rollout = RolloutGroup.launch(cfg.rollout.workers, cfg.models.policy, cfg.rollout, seed,
                                  ledger_url=url, campaign=name,
                                  num_cpus=plan.actor_resources("rollout").cpus,
                                  max_text_chars=cfg.storage.max_text_chars,
                                  scheduling=placement.strategies("rollout"),
                                  max_restarts=cfg.resources.max_restarts, say=say)
    release_stale_leases(ledger, name, [f"labeler-{i}" for i in range(cfg.labeling.labelers)],
                         say)
    labelers = LabelerGroup.launch(cfg.labeling, url, name, judge,
                                   num_cpus=plan.actor_resources("labeler").cpus,
                                   max_restarts=cfg.resources.max_restarts,
                                   scheduling=placement.strategies("labeler"))
    if not ledger.model_versions(name, "policy"):  # v0: the initial policy, parent of v1
        ledger.record_model_version(name, "policy", 0,
                                    metrics={"model": cfg.models.policy.name})
    ppo_places = placement.strategies("ppo-trainer")
    ppo = PPOTrainerGroup.from_config(cfg, num_cpus=plan.actor_resources("ppo-trainer").cpus,
                                      world_size=len(ppo_places), scheduling=ppo_places)
    ppo.set_reward_model(rm.serving.version, rm.serving.weights)
    return CampaignLoop(cfg, ledger, prompts, rollout, labelers, rm, ppo, gold, say,
                        LoopState(rm_versions=rm.serving.version,
                                  labels_at_refresh=rm.serving.watermark))


def required_cpus(cfg: Config) -> int:
    """Logical CPUs the campaign's actors reserve (a local Ray gets at least that many)."""
    return math.ceil(plan_bundles(cfg).totals()["CPU"])


def reserve_placement(cfg: Config, say: Reporter) -> Placement:
    """Reserve one bundle per actor of the campaign (`loop.placement`), all at once."""
    placement = reserve(plan_bundles(cfg), cfg.resources.placement_timeout_s)
    say(f"placement group reserved on {len(set(placement.nodes()))} node(s): "
        f"{placement.plan.describe()}")
    return placement


def run_campaign(cfg: Config, config_path: Path, resume: Path | None = None) -> None:
    """Run the campaign `cfg` (read from `config_path`), or continue it with `resume`."""
    say = Reporter()
    run_dir = prepare_run_dir(cfg, resume)
    say(f"campaign {cfg.campaign.name!r} from {config_path}; run directory {run_dir}")
    url = resolve_url(cfg.storage.db_url, run_dir)
    ledger = Ledger.open(url, cfg.storage.max_text_chars)  # before Ray: a bad URL fails fast
    name = cfg.campaign.name
    ledger.ensure_campaign(name, cfg.model_dump(mode="json"))
    say(f"ledger: {url}")
    where = connect(required_cpus(cfg), cfg.resources.torch_threads, cfg.metrics.ray_dashboard)
    say(f"Ray: {'joined the cluster' if where == 'cluster' else 'started a local instance'}")
    sink = open_sinks(cfg, run_dir)
    setup: dict[str, float] = {}
    rm = RMService(cfg, ledger, run_dir, say)
    loop: CampaignLoop | None = None
    placement: Placement | None = None
    try:
        placement = reserve_placement(cfg, say)
        start_rm_group(cfg, rm, placement, say)
        if cfg.rm.seed_pairs:
            with timed(setup, "seed"):
                setup.update(seed_ledger(cfg, ledger, say))
        snap = ledger.snapshot(name)
        say(f"ledger snapshot: {len(snap.rows)} preferences at watermark {snap.watermark}, "
            f"sha256 {snap.sha256[:16]}…")
        if rm.restore_serving() is not None:
            say("the first RM exists already (resumed campaign): not retrained")
        elif snap.rows:
            with timed(setup, "rm_refresh"):
                setup.update(rm.refresh(snap, version=1).metrics)
        else:
            raise SystemExit("prefloop: error: the ledger holds no preferences to train the "
                             "first reward model on: set rm.seed_pairs")
        sink.log(setup, step=0)
        ledger.log_metrics(name, 0, setup)
        loop = start_loop(cfg, ledger, url, rm, placement, say)
        resume_from_checkpoint(loop, run_dir, say)
        iterate(loop, cfg, ledger, sink, say, run_dir)
    finally:
        if loop is not None:
            for group in (loop.rollout, loop.labelers, loop.ppo):
                group.shutdown()
        rm.shutdown()
        if placement is not None:
            placement.remove()
        sink.close()
    page = write_report(run_dir)
    say(f"done; metrics in {run_dir / 'metrics.jsonl'}; the Goodhart report: {page}")


def resume_from_checkpoint(loop: CampaignLoop, run_dir: Path, say: Reporter) -> None:
    """Continue from the newest complete checkpoint, if any: the PPO trainer's weights,
    optimizer, KL controller and RNG; the loop state; the RM that was serving; the rollout
    workers get the checkpointed policy version."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return
    state, serving = load_state(found)
    loop.ppo.load_checkpoint(found / "ppo")
    rm = loop.rm.restore_serving(serving)
    loop.ppo.set_reward_model(rm.version, rm.weights)
    loop.rollout.publish(state.policy_version, loop.ppo.publish(state.policy_version))
    existing = [v.version for v in loop.ledger.model_versions(loop.cfg.campaign.name, "rm")]
    state.rm_versions = max(existing)  # versions trained after the checkpoint keep their rows
    loop.state = state
    say(f"resumed from {found}: iteration {state.iteration}, policy v{state.policy_version}, "
        f"serving RM v{serving}")


def iterate(loop: CampaignLoop, cfg: Config, ledger: Ledger, sink: MetricSink,
            say: Reporter, run_dir: Path) -> None:
    """Run the remaining iterations, logging each one's metrics everywhere, checkpointing
    every campaign.checkpoint_every iterations and after the last (with no batch sampled ahead
    pending: `CampaignLoop.sample_ahead`)."""
    total = cfg.campaign.iterations
    with CampaignProgress(cfg.metrics.progress, total, loop.state.iteration) as progress:
        while loop.state.iteration < total:
            start = time.perf_counter()
            metrics = loop.run_iteration()
            step = loop.state.iteration
            metrics["timing/iteration"] = time.perf_counter() - start
            sink.log(metrics, step=step)
            ledger.log_metrics(cfg.campaign.name, step, metrics)
            latest = (f"reward {metrics.get('ppo/mean_reward', float('nan')):.3f}, gold "
                      f"{metrics.get('monitor/gold_mean', float('nan')):.3f}, KL "
                      f"{metrics.get('ppo/mean_kl', float('nan')):.3f}")
            progress.advance(step, say.stamp(
                f"iteration {step}/{total}: {latest}, {int(metrics['label/labeled'])} labels, "
                f"policy v{loop.state.policy_version}, RM v{loop.rm.serving.version} "
                f"({metrics['timing/iteration']:.1f}s)"), latest)
            if checkpoints_after(step, cfg.campaign.checkpoint_every, total):
                if loop.ahead is not None:  # CampaignLoop.sample_ahead never crosses one
                    raise RuntimeError(f"iteration {step}: a batch sampled ahead is pending at "
                                       "a checkpoint; a resumed campaign would not have it")
                path = save_checkpoint(run_dir, loop.state, loop.rm.serving.version,
                                       loop.ppo.save_checkpoint)
                say(f"checkpoint {path}")
