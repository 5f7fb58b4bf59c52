"""The campaign's reward model: one long-lived DeepSpeed group, refreshes, the promotion gate.

    rm = RMService(cfg, ledger, run_dir, say)
    first = rm.refresh(ledger.snapshot(name), version=1)   # trains on the seed pairs
    ...                                                    # labels of the current policy arrive
    later = rm.refresh(rm.snapshot(), version=2)           # warm start, fresh + replay, gate
    rm.serving.weights                                     # ObjectRef for the PPO trainer
    rm.shutdown()

Every refresh trains on a ledger snapshot split by `actors.core.refresh_split`:
the labels since the serving RM's snapshot (fresh) plus a bounded replay of older ones, minus a
stable held-out share of fresh comparisons that no RM ever trains on. `snapshot()` reads only a
window of the ledger (the fresh labels and the last `rm.replay_window` trainable ones before
them), recorded with the version, so a refresh costs the same at 1k or 100k labels and its
training set still rebuilds from the ledger with its hash. The candidate starts from
the serving RM's weights (a warm start with a fresh optimizer), is judged against the serving RM
on the held-out fresh pairs (or, with too few of them, on the fixed reference set rm.eval_pairs),
and is served only if it is not worse. Promoted or rejected, its weights go to the weight store
and its row — with the snapshot's watermark and hash, its parent, the split and the verdict —
to the ledger, so "what did RM vM train on" is a ledger query.

A rank that dies mid-refresh (a Ray actor death) cannot rejoin its gloo/NCCL group, so the
service replaces the whole group: it kills every rank, starts a new group the way the first was
started (`start(launch)` remembers how), and retries the refresh from the start — the warm start
from the serving RM included — at most `rm.max_restarts` times per refresh. Nothing is written
to the weight store or the ledger before the group's last call, so a retried refresh publishes
and records exactly what an undisturbed one would; `rm/restarts` counts the restarts.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayError

from actors.core.bradley_terry import PairMetrics
from actors.core.ensemble import load_reward_model
from actors.core.hh import PreferencePair, load_hh_jsonl
from actors.core.refresh_split import (
    GateDecision,
    older_trainable,
    promotion_gate,
    split_refresh,
)
from actors.core.weight_transport import pack_state
from actors.reward_trainer import FitResult, RewardTrainerGroup
from loop.config import Config
from loop.seed import resolve_pairs_path
from storage.errors import VersionExists
from storage.ledger import Ledger
from storage.records import Snapshot, SnapshotRow
from storage.weights import LocalWeightStore, WeightStore, WeightVersion, open_weight_store

WEIGHTS_ENV = "PREFLOOP_WEIGHTS_URI"
ACTOR_DEATHS = (RayActorError, ActorDiedError, ActorUnavailableError)
"""What a group call raises when a rank died (the last two subclass the first)."""
Launch = Callable[[], RewardTrainerGroup]
"""Starts a new RM trainer group (all ranks set up together)."""


class RMTrainerDied(RuntimeError):
    """An RM refresh lost its trainer group more often than `rm.max_restarts` allows."""


@dataclass(frozen=True)
class ServingRM:
    """The RM the policy is optimized against.

    Attributes:
        version: Its version.
        watermark: Watermark of the snapshot it trained on (labels after it are fresh).
        weights: ObjectRef of its `pack_state` weights (the hot path to PPO and to warm starts).
    """

    version: int
    watermark: int
    weights: ray.ObjectRef


@dataclass(frozen=True)
class RMRefresh:
    """One trained, published and registered RM version and the gate's verdict."""

    version: int
    pairs: int
    ties_skipped: int
    weight_uri: str
    promoted: bool
    reason: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class _Candidate:
    """A trained, judged and published candidate: everything a refresh writes to the ledger,
    computed before any ledger write (so a rank's death never leaves a partial record)."""

    pairs: int
    ties: int
    decision: GateDecision
    metrics: dict[str, float]
    published: WeightVersion
    state: dict | None
    """The candidate's full state when it is promoted (the next serving RM), else None."""


def row_pair(row: SnapshotRow, human_weight: float) -> PreferencePair | None:
    """The Bradley–Terry pair of a snapshot row (winner first), None for a tie."""
    if row.choice == "tie":
        return None
    chosen, rejected = (row.text_a, row.text_b) if row.choice == "a" else (row.text_b, row.text_a)
    return PreferencePair(row.prompt, chosen, rejected, margin=row.strength or 0.0,
                          weight=human_weight if row.labeler_kind == "human" else 1.0)


def rows_to_pairs(rows: Sequence[SnapshotRow], human_weight: float = 1.0
                  ) -> tuple[list[PreferencePair], int]:
    """Pairs of the rows and the number of ties left out."""
    pairs = [p for p in (row_pair(r, human_weight) for r in rows) if p is not None]
    return pairs, len(rows) - len(pairs)


def weights_location(cfg: Config, run_dir: Path) -> str:
    """`storage.weights_uri`, else $PREFLOOP_WEIGHTS_URI, else `<run_dir>/weights`."""
    return cfg.storage.weights_uri or os.environ.get(WEIGHTS_ENV) or str(run_dir / "weights")


class RMService:
    """Owns the RM trainer group for the whole campaign and the serving RM."""

    def __init__(self, cfg: Config, ledger: Ledger, run_dir: Path,
                 say: Callable[[str], None]):
        self.cfg, self.ledger, self.say = cfg, ledger, say
        self.name = cfg.campaign.name
        self.store = open_weight_store(weights_location(cfg, run_dir))
        self.group: RewardTrainerGroup | None = None
        self.serving: ServingRM | None = None
        self.launch: Launch = self._launch_default
        self.restarts = 0
        """Trainer-group restarts over the service's life (all refreshes)."""
        self._reference: list[PreferencePair] | None = None

    def start(self, launch: Launch | None = None) -> RewardTrainerGroup:
        """Start the trainer group with `launch` (default: Ray places `rm.trainers` ranks of
        `resources.cpus_per_actor` / `gpus_per_actor`); a restart calls it again."""
        if launch is not None:
            self.launch = launch
        return self._group()

    def _launch_default(self) -> RewardTrainerGroup:
        cfg = self.cfg
        self.say(f"starting {cfg.rm.trainers} RM trainer rank(s): {cfg.models.reward.name}, "
                 f"DeepSpeed ZeRO-{cfg.rm.zero_stage}, {cfg.rm.ensemble.members} member(s)")
        return RewardTrainerGroup.launch(
            cfg.rm.trainers, cfg.models.reward, cfg.rm, cfg.campaign.seed,
            num_cpus=cfg.resources.cpus_per_actor, num_gpus=cfg.resources.gpus_per_actor)

    def _group(self) -> RewardTrainerGroup:
        if self.group is None:
            self.group = self.launch()
        return self.group

    def reference_pairs(self) -> list[PreferencePair]:
        """The fixed reference set (rm.eval_pairs; never trained on), loaded once."""
        if self._reference is None:
            self._reference = []
            if self.cfg.rm.eval_pairs:
                path = resolve_pairs_path(self.cfg.rm.eval_pairs, "rm.eval_pairs")
                self._reference = load_hh_jsonl(path, limit=self.cfg.rm.eval_max_pairs)
        return self._reference

    def restore_serving(self, version: int | None = None) -> ServingRM | None:
        """After a restart: RM `version` (default: the ledger's latest promoted one), its
        weights read back from the weight store into the object store (None when no RM was
        promoted yet)."""
        found = (self.ledger.model_version(self.name, "rm", version) if version is not None
                 else self.ledger.latest_model_version(self.name, "rm"))
        if found is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            model = load_reward_model(local_copy(self.store, found.version, Path(tmp)))
            weights = ray.put(pack_state(model.state_dict()))
        assert found.snapshot is not None, "the schema requires a snapshot on every rm version"
        self.serving = ServingRM(found.version, found.snapshot.watermark, weights)
        self.say(f"serving RM v{found.version} restored from {found.weight_uri}")
        return self.serving

    def snapshot(self) -> Snapshot:
        """What the next refresh reads: the ledger's snapshot, windowed to the labels after the
        serving RM's watermark plus the last `rm.replay_window` trainable ones before it, so a
        refresh reads about the same number of rows however long the ledger grows (the whole
        snapshot for the first RM). The split is the one the whole snapshot would give."""
        if self.serving is None:
            return self.ledger.snapshot(self.name)
        rm, fresh_after = self.cfg.rm, self.serving.watermark
        base = self._base_watermark(None)
        # enough rows that, after the held-out share, the window holds the replay window (with
        # a margin for the hash's spread); widened below in the rare case it does not
        wanted = math.ceil(1.25 * rm.replay_window / (1.0 - rm.fresh_eval_fraction)) + 32
        while True:
            since = self.ledger.window_start(self.name, fresh_after, wanted)
            snap = self.ledger.snapshot(self.name, since=since)
            older = older_trainable(snap.rows, fresh_after, base, rm.fresh_eval_fraction,
                                    self.cfg.campaign.seed)
            if since == 0 or older >= rm.replay_window:
                return snap
            wanted *= 2  # more held-out rows in the window than expected: widen it

    def refresh(self, snap: Snapshot, version: int, refresh: int | None = None) -> RMRefresh:
        """Train candidate RM `version` on `snap`, gate it, publish and record it.

        `refresh` is which of the campaign's refreshes this is (default: `version`, which it
        equals unless a run stopped between a refresh and its next checkpoint: the resumed run
        redoes that refresh under a new version number). It seeds the replay draw and the
        ensemble's bootstrap, so a redone refresh trains the same RM as the lost one, and is
        recorded with the version's metrics (`rm/refresh`).

        A rank that dies on the way replaces the whole group and restarts the refresh (at most
        `rm.max_restarts` times; `RMTrainerDied` after that): the version, the weights and the
        ledger rows are those of an undisturbed refresh."""
        refresh = version if refresh is None else refresh
        deaths: list[str] = []
        while True:
            try:
                cand = self._candidate(snap, version, refresh)
                break
            except RayError as err:
                if not isinstance(err, ACTOR_DEATHS) and not self._lost_a_rank():
                    raise  # a real error, no rank died
                deaths.append(f"{type(err).__name__}: {first_line(err)}")
                self._discard_group()
                limit = self.cfg.rm.max_restarts
                if len(deaths) > limit:
                    raise RMTrainerDied(
                        f"RM v{version}: the RM trainer group lost a rank {len(deaths)} time(s) "
                        f"in this refresh, and rm.max_restarts={limit} allows {limit} "
                        f"restart(s); no version was recorded. Deaths: "
                        + "; ".join(f"{i}) {d}" for i, d in enumerate(deaths, 1))) from err
                self.restarts += 1
                self.say(f"RM v{version}: an RM trainer rank died ({deaths[-1]}); restarting "
                         f"the group ({len(deaths)}/{limit}) and the refresh from the start")
        serving = self.serving
        version = cand.published.version
        self.ledger.record_model_version(
            self.name, "rm", version, snapshot=snap.ref, metrics=cand.metrics,
            parent_version=serving.version if serving else None, weight_uri=cand.published.uri)
        self._settle(version, snap.watermark, cand.decision, cand.state)
        metrics = {**cand.metrics, "rm/restarts": float(len(deaths))}
        return RMRefresh(version, cand.pairs, cand.ties, cand.published.uri,
                         cand.decision.promote, cand.decision.reason, metrics)

    def _candidate(self, snap: Snapshot, version: int, refresh: int) -> _Candidate:
        """Every group call of a refresh: warm start, train, judge, publish (no ledger write)."""
        rm, serving = self.cfg.rm, self.serving
        base = self._base_watermark(snap)
        split = split_refresh(snap.rows, serving.watermark if serving else 0, base,
                              rm.replay_fraction, rm.replay_window, rm.fresh_eval_fraction,
                              self.cfg.campaign.seed, refresh)
        pairs, ties = rows_to_pairs([snap.rows[i] for i in split.train], rm.human_label_weight)
        fresh_eval, _ = rows_to_pairs([snap.rows[i] for i in split.fresh_eval])
        gate_set, gate_name = ((fresh_eval, "fresh") if len(fresh_eval) >= rm.promotion_min_pairs
                               else (self.reference_pairs(), "reference"))
        group = self._group()
        before = None
        if serving is not None:
            group.load_state(serving.weights)
            before = group.evaluate(gate_set) if gate_set else None
        start = f"warm start from v{serving.version}" if serving else "pretrained backbone"
        self.say(f"RM v{version}: training on {len(pairs)} pairs ({split.fresh} fresh, "
                 f"{split.replay} replayed, {ties} ties left out; snapshot watermark "
                 f"{snap.watermark}; {start})")
        fit = self._train_candidate(group, pairs, version, refresh)
        after = group.evaluate(gate_set) if gate_set else None
        if after is not None:
            was = f", serving v{serving.version}: {before.accuracy:.3f}" if before else ""
            self.say(f"RM v{version}: {gate_name}-pair accuracy {after.accuracy:.3f} (ECE "
                     f"{after.ece:.3f}, {after.n} pairs{was})")
        decision = promotion_gate(after, before, rm.promotion_tolerance, gate_name)
        metrics = self._metrics({**fit.metrics, "rm/steps": float(fit.steps),
                                 "rm/refresh": float(refresh)}, split,
                                len(pairs), after, before, gate_name)
        state = group.state_dict() if decision.promote else None
        published = publish_new_version(self.store, version, group.save, self.say)
        return _Candidate(len(pairs), ties, decision, metrics, published, state)

    def _train_candidate(self, group: RewardTrainerGroup, pairs: list[PreferencePair],
                         version: int, refresh: int) -> FitResult:
        """Fit the group (holding the warm-start weights) on the refresh's pairs."""
        if not pairs:
            raise ValueError(f"RM v{version}: the refresh has no pairs to train on (all ties?)")
        return group.fit(ray.put(pairs), bootstrap_seed=self.cfg.campaign.seed * 10007 + refresh)

    def _base_watermark(self, snap: Snapshot | None) -> int:
        """Watermark of the first RM's snapshot (labels after it may be held out); with no RM
        yet, `snap`'s."""
        versions = self.ledger.model_versions(self.name, "rm")
        first = versions[0].snapshot if versions else None
        if first is not None:
            return first.watermark
        assert snap is not None, "no RM version yet: the first refresh's snapshot is needed"
        return snap.watermark

    def _metrics(self, fit: dict[str, float], split, pairs: int, after: PairMetrics | None,
                 before: PairMetrics | None, gate_name: str) -> dict[str, float]:
        metrics = {**fit, "rm/train_pairs": float(pairs), "rm/train_fresh": float(split.fresh),
                   "rm/train_replay": float(split.replay),
                   "rm/fresh_eval_pairs": float(len(split.fresh_eval))}
        if after is not None:
            metrics[f"rm/{gate_name}_accuracy"] = after.accuracy
            metrics[f"rm/{gate_name}_ece"] = after.ece
        if before is not None:
            metrics[f"rm/{gate_name}_accuracy_serving"] = before.accuracy
        if self.reference_pairs() and gate_name != "reference":
            held = self.group.evaluate(self.reference_pairs())
            metrics.update({"rm/reference_accuracy": held.accuracy, "rm/reference_ece": held.ece})
        return metrics

    def _settle(self, version: int, watermark: int, decision: GateDecision,
                state: dict | None) -> None:
        status = "promoted" if decision.promote else "rejected"
        self.ledger.set_model_status(self.name, "rm", version, status, reason=decision.reason)
        self.say(f"RM v{version} {status}: {decision.reason}")
        if decision.promote:
            self.serving = ServingRM(version, watermark, ray.put(pack_state(state)))

    def _lost_a_rank(self, timeout_s: float = 30.0) -> bool:
        """Whether a rank of the group is dead. A survivor's collective may fail first (a gloo
        "connection closed" task error that names no death); a dead rank answers no ping."""
        if self.group is None:
            return False
        pending = [actor.__ray_ready__.remote() for actor in self.group.actors]
        deadline = time.monotonic() + timeout_s
        while pending and (left := deadline - time.monotonic()) > 0:
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            for ref in done:
                try:
                    ray.get(ref)
                except ACTOR_DEATHS:
                    return True
        return False

    def _discard_group(self) -> None:
        """Kill every rank of a group that lost one (the survivors would wait on it forever)."""
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    def shutdown(self) -> None:
        """Stop the trainer group (idempotent)."""
        self._discard_group()


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, cut to `limit` characters."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]


def local_copy(store: WeightStore, version: int, scratch: Path) -> Path:
    """A local directory holding RM `version` (the store's own for a local store)."""
    if isinstance(store, LocalWeightStore):
        return store.path("rm", version)
    return store.fetch("rm", version, scratch / f"rm-v{version}")


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
