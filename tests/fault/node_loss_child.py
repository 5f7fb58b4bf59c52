"""Child process of test_node_loss.py: a simulated 2-node cluster loses the node that holds a
rollout shard between `generate` and `collect`.

Usage: ``python tests/fault/node_loss_child.py OUT_DIR``. The child owns its cluster (a
`ray.cluster_utils.Cluster` it connects to as the driver), so the test process's own Ray is
left alone. Node A (the head) carries the custom resource `node_a`, node B `node_b`; a
placement group pins rollout worker 0 to node A and worker 1 to node B, as the campaign's
placement group pins its actors to bundles. Three runs, in this order, each with its own
campaign in one SQLite ledger:

1. ``reference``: the rollout undisturbed.
2. ``regenerate`` (max_regenerations=3): once both shards are sealed in their nodes' object
   stores (`ray.wait(fetch_local=False)`), node B is removed (SIGKILL of its raylet and
   workers) and a replacement node with `node_b` is added, as an autoscaler would; then
   `collect`.
3. ``no_regeneration`` (max_regenerations=0, the negative control): the same loss.
4. ``weights_lost``: the same loss, with the published weights put by an actor on node B (as
   a trainer there would): they die with it, and the restarted worker cannot load them.

Writes OUT_DIR/result.json (per run: where each shard's object was and its size, what
`collect` raised or the batch's shape, the group's log lines, the nodes) and
OUT_DIR/batches.pt (the collected batches of runs 1 and 2).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray
import torch
from ray.cluster_utils import Cluster
from ray.experimental import get_object_locations
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.core.policy import load_policy
from actors.core.weight_transport import pack_state
from actors.rollout import RolloutGroup
from loop.config import ModelSpec, RolloutConfig
from storage.ledger import Ledger

SPEC = ModelSpec(name="tiny-gpt2", max_length=96)
CFG = RolloutConfig(workers=2, samples_per_prompt=8, max_new_tokens=16, temperature=1.0)
PROMPTS = [f"\n\nHuman: Question {i}: " + " ".join(f"tell me about {w} and its history"
                                                   for w in ("rivers", "bread", "maps", "tea",
                                                             "clocks", "kites", "salt", "bees"))
           + "\n\nAssistant:" for i in range(32)]
"""32 prompts of ~80 tokens: 16 per shard × K=8 = 128 rows, ~200 KB per shard — well over the
100 KB under which Ray keeps a task's result in the caller's memory instead of the node's
object store (where a node loss can take it)."""
SEED, OFFSET = 11, 8
"""The rollout's seed and sample offset (as the loop's iteration 1 would pass them)."""
NODE_ARGS = {"num_cpus": 2, "resources": {"node_b": 1}}
HEAD_ARGS = {"num_cpus": 2, "resources": {"node_a": 1}, "include_dashboard": False,
             "_system_config": {"health_check_initial_delay_ms": 0,
                                "health_check_period_ms": 1000,
                                "health_check_failure_threshold": 3}}
"""A dead raylet is declared dead after ~3 s instead of the default ~15 s."""


def pinned() -> tuple[object, list[PlacementGroupSchedulingStrategy]]:
    """A placement group with worker 0's bundle on node A and worker 1's on node B."""
    group = placement_group([{"CPU": 0.5, "node_a": 0.01}, {"CPU": 0.5, "node_b": 0.01}])
    ray.get(group.ready(), timeout=120)
    return group, [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
                   for i in range(2)]


@ray.remote(num_cpus=0, resources={"node_b": 0.01})
class WeightsOnNodeB:
    """Puts policy weights from node B: it owns them, so they die with the node."""

    def put(self, seed: int) -> ray.ObjectRef:
        policy, _ = load_policy("tiny-gpt2", seed=seed)
        return ray.put(pack_state(policy.state_dict()))


def run(name: str, cluster: Cluster, ledger: Ledger, weights: ray.ObjectRef,
        max_regenerations: int | None) -> tuple[dict, object]:
    """One rollout; with `max_regenerations` set, node B is lost before `collect`."""
    ledger.ensure_campaign(name)
    pg, places = pinned()
    lines: list[str] = []
    group = RolloutGroup.launch(2, SPEC, CFG, seed=0, ledger_url=ledger.url, campaign=name,
                                name_prefix=name, num_cpus=0.5, scheduling=places,
                                max_regenerations=max_regenerations or 0, say=lines.append)
    info: dict = {"nodes_before": list(group.nodes), "lines": lines}
    batch = None
    try:
        group.publish(1, weights)
        refs = group.generate(PROMPTS, seed=SEED, sample_offset=OFFSET)
        ready, _ = ray.wait(refs, num_returns=len(refs), fetch_local=False, timeout=300)
        assert len(ready) == len(refs), f"{name}: shards not ready in 300 s"
        where = get_object_locations(list(refs))
        deadline = time.monotonic() + 30  # a sealed object's location reaches its owner late
        while (not all(where[r]["node_ids"] for r in refs)) and time.monotonic() < deadline:
            time.sleep(0.1)
            where = get_object_locations(list(refs))
        info["shards"] = [{"node_ids": where[r]["node_ids"], "bytes": where[r]["object_size"]}
                          for r in refs]
        if max_regenerations is not None:
            info["lost_node"] = lose_node_b(cluster)
            info["removed_at"] = time.time()
        try:
            batch = group.collect(refs)
            info["rows"] = batch.num_rows
        except Exception as err:  # the negative control's outcome, checked by the test
            info["error"] = {"type": type(err).__name__,
                             "mro": [c.__name__ for c in type(err).__mro__],
                             "cause": type(err.__cause__).__name__ if err.__cause__ else None,
                             "message": str(err)[:2000]}
        info["nodes_after"] = list(group.nodes)
    finally:
        group.shutdown()
        remove_placement_group(pg)
    return info, batch


def lose_node_b(cluster: Cluster) -> str:
    """Kill the node that has `node_b` (no graceful shutdown) and add a replacement."""
    node = next(n for n in cluster.worker_nodes if n.node_id and "node_b" in str(
        n._ray_params.resources))
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(**NODE_ARGS)
    cluster.wait_for_nodes()
    return node.node_id


def main(out: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args=HEAD_ARGS)
    try:
        cluster.add_node(**NODE_ARGS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        ledger = Ledger.open(f"sqlite:///{out / 'ledger.sqlite'}")
        v1, _ = load_policy("tiny-gpt2", seed=1)
        weights = ray.put(pack_state(v1.state_dict()))  # driver-owned: lives on the head
        result, batches = {"head": cluster.head_node.node_id}, {}
        for name, regen in (("reference", None), ("regenerate", 3), ("no_regeneration", 0),
                            ("weights_lost", 3)):
            if name == "weights_lost":  # the owner must live until its node dies
                owner = WeightsOnNodeB.remote()
                weights = ray.get(owner.put.remote(1))
            start = time.monotonic()
            result[name], batches[name] = run(name, cluster, ledger, weights, regen)
            result[name]["seconds"] = time.monotonic() - start
        torch.save({k: v for k, v in batches.items() if v is not None}, out / "batches.pt")
        (out / "result.json").write_text(json.dumps(result, indent=1))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
