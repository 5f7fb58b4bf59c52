"""A campaign that stops between an RM refresh and its next checkpoint resumes exactly.

The crashed run recorded RM v4 (iteration 3's refresh) after checkpoint it-2; the ledger is
append-only, so v4 stays, and the resumed run redoes the refresh under v5. The refresh is seeded
by its number in the campaign (`LoopState.rm_refreshes`, checkpointed), not by the version
number, so the redone refresh trains the same RM as the lost one, and the resumed campaign ends
where an uninterrupted one does: the same RMs (renumbered past the orphan), policies, labels and
per-iteration metrics. Before the refresh number existed the replay draw and the bootstrap were
seeded by the version, and the resumed campaign trained a different RM from iteration 3 on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.core.metrics import read_jsonl
from storage.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RUN = ["campaign.name=resume", "campaign.iterations=4", "campaign.checkpoint_every=2",
       "metrics.progress=lines"]
"""tiny refreshes the RM every iteration: v1 at start-up, v2..v5 in iterations 1..4."""
RENUMBERED = {1: 1, 2: 2, 3: 3, 4: 5, 5: 6}
"""Uninterrupted RM version -> the resumed campaign's version that redid it (v4: the orphan)."""
VARIES = ("per_s", "timing")
"""Metric names holding these are wall-clock measurements."""

pytestmark = pytest.mark.timeout(1800)


def prefloop(run_dir: Path, *args: str, crash: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(HERE / "crash_child.py"), "rm_refresh"] if crash else ["-m", "loop.main", "run"]
    return subprocess.run([sys.executable, *cmd, "configs/tiny.yaml",
                           f"campaign.run_dir={run_dir}", *RUN, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def ledger_of(run_dir: Path) -> Ledger:
    return Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite")


def measured(metrics: dict) -> dict:
    """``metrics`` without the wall-clock ones."""
    return {k: v for k, v in metrics.items() if not any(w in k for w in VARIES)}


def rm_rows(run_dir: Path) -> dict[int, tuple]:
    """version -> (status, snapshot watermark, snapshot sha256, parent, metrics)."""
    return {v.version: (v.status, v.snapshot.watermark, v.snapshot.sha256, v.parent_version,
                        measured(v.metrics))
            for v in ledger_of(run_dir).model_versions("resume", "rm")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "full"
    done = prefloop(run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> tuple[Path, dict[int, tuple], str]:
    """The campaign crashed right after iteration 3's refresh, then resumed: (run dir, RM
    rows at the crash, the resumed run's stdout)."""
    run_dir = tmp_path_factory.mktemp("resume") / "crashed"
    died = prefloop(run_dir, crash=True)
    assert died.returncode != 0 and "injected crash after the RM refresh of iteration 3 (RM v4" \
        in died.stderr, died.stdout[-2000:] + died.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["it-000002"]
    at_crash = rm_rows(run_dir)
    resumed = prefloop(run_dir, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return run_dir, at_crash, resumed.stdout


def test_the_redone_refresh_trains_the_rm_the_crash_lost(uninterrupted, crashed):
    run_dir, at_crash, out = crashed
    full = rm_rows(uninterrupted)
    assert sorted(full) == [1, 2, 3, 4, 5]
    assert sorted(at_crash) == [1, 2, 3, 4]
    assert f"resumed from {run_dir / 'checkpoints/it-000002'}: iteration 2" in out
    assert "RM v5: training on" in out and "RM v4: training on" not in out
    assert at_crash == {v: full[v] for v in at_crash}  # the lost v4 was the uninterrupted v4
    resumed = rm_rows(run_dir)
    assert resumed[4] == at_crash[4]  # the orphan keeps its row
    assert [resumed[v][4].pop("rm/refresh") for v in (1, 2, 3, 4, 5, 6)] == [1, 2, 3, 4, 4, 5]
    for version, again in RENUMBERED.items():
        status, watermark, sha, parent, metrics = full[version]
        metrics.pop("rm/refresh")
        want = (status, watermark, sha, RENUMBERED.get(parent), metrics)
        assert resumed[again] == want, (version, again)  # trained alike: loss, accuracy, ...


def test_the_resumed_campaign_ends_where_the_uninterrupted_one_does(uninterrupted, crashed):
    run_dir, _, _ = crashed
    full, resumed = ledger_of(uninterrupted), ledger_of(run_dir)
    policies = [[(v.version, v.parent_version, v.metrics) for v in ledger.model_versions(
        "resume", "policy")] for ledger in (full, resumed)]
    renumber = [(v, p, {**m, "rm_version": RENUMBERED[m["rm_version"]]} if "rm_version" in m
                 else m) for v, p, m in policies[0]]
    assert policies[1] == renumber

    def labels(ledger: Ledger) -> list[tuple]:
        return sorted((r.text_a, r.text_b, r.choice, r.policy_version_a, r.policy_version_b)
                      for r in ledger.snapshot("resume", kinds=("ai",)).rows)

    assert labels(resumed) == labels(full)
    keys = [(r.comparison_id, r.labeler_id) for r in resumed.snapshot("resume").rows]
    assert len(keys) == len(set(keys))
    last = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}  # the resumed rows
    compared = 0
    for want in read_jsonl(uninterrupted / "metrics.jsonl")[1:]:
        got = last[want["step"]]
        if want["step"] == 3:  # its labels were recorded before the crash: no new rows
            assert (got["label/labeled"], want["label/labeled"]) == (0.0, 4.0)
            want = {k: v for k, v in want.items() if k != "label/labeled"}
        for key in [k for k in measured(want) if k.startswith(("ppo/", "rollout/", "monitor/",
                                                               "rm/", "label/"))]:
            renumbered = key in ("rm/serving_version", "ppo/rm_version")
            expected = RENUMBERED[int(want[key])] if renumbered else want[key]
            assert got[key] == pytest.approx(expected, rel=1e-5, abs=1e-6), (want["step"], key)
            compared += 1
    assert compared > 100
