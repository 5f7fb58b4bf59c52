"""The Goodhart report's HTML: one page, no script, figures embedded as base64 PNGs.

Everything that comes from the run is text and goes through `esc`; only `Html` values (markup
built here) pass unescaped, so a campaign called `<script>…` shows as its name.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from loop.report import Page
    from storage.people import QuarantineRow
    from storage.records import ModelVersion

SECTIONS = {
    "gao": "Proxy and gold reward against √KL",
    "rm": "RM accuracy on fresh pairs per RM version",
    "labels": "Labels by source over time",
    "monitors": "Monitor traces and alarms",
    "provenance": "Provenance: reward-model and policy versions",
}
NO_DATA = "no data yet"
SHOWN_IN_COLUMNS = ("rm/train_pairs",)
MAX_LABELERS = 100
CSS = """
body { font-family: system-ui, sans-serif; font-size: 16px; line-height: 1.45; color: #222;
       max-width: 1060px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ccc; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .meta { color: #444; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.nw { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font-size: 0.95em; overflow-wrap: anywhere; }
.nodata { color: #8a5a00; font-style: italic; } .warn { color: #a00000; }
.promoted { color: #1b7a1b; font-weight: 600; } .rejected { color: #b00000; font-weight: 600; }
.scroll { overflow-x: auto; } .small { font-size: 0.88em; white-space: nowrap; }
"""


class Html(str):
    """Markup built by this module: passes `esc` unchanged."""


def esc(value: object) -> Html:
    """`value` as HTML text (markup escaped, quotes included), or an `Html` as it is."""
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def num(value: Any) -> str:
    """A metric value for a table: 4 significant digits for floats, JSON for the rest."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int | str) and not isinstance(value, bool):
        return str(value)
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:119] + "…"


def ranges(steps: Sequence[int]) -> str:
    """Ascending steps as runs: `[1, 2, 3, 5]` -> `"1–3, 5"`."""
    runs: list[list[int]] = []
    for step in steps:
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]],
          numeric: Iterable[int] = (), nowrap: Iterable[int] = ()) -> Html:
    """A table; cells are escaped unless `Html`; `numeric` columns align right, `nowrap`
    columns do not break lines."""
    kinds = {i: "num" for i in numeric} | {i: "nw" for i in nowrap}
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="{kinds[i]}">{esc(c)}</td>' if i in kinds else
                         f"<td>{esc(c)}</td>" for i, c in enumerate(row)) + "</tr>\n"
        for row in rows)
    return Html(f'<div class="scroll"><table><thead><tr>{head}</tr></thead>\n<tbody>\n{body}'
                "</tbody></table></div>")


def no_data(reason: str) -> Html:
    return Html(f'<p class="nodata">{esc(NO_DATA)}: {esc(reason)}</p>')


def figure(out: Path, name: str, alt: str, caption: Html) -> Html:
    """The PNG `out/name` embedded as base64, with a link to the file beside the page."""
    data = base64.b64encode((out / name).read_bytes()).decode("ascii")
    return Html(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
                f'<figcaption>{caption} (Also saved as <a href="{esc(name)}">{esc(name)}</a>.)'
                "</figcaption></figure>")


def section(key: str, *parts: Html) -> Html:
    return Html(f'<section id="{key}"><h2>{esc(SECTIONS[key])}</h2>\n' + "\n".join(parts)
                + "</section>")


def render(page: Page, pngs: Mapping[str, str], out: Path, now: datetime) -> str:
    """The whole page."""
    body = [_header(page, now), _gao(page, pngs, out), _rm(page, pngs, out),
            _labels(page, pngs, out), _monitors(page, pngs, out), _provenance(page)]
    title = esc(f"Goodhart report: {page.info.campaign}")
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{title}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _header(page: Page, now: datetime) -> Html:
    info, log, view = page.info, page.log, page.view
    steps = (f"{len(log.steps)} steps" if log.found else "no metrics.jsonl yet")
    rows = [("campaign", info.campaign), ("run directory", str(info.run_dir)),
            ("ledger", make_url(info.db_url).render_as_string(hide_password=True)),
            ("metrics", f"{info.run_dir / 'metrics.jsonl'}: {steps}"),
            ("written", f"{now:%Y-%m-%d %H:%M:%S} UTC")]
    meta = "".join(f"<tr><th scope=row>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    warnings = []
    if log.bad_lines:
        shown = ", ".join(str(n) for n in log.bad_lines[:10])
        more = f" and {len(log.bad_lines) - 10} more" if len(log.bad_lines) > 10 else ""
        warnings.append(f"metrics.jsonl: skipped {len(log.bad_lines)} line(s) that are not "
                        f"metrics rows: {shown}{more}")
    if view.note:
        warnings.append(f"ledger: {view.note}")
    warn = "".join(f'<p class="warn">{esc(w)}</p>' for w in warnings)
    return Html(f"<h1>{esc(f'Goodhart report: campaign {info.campaign}')}</h1>\n"
                f'<table class="meta">{meta}</table>{warn}')


def _gao(page: Page, pngs: Mapping[str, str], out: Path) -> Html:
    gao = page.gao
    if "gao" not in pngs:
        return section("gao", no_data(
            "metrics.jsonl has no step with a KL (monitor/sqrt_kl, monitor/kl or ppo/mean_kl) "
            "and a proxy or gold reward (monitor/proxy_mean or ppo/mean_reward, "
            "monitor/gold_mean)"))
    keys = ", ".join(f"{role}: {key}" for role, key in gao.keys.items())
    caption = esc(
        f"One point per iteration ({len(gao.steps)}; {keys}). Each iteration's proxy is scored "
        "by the RM serving then, so a refresh may shift its scale; gold is one fixed scale. "
        "Reward hacking shows as gold turning down while the proxy keeps rising.")
    parts = [figure(out, pngs["gao"], "proxy and gold reward against square-root KL", caption)]
    if all(g is None for g in gao.gold):
        parts.append(no_data("no gold reward logged (monitor/gold_mean); set labeling.gold"))
    rows = [(s, f"{x:.4g}", "—" if p is None else f"{p:.4g}", "—" if g is None else f"{g:.4g}")
            for s, x, p, g in zip(gao.steps, gao.sqrt_kl, gao.proxy, gao.gold, strict=True)]
    numbers = table(["step", "√KL", "proxy", "gold"], rows, numeric=(0, 1, 2, 3))
    parts.append(Html(f"<details><summary>The numbers</summary>{numbers}</details>"))
    return section("gao", *parts)


def _rm(page: Page, pngs: Mapping[str, str], out: Path) -> Html:
    if "rm" not in pngs:
        return section("rm", no_data(page.view.note or "no RM version has an accuracy metric "
                                     "(rm/fresh_accuracy, rm/reference_accuracy) yet"))
    caption = esc("Filled markers: the version's pair accuracy on fresh, current-policy pairs "
                  "held out of its training set (rm/fresh_accuracy); marker and colour give the "
                  "promotion gate's verdict. Bars: the serving RM on the same pairs "
                  "(rm/fresh_accuracy_serving). Hollow squares: the fixed reference set "
                  "(rm/reference_accuracy).")
    rows = [(f"v{m.version}", _status(m.status),
             *(num(m.metrics.get(k, "—")) for k in (
                 "rm/fresh_accuracy", "rm/fresh_accuracy_serving", "rm/reference_accuracy",
                 "rm/fresh_eval_pairs"))) for m in page.view.rm]
    return section("rm", figure(out, pngs["rm"], "RM pair accuracy per RM version", caption),
                   table(["RM", "status", "fresh accuracy", "serving RM, same pairs",
                          "reference accuracy", "fresh pairs"], rows, numeric=(2, 3, 4, 5)))


def _status(status: str) -> Html:
    known = status if status in ("promoted", "rejected") else "other"
    return Html(f'<span class="{known}">{esc(status)}</span>')


def _labels(page: Page, pngs: Mapping[str, str], out: Path) -> Html:
    view = page.view
    if "labels" not in pngs:
        return section("labels", no_data(view.note or "the ledger holds no preferences yet"))
    totals = table(["labeler kind", "preferences (corrections included)"],
                   list(view.label_totals.items()), numeric=(1,))
    caption = esc(f"Cumulative preference rows per labeler kind, counted in {view.bucket_s}-"
                  "second buckets of their ledger time; dash-dotted lines: an RM version was "
                  "recorded.")
    who = [(kind, labeler, n) for kind, counts in view.by_labeler.items()
           for labeler, n in counts.items()]
    shown = table(["labeler kind", "labeler", "effective preferences"], who[:MAX_LABELERS],
                  numeric=(2,))
    more = (Html(f'<p class="meta">… and {len(who) - MAX_LABELERS} more labelers</p>')
            if len(who) > MAX_LABELERS else Html(""))
    return section("labels", figure(out, pngs["labels"], "labels by source over time", caption),
                   totals, shown, more, _quarantines(view.quarantines))


def _quarantines(rows: Sequence[QuarantineRow]) -> Html:
    """Labelers left out of RM training (the annotator audit's verdicts), if any."""
    if not rows:
        return Html("")
    body = [(q.labeler_id, f"{q.created_at:%Y-%m-%d %H:%M:%S}", q.watermark, q.reason)
            for q in rows]
    return Html("<h3>Quarantined from RM training</h3>" + table(
        ["labeler", "since (UTC)", "after preference", "reason"], body, numeric=(2,),
        nowrap=(0, 1)))


def _monitors(page: Page, pngs: Mapping[str, str], out: Path) -> Html:
    if "monitors" not in pngs:
        return section("monitors", no_data("metrics.jsonl has no monitor/… keys yet"))
    thresholds = ", ".join(f"monitors.{k} = {v:g}" for k, v in page.info.thresholds.items())
    caption = esc("One panel per monitor/… key; red ▼: the alarm on that statistic fired "
                  "(monitor/alarm/<name> = 1); dashed red line: its threshold from config.yaml"
                  f" ({thresholds or 'none found'}; divergence: gold trend ≤ 0).")
    rows = [(name, ranges(fired) or "never", len(evaluated))
            for name, (evaluated, fired) in page.alarms.items()]
    alarms = (table(["alarm", "fired at steps", "steps evaluated"], rows, numeric=(2,))
              if rows else no_data("no monitor/alarm/… keys in metrics.jsonl"))
    return section("monitors", alarms, figure(out, pngs["monitors"], "monitor traces", caption))


def _provenance(page: Page) -> Html:
    view = page.view
    if not view.rm and not view.policy and not view.generations:
        return section("provenance", no_data(view.note or "no model versions recorded yet"))
    rm_rows = [_rm_row(m, view.snapshot_rows.get(m.version)) for m in view.rm]
    rm = (table(["RM", "status", "parent", "recorded (UTC)", "snapshot rows", "trained pairs",
                 "snapshot: watermark, labeler kinds, sha256", "weights", "metrics"],
                rm_rows, numeric=(4, 5), nowrap=(0, 1, 2, 3))
          if rm_rows else no_data("no RM versions yet"))
    policies = {m.version: m for m in view.policy}
    versions = sorted(set(policies) | set(view.generations))
    policy_rows = [_policy_row(v, policies.get(v), view.generations.get(v, 0))
                   for v in versions]
    policy = (table(["policy", "status", "parent", "recorded (UTC)", "generations", "metrics"],
                    policy_rows, numeric=(4,), nowrap=(0, 1, 2, 3))
              if policy_rows else no_data("no policy versions"))
    return section("provenance", Html("<h3>Reward models</h3>"), rm,
                   Html("<h3>Policies</h3>"), policy)


def _metrics_cell(metrics: Mapping[str, Any]) -> Html:
    """One `key = value` per line."""
    return Html('<span class="small">' + "<br>".join(
        esc(f"{k} = {num(v)}") for k, v in sorted(metrics.items()) if k not in SHOWN_IN_COLUMNS)
        + "</span>")


def _rm_row(m: ModelVersion, rows: int | None) -> list[object]:
    snap = m.snapshot
    snapshot = (Html(f"watermark {snap.watermark}<br>{esc(', '.join(snap.kinds))}<br>"
                     f'<code title="{esc(snap.sha256)}">{esc(snap.sha256[:12])}…</code>')
                if snap else "—")
    return [f"v{m.version}", _status(m.status), _version(m.parent_version),
            f"{m.created_at:%Y-%m-%d %H:%M}", "—" if rows is None else rows,
            num(m.metrics.get("rm/train_pairs", "—")), snapshot,
            Html(f"<code>{esc(m.weight_uri or '—')}</code>"), _metrics_cell(m.metrics)]


def _policy_row(version: int, m: ModelVersion | None, generations: int) -> list[object]:
    if m is None:
        why = "— (the initial policy)" if version == 0 else "— (no ledger row)"
        return [f"v{version}", "—", "—", why, generations, Html("")]
    return [f"v{version}", _status(m.status), _version(m.parent_version),
            f"{m.created_at:%Y-%m-%d %H:%M}", generations, _metrics_cell(m.metrics)]


def _version(version: int | None) -> str:
    return "—" if version is None else f"v{version}"
