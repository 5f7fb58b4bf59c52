"""Child process of ``test_ppo_resume``: a real tiny campaign (`loop.campaign.run_campaign`).

    python tests/fault/ppo_resume_child.py MODE RUN_DIR [KEY=VALUE ...]

MODE ``full`` runs the campaign to its end; ``stop`` runs it until checkpoint
``it-<STOP_AT>`` is complete, then writes its PID to the barrier file and waits there for the
test's SIGKILL (no part of iteration STOP_AT + 1 has started); ``resume`` continues the campaign
in RUN_DIR as ``prefloop run --resume`` does; ``resume-drop-kl`` is the negative control: a
resume that restores everything but the KL controller (β back to its initial value).
Every mode appends the prompts each iteration draws to RUN_DIR/consumed.jsonl (the data
position as the driver used it).

The config is configs/tiny.yaml with the overrides; the run directory is passed through
$PREFLOOP_RUN_DIR, so the pinned config names no path and a copy of a run directory resumes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from actors.core.kl_control import make_kl_controller
from loop import campaign
from loop.config_load import load_config
from loop.prompts import PromptStream

BARRIER = "paused"
STOP_AT = 3
CONFIG = Path("configs/tiny.yaml")


def stop_after_checkpoint(run_dir: Path, iteration: int) -> None:
    """Stop the process for good once checkpoint `iteration` is complete."""
    real = campaign.save_checkpoint

    def save(*args, **kwargs):
        path = real(*args, **kwargs)
        if args[1].iteration == iteration:
            (run_dir / BARRIER).write_text(str(os.getpid()), encoding="utf-8")
            while True:  # until SIGKILL
                time.sleep(1.0)
        return path

    campaign.save_checkpoint = save


def record_prompts(run_dir: Path) -> None:
    """Append each iteration's prompts, as `PromptStream.batch` hands them out."""
    real = PromptStream.batch

    def batch(self, iteration: int) -> list[str]:
        prompts = real(self, iteration)
        with (run_dir / "consumed.jsonl").open("a", encoding="utf-8") as log:
            log.write(json.dumps({"iteration": iteration, "prompts": prompts}) + "\n")
        return prompts

    PromptStream.batch = batch


def drop_kl_on_resume(cfg) -> None:
    """Negative control: resume everything, then reset the KL controller."""
    real = campaign.resume_from_checkpoint

    def resume(loop, run_dir, say):
        real(loop, run_dir, say)
        state = loop.ppo.state_dict()
        loop.ppo.load_state_dict({**state, "kl": make_kl_controller(cfg.ppo.kl).state_dict()})
        say("negative control: the KL controller was NOT restored")

    campaign.resume_from_checkpoint = resume


def main(mode: str, run_dir: Path, overrides: list[str]) -> None:
    os.environ["PREFLOOP_RUN_DIR"] = str(run_dir)
    cfg = load_config(CONFIG, overrides)
    record_prompts(run_dir)
    if mode == "stop":
        stop_after_checkpoint(run_dir, STOP_AT)
    if mode == "resume-drop-kl":
        drop_kl_on_resume(cfg)
    resume = run_dir if mode.startswith("resume") else None
    campaign.run_campaign(cfg, CONFIG, resume=resume)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
