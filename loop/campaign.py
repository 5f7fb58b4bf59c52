"""The campaign driver: what `prefloop run` (and `python -m loop.main run` under
`ray job submit`) does.

    run directory → ledger → Ray → seed labels → RM v1 → actor groups →
    iterations of `CampaignLoop.run_iteration` (metrics to JSONL, the ledger, the Ray
    dashboard) → shutdown

The RM trainer group lives for the whole campaign (`RMService`); the rollout workers, labelers
and the PPO trainer are started once and reused every iteration.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from actors.core.judges.factory import make_judge
from actors.core.judges.gold import gold_scorer
from actors.core.metrics import JsonlSink, MetricSink, MultiSink
from actors.labeler import LabelerGroup
from actors.metrics_exporter import DashboardSink
from actors.ppo_trainer import PPOTrainerGroup
from actors.rollout import RolloutGroup
from loop.checkpoint import latest_checkpoint, load_state, save_checkpoint
from loop.config import Config
from loop.iteration import CampaignLoop, timed
from loop.prompts import PromptStream, load_prompts
from loop.ray_env import connect
from loop.report import write_report
from loop.rm_refresh import RMService
from loop.run_dir import prepare_run_dir
from loop.seed import load_seed_pairs, resolve_pairs_path, seed_pairs
from loop.state import LoopState
from storage.db import resolve_url
from storage.ledger import Ledger


class Reporter:
    """Plain progress lines (what job logs and terminals both read well)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[prefloop {time.monotonic() - self.t0:7.1f}s] {message}", flush=True)


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


def start_loop(cfg: Config, ledger: Ledger, url: str, rm: RMService,
               say: Reporter) -> CampaignLoop:
    """Start the rollout workers, labelers and PPO trainer around a serving RM."""
    name, seed, cpus = cfg.campaign.name, cfg.campaign.seed, cfg.resources.cpus_per_actor
    say(f"starting {cfg.rollout.workers} rollout worker(s) ({cfg.models.policy.name}), "
        f"{cfg.labeling.labelers} {cfg.labeling.judge} labeler(s), the PPO trainer")
    prompts = PromptStream(tuple(load_prompts(cfg)), seed, cfg.rollout.prompts_per_iteration)
    gold = gold_scorer(cfg.labeling.gold)
    judge = make_judge(cfg.labeling, gold=gold, seed=seed)
    rollout = RolloutGroup.launch(cfg.rollout.workers, cfg.models.policy, cfg.rollout, seed,
                                  ledger_url=url, campaign=name, num_cpus=cpus,
                                  max_text_chars=cfg.storage.max_text_chars)
    labelers = LabelerGroup.launch(cfg.labeling, url, name, judge, num_cpus=min(cpus, 0.5),
                                   max_restarts=cfg.resources.max_restarts)
    if not ledger.model_versions(name, "policy"):  # v0: the initial policy, parent of v1
        ledger.record_model_version(name, "policy", 0,
                                    metrics={"model": cfg.models.policy.name})
    ppo = PPOTrainerGroup.from_config(cfg, num_cpus=cpus)
    ppo.set_reward_model(rm.serving.version, rm.serving.weights)
    return CampaignLoop(cfg, ledger, prompts, rollout, labelers, rm, ppo, gold, say,
                        LoopState(rm_versions=rm.serving.version,
                                  labels_at_refresh=rm.serving.watermark))


def required_cpus(cfg: Config) -> int:
    """Logical CPUs the campaign's actors reserve (a local Ray gets at least that many)."""
    cpus = cfg.resources.cpus_per_actor
    total = (cfg.rm.trainers + cfg.rollout.workers + 1) * cpus + cfg.labeling.labelers * min(
        cpus, 0.5)
    return math.ceil(total)


def open_sinks(cfg: Config, run_dir: Path) -> MetricSink:
    sinks: list[MetricSink] = [JsonlSink(run_dir / "metrics.jsonl")]
    if cfg.metrics.ray_dashboard:
        sinks.append(DashboardSink(cfg.campaign.name))
    return MultiSink(sinks)


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
    try:
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
        loop = start_loop(cfg, ledger, url, rm, say)
        resume_from_checkpoint(loop, run_dir, say)
        iterate(loop, cfg, ledger, sink, say, run_dir)
    finally:
        if loop is not None:
            for group in (loop.rollout, loop.labelers, loop.ppo):
                group.shutdown()
        rm.shutdown()
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
    every campaign.checkpoint_every iterations and after the last."""
    total = cfg.campaign.iterations
    while loop.state.iteration < total:
        start = time.perf_counter()
        metrics = loop.run_iteration()
        step = loop.state.iteration
        metrics["timing/iteration"] = time.perf_counter() - start
        sink.log(metrics, step=step)
        ledger.log_metrics(cfg.campaign.name, step, metrics)
        say(f"iteration {step}/{total}: reward {metrics.get('ppo/mean_reward', float('nan')):.3f}"
            f", gold {metrics.get('monitor/gold_mean', float('nan')):.3f}, KL "
            f"{metrics.get('ppo/mean_kl', float('nan')):.3f}, {int(metrics['label/labeled'])} "
            f"labels, policy v{loop.state.policy_version}, RM v{loop.rm.serving.version} "
            f"({metrics['timing/iteration']:.1f}s)")
        if step % cfg.campaign.checkpoint_every == 0 or step == total:
            path = save_checkpoint(run_dir, loop.state, loop.rm.serving.version,
                                   loop.ppo.save_checkpoint)
            say(f"checkpoint {path}")
