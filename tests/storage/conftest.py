"""Fixtures of the storage tests: a ledger on SQLite and on a fresh PostgreSQL database (the
URLs come from the root conftest's ``db_url`` and ``pg_fresh_url``).

PostgreSQL tests need ``PREFLOOP_TEST_PG_URL`` (``.ci/test`` starts a server and sets it). Where
it is missing they fail, never skip: a green run must mean both backends were tested.
"""

from __future__ import annotations

import importlib
import multiprocessing
import queue
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from storage.ledger import Ledger
from storage.records import NewComparison, NewGeneration


@dataclass(frozen=True)
class Procs:
    """Spawned worker processes: ``ctx`` makes them, ``bodies`` is storage_test_procs."""

    ctx: BaseContext
    bodies: ModuleType

    def start(self, target: Callable[..., None], *arg_lists: tuple) -> list[BaseProcess]:
        """Start one process per argument tuple."""
        started = [self.ctx.Process(target=target, args=args) for args in arg_lists]
        for process in started:
            process.start()
        return started

    def results(self, out: Any, processes: list[BaseProcess], n: int, timeout: float) -> list:
        """``n`` results from ``out``; fails fast when the producers died without them."""
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            try:
                got.append(out.get(timeout=0.2))
            except queue.Empty:
                if time.monotonic() > deadline or not any(p.is_alive() for p in processes):
                    codes = [p.exitcode for p in processes]
                    pytest.fail(f"{len(got)}/{n} results after {timeout}s; exit codes {codes}")
        return got


@pytest.fixture(scope="session")
def procs() -> Iterator[Procs]:
    """Multi-process helper. ``spawn``: a child never inherits pytest's threads (Ray may be
    running in this process by then), so only the code under test forks."""
    here = str(Path(__file__).resolve().parent)
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)  # spawned children import storage_test_procs from here
    yield Procs(multiprocessing.get_context("spawn"), importlib.import_module("storage_test_procs"))
    if added:
        sys.path.remove(here)


@pytest.fixture
def ledger(db_url: str) -> Ledger:
    """A migrated ledger with campaign ``c1``."""
    opened = Ledger.open(db_url, max_text_chars=100)
    opened.ensure_campaign("c1")
    return opened


@dataclass(frozen=True)
class Seeded:
    """Ids created by ``seed``: prompts, generations per prompt, comparisons."""

    prompts: list[int]
    generations: list[list[int]]
    comparisons: list[int]


def seed_campaign(
    ledger: Ledger, campaign: str, n_prompts: int, per_prompt: int, policy_version: int = 0
) -> Seeded:
    """Add ``n_prompts`` prompts, ``per_prompt`` generations each, and every (i < j) pair."""
    ledger.ensure_campaign(campaign)
    prompts = ledger.add_prompts(campaign, [f"{campaign} prompt {i}" for i in range(n_prompts)])
    gens = ledger.add_generations(
        campaign,
        [
            NewGeneration(p, f"answer {p}.{k} v{policy_version}", 3, policy_version, "w0", k)
            for p in prompts
            for k in range(per_prompt)
        ],
    )
    grouped = [gens[i * per_prompt : (i + 1) * per_prompt] for i in range(n_prompts)]
    pairs = [
        NewComparison(g[i], g[j])
        for g in grouped
        for i in range(per_prompt)
        for j in range(i + 1, per_prompt)
    ]
    return Seeded(prompts, grouped, ledger.add_comparisons(campaign, pairs))


@pytest.fixture
def seed() -> Callable[..., Seeded]:
    """``seed(ledger, campaign, n_prompts, per_prompt)`` -> ``Seeded``."""
    return seed_campaign
