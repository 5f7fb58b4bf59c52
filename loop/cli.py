"""The `prefloop` command line.

    prefloop run CONFIG [KEY=VALUE ...] [--resume RUN_DIR | --auto-resume]
    prefloop check CONFIG [KEY=VALUE ...]
    prefloop label serve|import|export ...
    prefloop annotators add|revoke|list|audit ...
    prefloop db upgrade|status
    prefloop report RUN_DIR [--out DIR]

User mistakes print one `prefloop: error: …` message and exit 2; a capability that is not
built yet says so and exits 3. Neither prints a traceback.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import yaml

from loop.config import AuditConfig
from loop.config_load import ConfigError, load_config

EXIT_USAGE = 2
AUDIT_DEFAULTS = AuditConfig()

app = typer.Typer(
    name="prefloop",
    help="prefloop: an online preference loop for RLHF on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
label_app = typer.Typer(help="Human labeling: serve the label API and web page, import and "
                        "export labels.",
                        no_args_is_help=True)
annotators_app = typer.Typer(help="Manage annotators and their bearer tokens.",
                             no_args_is_help=True)
db_app = typer.Typer(help="Ledger database schema (Alembic).", no_args_is_help=True)
app.add_typer(label_app, name="label")
app.add_typer(annotators_app, name="annotators")
app.add_typer(db_app, name="db")

ConfigArg = Annotated[Path, typer.Argument(help="Campaign YAML file, e.g. configs/demo.yaml.")]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides KEY=VALUE, e.g. ppo.kl.target=6.0 rm.zero_stage=3."),
]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one error message for a person and exit without a traceback."""
    typer.echo(f"prefloop: error: {message}", err=True)
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        fail(str(exc))


@app.command()
def check(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Validate a campaign config with its overrides and print the resolved YAML."""
    cfg = _load(config, overrides)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), nl=False)


@app.command()
def run(
    config: ConfigArg,
    overrides: OverridesArg = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the campaign in this run directory.")
    ] = None,
    auto_resume: Annotated[bool, typer.Option(
        "--auto-resume", help="Continue the campaign in the config's run directory if it holds "
        "one, else start it there: a resubmitted job with the same command continues.")] = False,
) -> None:
    """Run a campaign (locally, or inside `ray job submit`)."""
    cfg = _load(config, overrides)
    if auto_resume:
        resume = _auto_resume_dir(cfg, resume)
    from loop.campaign import run_campaign
    from loop.placement import PlacementError

    try:
        with _storage_errors():
            run_campaign(cfg, config_path=config, resume=resume)
    except (ConfigError, PlacementError) as exc:
        fail(str(exc))


def _auto_resume_dir(cfg, resume: Path | None) -> Path | None:
    """The run directory `--auto-resume` continues (None: start the campaign), said aloud."""
    from loop.run_dir import auto_resume_dir, resolve_run_dir

    if resume is not None:
        fail("pass --resume RUN_DIR or --auto-resume, not both")
    try:
        found = auto_resume_dir(cfg)
    except ConfigError as exc:
        fail(str(exc))
    typer.echo("prefloop: --auto-resume: " + (
        f"continuing the campaign in {found}" if found is not None
        else f"no campaign in {resolve_run_dir(cfg)} yet: starting one"), err=True)
    return found


CampaignOpt = Annotated[str | None, typer.Option(
    "--campaign", help="Campaign name (default: campaign.name in the --run-dir's config.yaml).")]


@contextmanager
def _label_errors():
    """Label-file and bind refusals are one-line messages, like storage refusals."""
    from actors.label_app import UnsafeBind
    from loop.label_io import LabelFileError

    with _storage_errors():
        try:
            yield
        except (LabelFileError, UnsafeBind) as exc:
            fail(str(exc))


@label_app.command("serve")
def label_serve(
    db_url: DbUrlOpt = None,
    run_dir: RunDirOpt = None,
    campaign: CampaignOpt = None,
    host: Annotated[str, typer.Option(
        help="Interface to bind; non-loopback needs a live annotator token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    allow_host: Annotated[list[str] | None, typer.Option(
        help="Host-header name to serve besides loopback and --host (repeatable).")] = None,
    allow_origin: Annotated[list[str] | None, typer.Option(
        help="Extra allowed Origin, e.g. https://label.example.org (repeatable).")] = None,
) -> None:
    """Serve the human label API and web page (uvicorn, until Ctrl-C)."""
    import uvicorn

    from actors.label_app import LabelSettings, create_app
    from loop import label_io

    with _label_errors():
        name = label_io.campaign_name(campaign, run_dir)
        try:
            settings = LabelSettings(host=host, port=port, allowed_hosts=tuple(allow_host or ()),
                                     allowed_origins=tuple(allow_origin or ()))
        except ValueError as exc:
            fail(str(exc))
        app = create_app(_open_ledger(db_url, run_dir), name, settings)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"serving campaign {name!r} at http://{shown}:{port}/ (Ctrl-C stops)", err=True)
    if host in ("0.0.0.0", "::") and not allow_host:
        typer.echo("note: only loopback Host names are served; pass --allow-host NAME for the "
                   "name annotators type into their browser", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False,
                server_header=False, lifespan="off")


@label_app.command("import")
def label_import(
    path: Annotated[Path, typer.Argument(help="JSONL file, one label per line.")],
    skip_bad: Annotated[bool, typer.Option(
        help="Import the good lines of a file that has bad ones.")] = False,
    db_url: DbUrlOpt = None,
    run_dir: RunDirOpt = None,
    campaign: CampaignOpt = None,
) -> None:
    """Bulk-import human labels from a JSONL file (every line is checked first)."""
    from loop import label_io

    with _label_errors():
        name = label_io.campaign_name(campaign, run_dir)
        if not path.is_file():
            fail(f"{path}: no such file")
        ledger = _open_ledger(db_url, run_dir)
        parsed = label_io.read_labels(path, ledger.max_text_chars)
        if label_io.ensure_campaign(ledger, name):
            typer.echo(f"campaign {name!r} did not exist in this ledger: created it", err=True)
        try:
            done = label_io.import_labels(ledger, name, parsed, skip_bad)
        except label_io.ImportRefused as refused:
            _report_bad(path, refused.bad, "error")
            fail(f"{path}: {len(refused.bad)} bad line(s) of {len(parsed.lines) + len(parsed.bad)}"
                 "; nothing imported (fix them, or pass --skip-bad to import the rest)")
    _report_bad(path, done.skipped, "warning")
    skipped = f"; skipped {len(done.skipped)} bad line(s)" if done.skipped else ""
    typer.echo(f"imported {done.created + done.existing} label(s) into campaign {name!r}: "
               f"{done.created} new, {done.existing} already in the ledger{skipped}")


def _report_bad(path: Path, bad: list, level: str) -> None:
    from loop.label_io import MAX_REPORTED

    for line in sorted(bad, key=lambda b: b.number)[:MAX_REPORTED]:
        typer.echo(f"prefloop: {level}: {path}:{line.number}: {line.problem}", err=True)
    if len(bad) > MAX_REPORTED:
        typer.echo(f"prefloop: {level}: {path}: ... and {len(bad) - MAX_REPORTED} more", err=True)


@label_app.command("export")
def label_export(
    out: Annotated[Path | None, typer.Option(help="Write here (default: stdout).")] = None,
    kind: Annotated[list[str] | None, typer.Option(
        help="Labeler kinds to export: human, ai, gold (repeatable; default human).")] = None,
    db_url: DbUrlOpt = None,
    run_dir: RunDirOpt = None,
    campaign: CampaignOpt = None,
) -> None:
    """Export the campaign's effective preferences as JSONL, with provenance."""
    from loop import label_io

    with _label_errors():
        name = label_io.campaign_name(campaign, run_dir)
        ledger = _open_ledger(db_url, run_dir)
        kinds = kind or ["human"]
        if out is None:
            count = label_io.export_labels(ledger, name, kinds, sys.stdout)
        else:
            count = label_io.export_to_file(ledger, name, kinds, out)
    where = "" if out is None else f" to {out}"
    typer.echo(f"exported {count} preference(s) of campaign {name!r} ({', '.join(kinds)})"
               f"{where}", err=True)


DbUrlOpt = Annotated[str | None, typer.Option(
    "--db-url", help="Ledger URL (default: $PREFLOOP_DB_URL, else the run dir's SQLite file).")]
RunDirOpt = Annotated[Path | None, typer.Option(
    "--run-dir", help="Run directory whose ledger.sqlite to use.")]


def _ledger_url(db_url: str | None, run_dir: Path | None) -> str:
    from storage.db import DB_URL_ENV, resolve_url

    if db_url is None and run_dir is None and not os.environ.get(DB_URL_ENV):
        fail(f"which ledger? pass --db-url URL or --run-dir DIR, or set {DB_URL_ENV}")
    if run_dir is not None and db_url is None and not run_dir.is_dir():
        fail(f"--run-dir {run_dir}: no such directory")
    return resolve_url(db_url, run_dir or Path("."))


@contextmanager
def _storage_errors():
    """Storage refusals (bad input, unknown names, migrations) are messages, not tracebacks."""
    from sqlalchemy.exc import SQLAlchemyError

    from storage.errors import StorageError

    try:
        yield
    except StorageError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"database error: {exc.__class__.__name__}: {getattr(exc, 'orig', exc)}")


def _open_ledger(db_url: str | None, run_dir: Path | None):
    from storage.ledger import Ledger

    return Ledger.open(_ledger_url(db_url, run_dir))


@annotators_app.command("add")
def annotators_add(
    name: str,
    role: Annotated[str, typer.Option(help="annotator or admin")] = "annotator",
    db_url: DbUrlOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Create an annotator and print its bearer token (shown this once, stored hashed)."""
    with _storage_errors():
        token = _open_ledger(db_url, run_dir).add_annotator(name, role)
    typer.echo(f"annotator {name!r} ({role}) created; its token, shown only now:", err=True)
    typer.echo(token)


@annotators_app.command("revoke")
def annotators_revoke(name: str, db_url: DbUrlOpt = None, run_dir: RunDirOpt = None) -> None:
    """Revoke an annotator's token (the annotator's labels stay in the ledger)."""
    with _storage_errors():
        annotator = _open_ledger(db_url, run_dir).revoke_annotator(name)
    typer.echo(f"annotator {annotator.name!r} revoked at {annotator.revoked_at:%Y-%m-%d %H:%M:%S}")


@annotators_app.command("list")
def annotators_list(db_url: DbUrlOpt = None, run_dir: RunDirOpt = None) -> None:
    """List annotators, their roles and whether they are revoked."""
    with _storage_errors():
        people = _open_ledger(db_url, run_dir).list_annotators()
    for a in people:
        state = f"revoked {a.revoked_at:%Y-%m-%d %H:%M}" if a.revoked_at else "active"
        typer.echo(f"{a.name}\t{a.role}\t{state}\tcreated {a.created_at:%Y-%m-%d %H:%M}")
    if not people:
        typer.echo("no annotators", err=True)


@annotators_app.command("audit")
def annotators_audit(
    apply: Annotated[bool, typer.Option(
        help="Quarantine the flagged annotators (default: a dry run that writes nothing).")
    ] = False,
    alpha: Annotated[float, typer.Option(help="Family-wise rate of quarantining an honest "
                                         "annotator.")] = AUDIT_DEFAULTS.alpha,
    margin: Annotated[float, typer.Option(help="Disagreement above the others' pooled rate "
                                          "tolerated as honest.")] = AUDIT_DEFAULTS.margin,
    min_scored: Annotated[int, typer.Option(help="Fewest scored labels before anyone is "
                                            "quarantined.")] = AUDIT_DEFAULTS.min_scored,
    db_url: DbUrlOpt = None,
    run_dir: RunDirOpt = None,
    campaign: CampaignOpt = None,
) -> None:
    """Find human annotators who disagree with the other labelers of the same comparisons far
    more than honest noise explains; with --apply, quarantine them from RM training."""
    from pydantic import ValidationError

    from loop import label_io
    from loop.audit import audit_campaign

    try:
        cfg = AuditConfig(alpha=alpha, margin=margin, min_scored=min_scored)
    except ValidationError as exc:
        fail("; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}"
                       for e in exc.errors()))
    with _label_errors(), _storage_errors():
        name = label_io.campaign_name(campaign, run_dir)
        outcome = audit_campaign(_open_ledger(db_url, run_dir), name, cfg, apply)
    typer.echo("annotator\tlabels\tscored\tdisagreed\trate\tothers_rate\tp_value\tverdict")
    for a in outcome.audits:
        verdict = ("quarantined" if a.labeler_id in outcome.quarantined
                   else "flagged" if a.quarantine else "ok")
        typer.echo(f"{a.labeler_id}\t{a.labels}\t{a.scored}\t{a.disagreed}\t{a.rate:.4f}\t"
                   f"{a.pool_rate:.4f}\t{a.p_value:.3g}\t{verdict}")
    for q in outcome.earlier:
        typer.echo(f"{q.labeler_id}\t-\t-\t-\t-\t-\t-\tquarantined earlier")
    flagged = [a.labeler_id for a in outcome.flagged]
    done = (f"quarantined {', '.join(outcome.quarantined)}" if outcome.quarantined
            else f"dry run: pass --apply to quarantine {', '.join(flagged)}" if flagged
            else "nobody flagged")
    typer.echo(f"audited {outcome.labels} human label(s) of {len(outcome.audits)} annotator(s) "
               f"of campaign {name!r} at preference {outcome.watermark}: {done}", err=True)


@db_app.command("upgrade")
def db_upgrade(db_url: DbUrlOpt = None, run_dir: RunDirOpt = None) -> None:
    """Create or migrate the ledger schema to the newest revision."""
    from storage.db import upgrade

    url = _ledger_url(db_url, run_dir)
    with _storage_errors():
        revision = upgrade(url)
    typer.echo(f"ledger schema at revision {revision}")


@db_app.command("status")
def db_status(db_url: DbUrlOpt = None, run_dir: RunDirOpt = None) -> None:
    """Show the ledger's schema revision and row counts (changes nothing)."""
    from storage.db import status

    with _storage_errors():
        info = status(_ledger_url(db_url, run_dir))
    state = "up to date" if info["up_to_date"] else "needs `prefloop db upgrade`"
    typer.echo(f"{info['backend']} {info['url']}")
    typer.echo(f"revision {info['current']} (head {info['head']}): {state}")
    for table, count in info["tables"].items():
        typer.echo(f"  {table:<20} {count:>10}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a campaign (its config.yaml, "
                                            "metrics.jsonl and ledger).")],
    out: Annotated[Path | None, typer.Option(
        help="Write report.html and its PNGs here (default: RUN_DIR/report).")] = None,
) -> None:
    """Write the Goodhart report (HTML + PNGs) of a run directory."""
    from loop.report import ReportError, write_report

    with _storage_errors():
        try:
            page = write_report(run_dir, out)
        except ReportError as exc:
            fail(str(exc))
    typer.echo(str(page))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="prefloop")
