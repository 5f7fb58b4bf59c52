"""Optional metric sinks: TensorBoard event files and an offline W&B run, read back."""

from __future__ import annotations

import math

import pytest

from actors.core.metrics import read_jsonl
from loop.config_load import ConfigError, load_config
from loop.sinks import EXTRAS, open_sinks

ROWS = [{"ppo/mean_reward": 0.3125, "rm/fresh_accuracy": 0.5078125},
        {"ppo/mean_reward": 0.4375, "rm/fresh_accuracy": math.nan},  # NaN: left out, no point
        {"ppo/mean_reward": 0.8125, "rm/fresh_accuracy": 0.6328125}]


def _log_all(cfg, run_dir):
    sink = open_sinks(cfg, run_dir)
    for step, row in enumerate(ROWS, start=1):
        sink.log(row, step)
    sink.close()


def test_tensorboard_gets_every_finite_scalar_by_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config("configs/tiny.yaml", ["metrics.tensorboard=true",
                                            "metrics.ray_dashboard=false"])
    _log_all(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    reward = [(e.step, e.value) for e in events.Scalars("ppo/mean_reward")]
    accuracy = [(e.step, e.value) for e in events.Scalars("rm/fresh_accuracy")]
    assert reward == [(1, 0.3125), (2, 0.4375), (3, 0.8125)]
    assert accuracy == [(1, 0.5078125), (3, 0.6328125)]
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 3  # JSONL is always written


def test_wandb_logs_an_offline_run_in_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config("configs/tiny.yaml", ["metrics.wandb_project=prefloop-test",
                                            "metrics.ray_dashboard=false"])
    _log_all(cfg, tmp_path)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/run-tiny.wandb"))
    assert len(runs) == 1  # offline by default, run id = the campaign name
    data = runs[0].read_bytes()
    assert b"ppo/mean_reward" in data and b"rm/fresh_accuracy" in data
    assert all(v in data for v in (b"0.3125", b"0.4375", b"0.8125", b"0.5078125", b"0.6328125"))


def test_a_sink_without_its_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(EXTRAS, "tensorboard", "prefloop_no_such_package")
    cfg = load_config("configs/tiny.yaml", ["metrics.tensorboard=true",
                                            "metrics.ray_dashboard=false"])
    with pytest.raises(ConfigError, match=r"metrics.tensorboard needs the "
                                          r"'prefloop_no_such_package' package: pip install "
                                          r"'prefloop\[tensorboard\]'"):
        open_sinks(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing opened before the check
