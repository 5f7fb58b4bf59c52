"""Test harness shared by every test package.

RAY_AUTH_MODE is pinned before anything imports Ray (see loop/ray_env.py for why), and all
Ray tests share one session-scoped local instance.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (`address="local"` also works while another
    cluster runs on the machine, where a plain `ray.init(num_cpus=2)` would raise)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """pytest-playwright launches Debian's Chromium, headless (never a downloaded browser; see
    ../shared/RECIPES.md). Browser tests use its `browser`/`page` fixtures: one Playwright per
    session (a second sync Playwright inside the first one's event loop is refused)."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real, offline data next to the checkout (../shared/data)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need the project's shared data")
    return SHARED_DATA
