"""The metrics path: prefixed keys, one JSON object per line, NaN written as null."""

from __future__ import annotations

import io
import json
import math

import pytest

from actors.core.metrics import JsonlSink, MetricKeyError, MetricSink, MultiSink, read_jsonl


def test_jsonl_rows_round_trip(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    sink = JsonlSink(path)
    sink.log({"rollout/reward_mean": 0.5, "timing/rollout": 2}, step=0)
    sink.log({"ppo/approx_kl": math.nan, "monitor/alarm_length": math.inf}, step=1)
    sink.close()
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["rollout/reward_mean"] == 0.5 and rows[0]["timing/rollout"] == 2.0
    assert rows[1]["ppo/approx_kl"] is None and rows[1]["monitor/alarm_length"] is None
    assert rows[0]["time"] <= rows[1]["time"]


def test_appends_across_reopen(tmp_path):
    path = tmp_path / "m.jsonl"
    for step in range(3):
        sink = JsonlSink(path)
        sink.log({"rm/loss": float(step)}, step=step)
        sink.close()
    assert [r["rm/loss"] for r in read_jsonl(path)] == [0.0, 1.0, 2.0]


def test_each_line_is_flushed_immediately():
    buf = io.StringIO()
    JsonlSink(buf).log({"label/count": 3}, step=7)
    assert json.loads(buf.getvalue())["label/count"] == 3


@pytest.mark.parametrize("bad", [{"reward": 1.0}, {"ppo_loss": 1.0}, {"rm/x": 1.0, "kl": 2.0}])
def test_keys_need_a_stage_prefix(bad):
    with pytest.raises(MetricKeyError, match="must start with one of rollout/"):
        JsonlSink(io.StringIO()).log(bad, step=0)


@pytest.mark.parametrize("value", ["1.0", None, True])
def test_values_must_be_numbers(value):
    with pytest.raises(MetricKeyError, match=r"metric values of \['rm/loss'\] must be numbers"):
        JsonlSink(io.StringIO()).log({"rm/loss": value}, step=0)


def test_multisink_fans_out_and_is_a_sink():
    a, b = io.StringIO(), io.StringIO()
    multi = MultiSink([JsonlSink(a), JsonlSink(b)])
    assert isinstance(multi, MetricSink)
    multi.log({"ppo/clipfrac": 0.25}, step=2)
    assert json.loads(a.getvalue())["ppo/clipfrac"] == json.loads(b.getvalue())["ppo/clipfrac"]
