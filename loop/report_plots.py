"""The figures of the Goodhart report: matplotlib on the Agg canvas, constrained layout.

Each function draws one figure from plain numbers and writes it as a PNG; none reads a file or
the ledger (`loop.report` does that). Text that comes from data (metric keys, alarm names)
passes through `plain`, so a `$` in a key never starts mathtext. Series are told apart by
marker and line style as well as colour, so the plots read in grey scale too.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

DPI = 100
"""Pixels per inch of the PNGs: a 10-inch-wide figure is 1000 px, the page's column width."""
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
         "ytick.labelsize": 10, "legend.fontsize": 10, "figure.titlesize": 13,
         "axes.grid": True, "grid.alpha": 0.3}
PROXY, GOLD, ALARM, QUIET = "#1f77b4", "#d62728", "#d62728", "#9e9e9e"
KIND_STYLE = {"ai": ("#1f77b4", "-", "o"), "human": ("#2ca02c", "--", "s"),
              "gold": ("#ff7f0e", ":", "^")}
STATUS_STYLE = {"promoted": ("#2ca02c", "o"), "rejected": ("#d62728", "X"),
                "candidate": ("#7f7f7f", "D")}
MAX_MARKED_POINTS = 60
"""Above this many points a line carries no markers (they would merge into a smear)."""
PANEL_COLUMNS = 3
TITLE_CHARS = 26
"""Panel titles wrap at this many characters, so a long one never runs into its neighbour."""
MONITOR_PANELS = {
    "monitor/proxy_mean": ("proxy reward (batch mean)", "RM score"),
    "monitor/gold_mean": ("gold reward (batch mean)", "gold judge score"),
    "monitor/kl": ("KL to the reference", "nats"),
    "monitor/sqrt_kl": ("√KL to the reference", "√nats"),
    "monitor/proxy_slope": ("proxy trend (window)", "RM score / iteration"),
    "monitor/gold_slope": ("gold trend (window)", "gold score / iteration"),
    "monitor/length_mean": ("response length (mean)", "words"),
    "monitor/length_slope": ("length trend (window)", "words / iteration"),
    "monitor/length_corr_proxy": ("corr(length, proxy)", "Pearson r"),
    "monitor/length_corr_gold": ("corr(length, gold)", "Pearson r"),
    "monitor/length_corr_gap": ("corr gap (proxy − gold)", "Δ Pearson r"),
    "monitor/format_density": ("formatting density", "markers / 100 words"),
    "monitor/format_bullets": ("bullets", "markers / 100 words"),
    "monitor/format_numbered": ("numbered items", "markers / 100 words"),
    "monitor/format_bold": ("bold spans", "markers / 100 words"),
    "monitor/format_headings": ("headings", "markers / 100 words"),
    "monitor/false_confidence": ("confident when wrong", "fraction of wrong"),
    "monitor/unhedged_wrong": ("wrong and unhedged", "fraction of wrong"),
    "monitor/hedge_gap": ("hedged: wrong − right", "Δ fraction hedged"),
    "monitor/verifier_accuracy": ("verifier accuracy", "fraction correct"),
    "monitor/sycophancy": ("sycophancy (agree rate)", "fraction of probes"),
    "monitor/sycophancy_disagree": ("disagrees with the probe", "fraction of probes"),
    "monitor/sycophancy_probes": ("probe responses", "count"),
    "monitor/rm_fresh_accuracy": ("RM accuracy, fresh pairs", "fraction of pairs"),
    "monitor/ensemble_disagreement": ("RM ensemble disagreement", "std of member scores"),
}
"""Known monitor keys, in panel order: (panel title, y-axis label with its unit)."""


def trace_order(keys: Iterable[str]) -> list[str]:
    """Known monitor keys in `MONITOR_PANELS` order, then any others sorted."""
    keys = set(keys)
    return [k for k in MONITOR_PANELS if k in keys] + sorted(keys - MONITOR_PANELS.keys())


def trace_title(key: str) -> tuple[str, str]:
    """(panel title, y label) of a monitor key; an unknown key is titled by its name."""
    return MONITOR_PANELS.get(key, (key.removeprefix("monitor/"), "value"))


def plain(text: str) -> str:
    """`text` shown literally by matplotlib (no mathtext)."""
    return text.replace("$", r"\$")


@contextmanager
def _figure(width: float, height: float):
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig


def _save(fig: Figure, path: Path) -> None:
    with mpl.rc_context(STYLE):
        fig.savefig(path, format="png", dpi=DPI)


def _marker(n: int, marker: str) -> str:
    return marker if n <= MAX_MARKED_POINTS else ""


def _present(xs: Sequence[float], ys: Sequence[float | None]) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def gao_figure(path: Path, sqrt_kl: Sequence[float], proxy: Sequence[float | None],
               gold: Sequence[float | None], proxy_key: str, gold_key: str) -> None:
    """Proxy (left axis) and gold (right axis) reward against √KL, one point per iteration.

    The two rewards live on different scales (an RM's logits, the gold judge's score), so each
    has its own axis, coloured like its line.
    """
    with _figure(9.0, 5.2) as fig:
        ax = fig.add_subplot()
        handles = []
        xp, yp = _present(sqrt_kl, proxy)
        if xp:
            handles += ax.plot(xp, yp, linestyle="-", marker=_marker(len(xp), "o"), color=PROXY,
                               label=plain(f"proxy reward ({proxy_key})"))
        ax.set_ylabel("proxy reward (RM score)", color=PROXY)
        ax.tick_params(axis="y", colors=PROXY)
        xg, yg = _present(sqrt_kl, gold)
        if xg:
            twin = ax.twinx()
            twin.grid(False)
            handles += twin.plot(xg, yg, linestyle="--", marker=_marker(len(xg), "s"),
                                 color=GOLD, label=plain(f"gold reward ({gold_key})"))
            twin.set_ylabel("gold reward (gold judge score)", color=GOLD)
            twin.tick_params(axis="y", colors=GOLD)
        ax.set_xlabel("√KL(policy ‖ reference)   [√nats]")
        ax.set_xlim(left=0.0)
        ax.set_title("Proxy and gold reward against √KL (Gao et al. 2022)")
        fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
        _save(fig, path)


def rm_accuracy_figure(path: Path, versions: Sequence[int], statuses: Sequence[str],
                       fresh: Sequence[float | None], serving: Sequence[float | None],
                       reference: Sequence[float | None]) -> None:
    """Pair accuracy of each RM version: on its fresh held-out pairs (marker = gate verdict),
    the serving RM on the same pairs, and on the fixed reference set."""
    with _figure(9.0, 5.0) as fig:
        ax = fig.add_subplot()
        ax.axhline(0.5, color=QUIET, linestyle=":", linewidth=1.2)
        for status, (color, marker) in STATUS_STYLE.items():
            xs = [v - 0.08 for v, s, a in zip(versions, statuses, fresh, strict=True)
                  if s == status and a is not None]
            ys = [a for s, a in zip(statuses, fresh, strict=True) if s == status and a is not None]
            if xs:
                ax.plot(xs, ys, linestyle="none", marker=marker, markersize=10, color=color,
                        label=f"fresh pairs: {status}")
        xs, ys = _present([v - 0.08 for v in versions], serving)
        if xs:
            ax.plot(xs, ys, linestyle="none", marker="_", markersize=22, markeredgewidth=2.5,
                    color="black", label="serving RM on the same fresh pairs")
        xs, ys = _present([v + 0.12 for v in versions], reference)
        if xs:
            ax.plot(xs, ys, linestyle="none", marker="s", markersize=8, markerfacecolor="none",
                    markeredgewidth=1.8, color="#1f77b4", label="fixed reference pairs")
        ax.set_ylim(0.0, 1.02)
        ax.set_xlim(min(versions) - 0.6, max(versions) + 0.6)
        if len(versions) <= 12:
            ax.set_xticks(list(versions), [f"v{v}\n{plain(s)}" for v, s in
                                           zip(versions, statuses, strict=True)])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("RM version (and its promotion-gate status)")
        ax.set_ylabel("pair accuracy (fraction of pairs)")
        ax.set_title("RM accuracy on fresh pairs per RM version (dotted: chance, 0.5)")
        fig.legend(loc="outside lower center", ncols=2, frameon=False)
        _save(fig, path)


def labels_figure(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[int]]],
                  unit: str, unit_s: float, start: str, rm_marks: Sequence[float]) -> None:
    """Cumulative preference labels per labeler kind against time since the first label.

    Args:
        series: kind -> (seconds since the first label, cumulative count), ascending.
        unit, unit_s: the time unit's name and length in seconds.
        start: when the first label was recorded (UTC, as text).
        rm_marks: seconds since the first label at which RM versions were recorded.
    """
    with _figure(9.0, 5.0) as fig:
        ax = fig.add_subplot()
        for mark in rm_marks:
            ax.axvline(mark / unit_s, color=QUIET, linestyle="-.", linewidth=1.0)
        end = max(secs[-1] for secs, _ in series.values())
        handles = []
        for kind, (secs, counts) in series.items():
            color, style, marker = KIND_STYLE.get(kind, ("black", "-", "d"))
            marker = _marker(len(secs), marker)
            # a cumulative count is a step function: it holds until the next bucket ends
            ax.plot([s / unit_s for s in [*secs, end]], [*counts, counts[-1]], color=color,
                    linestyle=style, drawstyle="steps-post", linewidth=2)
            ax.plot([s / unit_s for s in secs[1:]], counts[1:], linestyle="none", color=color,
                    marker=marker)
            handles.append(Line2D([], [], color=color, linestyle=style, marker=marker,
                                  linewidth=2, label=plain(kind)))
        if rm_marks:
            handles.append(Line2D([], [], color=QUIET, linestyle="-.",
                                  label="an RM version was recorded"))
        ax.set_xlim(left=0.0)
        ax.set_ylim(bottom=0.0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"time since the first label [{unit}]   (first label {start} UTC)")
        ax.set_ylabel("preferences recorded (cumulative)")
        ax.set_title("Preference labels by source (labeler kind) over time")
        fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False)
        _save(fig, path)


def monitors_figure(path: Path, traces: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                    titles: Mapping[str, tuple[str, str]],
                    alarms: Mapping[str, tuple[Sequence[int], Sequence[int]]],
                    fired_on: Mapping[str, Sequence[int]],
                    thresholds: Mapping[str, float]) -> None:
    """An alarm lane over small multiples of the monitor traces.

    Args:
        traces: key -> (steps, values), in the panel order.
        titles: key -> (panel title, y-axis label with unit).
        alarms: alarm name -> (steps where it was evaluated, steps where it fired).
        fired_on: trace key -> steps where the alarm on that statistic fired (red markers).
        thresholds: trace key -> the alarm threshold (a dashed line).
    """
    keys = list(traces)
    rows = [keys[i:i + PANEL_COLUMNS] for i in range(0, len(keys), PANEL_COLUMNS)]
    mosaic = [row + ["."] * (PANEL_COLUMNS - len(row)) for row in rows]
    heights = [2.4] * len(rows)
    if alarms:
        mosaic.insert(0, ["\0alarms"] * PANEL_COLUMNS)
        heights.insert(0, 0.9 + 0.32 * len(alarms))
    with _figure(10.0, sum(heights) + 0.6) as fig:
        axes = fig.subplot_mosaic(mosaic, sharex=True, height_ratios=heights,
                                  empty_sentinel=".")
        if alarms:
            _alarm_lane(axes["\0alarms"], alarms)
        for key in keys:
            _trace_panel(axes[key], key, traces[key], titles[key], fired_on.get(key, ()),
                         thresholds.get(key))
        fig.supxlabel("iteration (metrics.jsonl step)")
        _save(fig, path)


def _alarm_lane(ax, alarms: Mapping[str, tuple[Sequence[int], Sequence[int]]]) -> None:
    names = list(alarms)
    for row, name in enumerate(names):
        evaluated, fired = alarms[name]
        quiet = [s for s in evaluated if s not in set(fired)]
        ax.plot(quiet, [row] * len(quiet), linestyle="none", marker="|", markersize=10,
                color=QUIET)
        ax.plot(fired, [row] * len(fired), linestyle="none", marker="v", markersize=10,
                color=ALARM)
    ax.set_yticks(range(len(names)), [plain(n) for n in names])
    ax.set_ylim(len(names) - 0.4, -0.6)  # the first name on top, as in the page's table
    ax.grid(False, axis="y")
    ax.set_title("Alarms: red ▼ fired, grey | evaluated and quiet")


def _trace_panel(ax, key: str, trace: tuple[Sequence[int], Sequence[float]],
                 title: tuple[str, str], fired: Sequence[int], threshold: float | None) -> None:
    steps, values = trace
    ax.plot(steps, values, linestyle="-", marker=_marker(len(steps), "o"), markersize=4,
            color="#333333")
    at = dict(zip(steps, values, strict=True))
    marked = [s for s in fired if s in at]
    if marked:
        ax.plot(marked, [at[s] for s in marked], linestyle="none", marker="v", markersize=9,
                color=ALARM)
    if threshold is not None and math.isfinite(threshold):
        ax.axhline(threshold, color=ALARM, linestyle="--", linewidth=1.0)
    ax.set_title(plain(textwrap.fill(title[0], TITLE_CHARS)))
    ax.set_ylabel(plain(textwrap.fill(title[1], TITLE_CHARS)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelbottom=True)
