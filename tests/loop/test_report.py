"""`prefloop report RUN_DIR`: the data it extracts (exact numbers), the page it writes from a
synthetic run directory (sections, provenance, escaping, PNGs), the page in real Chromium, and
the CLI's errors."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml
from PIL import Image

from actors.core.metrics import JsonlSink
from loop import report_plots
from loop.config_load import load_config
from loop.report import (
    PNG,
    LabelSeries,
    MetricsLog,
    alarm_traces,
    gao_points,
    label_series,
    monitor_traces,
    read_metrics,
    time_unit,
    write_report,
)
from loop.report_html import NO_DATA, SECTIONS, ranges
from loop.run_dir import prepare_run_dir
from storage.db import engine_for
from storage.ledger import Ledger
from storage.models import utcnow
from storage.records import NewComparison, NewGeneration, NewPreference

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CAMPAIGN = '<script>window.__pwned=1</script>"&co'
HUMAN = '<img src=x onerror="window.__pwned=2">'
ODD_ALARM = "<b>odd</b>"


def prefloop(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("PREFLOOP_DB_URL", None)
    return subprocess.run([sys.executable, "-m", "loop.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def body_rows(fragment: str) -> list[str]:
    """The body rows of the first table in `fragment`."""
    body = fragment[fragment.index("<tbody>"):fragment.index("</tbody>")]
    return re.findall(r"<tr>(.*?)</tr>", body, re.S)


# -- data extraction, by hand ---------------------------------------------------------------------

def test_read_metrics_merges_steps_later_lines_win_and_names_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "time": 5.0, "monitor/kl": 1.0, "monitor/gold_mean": None},
             {"step": 2, "monitor/kl": 2.0, "note": "text", "flag": True},
             {"step": 1, "monitor/kl": 1.5, "monitor/proxy_mean": 0.25},
             {"time": 9.0, "monitor/kl": 3.0},       # no step
             {"step": True, "monitor/kl": 3.0}]      # a bool is not a step
    text = "\n".join(json.dumps(x) for x in lines) + '\n\n[1, 2]\n{"step": 3, "monitor/k'
    path.write_text(text, encoding="utf-8")
    log = read_metrics(path)
    assert log.found
    assert log.steps == {1: {"monitor/kl": 1.5, "monitor/proxy_mean": 0.25},
                         2: {"monitor/kl": 2.0}}
    assert list(log.steps) == [1, 2]
    assert log.bad_lines == (4, 5, 7, 8)
    assert read_metrics(tmp_path / "missing.jsonl") == MetricsLog()


def test_gao_points_take_sqrt_kl_else_sqrt_of_kl_and_proxy_fallback():
    log = MetricsLog(steps={
        0: {"rm/train_pairs": 64.0},                                        # setup: no point
        1: {"monitor/sqrt_kl": 0.5, "monitor/kl": 9.0, "monitor/proxy_mean": 1.0,
            "ppo/mean_reward": 7.0, "monitor/gold_mean": 2.0},
        2: {"monitor/kl": 4.0, "ppo/mean_kl": 100.0, "ppo/mean_reward": 3.0},
        3: {"ppo/mean_kl": -0.01, "monitor/gold_mean": -1.5},               # KL estimate < 0
        4: {"monitor/sqrt_kl": 1.0},                                        # no reward
        5: {"monitor/proxy_mean": 1.0, "monitor/gold_mean": 1.0},           # no KL
    }, found=True)
    gao = gao_points(log)
    assert gao.steps == (1, 2, 3)
    assert gao.sqrt_kl == (0.5, 2.0, 0.0)
    assert gao.proxy == (1.0, 3.0, None)
    assert gao.gold == (2.0, None, -1.5)
    assert gao.keys == {"x": "monitor/sqrt_kl", "proxy": "monitor/proxy_mean",
                        "gold": "monitor/gold_mean"}
    assert gao_points(MetricsLog(steps={2: {"ppo/mean_kl": 2.25, "ppo/mean_reward": 1.0}})
                      ).keys == {"x": "√ppo/mean_kl", "proxy": "ppo/mean_reward"}


def test_monitor_traces_in_panel_order_and_alarms_per_name():
    log = MetricsLog(steps={
        1: {"monitor/zeta": 1.0, "monitor/gold_mean": 0.5, "monitor/proxy_mean": 0.1,
            "monitor/alarm/length": 0.0, "monitor/alarm/format": 1.0, "ppo/loss": 3.0},
        2: {"monitor/gold_mean": 0.25, "monitor/alarm/length": 1.0, "monitor/alarm/format": 1.0},
        4: {"monitor/alarm/length": 1.0, "monitor/alpha": 2.0},
    })
    assert monitor_traces(log) == {"monitor/proxy_mean": ([1], [0.1]),
                                   "monitor/gold_mean": ([1, 2], [0.5, 0.25]),
                                   "monitor/alpha": ([4], [2.0]),
                                   "monitor/zeta": ([1], [1.0])}
    assert list(monitor_traces(log)) == ["monitor/proxy_mean", "monitor/gold_mean",
                                         "monitor/alpha", "monitor/zeta"]
    assert alarm_traces(log) == {"format": ([1, 2], [1, 2]), "length": ([1, 2, 4], [2, 4])}
    assert ranges([1, 2, 3, 5, 7, 8]) == "1–3, 5, 7–8"
    assert ranges([]) == ""


def test_label_series_is_cumulative_at_each_bucket_end_from_zero():
    t0 = datetime(2025, 1, 1, 12, 0, 0)
    buckets = [(t0, "ai", 3), (t0, "human", 1), (t0 + timedelta(seconds=120), "ai", 2),
               (t0 + timedelta(seconds=300), "human", 4)]
    assert label_series(buckets, 60) == LabelSeries(t0, {
        "ai": ([0.0, 60.0, 180.0], [0, 3, 5]),
        "human": ([0.0, 60.0, 360.0], [0, 1, 5])})
    assert label_series([], 60) is None
    assert [time_unit(s) for s in (179, 180, 3 * 3600, 3 * 86_400)] == [
        ("s", 1.0), ("min", 60.0), ("h", 3600.0), ("days", 86_400.0)]


# -- a synthetic run directory --------------------------------------------------------------------

def build_run(run: Path) -> dict[str, str]:
    """A run dir: hand-written config.yaml, a ledger (4 ai + 2 human labels, RM v1 promoted,
    RM v2 rejected, policy v0 and v1) and 8 iterations of metrics; returns the snapshot hashes."""
    run.mkdir()
    config = {"campaign": {"name": CAMPAIGN}, "storage": {"db_url": None},
              "monitors": {"length_corr_gap": 0.3, "format_density": 5.0}}
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    ledger = Ledger.open(f"sqlite:///{run.resolve() / 'ledger.sqlite'}")
    ledger.ensure_campaign(CAMPAIGN)
    prompts = ledger.add_prompts(CAMPAIGN, [f"prompt {i}" for i in range(6)])
    gens = ledger.add_generations(CAMPAIGN, [NewGeneration(p, f"reply {i}.{k}", 2, 0, "w0", k)
                                             for i, p in enumerate(prompts) for k in range(2)])
    comps = ledger.add_comparisons(CAMPAIGN, [NewComparison(gens[2 * i], gens[2 * i + 1])
                                              for i in range(6)])
    start = utcnow() - timedelta(minutes=40)
    for i, c in enumerate(comps[:4]):
        ledger.record_preference(CAMPAIGN, NewPreference(c, "a", "ai", "judge-1"),
                                 now=start + timedelta(minutes=5 * i))
    first = ledger.snapshot(CAMPAIGN, kinds=("ai", "human"))
    ledger.record_model_version(CAMPAIGN, "rm", 1, snapshot=first.ref, weight_uri="/w/rm/v1",
                                metrics={"rm/train_pairs": 4.0, "rm/reference_accuracy": 0.625})
    ledger.set_model_status(CAMPAIGN, "rm", 1, "promoted")
    for i, c in enumerate(comps[4:]):
        ledger.record_preference(CAMPAIGN, NewPreference(c, "b", "human", HUMAN),
                                 now=start + timedelta(minutes=25 + 5 * i))
    second = ledger.snapshot(CAMPAIGN, kinds=("ai", "human"))
    ledger.record_model_version(CAMPAIGN, "rm", 2, snapshot=second.ref, parent_version=1,
                                weight_uri="/w/rm/v2<i>", metrics={
                                    "rm/train_pairs": 5.0, "rm/fresh_accuracy": 0.4,
                                    "rm/fresh_accuracy_serving": 0.7,
                                    "rm/reference_accuracy": 0.55})
    ledger.set_model_status(CAMPAIGN, "rm", 2, "rejected", reason="worse than v1")
    ledger.quarantine(CAMPAIGN, HUMAN, "annotator audit: <script>window.__pwned=3</script>",
                      {"scored": 120, "disagreed": 40})
    ledger.record_model_version(CAMPAIGN, "policy", 0)
    ledger.record_model_version(CAMPAIGN, "policy", 1, parent_version=0,
                                metrics={"rm_version": 1})
    sink = JsonlSink(run / "metrics.jsonl")
    sink.log({"rm/train_pairs": 4.0}, step=0)
    for s in range(1, 9):
        m = {"ppo/mean_kl": 0.5 * s, "monitor/kl": 0.5 * s, "monitor/sqrt_kl": math.sqrt(0.5 * s),
             "monitor/proxy_mean": 0.2 * s, "monitor/length_corr_gap": 0.1 * s,
             "monitor/format_density": 1.0 + 0.2 * s, "monitor/cost_$x$": 1.0,
             "monitor/alarm/length": float(0.1 * s > 0.3), "monitor/alarm/format": 0.0,
             f"monitor/alarm/{ODD_ALARM}": float(s == 8)}
        if s != 2:  # the gold judge skipped one iteration
            m["monitor/gold_mean"] = 1.0 - (s - 4) ** 2 * 0.05
        sink.log(m, step=s)
    sink.close()
    return {"v1": first.sha256, "v2": second.sha256}


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """The synthetic run, its report, and the arguments the Gao figure was drawn with."""
    run = tmp_path_factory.mktemp("report") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PREFLOOP_DB_URL", raising=False)
        hashes = build_run(run)
        drawn = []
        real = report_plots.gao_figure
        mp.setattr(report_plots, "gao_figure", lambda *a, **k: (drawn.append(a), real(*a, **k)))
        page = write_report(run)
    yield run, page, hashes, drawn
    engine_for(f"sqlite:///{run.resolve() / 'ledger.sqlite'}").dispose()


def test_report_has_every_section_and_embeds_every_png(reported):
    run, page, _, _ = reported
    assert page == run / "report" / "report.html"
    text = page.read_text(encoding="utf-8")
    for title in SECTIONS.values():
        assert f"<h2>{title}</h2>" in text
    assert NO_DATA not in text
    alarms = body_rows(text[text.index('<section id="monitors">'):])
    assert alarms == ['<td>&lt;b&gt;odd&lt;/b&gt;</td><td>8</td><td class="num">8</td>',
                      '<td>format</td><td>never</td><td class="num">8</td>',
                      '<td>length</td><td>3–8</td><td class="num">8</td>']
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == len(PNG) == 4
    for name, data in zip(PNG.values(), embedded, strict=True):  # in section order
        path = run / "report" / name
        assert base64.b64decode(data) == path.read_bytes()
        assert f'href="{name}"' in text
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 800 and image.height >= 450, (name, image.size)


def test_gao_figure_gets_one_point_per_iteration_and_gold_where_logged(reported):
    (call,) = reported[3]
    _, sqrt_kl, proxy, gold, proxy_key, gold_key = call
    assert list(sqrt_kl) == pytest.approx([math.sqrt(0.5 * s) for s in range(1, 9)], rel=1e-12)
    assert list(proxy) == pytest.approx([0.2 * s for s in range(1, 9)], rel=1e-12)
    assert [g is None for g in gold] == [s == 2 for s in range(1, 9)]
    assert (proxy_key, gold_key) == ("monitor/proxy_mean", "monitor/gold_mean")
    assert "One point per iteration (8;" in reported[1].read_text(encoding="utf-8")


def test_provenance_rows_carry_status_parent_sizes_and_hash_prefixes(reported):
    _, page, hashes, _ = reported
    text = page.read_text(encoding="utf-8")
    provenance = text[text.index('<section id="provenance">'):]
    rows = body_rows(provenance[:provenance.index("<h3>Policies")])
    assert len(rows) == 2
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in rows]
    assert [c[0] for c in cells] == ["v1", "v2"]
    assert [c[1] for c in cells] == ['<span class="promoted">promoted</span>',
                                     '<span class="rejected">rejected</span>']
    for c, version in zip(cells, ("v1", "v2"), strict=True):
        sha = hashes[version]
        assert c[6].endswith(f'<code title="{sha}">{sha[:12]}…</code>')
    assert [c[2] for c in cells] == ["—", "v1"]                       # parent
    assert [(c[4], c[5]) for c in cells] == [("4", "4"), ("6", "5")]  # snapshot rows, trained
    assert "watermark 4" in cells[0][6] and "watermark 6" in cells[1][6]
    assert cells[1][7] == "<code>/w/rm/v2&lt;i&gt;</code>"
    assert "rm/fresh_accuracy = 0.4<br>" in cells[1][8]
    policy = body_rows(provenance[provenance.index("<h3>Policies"):])
    assert [re.findall(r"<td[^>]*>(.*?)</td>", r)[4] for r in policy] == ["12", "0"]


def test_the_labels_section_lists_quarantined_labelers(reported):
    text = reported[1].read_text(encoding="utf-8")
    labels = text[text.index('<section id="labels">'):text.index('<section id="monitors">')]
    quarantined = labels[labels.index("<h3>Quarantined from RM training</h3>"):]
    [row] = body_rows(quarantined)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[0] == "&lt;img src=x onerror=&quot;window.__pwned=2&quot;&gt;"
    assert cells[2:] == ["6", "annotator audit: &lt;script&gt;window.__pwned=3&lt;/script&gt;"]


def test_text_from_the_run_is_escaped(reported):
    text = reported[1].read_text(encoding="utf-8")
    assert "<script>" not in text and "<img src=x" not in text and "<b>odd" not in text
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;&quot;&amp;co" in text
    assert "&lt;img src=x onerror=&quot;window.__pwned=2&quot;&gt;" in text
    assert "<td>&lt;b&gt;odd&lt;/b&gt;</td>" in text  # the alarm table


def test_report_opens_in_chromium_with_every_plot_loaded_and_no_script_run(reported, browser,
                                                                           tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(reported[1].resolve().as_uri(), wait_until="load", timeout=60_000)
        page.wait_for_function("Array.from(document.images).every(i => i.complete)",
                               timeout=60_000)
        images = page.evaluate("Array.from(document.images).map(i => "
                               "[i.complete, i.naturalWidth, i.naturalHeight])")
        pwned = page.evaluate("window.__pwned === undefined")
        title = page.title()
        page.screenshot(path=tmp_path / "report.png", full_page=True)
    finally:
        page.close()
    assert len(images) == 4
    assert all(done and w >= 800 and h >= 450 for done, w, h in images), images
    assert pwned is True
    assert title == f"Goodhart report: {CAMPAIGN}"
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.width == 1200 and shot.height > 3000


# -- empty and wrong run directories --------------------------------------------------------------

def test_a_run_without_metrics_or_labels_says_no_data_yet(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFLOOP_DB_URL", raising=False)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"campaign.run_dir={tmp_path / 'run'}"])
    run = prepare_run_dir(cfg, None)
    url = f"sqlite:///{run.resolve() / 'ledger.sqlite'}"
    Ledger.open(url).ensure_campaign("tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / PNG["gao"]).write_bytes(b"a figure of an earlier report")
    page = write_report(run, out)
    engine_for(url).dispose()
    text = page.read_text(encoding="utf-8")
    sections = re.findall(r'<section id="(\w+)">(.*?)</section>', text, re.S)
    assert [key for key, _ in sections] == list(SECTIONS)
    for _, body in sections:
        assert f'<p class="nodata">{NO_DATA}: ' in body
    assert "no metrics.jsonl yet" in text
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]  # the stale PNG is gone


def test_a_run_whose_ledger_is_missing_still_renders(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFLOOP_DB_URL", raising=False)
    (tmp_path / "config.yaml").write_text("campaign: {name: c1}\n", encoding="utf-8")
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert f'<p class="warn">ledger: no ledger at {tmp_path.resolve() / "ledger.sqlite"}</p>' \
        in text
    assert text.count(f'<p class="nodata">{NO_DATA}: ') == 5
    assert not (tmp_path / "ledger.sqlite").exists()  # the report never creates one


def test_cli_refuses_a_directory_that_is_not_a_run(tmp_path):
    result = prefloop("report", str(tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (f"prefloop: error: {tmp_path}: not a run directory "
                             "(no config.yaml there)\n")
    missing = prefloop("report", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr == f"prefloop: error: {tmp_path / 'nope'}: no such directory\n"
    (tmp_path / "config.yaml").write_text("model: x\n", encoding="utf-8")
    no_name = prefloop("report", str(tmp_path))
    assert no_name.returncode == 2
    assert no_name.stderr == (f"prefloop: error: {tmp_path / 'config.yaml'}: no campaign.name; "
                              "not a run directory's config\n")


def test_cli_writes_the_report_where_told(reported, tmp_path):
    run = reported[0]
    result = prefloop("report", str(run), "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'r' / 'report.html'}\n"
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(
        [*PNG.values(), "report.html"])
