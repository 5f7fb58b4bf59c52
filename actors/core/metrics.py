"""One metrics path: a sink protocol and the sinks that implement it.

Keys carry a stage prefix (`rollout/ label/ rm/ ppo/ monitor/ timing/`), so the same number
reads the same in the JSONL log, TensorBoard and the Ray dashboard.

>>> import io, json
>>> buf = io.StringIO()
>>> sink = JsonlSink(buf)
>>> sink.log({"ppo/approx_kl": 0.01, "timing/rollout": 1.5}, step=3)
>>> json.loads(buf.getvalue())["ppo/approx_kl"]
0.01
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

PREFIXES = ("rollout/", "label/", "rm/", "ppo/", "monitor/", "timing/")


class MetricKeyError(ValueError):
    """A metric key without one of the known stage prefixes."""


def check_keys(metrics: Mapping[str, float]) -> None:
    """Raise `MetricKeyError` naming every key that lacks a known prefix or is not a number."""
    bad = [key for key in metrics if not key.startswith(PREFIXES)]
    if bad:
        raise MetricKeyError(
            f"metric keys {bad} must start with one of {', '.join(PREFIXES)}")
    not_numbers = [k for k, v in metrics.items()
                   if isinstance(v, bool) or not isinstance(v, int | float)]
    if not_numbers:
        raise MetricKeyError(f"metric values of {not_numbers} must be numbers")


@runtime_checkable
class MetricSink(Protocol):
    """Anything that takes a dict of prefixed scalar metrics at an iteration."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per `log` call: `{"step": N, "time": unix_s, key: value, ...}`.

    Each line is flushed as it is written, so a killed run loses at most the line in flight, and
    NaN/inf are written as null (JSON has no NaN) so every line parses with any JSON reader.
    """

    def __init__(self, target: str | Path | IO[str]):
        self._owned = not hasattr(target, "write")
        if self._owned:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = open(target, "a", encoding="utf-8") if self._owned else target  # noqa: SIM115

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        check_keys(metrics)
        row = {"step": int(step), "time": time.time()}
        row.update({k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()})
        self._fh.write(json.dumps(row, sort_keys=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._owned:
            self._fh.close()


class MultiSink:
    """Fans one `log` call out to several sinks, in order."""

    def __init__(self, sinks: Sequence[MetricSink]):
        self.sinks = list(sinks)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        check_keys(metrics)
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_jsonl(path: str | Path) -> list[dict[str, float | None]]:
    """Read back a metrics.jsonl file (for reports and tests)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
