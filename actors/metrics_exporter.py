"""MetricsExporter: the campaign's numbers as Ray custom metrics (dashboard + Prometheus).

`ray.util.metrics` series are exported by the node's metrics agent from worker processes, so
one tiny actor owns the gauges and the driver sends it each iteration's metrics. A metric key
`ppo/approx_kl` becomes the gauge `prefloop_ppo_approx_kl` (on the Prometheus endpoint:
`ray_prefloop_ppo_approx_kl{campaign="…"}`), tagged with the campaign.

    exporter = MetricsExporter.options(name="metrics-exporter").remote("demo")
    exporter.set.remote({"ppo/mean_reward": 0.4, "iteration": 3})
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import ray

_INVALID = re.compile(r"[^A-Za-z0-9_]")


def gauge_name(key: str) -> str:
    """`ppo/approx_kl` → `prefloop_ppo_approx_kl` (Prometheus names: letters, digits, _)."""
    return "prefloop_" + _INVALID.sub("_", key)


@ray.remote(num_cpus=0)
class MetricsExporter:
    """Holds one `Gauge` per metric key, created on first use."""

    def __init__(self, campaign: str):
        self.campaign = campaign
        self.gauges: dict[str, object] = {}

    def set(self, values: Mapping[str, float]) -> int:
        """Set the gauges of `values` (non-finite values are skipped); returns how many."""
        from ray.util.metrics import Gauge

        done = 0
        for key, value in values.items():
            if value is None or not math.isfinite(float(value)):
                continue
            name = gauge_name(key)
            if name not in self.gauges:
                self.gauges[name] = Gauge(name, description=f"prefloop metric {key}",
                                          tag_keys=("campaign",))
            self.gauges[name].set(float(value), tags={"campaign": self.campaign})
            done += 1
        return done


class DashboardSink:
    """A `MetricSink` that forwards each logged row to a `MetricsExporter` actor."""

    def __init__(self, campaign: str, name: str = "metrics-exporter"):
        self.actor = MetricsExporter.options(name=f"{name}-{campaign}",
                                             get_if_exists=True).remote(campaign)

    def log(self, values: Mapping[str, float], step: int) -> None:
        ray.get(self.actor.set.remote({**values, "iteration": float(step)}))

    def close(self) -> None:
        ray.kill(self.actor)
