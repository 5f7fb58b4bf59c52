"""Ray the way prefloop uses it: one local instance for tests, and a real `ray start` cluster
that accepts `ray job submit` of the prefloop entry point with auth pinned the same way."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_actor_round_trip_through_the_object_store(ray_local):
    import torch

    @ray_local.remote
    class Doubler:
        def run(self, batch: torch.Tensor) -> torch.Tensor:
            return batch * 2

    batch = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    ref = ray_local.put(batch)
    actor = Doubler.remote()
    out = ray_local.get(actor.run.remote(ref))
    assert torch.equal(out, batch * 2)
    ray_local.kill(actor)


def mapped_libraries(ray, env: dict[str, str]) -> str:
    """/proc/self/maps of a Ray worker started with `env`."""

    @ray.remote(num_cpus=0)
    def maps() -> str:
        return Path("/proc/self/maps").read_text()

    return ray.get(maps.options(runtime_env={"env_vars": env}).remote())


def test_workers_get_tcmalloc_where_it_is_installed(ray_local):
    from loop.ray_env import worker_env

    env = worker_env()
    assert env == {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}  # .ci/setup installs it
    assert "libtcmalloc_minimal" in mapped_libraries(ray_local, env)
    assert "libtcmalloc_minimal" not in mapped_libraries(ray_local, {"PREFLOOP_PROBE": "1"})


def test_worker_env_respects_an_explicit_choice(monkeypatch):
    from loop.ray_env import worker_env

    monkeypatch.setenv("PREFLOOP_ALLOCATOR", "system")
    assert worker_env() == {}
    monkeypatch.delenv("PREFLOOP_ALLOCATOR")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")  # the user's own preload wins
    assert worker_env() == {}


def test_connect_reuses_the_running_instance(ray_local):
    from loop.ray_env import connect

    assert ray_local.is_initialized()
    assert connect() == "local"
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real `ray start --head --block` cluster in its own process group; teardown signals that
    group only (never `ray stop`, which would also kill the session's other Ray instances)."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bindir}:{os.environ['PATH']}"}
    # Every port explicit: the session's local Ray already holds the defaults (e.g. the
    # dashboard agent's 52365), and a head whose agent cannot bind never accepts jobs.
    gcs, dash, agent_http, agent_grpc, metrics = (_free_port() for _ in range(5))
    start = [f"{bindir}/ray", "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             "--disable-usage-stats", f"--temp-dir={tmp_path_factory.mktemp('ray')}"]
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # stragglers of the head's group
            os.killpg(head.pid, signal.SIGKILL)


def submit(ray_head, *entrypoint: str) -> subprocess.CompletedProcess[str]:
    """`ray job submit --working-dir . -- ENTRYPOINT`, retried while the freshly started head
    is not up yet (connection refused, or 500 "No available agent" for a few seconds)."""
    env, address = ray_head
    argv = [f"{Path(sys.executable).parent}/ray", "job", "submit", "--address", address,
            "--working-dir", ".", "--", *entrypoint]
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        starting = ("No available agent" in result.stderr
                    or "Failed to connect to Ray" in result.stderr
                    or "ConnectionError" in result.stderr)
        if not starting or time.monotonic() > deadline:
            return result
        time.sleep(2)


def test_ray_job_submit_runs_the_entry_point(ray_head):
    result = submit(ray_head, "python", "-m", "loop.main", "check", "configs/tiny.yaml",
                    "ppo.kl.target=4.5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "    target: 4.5\n" in result.stdout
    assert "succeeded" in result.stdout


def test_ray_job_submit_reports_a_config_error(ray_head):
    result = submit(ray_head, "python", "-m", "loop.main", "check", "configs/tiny.yaml",
                    "ppo.lr=abc")
    assert result.returncode != 0
    assert "ppo.lr: expected a valid number, got 'abc'" in result.stdout + result.stderr
    assert "failed" in (result.stdout + result.stderr).lower()
