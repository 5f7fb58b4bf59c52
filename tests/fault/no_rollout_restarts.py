"""`python -m loop.main` with rollout workers that Ray never restarts and that `collect` never
samples again (`max_restarts=0`, `max_regenerations=0`): the negative control of
test_node_loss.py's campaign. Arguments are those of `loop.main`."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from actors.rollout import RolloutGroup

launch = RolloutGroup.launch


def launch_without_restarts(*args, **kwargs) -> RolloutGroup:
    return launch(*args, **{**kwargs, "max_restarts": 0, "max_regenerations": 0})


RolloutGroup.launch = staticmethod(launch_without_restarts)
runpy.run_module("loop.main", run_name="__main__", alter_sys=True)
