"""The campaign's metric sinks, from `metrics.*`: JSONL (always), the Ray dashboard's gauges,
and, optionally, TensorBoard event files and a Weights & Biases run.

    sink = open_sinks(cfg, run_dir)      # a MultiSink
    sink.log({"ppo/mean_reward": 0.4, "timing/rollout": 2.1}, step=3)
    sink.close()

TensorBoard (`metrics.tensorboard: true`) writes `RUN_DIR/tensorboard/` — `tensorboard --logdir
RUN_DIR/tensorboard` shows it. W&B (`metrics.wandb_project: NAME`) logs to that project, offline
unless `WANDB_MODE` says otherwise (the run lands in `RUN_DIR/wandb/`; `wandb sync` uploads it),
so a campaign never depends on reaching a server. Both packages are optional extras
(`pip install 'prefloop[tensorboard]'`, `'prefloop[wandb]'`); asking for a sink whose package is
missing is a config error that says what to install, before any actor starts.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from actors.core.metrics import JsonlSink, MetricSink, MultiSink, check_keys
from loop.config import Config
from loop.config_load import ConfigError

EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""Sink → the package (and prefloop extra) it needs."""


def require(sink: str, key: str) -> None:
    """Fail with a config error when `sink`'s package is not installed."""
    if importlib.util.find_spec(EXTRAS[sink]) is None:
        raise ConfigError(f"{key} needs the {EXTRAS[sink]!r} package: pip install "
                          f"'prefloop[{sink}]' (or turn {key} off)")


class TensorBoardSink:
    """Scalars to TensorBoard event files (torch's SummaryWriter), one tag per metric key."""

    def __init__(self, log_dir: Path):
        require("tensorboard", "metrics.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        check_keys(metrics)
        for key, value in metrics.items():
            if math.isfinite(value):
                self.writer.add_scalar(key, float(value), global_step=int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per campaign (its name and id are the campaign's, so a resumed campaign
    continues the same run); offline unless WANDB_MODE is set."""

    def __init__(self, project: str, campaign: str, run_dir: Path, config: dict[str, Any]):
        require("wandb", "metrics.wandb_project")
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, name=campaign, id=_run_id(campaign),
                              resume="allow", dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        check_keys(metrics)
        self.run.log({k: float(v) for k, v in metrics.items() if math.isfinite(v)},
                     step=int(step))

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() only informs W&B's service process that the run is done; the service closes
        # (flushes) the run's file later. Tearing the service down waits for that, so the run
        # directory is complete, ready for `wandb sync`, when the campaign returns.
        wandb.teardown()


def _run_id(campaign: str) -> str:
    """A W&B run id from a campaign name (letters, digits, - and _ only)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in campaign)[:64]


def open_sinks(cfg: Config, run_dir: Path) -> MultiSink:
    """The sinks `cfg.metrics` asks for (metrics.jsonl always: the report reads it)."""
    metrics = cfg.metrics
    if metrics.tensorboard:
        require("tensorboard", "metrics.tensorboard")
    if metrics.wandb_project:
        require("wandb", "metrics.wandb_project")
    sinks: list[MetricSink] = [JsonlSink(run_dir / "metrics.jsonl")]
    if metrics.ray_dashboard:
        from actors.metrics_exporter import DashboardSink

        sinks.append(DashboardSink(cfg.campaign.name))
    if metrics.tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    if metrics.wandb_project:
        sinks.append(WandbSink(metrics.wandb_project, cfg.campaign.name, run_dir,
                               cfg.model_dump(mode="json")))
    return MultiSink(sinks)
