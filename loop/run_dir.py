"""The run directory of a campaign: where its resolved config, metrics, checkpoints and (by
default) its SQLite ledger and weight store live."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from loop.config import Config
from loop.config_load import ConfigError

CONFIG_FILE = "config.yaml"
EXTENDABLE = {"campaign.iterations"}  # a resumed campaign may run longer (or stop sooner)


def resolve_run_dir(cfg: Config) -> Path:
    """`campaign.run_dir`, else $PREFLOOP_RUN_DIR, else `runs/<campaign.name>`."""
    if cfg.campaign.run_dir:
        return Path(cfg.campaign.run_dir)
    if os.environ.get("PREFLOOP_RUN_DIR"):
        return Path(os.environ["PREFLOOP_RUN_DIR"])
    return Path("runs") / cfg.campaign.name


def prepare_run_dir(cfg: Config, resume: Path | None) -> Path:
    """Create (or, with `resume`, reopen) the run directory and pin its resolved config.

    A resumed campaign must run the config it started with: any difference is an error that
    names the keys, so a resubmitted job never silently changes course — except
    `campaign.iterations`, which extends (or shortens) the campaign and is re-pinned.
    """
    run_dir = resume if resume is not None else resolve_run_dir(cfg)
    saved_path = run_dir / CONFIG_FILE
    resolved = cfg.model_dump(mode="json")
    if resume is not None:
        if not saved_path.is_file():
            raise ConfigError(f"--resume {run_dir}: no {CONFIG_FILE} there; not a run directory")
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
        changed = sorted(_diff_keys(saved, resolved) - EXTENDABLE)
        if changed:
            raise ConfigError(f"--resume {run_dir}: the config differs from the one the campaign "
                              f"started with at: {', '.join(changed)}")
        if saved != resolved:
            _pin(saved_path, resolved)
        return run_dir
    if saved_path.exists():
        raise ConfigError(f"{run_dir} already holds a campaign: continue it with --resume "
                          f"{run_dir}, or pick another campaign.name or campaign.run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    _pin(saved_path, resolved)
    return run_dir


def _pin(path: Path, resolved: dict) -> None:
    """Write the resolved config atomically (write, then rename)."""
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def _diff_keys(a: object, b: object, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return set().union(*(_diff_keys(a.get(k), b.get(k), f"{prefix}{k}.") for k in keys))
    return set() if a == b else {prefix.rstrip(".")}
