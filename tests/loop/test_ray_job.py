"""The tiny campaign as a cluster user runs it: `ray job submit` to a real `ray start --head` on
loopback, the job's metrics on the node's Prometheus endpoint, and a job stopped mid-run that a
resubmission of the identical command continues exactly.

Every job is submitted with the same command line (`--auto-resume`), the way a resubmitted job
or a RayJob retry sends it. The uninterrupted campaign is the reference: the stopped and resumed
one must leave the same ledger behind — the same policy versions, the same generations and the
same preferences, none twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the repository's venv: `ray` and the job's `python`
ENV = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
       "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
ITERATIONS = 4
OVERRIDES = (
    f"campaign.iterations={ITERATIONS}", "campaign.checkpoint_every=1",
    # The RM stays v1: a policy version records the serving RM, so an iteration re-run after
    # a stop would have to promote exactly the same RMs to record the same rows.
    "rm.refresh_every=1000",
    # A lease the stopped job held must lapse before the resumed job labels (it starts in
    # > 5 s), or that comparison would wait out the lease and be labeled an iteration late.
    "labeling.lease_seconds=5",
)
UPLOAD_EXCLUDES = [".venv*", "runs", ".git", "tests", "bench", "docker", "*.egg-info",
                   "__pycache__", ".pytest_cache", ".ruff_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class Head:
    dashboard: str  # http://127.0.0.1:PORT: the Jobs API
    metrics: str    # http://127.0.0.1:PORT/metrics: the node's Prometheus endpoint
    root: Path      # this module's run directories (their path marks the jobs' processes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def head(tmp_path_factory, shared_data):
    """`ray start --head --block` on 127.0.0.1 with its own ports and temp dir, in its own
    process group. Teardown signals that group (never `ray stop`: it would stop every Ray on
    the machine) and then any job process that names this module's run directories."""
    root = tmp_path_factory.mktemp("rayjob")
    ports = {name: _free_port() for name in ("gcs", "dash", "agent", "agent_grpc", "metrics")}
    argv = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={ports['gcs']}", "--num-cpus=2", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dash']}",
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--metrics-export-port={ports['metrics']}", "--disable-usage-stats",
            f"--temp-dir={tmp_path_factory.mktemp('ray')}"]
    log = (root / "ray-start.log").open("w")
    proc = subprocess.Popen(argv, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dash']}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the Jobs API answers once the dashboard is up
            assert proc.poll() is None, (root / "ray-start.log").read_text()
            with contextlib.suppress(OSError):
                _get_json(f"{dashboard}/api/version")
                break
            assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(1)
        yield Head(dashboard, f"http://127.0.0.1:{ports['metrics']}/metrics", root)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)  # a throwaway cluster: no need to wait for a clean exit
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # stragglers of the head's group
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_processes_naming(str(root))  # job drivers run in sessions of their own
        log.close()


def _kill_processes_naming(token: str) -> None:
    for proc_dir in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if token in (proc_dir / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc_dir.name), signal.SIGKILL)


def campaign_command(run_dir: Path) -> list[str]:
    """The job's entrypoint (`ray job submit` quotes each word: no shell syntax here)."""
    return ["python", "-m", "loop.main", "run", "configs/tiny.yaml",
            f"campaign.run_dir={run_dir}", *OVERRIDES, "--auto-resume"]


def submit(head: Head, submission_id: str, entrypoint: list[str], data_dir: Path) -> None:
    """`ray job submit --no-wait --working-dir <repo>`, the upload kept small (code and
    configs); retried while the fresh head has no agent to take it yet."""
    runtime_env = {"excludes": UPLOAD_EXCLUDES,
                   "env_vars": {"RAY_AUTH_MODE": "disabled", "PREFLOOP_DATA_DIR": str(data_dir)}}
    argv = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard,
            "--submission-id", submission_id, "--no-wait", "--working-dir", str(REPO),
            "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True,
                                timeout=180)
        if result.returncode == 0:
            return
        starting = "No available agent" in result.stdout + result.stderr
        assert starting and time.monotonic() < deadline, result.stdout + result.stderr
        time.sleep(2)


def job_status(head: Head, submission_id: str) -> str:
    return _get_json(f"{head.dashboard}/api/jobs/{submission_id}")["status"]


def job_logs(head: Head, submission_id: str) -> str:
    return _get_json(f"{head.dashboard}/api/jobs/{submission_id}/logs")["logs"]


def wait_for(head: Head, submission_id: str, timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    while (status := job_status(head, submission_id)) not in TERMINAL:
        assert time.monotonic() < deadline, f"job {submission_id} still {status}"
        time.sleep(1)
    return status


def prefloop_series(head: Head) -> dict[str, float]:
    """`ray_prefloop_*{campaign="tiny"}` series on the node's endpoint: name → value."""
    try:
        with urllib.request.urlopen(head.metrics, timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    series = {}
    for line in text.splitlines():
        if line.startswith("ray_prefloop_") and 'campaign="tiny"' in line:
            series[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return series


@dataclass(frozen=True)
class Finished:
    run_dir: Path
    status: str
    logs: str
    series: dict[str, float]


@pytest.fixture(scope="module")
def reference(head, shared_data) -> Finished:
    """The campaign submitted once and left alone; the metrics endpoint is polled while it runs
    (a series shows up about 10 s after it is set) and for up to 30 s after."""
    run_dir = head.root / "reference"
    submit(head, "prefloop-reference", campaign_command(run_dir), shared_data)
    series: dict[str, float] = {}
    deadline = time.monotonic() + 400
    while (status := job_status(head, "prefloop-reference")) not in TERMINAL:
        assert time.monotonic() < deadline, f"the reference job is still {status}"
        series.update(prefloop_series(head))
        time.sleep(1)
    after = time.monotonic() + 30
    while "ray_prefloop_label_seed_pairs" not in series and time.monotonic() < after:
        time.sleep(1)
        series.update(prefloop_series(head))
    return Finished(run_dir, status, job_logs(head, "prefloop-reference"), series)


def open_ledger(run_dir: Path) -> Ledger:
    return Ledger.open(f"sqlite:///{run_dir}/ledger.sqlite", migrate=False)


def test_jobs_run_the_repository_venv_python(head, shared_data):
    """The `python` of an entrypoint is the venv's (the head was started from it): a job
    never falls back to a system interpreter without prefloop's packages."""
    submit(head, "prefloop-which-python",
           ["python", "-c", "import sys; print('job python:', sys.executable)"], shared_data)
    assert wait_for(head, "prefloop-which-python", timeout=120) == "SUCCEEDED"
    job_python = re.search(r"^job python: (.+)$", job_logs(head, "prefloop-which-python"),
                           re.MULTILINE)
    assert job_python and Path(job_python[1]).parent == BIN


def test_a_submitted_campaign_succeeds_with_ledger_rows_and_metrics(reference):
    logs = reference.logs
    assert reference.status == "SUCCEEDED", logs
    assert f"prefloop: --auto-resume: no campaign in {reference.run_dir} yet: starting one" in logs
    assert "Ray: joined the cluster" in logs
    assert ("placement group reserved on 1 node(s): rollout 1 × {CPU: 0.25}, labeler 1 × "
            "{CPU: 0.25}, rm-trainer 1 × {CPU: 0.25}, ppo-trainer 1 × {CPU: 0.25} (PACK)") in logs
    assert f"iteration {ITERATIONS}/{ITERATIONS}: reward" in logs

    ledger = open_ledger(reference.run_dir)
    policies = ledger.model_versions("tiny", "policy")
    assert [v.version for v in policies] == list(range(ITERATIONS + 1))
    assert [v.parent_version for v in policies] == [None, *range(ITERATIONS)]
    assert set(ledger.generations_per_policy_version("tiny")) == set(range(ITERATIONS))
    assert len(ledger.snapshot("tiny", kinds=("human",)).rows) == 64  # the seed pairs
    ai = ledger.snapshot("tiny", kinds=("ai",)).rows
    assert {r.labeler_id for r in ai} == {"labeler-0"}
    assert 0 < len(ai) <= 4 * ITERATIONS  # 4 prompts → at most 4 comparisons per iteration
    assert [v.version for v in ledger.model_versions("tiny", "rm")] == [1]

    series = reference.series
    assert series.get("ray_prefloop_label_seed_pairs") == 64.0, sorted(series)
    assert series.get("ray_prefloop_rm_train_pairs") == 64.0  # RM v1 on the seed pairs
    assert series.get("ray_prefloop_iteration") in {float(i) for i in range(ITERATIONS + 1)}


def preference_contents(ledger: Ledger) -> Counter:
    """Every preference by what it says (texts, versions, verdict, who), not by row id."""
    rows = ledger.snapshot("tiny", kinds=("ai", "human", "gold")).rows
    return Counter((r.prompt, r.text_a, r.text_b, r.policy_version_a, r.policy_version_b,
                    r.choice, r.labeler_kind, r.labeler_id) for r in rows)


@pytest.mark.slow  # two more job start-ups after the reference: ~3 min on 2 idle cores
def test_a_stopped_job_resubmitted_continues_exactly(head, reference, shared_data):
    assert reference.status == "SUCCEEDED", reference.logs
    # What `ray job stop` does (SIGTERM to the entrypoint, SIGKILL 3 s later), through the
    # Jobs API with a client made beforehand: the CLI, or even importing the client, takes
    # seconds, time enough for the tiny campaign to end.
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(head.dashboard)
    run_dir = head.root / "resumed"
    command = campaign_command(run_dir)
    submit(head, "prefloop-stopped", command, shared_data)
    first_checkpoint = run_dir / "checkpoints/it-000001/COMPLETE"
    deadline = time.monotonic() + 300
    while not first_checkpoint.is_file():
        status = job_status(head, "prefloop-stopped")
        assert status not in TERMINAL, job_logs(head, "prefloop-stopped")
        assert time.monotonic() < deadline, "no first checkpoint after 300 s"
        time.sleep(0.2)
    assert jobs.stop_job("prefloop-stopped")
    assert wait_for(head, "prefloop-stopped") == "STOPPED", (
        f"the job ended before the stop reached it (raise ITERATIONS):\n"
        f"{job_logs(head, 'prefloop-stopped')}")
    stopped_at = [v.version for v in open_ledger(run_dir).model_versions("tiny", "policy")]
    assert 2 <= len(stopped_at) <= ITERATIONS  # v0, v1 … but not the last one

    submit(head, "prefloop-resubmitted", command, shared_data)  # the identical command
    assert wait_for(head, "prefloop-resubmitted") == "SUCCEEDED", job_logs(
        head, "prefloop-resubmitted")
    logs = job_logs(head, "prefloop-resubmitted")
    assert f"prefloop: --auto-resume: continuing the campaign in {run_dir}" in logs
    resumed = re.search(r"resumed from .*/it-(\d+): iteration (\d+), policy v(\d+)", logs)
    assert resumed, logs
    k = int(resumed[2])
    assert int(resumed[1]) == k == int(resumed[3]) and 1 <= k <= len(stopped_at) - 1
    assert f"iteration {k}/{ITERATIONS}:" not in logs  # nothing before the checkpoint re-ran
    assert f"iteration {k + 1}/{ITERATIONS}:" in logs
    assert f"iteration {ITERATIONS}/{ITERATIONS}:" in logs

    ledger, ref = open_ledger(run_dir), open_ledger(reference.run_dir)
    policies = ledger.model_versions("tiny", "policy")
    assert [v.version for v in policies] == list(range(ITERATIONS + 1))  # no gap, no restart
    assert [v.parent_version for v in policies] == [None, *range(ITERATIONS)]
    assert (ledger.generations_per_policy_version("tiny")
            == ref.generations_per_policy_version("tiny"))
    rows = ledger.snapshot("tiny", kinds=("ai", "human", "gold")).rows
    assert len({(r.comparison_id, r.labeler_id) for r in rows}) == len(rows)
    assert ledger.row_counts()["preference"] == len(rows)  # nothing superseded or hidden
    got, want = preference_contents(ledger), preference_contents(ref)
    assert max(got.values()) == 1  # no pair of responses labeled twice by one labeler
    assert got == want  # stopped + resumed == uninterrupted
