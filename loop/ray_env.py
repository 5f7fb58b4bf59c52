"""Connecting to Ray the same way everywhere: drivers, the CLI, `ray job submit`, tests.

Ray 2.60 writes `~/.ray/auth_token` on a local `ray.init()`; a cluster started afterwards then
turns token auth on and refuses job submissions and new actors unless every party agrees. So
prefloop always sets `RAY_AUTH_MODE` explicitly (default `disabled` on a single machine;
cluster templates set `token`) before Ray is imported anywhere in the process.
"""

from __future__ import annotations

import os

DEFAULT_AUTH_MODE = "disabled"


def configure_auth() -> str:
    """Pin RAY_AUTH_MODE for this process and its children; returns the mode in force."""
    return os.environ.setdefault("RAY_AUTH_MODE", DEFAULT_AUTH_MODE)


def connect(num_cpus: int | None = None) -> str:
    """Join the Ray cluster named by $RAY_ADDRESS, or start a private local one.

    `ray job submit` sets RAY_ADDRESS for its driver, so a submitted campaign joins its cluster;
    next to `ray start --head`, `RAY_ADDRESS=auto prefloop run …` joins that one. Without it,
    prefloop starts its own local instance (`address="local"`) rather than attaching to
    whatever Ray happens to run on the machine. Returns "cluster" or "local".
    """
    configure_auth()
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return "cluster" if address else "local"
    if address:
        ray.init(address=address)
        return "cluster"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return "local"
