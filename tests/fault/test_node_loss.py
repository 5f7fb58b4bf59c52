"""Issue #9, item 5: a simulated 2-node cluster loses the node that holds rollout objects; the
batch is regenerated; the campaign finishes.

Component level (node_loss_child.py, its own `ray.cluster_utils.Cluster`): rollout worker 1 is
pinned to node B by its placement-group bundle; once both shards of a rollout are sealed in
their nodes' object stores, node B is SIGKILLed and a replacement added. `collect` samples the
lost shard again on the restarted worker, and the batch equals, tensor for tensor and text for
text, that of the same rollout undisturbed; the lost worker's ledger rows, written before its
node died, are the rows the regenerated shard refers to (no second copy). Negative control: the
same loss with `max_regenerations=0` raises Ray's `ObjectLostError` from `collect`. And when the
published weights were owned by an actor on the lost node, `collect` stops with `RolloutLost`
naming the version (the group keeps the ref, not a driver-owned copy: see `RolloutGroup`).

Campaign level (`slow`): the tiny campaign with 2 rollout workers, SPREAD over two worker nodes,
loses the node of a rollout worker (not the PPO trainer's) right after that worker logged
iteration 1's generations; the campaign finishes with policy versions 0..3 and one ledger row
per generation and per (comparison, labeler). Negative control: the same kill with rollout
workers Ray never restarts (no_rollout_restarts.py) fails the campaign.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from actors.rollout import shard_seed
from storage.ledger import Ledger
from storage.models import Generation, Preference

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
       "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
INLINE_LIMIT = 100 * 1024
"""Ray returns a task result under 100 KiB inline, to the caller's memory (no node can lose it)."""
SEED, OFFSET, K = 11, 8, 8
"""node_loss_child.py's rollout seed, sample offset and samples per prompt."""


@pytest.fixture(scope="module")
def node_loss(tmp_path_factory) -> tuple[dict, dict, Path]:
    """Run node_loss_child.py once: its result.json, its batches and its output directory."""
    out = tmp_path_factory.mktemp("node-loss")
    proc = subprocess.run([sys.executable, str(HERE / "node_loss_child.py"), str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    result = json.loads((out / "result.json").read_text())
    batches = torch.load(out / "batches.pt", weights_only=False)
    return result, batches, out


def test_a_shard_lost_with_its_node_is_sampled_again_row_for_row(node_loss):
    result, batches, out = node_loss
    run, head = result["regenerate"], result["head"]
    lost = run["lost_node"]
    # the fault: shard 1 lived in node B's object store only (too big to be inline), B died
    assert run["nodes_before"] == [head, lost]
    assert [s["node_ids"] for s in run["shards"]] == [[head], [lost]]
    assert min(s["bytes"] for s in run["shards"]) > INLINE_LIMIT
    # one line, naming the shard, its worker and its node; the worker came back elsewhere
    assert len(run["lines"]) == 1, run["lines"]
    assert re.fullmatch(rf"rollout shard 1 \(regenerate-1 on node {lost[:12]}\) lost: "
                        r"Object\w*Error: .+; sampling it again on the restarted worker \(1/3\)",
                        run["lines"][0]), run["lines"][0]
    assert run["nodes_after"][0] == head and run["nodes_after"][1] not in (head, lost)

    regenerated, reference = batches["regenerate"], batches["reference"]
    assert regenerated.num_rows == reference.num_rows == 32 * K
    assert regenerated.policy_version == reference.policy_version == 1
    for field in dataclasses.fields(reference):
        if field.name == "generation_ids":  # ledger ids of another campaign
            continue
        want, got = getattr(reference, field.name), getattr(regenerated, field.name)
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want), field.name
        else:
            assert got == want, field.name

    ledger = Ledger.open(f"sqlite:///{out / 'ledger.sqlite'}", migrate=False)
    removed = datetime.fromtimestamp(run["removed_at"], UTC).replace(tzinfo=None)
    with ledger.engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(
            select(Generation).where(Generation.worker.like("regenerate-%")))}
    written = [t for t in regenerated.texts if t]  # the ledger refuses empty responses
    assert len(rows) == len(written) > 200  # one row per sampled response, none twice
    ids = [i for i in regenerated.generation_ids if i is not None]
    assert sorted(ids) == sorted(rows)
    shard1 = [rows[i] for i in regenerated.generation_ids[16 * K:] if i is not None]
    # the lost worker wrote these before its node died; the regenerated shard found them
    assert shard1 and all(r.created_at < removed for r in shard1)
    assert {r.worker for r in shard1} == {"regenerate-1"}
    assert {r.sampling_params["seed"] for r in shard1} == {shard_seed(SEED, 1)}
    assert {r.sample_index for r in shard1} == set(range(OFFSET, OFFSET + K))
    texts = dict(zip(regenerated.generation_ids, regenerated.texts, strict=True))
    assert all(rows[i].text == texts[i] for i in ids)


def test_without_regeneration_the_lost_shard_fails_collect(node_loss):
    """Negative control: the same loss, max_regenerations=0."""
    result, batches, _ = node_loss
    run = result["no_regeneration"]
    assert [s["node_ids"] for s in run["shards"]][1] == [run["lost_node"]]
    assert "ObjectLostError" in run["error"]["mro"], run["error"]
    assert run["lines"] == [] and "no_regeneration" not in batches


def test_weights_lost_with_their_owner_stop_the_regeneration_with_a_clear_error(node_loss):
    """The published weights were put by an actor on the lost node (a trainer there): the
    restarted worker cannot load them, and `collect` says which version and why."""
    result, batches, _ = node_loss
    run = result["weights_lost"]
    assert [s["node_ids"] for s in run["shards"]][1] == [run["lost_node"]]
    assert run["error"]["type"] == "RolloutLost", run["error"]
    assert "OwnerDiedError" in run["error"]["cause"], run["error"]  # raised by load_weights
    assert re.match(r"weights_lost-1 on node \w{12} restarted and cannot load policy v1 again: "
                    r"the published weights were lost with their owner \(OwnerDiedError: ",
                    run["error"]["message"]), run["error"]["message"]
    assert len(run["lines"]) == 1 and "weights_lost" not in batches


# -- the campaign ---------------------------------------------------------------------------

ITERATIONS = 3
PROMPTS, SAMPLES = 4, 2
"""configs/tiny.yaml: prompts per iteration and samples per prompt."""


@pytest.fixture
def worker_nodes():
    """A head with no CPUs (the GCS and the driver live there; it is never lost) and two
    worker nodes of 2 CPUs, so a SPREAD campaign's actors all run on nodes that may be lost.
    Torn down node by node (`Cluster.shutdown` would also reset the internal-KV client of this
    process's own Ray, the one the other tests share)."""
    import ray._common.utils
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3}})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        for node in [*cluster.worker_nodes, cluster.head_node]:
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        ray._common.utils.reset_ray_address()


def actors(cluster) -> dict[str, dict]:
    """The cluster's actor table by actor name (the newest entry of each name)."""
    table = sorted(cluster.global_state.actor_table(None).values(),
                   key=lambda a: a.get("StartTime", 0))
    return {a["Name"]: a for a in table if a.get("Name")}


def alive(cluster, names: set[str]) -> dict[str, dict] | None:
    """The actor table once every actor of `names` is alive, else None."""
    table = actors(cluster)
    return table if all(table.get(n, {}).get("State") == "ALIVE" for n in names) else None


def wait_for(what: str, check, proc: subprocess.Popen, timeout_s: float = 300.0):
    """Poll `check()` until it returns something truthy; fail early if the campaign exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the campaign exited ({proc.returncode}) before {what}:\n"
                        + proc.stdout.read()[-4000:] + proc.stderr.read()[-8000:])
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


def generations_by(ledger_path: Path, worker: str, version: int) -> int:
    """Generations `worker` logged at `version` (0 while the ledger does not exist yet)."""
    if not ledger_path.is_file():
        return 0
    with sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=5) as conn:
        try:
            return conn.execute("SELECT count(*) FROM generation WHERE worker = ? AND "
                                "policy_version = ?", (worker, version)).fetchone()[0]
        except sqlite3.OperationalError:  # not migrated yet, or busy
            return 0


def run_and_lose_a_rollout_node(cluster, run_dir: Path, entry: list[str]
                                ) -> tuple[subprocess.CompletedProcess, dict]:
    """Start the campaign; once a rollout worker that does not share its node with the PPO
    trainer has logged iteration 1's generations, SIGKILL that node and add a replacement."""
    env = {**ENV, "RAY_ADDRESS": cluster.address}
    cmd = [sys.executable, *entry, "run", "configs/tiny.yaml", f"campaign.run_dir={run_dir}",
           f"campaign.iterations={ITERATIONS}", "rollout.workers=2",
           "resources.placement_strategy=SPREAD", "metrics.ray_dashboard=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        names = {"rollout-0", "rollout-1", "ppo-trainer-0"}
        table = wait_for("the rollout workers and the PPO trainer started",
                         lambda: alive(cluster, names), proc)
        node_of = {n: table[n]["Address"]["NodeID"] for n in names}
        victim = next((n for n in ("rollout-0", "rollout-1")
                       if node_of[n] != node_of["ppo-trainer-0"]), None)
        assert victim, f"SPREAD put both rollout workers on the PPO trainer's node: {node_of}"
        wait_for(f"{victim}'s iteration-1 generations", lambda: generations_by(
            run_dir / "ledger.sqlite", victim, 1), proc)
        node = next(n for n in cluster.worker_nodes if n.node_id == node_of[victim])
        cluster.remove_node(node, allow_graceful=False)
        replacement = cluster.add_node(num_cpus=2)
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lost = {"victim": victim, "node": node_of[victim], "replacement": replacement.node_id,
            "others": sorted(n for n, a in table.items() if a["Address"]["NodeID"] ==
                             node_of[victim])}
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), lost


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_campaign_finishes_after_losing_a_rollout_node(worker_nodes, tmp_path):
    run_dir = tmp_path / "tiny"
    done, lost = run_and_lose_a_rollout_node(worker_nodes, run_dir, ["-m", "loop.main"])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    victim = lost["victim"]
    # the worker really died and came back on a live node (its bundle was rescheduled, to the
    # replacement or to the other node); the group set it up again
    after = actors(worker_nodes)[victim]
    assert after["NumRestarts"] >= 1 and after["Address"]["NodeID"] != lost["node"]
    recovered = re.compile(rf"rollout (shard \d \({victim} on node {lost['node'][:12]}\) lost|"
                           rf"{victim} on node {lost['node'][:12]} restarted).*")
    line = recovered.search(done.stdout + done.stderr)  # the campaign's log, on stdout
    assert line, done.stdout[-4000:] + done.stderr[-8000:]
    print(f"lost {lost}; the rollout group logged: {line.group(0)}")

    ledger = Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite", migrate=False)
    assert [v.version for v in ledger.model_versions("tiny", "policy")] == list(
        range(ITERATIONS + 1))
    with ledger.engine.connect() as conn:
        keys = conn.execute(select(Generation.policy_version, Generation.worker,
                                   Generation.sample_index, Generation.prompt_id)
                            .where(Generation.worker.like("rollout-%"))).all()
        prefs = conn.execute(select(Preference.comparison_id, Preference.labeler_id)).all()
    per_version = Counter(version for version, *_ in keys)
    # each iteration logged its 4 prompts × 2 samples (less any empty response), none twice
    assert sorted(per_version) == list(range(ITERATIONS))
    assert all(PROMPTS * SAMPLES - 2 <= n <= PROMPTS * SAMPLES for n in per_version.values())
    assert len(keys) == len(set(keys))
    assert len(prefs) == len(set(prefs)) > 0  # one preference per (comparison, labeler)
    assert (run_dir / f"checkpoints/it-{ITERATIONS:06d}/COMPLETE").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_without_rollout_restarts_the_same_loss_fails_the_campaign(worker_nodes, tmp_path):
    """Negative control: rollout workers that Ray never restarts (max_restarts=0)."""
    done, lost = run_and_lose_a_rollout_node(worker_nodes, tmp_path / "tiny",
                                             [str(HERE / "no_rollout_restarts.py")])
    assert done.returncode != 0, done.stdout[-4000:]
    died = re.search(rf"RolloutLost: {lost['victim']} on node {lost['node'][:12]} is dead and Ray "
                     r"will not restart it", done.stderr)
    assert died, done.stderr[-8000:]
