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
    """Join the Ray cluster this process was given, or start a local one.

    Inside `ray job submit` (RAY_ADDRESS set) or next to `ray start --head`, this joins that
    cluster; otherwise it starts a private local instance (`address="local"`, which also works
    while some other cluster runs on the machine). Returns "cluster" or "local".
    """
    configure_auth()
    import ray

    if ray.is_initialized():
        return "cluster" if os.environ.get("RAY_ADDRESS") else "local"
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
        return "cluster"
    except ConnectionError:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
        return "local"
