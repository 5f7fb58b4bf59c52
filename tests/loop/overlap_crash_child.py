"""Child process of ``test_overlap``: ``prefloop run`` with a crash injected in iteration 2 right
after the batch it samples ahead (batch 3, by policy v2) is in the ledger — batch 2 labeled,
nothing of the iteration's RM refresh or PPO done, checkpoint it-2 the newest.

    python tests/loop/overlap_crash_child.py CONFIG [KEY=VALUE ...]

The exception takes the driver down as a crash would: the campaign's `finally` kills the
actors, no checkpoint after it-2 exists, the process exits non-zero.
"""

from __future__ import annotations

import sys

from loop.cli import main
from loop.iteration import CampaignLoop

CRASH_AT = 3
"""The iteration whose batch, once sampled ahead and logged, is lost to the crash."""


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


if __name__ == "__main__":
    crash_after_sampling_ahead()
    main(["run", *sys.argv[1:]])
