"""The tiny campaign on a simulated 2-node cluster (`ray.cluster_utils.Cluster`): with
`resources.placement_strategy=SPREAD` its actors run on both nodes, and the campaign finishes
with the ledger rows of the single-node run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
ROLES = {"rollout-0", "labeler-0", "rm-trainer-0", "ppo-trainer-0"}


@pytest.fixture
def two_nodes():
    """Two raylets of 2 CPUs each, told apart by a custom resource. Torn down node by node
    (not `Cluster.shutdown`, which also resets the internal-KV client of this process's own
    Ray, the one the other tests share)."""
    import ray._common.utils
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 1}, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, resources={"node_b": 1})
        cluster.wait_for_nodes()
        yield cluster
    finally:
        for node in [*cluster.worker_nodes, cluster.head_node]:
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        ray._common.utils.reset_ray_address()


def test_spread_campaign_runs_actors_on_both_nodes(two_nodes, tmp_path):
    run_dir = tmp_path / "tiny"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": two_nodes.address}
    result = subprocess.run(
        [sys.executable, "-m", "loop.main", "run", "configs/tiny.yaml",
         f"campaign.run_dir={run_dir}", "resources.placement_strategy=SPREAD",
         "metrics.ray_dashboard=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ray: joined the cluster" in result.stdout
    assert ("placement group reserved on 2 node(s): rollout 1 × {CPU: 0.25}, labeler 1 × "
            "{CPU: 0.25}, rm-trainer 1 × {CPU: 0.25}, ppo-trainer 1 × {CPU: 0.25} (SPREAD)"
            ) in result.stdout

    # where each actor ran, from the cluster's own actor table (the actors are gone by now)
    actors = two_nodes.global_state.actor_table(None).values()
    where = {a["Name"]: a["Address"]["NodeID"] for a in actors if a["Name"] in ROLES}
    assert set(where) == ROLES
    nodes = {n.node_id for n in [two_nodes.head_node, *two_nodes.worker_nodes]}
    assert set(where.values()) == nodes  # both nodes hosted prefloop actors

    ledger = Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite", migrate=False)
    assert [v.version for v in ledger.model_versions("tiny", "policy")] == [0, 1, 2]
    assert set(ledger.generations_per_policy_version("tiny")) == {0, 1}
    assert len(ledger.snapshot("tiny", kinds=("human",)).rows) == 64
    ai = ledger.snapshot("tiny", kinds=("ai",)).rows
    assert ai and {r.labeler_id for r in ai} == {"labeler-0"}
    assert (run_dir / "checkpoints/it-000002/COMPLETE").is_file()
