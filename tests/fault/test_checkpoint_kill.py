"""Issue #9, item 3: a process killed (SIGKILL) after a checkpoint's files are written but before
its completion marker resumes from the previous complete checkpoint.

A real child process (`checkpoint_child.py`) checkpoints iteration 2, then starts iteration 4
and stops on a file barrier right before writing the ``COMPLETE`` marker; the test checks that
every other file of iteration 4 is on disk, kills the child with SIGKILL, and resumes as the
driver does (`latest_checkpoint` + `load_state`): it must load iteration 2, with its state and
its PPO bytes, and a resumed run must be able to checkpoint iteration 4 again.

Negative control: the same kill against a writer that writes in place and marks the checkpoint
complete before its files resumes from the torn iteration 4 and cannot load it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop.checkpoint import MARKER, STATE_FILE, latest_checkpoint, load_state, save_checkpoint

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("checkpoint_child", HERE / "checkpoint_child.py")
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


def kill_mid_checkpoint(run_dir: Path, writer: str, timeout_s: float = 60.0) -> int:
    """Run the child until it pauses at its barrier, SIGKILL it; returns its exit status."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(HERE / "checkpoint_child.py"), str(run_dir),
                             writer], cwd=REPO, env=env, stderr=subprocess.PIPE)
    barrier = run_dir / child.BARRIER
    deadline = time.monotonic() + timeout_s
    try:
        while not barrier.exists():
            if proc.poll() is not None:
                pytest.fail(f"child exited {proc.returncode} before the barrier: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"child did not reach the barrier in {timeout_s}s")
            time.sleep(0.02)
        assert int(barrier.read_text()) == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_sigkill_before_the_marker_resumes_from_the_previous_checkpoint(tmp_path: Path):
    status = kill_mid_checkpoint(tmp_path, "atomic")

    assert status == -signal.SIGKILL
    torn = tmp_path / "checkpoints" / ".it-000004.partial"  # what the kill left behind
    assert (torn / "ppo" / "weights.bin").read_bytes() == child.weights(4)
    assert (torn / STATE_FILE).is_file() and not (torn / MARKER).exists()

    found = latest_checkpoint(tmp_path)  # what a resumed driver loads
    assert found is not None and found.name == "it-000002"
    state, serving = load_state(found)
    assert state == child.state_at(2) and serving == child.SERVING_RM
    assert [s.iteration for s in state.history.summaries] == [1, 2]
    assert (found / "ppo" / "weights.bin").read_bytes() == child.weights(2)
    assert (found / "ppo" / "optimizer.bin").read_bytes() == child.weights(2)[::-1]

    # the resumed run redoes iteration 4 and checkpoints it over the torn one
    again = save_checkpoint(tmp_path, child.state_at(4), child.SERVING_RM, child.save_ppo(4))
    assert latest_checkpoint(tmp_path) == again and not torn.exists()
    assert load_state(again) == (child.state_at(4), child.SERVING_RM)


def test_negative_control_a_marker_first_writer_resumes_into_a_torn_checkpoint(tmp_path: Path):
    status = kill_mid_checkpoint(tmp_path, "marker_first")

    assert status == -signal.SIGKILL
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.name == "it-000004"  # not the previous complete one
    assert (found / MARKER).is_file() and not (found / STATE_FILE).exists()
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        load_state(found)
