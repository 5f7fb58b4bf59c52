"""Atomic campaign checkpoints: everything a resumed campaign needs to continue exactly.

    <run_dir>/checkpoints/it-000004/
        ppo/            the PPO trainer's own checkpoint (weights, optimizer, KL controller,
                        RNG states; `PPOTrainerGroup.save_checkpoint`)
        loop.json       LoopState: data position (iteration), policy version, RM versions,
                        ledger watermark of the last refresh, monitor history, serving RM
        COMPLETE        written last

A checkpoint is built in a `.partial` directory and renamed into place after `COMPLETE` is on
disk, so a crash at any moment leaves either the previous complete checkpoint or the new one;
`latest_checkpoint` ignores anything without the marker.

No rollout batch sampled ahead (`campaign.overlap_rollout`) is ever pending at a checkpoint: the
iteration that a checkpoint follows samples none ahead (`checkpoints_after`), in an uninterrupted
campaign as in a resumed one, so both run the same iterations on the same batches.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from actors.core.monitors_history import MonitorHistory
from loop.state import LoopState

MARKER = "COMPLETE"
STATE_FILE = "loop.json"


def checkpoints_after(step: int, every: int, total: int) -> bool:
    """Whether the campaign checkpoints once `step` iterations are done: every `every`
    iterations and after the last (`campaign.checkpoint_every`, `campaign.iterations`)."""
    return step % every == 0 or step >= total


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(run_dir: Path, state: LoopState, serving_rm: int,
                    save_ppo: Callable[[Path], object], keep: int = 2) -> Path:
    """Write checkpoint `it-<iteration>` atomically; keeps the newest `keep` checkpoints."""
    root = checkpoint_dir(run_dir)
    final = root / f"it-{state.iteration:06d}"
    partial = root / f".it-{state.iteration:06d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_ppo(partial / "ppo")
    payload = {**asdict(state), "history": state.history.to_dict(), "serving_rm": serving_rm}
    (partial / STATE_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    _fsync_tree(partial)
    (partial / MARKER).write_text("ok\n", encoding="utf-8")
    _fsync_tree(partial)
    if final.exists():  # the same iteration checkpointed again after a resume
        shutil.rmtree(final)
    os.replace(partial, final)
    for old in sorted(p for p in root.glob("it-*") if (p / MARKER).is_file())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = checkpoint_dir(run_dir)
    done = sorted(p for p in root.glob("it-*") if (p / MARKER).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def load_state(path: Path) -> tuple[LoopState, int]:
    """The `LoopState` and serving RM version stored in checkpoint `path`."""
    raw = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    serving = raw.pop("serving_rm")
    raw["history"] = MonitorHistory.from_dict(raw["history"])
    # checkpoints written before refreshes were counted: the count was the version then
    raw.setdefault("rm_refreshes", raw["rm_versions"])
    return LoopState(**raw), serving
