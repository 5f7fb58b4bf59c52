"""`prefloop report RUN_DIR`: the Goodhart report of a run directory.

Writes `report.html` — one page that opens alone: its PNGs are embedded as base64 — and the
same PNGs beside it, into `--out` (default `RUN_DIR/report/`). It reads, and never writes:

    RUN_DIR/config.yaml     campaign.name; storage.db_url; monitors.length_corr_gap,
                            .format_density, .hedging_rate, .sycophancy_rate (threshold lines)
    RUN_DIR/metrics.jsonl   one JSON object per line ({"step": N, "time": …, key: value, …});
                            lines of one step merge, a later line's value wins (a resumed run
                            re-logs a step); a line that does not parse is skipped and named
        monitor/sqrt_kl       x of the Gao plot (else √monitor/kl, else √ppo/mean_kl)
        monitor/proxy_mean    proxy reward of the iteration's batch (else ppo/mean_reward)
        monitor/gold_mean     gold reward of the same batch
        monitor/<name>        every other monitor key: one trace panel
        monitor/alarm/<name>  1.0 fired, 0.0 evaluated and quiet: the alarm lane and markers
    the ledger              config's storage.db_url, else $PREFLOOP_DB_URL, else
                            RUN_DIR/ledger.sqlite (`storage.db.resolve_url`); read only
        RM versions: status, parent, snapshot (watermark, kinds, sha256), weight URI, metrics
            rm/fresh_accuracy, rm/fresh_accuracy_serving, rm/reference_accuracy, rm/train_pairs
        training-set sizes, policy versions, generations per policy version,
        preferences per labeler kind per time bucket

Whatever is missing is said on the page ("no data yet"), not raised. Every text from the run
(campaign name, labeler kinds, URIs, metric keys and values) is HTML-escaped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import make_url

from loop import report_plots as plots
from loop.report_html import render
from loop.run_dir import CONFIG_FILE
from storage.db import resolve_url
from storage.db import status as db_status
from storage.errors import UnknownId
from storage.ledger import Ledger
from storage.people import QuarantineRow
from storage.records import ModelVersion

PNG = {"gao": "gao_proxy_gold_vs_sqrt_kl.png", "rm": "rm_accuracy.png",
       "labels": "labels_by_source.png", "monitors": "monitors.png"}
SQRT_KL_KEYS = ("monitor/sqrt_kl",)
KL_KEYS = ("monitor/kl", "ppo/mean_kl")
PROXY_KEYS = ("monitor/proxy_mean", "ppo/mean_reward")
GOLD_KEYS = ("monitor/gold_mean",)
ALARM_PREFIX = "monitor/alarm/"
ALARM_STATISTIC = {"length": ("monitor/length_corr_gap", "length_corr_gap"),
                   "format": ("monitor/format_density", "format_density"),
                   "false_confidence": ("monitor/false_confidence", "hedging_rate"),
                   "sycophancy": ("monitor/sycophancy", "sycophancy_rate"),
                   "divergence": ("monitor/gold_slope", None)}
"""Alarm name -> (the trace its statistic is, the monitors.* threshold key; None: 0.0)."""
LABEL_BUCKETS_S = (3600, 60, 1)
MIN_LABEL_BUCKETS = 20


class ReportError(Exception):
    """A run directory the report cannot read; the message names it and what was expected."""


@dataclass(frozen=True)
class RunInfo:
    """What the report needs of a run directory's pinned config."""

    run_dir: Path
    campaign: str
    db_url: str
    thresholds: dict[str, float]


def read_run(run_dir: Path) -> RunInfo:
    """The campaign name, ledger URL and alarm thresholds of `run_dir` (`ReportError` if it is
    not a run directory)."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ReportError(f"{run_dir}: not a run directory (no {CONFIG_FILE} there)")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not readable YAML ({exc.__class__.__name__})") from exc
    campaign = cfg.get("campaign") if isinstance(cfg, dict) else None
    if not isinstance(campaign, dict) or not isinstance(campaign.get("name"), str):
        raise ReportError(f"{path}: no campaign.name; not a run directory's config")
    storage = cfg.get("storage") if isinstance(cfg.get("storage"), dict) else {}
    explicit = storage.get("db_url") if isinstance(storage.get("db_url"), str) else None
    monitors = cfg.get("monitors") if isinstance(cfg.get("monitors"), dict) else {}
    thresholds = {key: float(monitors[key]) for _, key in ALARM_STATISTIC.values()
                  if key is not None and _number(monitors.get(key)) is not None}
    return RunInfo(run_dir, campaign["name"], resolve_url(explicit, run_dir), thresholds)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# -- metrics.jsonl --------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricsLog:
    """metrics.jsonl merged per step.

    Attributes:
        steps: step -> {key: finite value} (nulls, strings and the "time" field dropped).
        bad_lines: 1-based numbers of the lines that did not parse as a metrics row.
        found: whether the file exists.
    """

    steps: dict[int, dict[str, float]] = field(default_factory=dict)
    bad_lines: tuple[int, ...] = ()
    found: bool = False


def read_metrics(path: Path) -> MetricsLog:
    """Read a metrics.jsonl leniently (a killed run may leave a cut last line)."""
    if not path.is_file():
        return MetricsLog()
    steps: dict[int, dict[str, float]] = {}
    bad: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad.append(number)
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                bad.append(number)
                continue
            merged = steps.setdefault(step, {})
            for key, value in row.items():
                if key not in ("step", "time") and _number(value) is not None:
                    merged[key] = float(value)
    return MetricsLog(dict(sorted(steps.items())), tuple(bad), True)


@dataclass(frozen=True)
class GaoPoints:
    """One point per step that has a KL and a proxy or gold reward (None where it has not)."""

    steps: tuple[int, ...]
    sqrt_kl: tuple[float, ...]
    proxy: tuple[float | None, ...]
    gold: tuple[float | None, ...]
    keys: dict[str, str]
    """role ("x", "proxy", "gold") -> the metric key that supplied it (first step's choice)."""


def _first(row: dict[str, float], keys: tuple[str, ...]) -> tuple[str, float] | None:
    return next(((k, row[k]) for k in keys if k in row), None)


def gao_points(log: MetricsLog) -> GaoPoints:
    """The Gao et al. (2022) points: (√KL, proxy, gold) per step, by step."""
    steps, xs, proxy, gold, keys = [], [], [], [], {}
    for step, row in log.steps.items():
        x = _first(row, SQRT_KL_KEYS)
        if x is None and (kl := _first(row, KL_KEYS)) is not None:
            x = (f"√{kl[0]}", math.sqrt(max(kl[1], 0.0)))
        p, g = _first(row, PROXY_KEYS), _first(row, GOLD_KEYS)
        if x is None or (p is None and g is None):
            continue
        for role, found in (("x", x), ("proxy", p), ("gold", g)):
            if found is not None:
                keys.setdefault(role, found[0])
        steps.append(step)
        xs.append(x[1])
        proxy.append(p[1] if p else None)
        gold.append(g[1] if g else None)
    return GaoPoints(tuple(steps), tuple(xs), tuple(proxy), tuple(gold), keys)


def monitor_traces(log: MetricsLog) -> dict[str, tuple[list[int], list[float]]]:
    """`monitor/…` key (alarms excluded) -> (steps, values), in `report_plots.trace_order`."""
    traces: dict[str, tuple[list[int], list[float]]] = {}
    for step, row in log.steps.items():
        for key, value in row.items():
            if key.startswith("monitor/") and not key.startswith(ALARM_PREFIX):
                steps, values = traces.setdefault(key, ([], []))
                steps.append(step)
                values.append(value)
    return {key: traces[key] for key in plots.trace_order(traces)}


def alarm_traces(log: MetricsLog) -> dict[str, tuple[list[int], list[int]]]:
    """Alarm name -> (steps where it was evaluated, steps where it fired), names sorted."""
    alarms: dict[str, tuple[list[int], list[int]]] = {}
    for step, row in log.steps.items():
        for key, value in row.items():
            if key.startswith(ALARM_PREFIX):
                evaluated, fired = alarms.setdefault(key[len(ALARM_PREFIX):], ([], []))
                evaluated.append(step)
                if value >= 0.5:
                    fired.append(step)
    return dict(sorted(alarms.items()))


# -- the ledger -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LedgerView:
    """What the report shows of the ledger; `note` says why it is empty when it is."""

    rm: list[ModelVersion] = field(default_factory=list)
    policy: list[ModelVersion] = field(default_factory=list)
    snapshot_rows: dict[int, int] = field(default_factory=dict)
    generations: dict[int, int] = field(default_factory=dict)
    label_buckets: list[tuple[datetime, str, int]] = field(default_factory=list)
    bucket_s: int = 0
    label_totals: dict[str, int] = field(default_factory=dict)
    by_labeler: dict[str, dict[str, int]] = field(default_factory=dict)
    """labeler kind -> labeler id -> effective (not superseded) preferences."""
    quarantines: list[QuarantineRow] = field(default_factory=list)
    note: str | None = None


def read_ledger(info: RunInfo) -> LedgerView:
    """Read the campaign's rows, or say why there are none (`ReportError` on an old schema)."""
    url = make_url(info.db_url)
    on_disk = url.drivername.startswith("sqlite") and url.database not in (None, "", ":memory:")
    if on_disk and not Path(url.database).is_file():
        return LedgerView(note=f"no ledger at {url.database}")
    state = db_status(info.db_url)
    if state["current"] is None:
        return LedgerView(note=f"the ledger {state['url']} has no schema yet")
    if not state["up_to_date"]:
        raise ReportError(f"ledger {state['url']}: schema revision {state['current']}, this "
                          f"prefloop reads {state['head']}; run `prefloop db upgrade --db-url "
                          "URL` first")
    ledger, name = Ledger(info.db_url), info.campaign
    try:
        ledger.get_campaign(name)
    except UnknownId:
        return LedgerView(note=f"the ledger {state['url']} holds no campaign {name!r}")
    buckets, bucket_s = [], 0
    for bucket_s in LABEL_BUCKETS_S:
        buckets = ledger.labels_by_kind(name, bucket_s)
        if len({b for b, _, _ in buckets}) >= MIN_LABEL_BUCKETS:
            break
    totals = dict(sorted(ledger.label_counts(name).items()))
    return LedgerView(rm=ledger.model_versions(name, "rm"),
                      policy=ledger.model_versions(name, "policy"),
                      snapshot_rows=ledger.preferences_per_rm_version(name),
                      generations=ledger.generations_per_policy_version(name),
                      label_buckets=buckets, bucket_s=bucket_s,
                      label_totals=totals,
                      by_labeler={k: ledger.label_counts_by_labeler(name, k) for k in totals},
                      quarantines=ledger.quarantines(name))


@dataclass(frozen=True)
class LabelSeries:
    """Cumulative labels per kind; times in seconds since the first bucket's start `t0`."""

    t0: datetime
    series: dict[str, tuple[list[float], list[int]]]


def label_series(buckets: list[tuple[datetime, str, int]], bucket_s: int) -> LabelSeries | None:
    """Each kind's cumulative count at the end of each of its buckets, from 0 at `t0`."""
    if not buckets:
        return None
    t0 = min(b for b, _, _ in buckets)
    series: dict[str, tuple[list[float], list[int]]] = {}
    for start, kind, n in sorted(buckets):
        secs, counts = series.setdefault(kind, ([0.0], [0]))
        secs.append((start - t0).total_seconds() + bucket_s)
        counts.append(counts[-1] + n)
    return LabelSeries(t0, dict(sorted(series.items())))


def time_unit(span_s: float) -> tuple[str, float]:
    """A unit that keeps `span_s` readable: (name, seconds)."""
    for name, size, below in (("s", 1.0, 180), ("min", 60.0, 3 * 3600),
                              ("h", 3600.0, 3 * 86_400)):
        if span_s < below:
            return name, size
    return "days", 86_400.0


# -- the page -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Page:
    """Everything one report shows."""

    info: RunInfo
    log: MetricsLog
    view: LedgerView
    gao: GaoPoints
    traces: dict[str, tuple[list[int], list[float]]]
    alarms: dict[str, tuple[list[int], list[int]]]


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write `report.html` and its PNGs for `run_dir` into `out` (default `run_dir/report`).

    Returns:
        The HTML file's path.

    Raises:
        ReportError: `run_dir` is not a run directory, or `out` is not a directory.
    """
    info = read_run(run_dir)
    out = out if out is not None else run_dir / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    log = read_metrics(run_dir / "metrics.jsonl")
    view = read_ledger(info)
    page = Page(info=info, log=log, view=view, gao=gao_points(log),
                traces=monitor_traces(log), alarms=alarm_traces(log))
    pngs = _draw(page, out)
    for name in set(PNG.values()) - set(pngs.values()):
        (out / name).unlink(missing_ok=True)  # a stale figure of an earlier report
    html = out / "report.html"
    tmp = html.with_suffix(".html.tmp")
    tmp.write_text(render(page, pngs, out, datetime.now(UTC)), encoding="utf-8")
    os.replace(tmp, html)
    return html


def _draw(page: Page, out: Path) -> dict[str, str]:
    """Draw every figure that has data; section -> PNG file name."""
    drawn: dict[str, str] = {}
    gao = page.gao
    if gao.steps:
        plots.gao_figure(out / PNG["gao"], gao.sqrt_kl, gao.proxy, gao.gold,
                         gao.keys.get("proxy", "-"), gao.keys.get("gold", "-"))
        drawn["gao"] = PNG["gao"]
    rm = page.view.rm
    accuracies = [[_number(m.metrics.get(k)) for m in rm] for k in
                  ("rm/fresh_accuracy", "rm/fresh_accuracy_serving", "rm/reference_accuracy")]
    if any(a is not None for series in accuracies for a in series):
        plots.rm_accuracy_figure(out / PNG["rm"], [m.version for m in rm],
                                 [m.status for m in rm], *accuracies)
        drawn["rm"] = PNG["rm"]
    labels = label_series(page.view.label_buckets, page.view.bucket_s)
    if labels is not None:
        span = max(s[-1] for s, _ in labels.series.values())
        unit, unit_s = time_unit(span)
        marks = [(m.created_at - labels.t0).total_seconds() for m in rm]
        plots.labels_figure(out / PNG["labels"], labels.series, unit, unit_s,
                            f"{labels.t0:%Y-%m-%d %H:%M:%S}", [s for s in marks if s >= 0])
        drawn["labels"] = PNG["labels"]
    if page.traces:
        fired_on: dict[str, list[int]] = {}
        thresholds: dict[str, float] = {}
        for name, (_, fired) in page.alarms.items():
            trace, threshold_key = ALARM_STATISTIC.get(name, (None, None))
            if trace in page.traces:
                fired_on[trace] = fired
                if threshold_key is None:
                    thresholds[trace] = 0.0
                elif threshold_key in page.info.thresholds:
                    thresholds[trace] = page.info.thresholds[threshold_key]
        plots.monitors_figure(out / PNG["monitors"], page.traces,
                              {k: plots.trace_title(k) for k in page.traces}, page.alarms, fired_on,
                              thresholds)
        drawn["monitors"] = PNG["monitors"]
    return drawn
