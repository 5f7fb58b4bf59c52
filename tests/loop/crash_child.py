"""Child process of the crash/resume tests: ``prefloop run`` with a crash injected in iteration
``CRASH_AT`` (1-based step 3, the one after checkpoint it-2) at one of two points:

* ``sample_ahead`` (`test_overlap`): right after the batch it samples ahead (batch 3, by policy
  v2) is in the ledger — batch 2 labeled, nothing of the iteration's RM refresh or PPO done;
* ``rm_refresh`` (`test_resume_mid_iteration`): right after the iteration's RM refresh is
  trained, published and recorded in the ledger — before its PPO update.

    python tests/loop/crash_child.py POINT CONFIG [KEY=VALUE ...]

The exception takes the driver down as a crash would: the campaign's `finally` kills the
actors, no checkpoint after it-2 exists, the process exits non-zero.
"""

from __future__ import annotations

import sys

from loop.cli import main
from loop.iteration import CampaignLoop

CRASH_AT = 3
"""The step (1-based iteration) the crash interrupts."""


def crash_after_sampling_ahead() -> None:
    real = CampaignLoop.sample_ahead

    def sample_ahead(self, iteration):
        pending = real(self, iteration)
        if iteration == CRASH_AT:
            assert pending is not None, "the crash is meant to lose a batch sampled ahead"
            self.rollout.collect(pending.handle)  # its generations are in the ledger now
            raise RuntimeError(f"injected crash with batch {CRASH_AT} sampled ahead")
        return pending

    CampaignLoop.sample_ahead = sample_ahead


def crash_after_rm_refresh() -> None:
    real = CampaignLoop.maybe_refresh_rm

    def maybe_refresh_rm(self, iteration):
        metrics = real(self, iteration)
        if iteration + 1 == CRASH_AT:
            assert metrics.get("rm/refreshed") == 1.0, "the crash is meant to lose a refresh"
            raise RuntimeError(f"injected crash after the RM refresh of iteration {CRASH_AT} "
                               f"(RM v{self.state.rm_versions} recorded)")
        return metrics

    CampaignLoop.maybe_refresh_rm = maybe_refresh_rm


POINTS = {"sample_ahead": crash_after_sampling_ahead, "rm_refresh": crash_after_rm_refresh}

if __name__ == "__main__":
    POINTS[sys.argv[1]]()
    main(["run", *sys.argv[2:]])
