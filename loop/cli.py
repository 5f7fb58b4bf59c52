"""The `prefloop` command line.

    prefloop run CONFIG [KEY=VALUE ...] [--resume RUN_DIR]
    prefloop check CONFIG [KEY=VALUE ...]
    prefloop label serve|import ...
    prefloop annotators add|revoke|list ...
    prefloop db upgrade|status
    prefloop report RUN_DIR

User mistakes print one `prefloop: error: …` message and exit 2; a capability that is not
built yet says so and exits 3. Neither prints a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import yaml

from loop.config_load import ConfigError, load_config

EXIT_USAGE = 2
EXIT_NOT_BUILT = 3

app = typer.Typer(
    name="prefloop",
    help="prefloop: an online preference loop for RLHF on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
label_app = typer.Typer(help="Human labeling: serve the label API and web page, import labels.",
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


def not_built(what: str) -> NoReturn:
    fail(f"{what} is not built yet in this version of prefloop", EXIT_NOT_BUILT)


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
) -> None:
    """Run a campaign (locally, or inside `ray job submit`)."""
    cfg = _load(config, overrides)
    from loop.campaign import run_campaign

    try:
        run_campaign(cfg, config_path=config, resume=resume)
    except ConfigError as exc:
        fail(str(exc))


@label_app.command("serve")
def label_serve() -> None:
    """Serve the human label API and web page."""
    not_built("the human label service (prefloop label serve)")


@label_app.command("import")
def label_import(path: Path) -> None:
    """Bulk-import human labels from a JSONL file."""
    not_built("bulk label import (prefloop label import)")


@annotators_app.command("add")
def annotators_add(name: str) -> None:
    """Create an annotator and print its bearer token once."""
    not_built("annotator management (prefloop annotators add)")


@annotators_app.command("revoke")
def annotators_revoke(name: str) -> None:
    """Revoke an annotator's token."""
    not_built("annotator management (prefloop annotators revoke)")


@annotators_app.command("list")
def annotators_list() -> None:
    """List annotators, their roles and whether they are revoked."""
    not_built("annotator management (prefloop annotators list)")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the ledger schema to the newest revision."""
    not_built("ledger migrations (prefloop db upgrade)")


@db_app.command("status")
def db_status() -> None:
    """Show the ledger's schema revision and row counts."""
    not_built("ledger status (prefloop db status)")


@app.command()
def report(run_dir: Path) -> None:
    """Write the Goodhart report (HTML + PNGs) of a run directory."""
    not_built("the Goodhart report (prefloop report)")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:], prog_name="prefloop")
