"""One placement group for the campaign's actors: the bundle layout, its reservation, and the
scheduling strategy of each actor.

    plan = plan_bundles(cfg)                   # numbers only, no Ray
    placement = reserve(plan, cfg.resources.placement_timeout_s)
    RolloutGroup.launch(..., scheduling=placement.strategies("rollout"))
    placement.remove()                         # after the groups shut down

One bundle per actor, in the order of the diagram: R rollout workers, L labelers, W RM-trainer
ranks, the PPO ranks. Bundle `plan.indices(role)[i]` holds the actor `{role}-{i}`, so a role's
actors keep their names (`rollout-0`, `rm-trainer-1`, …) and the strategy decides only which
node each bundle lands on. The whole group is reserved at once, before any actor starts: a
campaign the cluster cannot hold stops with what it asked for instead of half-starting.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from loop.config import Config

ROLES = ("rollout", "labeler", "rm-trainer", "ppo-trainer")
"""Bundle order, and each role's actor-name prefix."""
PPO_RANKS = 1
"""PPO trainer ranks (the config has no key for more yet)."""
LABELER_MAX_CPUS = 0.5
"""An AI labeler waits on its judge and the ledger: it never needs a whole core."""


@dataclass(frozen=True)
class Bundle:
    """The resources reserved for one actor."""

    role: str
    rank: int
    cpus: float
    gpus: float = 0.0

    def resources(self) -> dict[str, float]:
        """Ray's bundle dict, e.g. `{"CPU": 0.25}` or `{"CPU": 1.0, "GPU": 1.0}`."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}


@dataclass(frozen=True)
class PlacementPlan:
    """The campaign's bundles, in `ROLES` order, and the strategy that places them."""

    bundles: tuple[Bundle, ...]
    strategy: str

    def indices(self, role: str) -> list[int]:
        """Bundle indices of `role`'s actors, by rank."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        return [i for i, b in enumerate(self.bundles) if b.role == role]

    def actor_resources(self, role: str) -> Bundle:
        """What each of `role`'s actors requests (equal to its bundle)."""
        return self.bundles[self.indices(role)[0]]

    def totals(self) -> dict[str, float]:
        """Resources of all bundles together."""
        total: Counter[str] = Counter()
        for bundle in self.bundles:
            total.update(bundle.resources())
        return dict(total)

    def describe(self) -> str:
        """e.g. `rollout 2 × {CPU: 1}, labeler 1 × {CPU: 0.5}, … (PACK)`."""
        parts = [f"{role} {len(self.indices(role))} × "
                 f"{_fmt(self.actor_resources(role).resources())}" for role in ROLES]
        return f"{', '.join(parts)} ({self.strategy})"


def plan_bundles(cfg: Config) -> PlacementPlan:
    """The bundle of every actor of the campaign `cfg` (pure: no Ray).

    CPUs come from `resources.cpus_per_actor` (labelers: at most `LABELER_MAX_CPUS`); GPUs
    from `resources.gpus_per_actor`, for the RM trainers only: the rollout workers and the
    PPO trainer keep their tensors on the CPU so far, and a GPU reserved for them would idle.
    """
    res = cfg.resources
    counts = {"rollout": cfg.rollout.workers, "labeler": cfg.labeling.labelers,
              "rm-trainer": cfg.rm.trainers, "ppo-trainer": PPO_RANKS}
    cpus = {"rollout": res.cpus_per_actor, "labeler": min(res.cpus_per_actor, LABELER_MAX_CPUS),
            "rm-trainer": res.cpus_per_actor, "ppo-trainer": res.cpus_per_actor}
    gpus = {"rm-trainer": res.gpus_per_actor}
    bundles = tuple(Bundle(role, rank, cpus[role], gpus.get(role, 0.0))
                    for role in ROLES for rank in range(counts[role]))
    return PlacementPlan(bundles, res.placement_strategy)


class PlacementError(RuntimeError):
    """The cluster did not reserve the campaign's placement group in time."""


@dataclass
class Placement:
    """A reserved placement group and the plan it was reserved for."""

    plan: PlacementPlan
    group: PlacementGroup

    def strategies(self, role: str) -> list[PlacementGroupSchedulingStrategy]:
        """One scheduling strategy per actor of `role`, by rank (its bundle)."""
        return [PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i)
                for i in self.plan.indices(role)]

    def nodes(self) -> list[str]:
        """Node id of each bundle, in bundle order."""
        where = placement_group_table(self.group)["bundles_to_node_id"]
        return [where[i] for i in range(len(self.plan.bundles))]

    def remove(self) -> None:
        """Give the reservation back (the group's actors must be gone first)."""
        ray.util.remove_placement_group(self.group)


def reserve(plan: PlacementPlan, timeout_s: float) -> Placement:
    """Reserve `plan` as one placement group; wait up to `timeout_s` seconds for it.

    Raises:
        PlacementError: the cluster did not reserve it in time; the message says what was
            requested and what the cluster has, and the group is given back.
    """
    group = placement_group([b.resources() for b in plan.bundles], strategy=plan.strategy)
    if group.wait(timeout_seconds=timeout_s):
        return Placement(plan, group)
    ray.util.remove_placement_group(group)
    raise PlacementError(unsatisfied_message(plan, timeout_s))


def unsatisfied_message(plan: PlacementPlan, timeout_s: float) -> str:
    """What was requested vs what the cluster has, and the keys that change it."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = "; ".join(f"{n.get('NodeManagerAddress', '?')}: "
                         f"{_fmt(_compute(n.get('Resources', {})))}" for n in nodes)
    hint = ""
    if plan.strategy == "STRICT_SPREAD" and len(nodes) < len(plan.bundles):
        hint = (f" STRICT_SPREAD puts each of the {len(plan.bundles)} bundles on its own node, "
                f"and the cluster has {len(nodes)}.")
    return (f"the cluster did not reserve the campaign's placement group within {timeout_s:g} s "
            f"(resources.placement_timeout_s): requested {len(plan.bundles)} bundles, "
            f"{plan.describe()}, {_fmt(plan.totals())} in all; the cluster has {len(nodes)} "
            f"node(s) ({per_node or 'none'}), {_fmt(_compute(ray.available_resources()))} "
            f"available.{hint} Lower resources.cpus_per_actor or resources.gpus_per_actor or the "
            "actor counts (rollout.workers, labeling.labelers, rm.trainers), change "
            "resources.placement_strategy, or add nodes.")


def _compute(resources: dict[str, float]) -> dict[str, float]:
    return {k: resources.get(k, 0.0) for k in ("CPU", "GPU")}


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"
