"""Child process of ``test_checkpoint_kill``: a campaign that checkpoints iteration 2, then
starts checkpointing iteration 4 and stops on a file barrier just before writing ``pause_at``
(its PID and the barrier file tell the test it is there). The test kills it with SIGKILL.

    python tests/fault/checkpoint_child.py RUN_DIR WRITER

WRITER ``atomic`` is `loop.checkpoint.save_checkpoint` (paused before the ``COMPLETE`` marker,
all other files written); ``marker_first`` is the negative control, a writer that writes in
place and marks the checkpoint complete before its files (paused before ``loop.json``).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from actors.core.monitors_history import IterationSummary, MonitorHistory
from loop import checkpoint
from loop.state import LoopState

BARRIER = "paused"
SERVING_RM = 3


def state_at(iteration: int) -> LoopState:
    """The loop state the campaign checkpoints at ``iteration`` (the test's expected data)."""
    history = MonitorHistory()
    for it in range(1, iteration + 1):
        history = history.updated(IterationSummary(it, 10.0 + it, 0.5 * it, 0.25 * it), keep=8)
    return LoopState(iteration=iteration, policy_version=iteration, rm_versions=iteration + 1,
                     labels_at_refresh=35 * iteration, history=history)


def weights(iteration: int) -> bytes:
    """The PPO checkpoint's bytes at ``iteration``."""
    return f"ppo weights of iteration {iteration}\n".encode() * 64


def save_ppo(iteration: int) -> Callable[[Path], None]:
    def save(directory: Path) -> None:
        directory.mkdir()
        (directory / "weights.bin").write_bytes(weights(iteration))
        (directory / "optimizer.bin").write_bytes(weights(iteration)[::-1])
    return save


def save_marker_first(run_dir: Path, state: LoopState, serving_rm: int,
                      save: Callable[[Path], None]) -> Path:
    """Negative control: in place, the marker first (what the atomic writer must not do)."""
    final = checkpoint.checkpoint_dir(run_dir) / f"it-{state.iteration:06d}"
    final.mkdir(parents=True)
    (final / checkpoint.MARKER).write_text("ok\n", encoding="utf-8")
    save(final / "ppo")
    payload = {**asdict(state), "history": state.history.to_dict(), "serving_rm": serving_rm}
    (final / checkpoint.STATE_FILE).write_text(json.dumps(payload), encoding="utf-8")
    return final


def pause_before(name: str, iteration_dir: str, barrier: Path) -> None:
    """Stop the process for good right before it writes file ``name`` of the checkpoint."""
    real = pathlib.Path.write_text

    def write_text(self: Path, *args, **kwargs):
        if self.name == name and iteration_dir in self.parent.name:
            barrier.write_text(str(os.getpid()), encoding="utf-8")
            while True:  # until SIGKILL
                time.sleep(1.0)
        return real(self, *args, **kwargs)

    pathlib.Path.write_text = write_text  # type: ignore[method-assign]


def main(run_dir: Path, writer: str) -> None:
    checkpoint.save_checkpoint(run_dir, state_at(2), SERVING_RM, save_ppo(2))
    if writer == "atomic":
        pause_before(checkpoint.MARKER, "it-000004", run_dir / BARRIER)
        checkpoint.save_checkpoint(run_dir, state_at(4), SERVING_RM, save_ppo(4))
    else:
        pause_before(checkpoint.STATE_FILE, "it-000004", run_dir / BARRIER)
        save_marker_first(run_dir, state_at(4), SERVING_RM, save_ppo(4))
    raise SystemExit("the checkpoint finished: the barrier never paused it")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
