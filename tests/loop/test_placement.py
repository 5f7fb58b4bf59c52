"""The campaign's placement group: one bundle per actor, in a fixed order, and a refusal that
says what was asked for when the cluster cannot hold it."""

from __future__ import annotations

from pathlib import Path

import pytest

from loop.campaign import required_cpus
from loop.config_load import load_config
from loop.placement import PlacementError, plan_bundles, reserve

REPO = Path(__file__).resolve().parents[2]


def tiny(*overrides: str):
    return load_config(REPO / "configs/tiny.yaml", list(overrides))


def test_bundle_layout_follows_the_roles_and_resources():
    cfg = tiny("rollout.workers=2", "labeling.labelers=3", "rm.trainers=2",
               "resources.cpus_per_actor=1.5", "resources.gpus_per_actor=1",
               "resources.placement_strategy=SPREAD")
    plan = plan_bundles(cfg)
    assert [b.resources() for b in plan.bundles] == (
        [{"CPU": 1.5}] * 2                    # rollout-0, rollout-1
        + [{"CPU": 0.5}] * 3                  # labeler-0..2: at most half a CPU each
        + [{"CPU": 1.5, "GPU": 1.0}] * 2      # rm-trainer-0, rm-trainer-1: the GPU role
        + [{"CPU": 1.5}])                     # ppo-trainer-0
    assert [(b.role, b.rank) for b in plan.bundles] == [
        ("rollout", 0), ("rollout", 1), ("labeler", 0), ("labeler", 1), ("labeler", 2),
        ("rm-trainer", 0), ("rm-trainer", 1), ("ppo-trainer", 0)]
    assert (plan.indices("rollout"), plan.indices("labeler"), plan.indices("rm-trainer"),
            plan.indices("ppo-trainer")) == ([0, 1], [2, 3, 4], [5, 6], [7])
    assert plan.strategy == "SPREAD"
    assert plan.totals() == {"CPU": 5 * 1.5 + 3 * 0.5, "GPU": 2.0}  # 9.0 CPUs
    assert required_cpus(cfg) == 9
    assert plan.describe() == ("rollout 2 × {CPU: 1.5}, labeler 3 × {CPU: 0.5}, rm-trainer 2 "
                               "× {CPU: 1.5, GPU: 1}, ppo-trainer 1 × {CPU: 1.5} (SPREAD)")
    with pytest.raises(ValueError, match="unknown role 'critic'"):
        plan.indices("critic")


def test_the_tiny_campaign_asks_for_one_cpu_packed():
    plan = plan_bundles(tiny())
    assert [b.resources() for b in plan.bundles] == [{"CPU": 0.25}] * 4
    assert (plan.strategy, plan.totals()) == ("PACK", {"CPU": 1.0})


def test_each_actor_gets_its_own_bundle(ray_local):
    # a sliver of a CPU per bundle: the session's Ray may be busy with other tests' actors
    cfg = tiny("labeling.labelers=2", "resources.cpus_per_actor=0.01")
    placement = reserve(plan_bundles(cfg), timeout_s=30)
    try:
        got = {role: [s.placement_group_bundle_index for s in placement.strategies(role)]
               for role in ("rollout", "labeler", "rm-trainer", "ppo-trainer")}
        assert got == {"rollout": [0], "labeler": [1, 2], "rm-trainer": [3], "ppo-trainer": [4]}
        assert all(s.placement_group == placement.group
                   for s in placement.strategies("labeler"))
        assert len(placement.nodes()) == 5 and len(set(placement.nodes())) == 1
    finally:
        placement.remove()


def test_an_unsatisfiable_group_is_refused_with_requested_vs_available(ray_local):
    from ray.util import placement_group_table

    cfg = tiny("resources.cpus_per_actor=3", "resources.placement_timeout_s=0.5")
    before = set(placement_group_table())
    with pytest.raises(PlacementError) as info:
        reserve(plan_bundles(cfg), cfg.resources.placement_timeout_s)
    message = str(info.value)
    assert message.startswith(
        "the cluster did not reserve the campaign's placement group within 0.5 s "
        "(resources.placement_timeout_s): requested 4 bundles, rollout 1 × {CPU: 3}, labeler "
        "1 × {CPU: 0.5}, rm-trainer 1 × {CPU: 3}, ppo-trainer 1 × {CPU: 3} (PACK), "
        "{CPU: 9.5} in all; the cluster has 1 node(s) (")
    assert ": {CPU: 2, GPU: 0}), {CPU: " in message  # the session's Ray: 2 CPUs, one node
    assert message.endswith(" available. Lower resources.cpus_per_actor or "
                            "resources.gpus_per_actor or the actor counts (rollout.workers, "
                            "labeling.labelers, rm.trainers), change "
                            "resources.placement_strategy, or add nodes.")
    # the pending group was given back: nothing of it stays reserved or pending
    new = {k: v for k, v in placement_group_table().items() if k not in before}
    assert [pg["state"] for pg in new.values()] == ["REMOVED"]


def test_strict_spread_over_too_few_nodes_says_why(ray_local):
    cfg = tiny("resources.placement_strategy=STRICT_SPREAD", "resources.placement_timeout_s=0.5")
    with pytest.raises(PlacementError, match=r"STRICT_SPREAD puts each of the 4 bundles on its "
                                             r"own node, and the cluster has 1\. Lower"):
        reserve(plan_bundles(cfg), cfg.resources.placement_timeout_s)
