"""RM refresh: train a reward model on a ledger snapshot, evaluate it, register it.

The training set is exactly `ledger.snapshot(...)` at a watermark, and the RM version row stores
that watermark and the snapshot's sha256, so "what did RM vM train on" is a ledger query that
rebuilds the same rows with the same hash.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray

from actors.core.bradley_terry import PairMetrics
from actors.core.hh import PreferencePair, load_hh_jsonl
from actors.reward_trainer import RewardTrainerGroup
from loop.config import Config
from loop.seed import resolve_pairs_path
from storage.errors import VersionExists
from storage.ledger import Ledger
from storage.records import Snapshot
from storage.weights import WeightStore, WeightVersion, open_weight_store

WEIGHTS_ENV = "PREFLOOP_WEIGHTS_URI"


@dataclass(frozen=True)
class RMRefresh:
    """One trained and registered RM version."""

    version: int
    pairs: int
    ties_skipped: int
    weight_uri: str
    metrics: dict[str, float]


def snapshot_pairs(snap: Snapshot) -> tuple[list[PreferencePair], int]:
    """Bradley–Terry pairs of a snapshot (winner first) and the number of ties left out."""
    pairs = []
    for row in snap.rows:
        if row.choice == "tie":
            continue
        chosen, rejected = (row.text_a, row.text_b) if row.choice == "a" else (row.text_b,
                                                                              row.text_a)
        pairs.append(PreferencePair(row.prompt, chosen, rejected, margin=row.strength or 0.0))
    return pairs, len(snap.rows) - len(pairs)


def weights_location(cfg: Config, run_dir: Path) -> str:
    """`storage.weights_uri`, else $PREFLOOP_WEIGHTS_URI, else `<run_dir>/weights`."""
    return cfg.storage.weights_uri or os.environ.get(WEIGHTS_ENV) or str(run_dir / "weights")


def refresh_rm(cfg: Config, ledger: Ledger, snap: Snapshot, run_dir: Path, version: int,
               say: Callable[[str], None]) -> RMRefresh:
    """Train RM `version` on `snap` under DeepSpeed, evaluate, publish, record it with the
    snapshot's watermark and hash."""
    name = cfg.campaign.name
    pairs, ties = snapshot_pairs(snap)
    say(f"RM v{version}: training {cfg.models.reward.name} on {len(pairs)} pairs "
        f"(snapshot watermark {snap.watermark}) with {cfg.rm.trainers} DeepSpeed ZeRO-"
        f"{cfg.rm.zero_stage} rank(s), {cfg.rm.epochs} epoch(s)")
    group = RewardTrainerGroup.launch(cfg.rm.trainers, cfg.models.reward, cfg.rm,
                                      cfg.campaign.seed, num_cpus=cfg.resources.cpus_per_actor)
    try:
        fit = group.fit(ray.put(pairs))
        metrics = {**fit.metrics, "rm/train_pairs": float(len(pairs)), "rm/steps": fit.steps}
        say(f"RM v{version}: {fit.steps} steps, loss {fit.history[0]['rm/loss']:.4f} → "
            f"{fit.final_loss:.4f}, {fit.metrics['rm/pairs_per_s']:.1f} pairs/s")
        if cfg.rm.eval_pairs:
            held = evaluate_held_out(group, cfg)
            metrics.update({"rm/eval_accuracy": held.accuracy, "rm/eval_ece": held.ece,
                            "rm/eval_mean_margin": held.mean_margin})
            say(f"RM v{version}: held-out accuracy {held.accuracy:.3f} (ECE {held.ece:.3f}) "
                f"on {cfg.rm.eval_pairs}")
        store = open_weight_store(weights_location(cfg, run_dir))
        published = publish_new_version(store, version, lambda d: group.save(d), say)
        version = published.version
    finally:
        group.shutdown()
    ledger.record_model_version(name, "rm", version, snapshot=snap.ref, metrics=metrics,
                                weight_uri=published.uri)
    say(f"RM v{version}: published to {published.uri}")
    return RMRefresh(version, len(pairs), ties, published.uri, metrics)


def publish_new_version(store: WeightStore, version: int, write: Callable[[Path], object],
                        say: Callable[[str], None]) -> WeightVersion:
    """Publish at `version`, or past it when the store already holds that version.

    Versions are immutable, and a run killed after publishing but before the ledger recorded
    the version leaves an orphan behind: the new weights take the next free version instead
    (the ledger never references the orphan).
    """
    start = max([version, *(v + 1 for v in store.versions("rm"))])
    for candidate in range(start, start + 10):
        try:
            return store.publish("rm", candidate, write)
        except VersionExists:
            say(f"weight store already holds rm v{candidate} (an interrupted publish): skipping")
    raise VersionExists(f"rm: no free version in v{start}..v{start + 9}")


def evaluate_held_out(group: RewardTrainerGroup, cfg: Config) -> PairMetrics:
    """Pairwise accuracy / ECE on the held-out pairs (never trained on)."""
    path = resolve_pairs_path(cfg.rm.eval_pairs, "rm.eval_pairs")
    return group.evaluate(load_hh_jsonl(path, limit=cfg.rm.eval_max_pairs))
